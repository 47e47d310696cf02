"""BEV evaluation: per-component vehicle IoU, and :func:`evaluate` (separation + IoU in one pass).

Both are :class:`lmdfx.metrics.Metric` accumulators fed by :func:`lmdfx.metrics.accumulate`, so a
new metric is one more class with ``update`` / ``merge`` / ``result``. Ground truth comes from
the dataset items: ``vehicle_gt`` (> 0 is a vehicle) and, optionally, ``valid_mask``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

from lmdfx.bev.iou import vehicle_iou
from lmdfx.errors import LMDError
from lmdfx.metrics import (PerturbationResult, Sample, Separation, accumulate, dataset_size, format_number,
                           partner_offsets, select)

__all__ = ["HEAD", "GT_KEY", "VALID_KEY", "ComponentIoU", "component_iou", "Evaluation", "evaluate"]

#: The BEV models' segmentation logits.
HEAD = "segmentation"
#: Dataset item key of the vehicle ground truth.
GT_KEY = "vehicle_gt"
#: Dataset item key of the cells that count (optional in an item).
VALID_KEY = "valid_mask"


class ComponentIoU:
    """Metric: vehicle IoU of each component alone (``logit > 0``) and of the full model.

    Intersections and unions are summed over the samples before dividing; ``result()`` returns
    the metric itself. ``names``: the modalities, ``"bias"`` and ``"full"``.
    """

    def __init__(self, modalities: Sequence[str], head: Any = HEAD, gt_key: str = GT_KEY,
                 valid_key: Optional[str] = VALID_KEY):
        self.names = (*modalities, "bias", "full")
        self.head, self.gt_key, self.valid_key = head, gt_key, valid_key
        self.intersection = torch.zeros(len(self.names), dtype=torch.float64)
        self.union = torch.zeros(len(self.names), dtype=torch.float64)

    def update(self, sample: Sample) -> None:
        """Count each component's and the output's hits against the sample's ground truth."""
        item = sample.item
        if not isinstance(item, Mapping) or self.gt_key not in item:
            have = sorted(item) if isinstance(item, Mapping) else type(item).__name__
            raise LMDError(f"component IoU needs ground truth {self.gt_key!r} in each dataset item; item "
                           f"{sample.index} has {have}. Pass gt_key= or iou=False.")
        ref = sample.reference
        maps = [*select(ref.components, self.head), select(ref.output, self.head)]
        gt = item[self.gt_key].to(maps[-1].device)
        valid = item.get(self.valid_key) if self.valid_key else None
        try:
            target = gt.expand(maps[-1].shape)
        except RuntimeError:
            raise LMDError(f"ground truth {self.gt_key!r} of shape {tuple(gt.shape)} does not fit head {self.head!r} "
                           f"of shape {tuple(maps[-1].shape)}; measure the BEV logits head (--head, head=) or skip "
                           "the IoU (--no-iou, iou=False).") from None
        for c, logits in enumerate(maps):
            inter, union, _ = vehicle_iou(logits.detach(), target, None if valid is None else valid.to(logits.device))
            self.intersection[c] += inter
            self.union[c] += union

    def merge(self, all_reduce: Callable[[Sequence[torch.Tensor]], None]) -> None:
        """Sum the counts over the ranks."""
        all_reduce([self.intersection, self.union])

    def result(self) -> "ComponentIoU":
        """This metric (its counts are the result)."""
        return self

    @property
    def iou(self) -> dict[str, float]:
        """name -> intersection / union (1.0 when the union is empty)."""
        return {n: float(i / u) if u > 0 else 1.0 for n, i, u in zip(self.names, self.intersection, self.union)}

    def table(self, digits: int = 1) -> str:
        """Markdown table of IoU (in %) per component and for the full model."""
        head = "| | " + " | ".join(self.names) + " |"
        rule = "|---|" + "---|" * len(self.names)
        row = "| vehicle IoU (%) | " + " | ".join(format_number(100 * v, digits) for v in self.iou.values()) + " |"
        return "\n".join([head, rule, row])

    def to_dict(self) -> dict:
        """JSON-ready summary."""
        return {"names": list(self.names), "iou": self.iou, "intersection": self.intersection.tolist(),
                "union": self.union.tolist()}


@dataclass
class Evaluation:
    """What :func:`evaluate` computed: separation scores and/or per-component IoU."""

    separation: Optional[PerturbationResult] = None
    iou: Optional[ComponentIoU] = None
    samples: int = 0

    def to_dict(self) -> dict:
        """JSON-ready summary."""
        return {"samples": self.samples,
                "separation": None if self.separation is None else self.separation.to_dict(),
                "component_iou": None if self.iou is None else self.iou.to_dict()}

    def markdown(self) -> str:
        """The separation table and the IoU table as markdown sections."""
        parts = []
        if self.separation is not None:
            parts += ["## Separation (perturbation protocol, appendix D.2)", "", self.separation.table(), ""]
        if self.iou is not None:
            parts += ["## Per-component vehicle IoU", "", self.iou.table(), "",
                      "Each component alone thresholded at logit 0 against the ground truth, cells outside "
                      "the valid mask ignored; intersections and unions summed over the samples.", ""]
        return "\n".join(parts)


def evaluate(
    dec: Any,
    dataset: Any,
    shift: int = 500,
    repeats: int = 12,
    offsets: Optional[Sequence[int]] = None,
    head: Any = HEAD,
    to_inputs: Optional[Callable[[Any], Mapping[str, Any]]] = None,
    batched: Optional[bool] = None,
    separation: bool = True,
    iou: bool = True,
    gt_key: str = GT_KEY,
    valid_key: Optional[str] = VALID_KEY,
    progress: bool = False,
    on_reference: Optional[Callable[[int, Any, Any], None]] = None,
) -> Evaluation:
    """One pass over ``dataset``: the separation protocol and/or :class:`ComponentIoU`.

    The reference call of each sample serves both; ``on_reference(k, item, decomposition)`` is
    called with it (on this rank's samples), e.g. to keep maps for figures. The other arguments
    are those of :func:`lmdfx.metrics.perturbation_matrix` and :func:`component_iou`.
    """
    n = dataset_size(dataset)
    metrics: dict[str, Any] = {}
    if separation:
        metrics["separation"] = Separation(dec, n, partner_offsets(shift, repeats, offsets), head)
    if iou:
        metrics["iou"] = ComponentIoU(tuple(getattr(dec, "modalities", ())), head, gt_key, valid_key)
    results = accumulate(dec, dataset, list(metrics.values()), to_inputs, batched, progress, on_reference)
    return Evaluation(samples=n, **dict(zip(metrics, results)))


def component_iou(
    dec: Any,
    dataset: Any,
    head: Any = HEAD,
    to_inputs: Optional[Callable[[Any], Mapping[str, Any]]] = None,
    batched: Optional[bool] = None,
    gt_key: str = GT_KEY,
    valid_key: Optional[str] = VALID_KEY,
    progress: bool = False,
) -> ComponentIoU:
    """Vehicle IoU of each component alone and of the full model over ``dataset``.

    A component "predicts" where its logits are > 0. Ground truth ``item[gt_key]`` (> 0 is a
    vehicle) and, when present, ``item[valid_key]`` (cells where it is 0 are ignored) come from the
    raw dataset item; intersections and unions are summed over the samples before dividing.
    """
    return evaluate(dec, dataset, head=head, to_inputs=to_inputs, batched=batched, separation=False, iou=True,
                    gt_key=gt_key, valid_key=valid_key, progress=progress).iou
