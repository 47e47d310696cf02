"""Vehicle IoU as SimpleBEV computes it: threshold logits at 0, count only valid cells."""

from __future__ import annotations

import torch

from lmdfx.errors import LMDError

__all__ = ["vehicle_iou", "VehicleIoU"]


def _counts(logits: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor | None) -> tuple[float, float]:
    if logits.shape != gt.shape:
        raise LMDError(f"logits {tuple(logits.shape)} and gt {tuple(gt.shape)} must have the same shape.")
    pred = (logits > 0).to(torch.float64)  # sigmoid(logit) > 0.5
    tgt = (gt > 0).to(torch.float64)
    v = torch.ones_like(pred) if valid is None else (valid > 0).to(torch.float64).expand_as(pred)
    inter = (pred * tgt * v).sum().item()
    union = ((pred + tgt).clamp(0, 1) * v).sum().item()
    return inter, union


def vehicle_iou(
    logits: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor | None = None
) -> tuple[float, float, float]:
    """(intersection, union, IoU) of ``logits > 0`` against ``gt``, counting cells where valid.

    IoU is 1.0 when the union is empty (nothing predicted, nothing to find).
    """
    inter, union = _counts(logits, gt, valid)
    return inter, union, inter / union if union > 0 else 1.0


class VehicleIoU:
    """Sums intersection and union over a split; :meth:`compute` gives the split IoU."""

    def __init__(self) -> None:
        self.intersection = 0.0
        self.union = 0.0

    def update(self, logits: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor | None = None) -> float:
        """Add one batch; returns that batch's IoU."""
        inter, union = _counts(logits.detach(), gt, valid)
        self.intersection += inter
        self.union += union
        return inter / union if union > 0 else 1.0

    def compute(self) -> float:
        """Split IoU = total intersection / total union (1.0 when the union is empty)."""
        return self.intersection / self.union if self.union > 0 else 1.0

    def reset(self) -> None:
        self.intersection = 0.0
        self.union = 0.0
