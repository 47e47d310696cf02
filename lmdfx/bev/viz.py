"""Figures of a decomposition (matplotlib, Agg, PNG); every plotting function returns the file path.

- :func:`component_maps`: per-component BEV maps as in the paper's figures 3-4, a sigmoid view and
  a signed view (diverging colormap symmetric around 0), beside the camera images, the ground truth
  and the prediction.
- :func:`layer_energy`: each component's share of Σ_k ||D_k||² at every recorded layer.
- :func:`modality_gradcam` / :func:`gradcam_figure`: Modality-GradCAM (appendix E.3): Grad-CAM on
  one modality's component of an intermediate layer, gradients taken through the decomposition.

matplotlib is imported inside the functions, so ``import lmdfx.bev.viz`` stays cheap.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from lmdfx.bev.evaluation import HEAD
from lmdfx.errors import LMDError
from lmdfx.metrics import select

__all__ = ["require_matplotlib", "component_maps", "layer_energy", "layer_shares", "modality_gradcam",
           "gradcam_figure"]


def require_matplotlib() -> None:
    """Raise an :class:`LMDError` naming the extra to install when matplotlib is missing."""
    # matplotlib is only in the "viz" extra; say so before any work instead of failing mid-way
    if importlib.util.find_spec("matplotlib") is None:
        raise LMDError('drawing figures needs matplotlib, which is not installed; install it with '
                       'pip install "lmdfx[viz]".')


def _figure(width: float, height: float):
    require_matplotlib()
    # a bare Figure renders with the Agg canvas and leaves pyplot's global state alone
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _save(fig: Any, path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise LMDError(f"figures are written as PNG; give a path ending in .png, got {str(path)!r}.")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def _bev(t: torch.Tensor, sample: int) -> torch.Tensor:
    """A [Z, X] map from [B, 1, Z, X] / [B, Z, X] / [Z, X] tensors."""
    t = t.detach().float().cpu()
    if t.dim() == 4:
        t = t[sample, 0]
    elif t.dim() == 3:
        t = t[sample]
    if t.dim() != 2:
        raise LMDError(f"expected a BEV map [B, 1, Z, X], [B, Z, X] or [Z, X], got shape {tuple(t.shape)}.")
    return t


def _contour(ax: Any, gt: Optional[torch.Tensor], colour: str = "k") -> None:
    if gt is not None and float(gt.max()) > 0 and float(gt.min()) < 1:
        ax.contour(gt.numpy(), levels=[0.5], colors=colour, linewidths=0.7, origin="lower")


def _mosaic(images: torch.Tensor, sample: int) -> torch.Tensor:
    """Camera images [B, S, 3, H, W] (or [S, 3, H, W]) in [-0.5, 0.5] -> one RGB mosaic, 2 rows."""
    images = images.detach().float().cpu()
    if images.dim() == 5:
        images = images[sample]
    if images.dim() != 4 or images.shape[1] != 3:
        raise LMDError(f"images must be [B, S, 3, H, W] or [S, 3, H, W], got {tuple(images.shape)}.")
    s, _, h, w = images.shape
    cols = (s + 1) // 2
    canvas = torch.ones(2 * h + 2, cols * w + 2 * (cols - 1), 3)
    for i in range(s):
        r, c = divmod(i, cols)
        top, left = r * (h + 2), c * (w + 2)
        canvas[top:top + h, left:left + w] = (images[i].permute(1, 2, 0) + 0.5).clamp(0, 1)
    return canvas


def component_maps(
    res: Any,
    path: str | os.PathLike,
    head: Any = HEAD,
    sample: int = 0,
    gt: Optional[torch.Tensor] = None,
    images: Optional[torch.Tensor] = None,
    title: Optional[str] = None,
) -> Path:
    """Per-component BEV maps of one output head, as in the paper's figures 3 and 4.

    ``res`` is a :class:`lmdfx.Decomposition`. Row 1: the camera images (``images``, optional),
    ground truth (``gt``, optional) and the prediction sigmoid(output). Row 2: sigmoid of each
    component's logits (only positive evidence stays bright). Row 3: the signed logits on a
    diverging colormap symmetric around 0 with one scale for all components (red supports,
    blue suppresses). Ground-truth outlines are drawn on the component maps. Z (forward) points up.
    """
    stack = select(res.components, head)
    names = list(res.names)
    comps = [_bev(stack[k], sample) for k in range(len(names))]
    pred = torch.sigmoid(_bev(select(res.output, head), sample))
    gt_map = _bev(gt, sample) if gt is not None else None
    n = len(names)
    cols = n + 1
    fig = _figure(3.0 * cols, 8.6)
    grid = fig.add_gridspec(3, cols)
    top = fig.add_subplot(grid[0, : cols - 2]) if images is not None else None
    if top is not None:
        top.imshow(_mosaic(images, sample).numpy())
        top.set_title("camera images")
        top.axis("off")
    ax = fig.add_subplot(grid[0, cols - 2])
    if gt_map is not None:
        ax.imshow(gt_map.numpy(), origin="lower", cmap="gray", vmin=0, vmax=1)
    ax.set_title("ground truth" if gt_map is not None else "(no ground truth)")
    ax.axis("off")
    ax = fig.add_subplot(grid[0, cols - 1])
    ax.imshow(pred.numpy(), origin="lower", cmap="magma", vmin=0, vmax=1)
    _contour(ax, gt_map, "w")
    ax.set_title("prediction sigmoid(output)")
    ax.axis("off")
    vmax = max(float(c.abs().max()) for c in comps) or 1.0
    for k, (name, comp) in enumerate(zip(names, comps)):
        ax = fig.add_subplot(grid[1, k])
        im_sig = ax.imshow(torch.sigmoid(comp).numpy(), origin="lower", cmap="magma", vmin=0, vmax=1)
        _contour(ax, gt_map, "w")
        ax.set_title(f"{name}: sigmoid")
        ax.axis("off")
        ax = fig.add_subplot(grid[2, k])
        im_signed = ax.imshow(comp.numpy(), origin="lower", cmap="RdBu_r", vmin=-vmax, vmax=vmax)
        _contour(ax, gt_map)
        ax.set_title(f"{name}: signed logits")
        ax.axis("off")
    for row, image, label in ((1, im_sig, "sigmoid"), (2, im_signed, "logit contribution")):
        holder = fig.add_subplot(grid[row, n])
        holder.axis("off")
        fig.colorbar(image, cax=holder.inset_axes([0.0, 0.05, 0.1, 0.9])).set_label(label)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def layer_shares(res: Any, mixed_only: bool = True) -> tuple[list[str], torch.Tensor]:
    """(layer names, shares [L, M+1]): each component's share of Σ_k ||D_k||² per recorded layer.

    ``mixed_only`` keeps layers where at least two components carry energy (after the fusion);
    layers that belong to one modality entirely (encoders) are skipped. Batches are pooled.
    """
    if not res.layers:
        raise LMDError("the decomposition recorded no layers; compile with record='all' (or a list of layers).")
    names, shares = [], []
    for layer, stack in res.layers.items():
        if not isinstance(stack, torch.Tensor) or stack.dim() < 1 or stack.shape[0] != len(res.names):
            continue
        energy = stack.detach().double().reshape(stack.shape[0], -1).pow(2).sum(1)
        total = float(energy.sum())
        if total <= 0 or (mixed_only and int((energy > 0).sum()) < 2):
            continue
        names.append(layer)
        shares.append(energy / total)
    if not names:
        raise LMDError("no recorded layer carries the energy of two components; record layers after the fusion "
                       "(record='all') or pass mixed_only=False.")
    return names, torch.stack(shares).float()


def layer_energy(res: Any, path: str | os.PathLike, mixed_only: bool = True, title: Optional[str] = None) -> Path:
    """Stacked plot of each component's share of Σ_k ||D_k||² along the recorded layers (in order).

    Use a decomposer compiled with ``record="all"``; see :func:`layer_shares` for ``mixed_only``.
    """
    layers, shares = layer_shares(res, mixed_only)
    import numpy as np

    n = len(layers)
    fig = _figure(max(8.0, 0.12 * n + 3), 4.8)
    ax = fig.add_subplot()
    x = np.arange(n)
    ax.stackplot(x, shares.T.numpy(), labels=list(res.names), step="mid", alpha=0.9)
    ax.set_xlim(-0.5, n - 0.5)
    ax.set_ylim(0, 1)
    ax.set_ylabel("share of Σ‖D_k‖²")
    step = max(1, n // 24)
    ax.set_xticks(x[::step])
    ax.set_xticklabels([layers[i] for i in range(0, n, step)], rotation=75, fontsize=6)
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title(title or "component energy per layer")
    return _save(fig, path)


def modality_gradcam(
    dec: Any,
    inputs: dict[str, Any],
    layer: str,
    modality: str,
    region: Optional[torch.Tensor] = None,
    head: Any = HEAD,
    operating_point: Any = None,
) -> torch.Tensor:
    """Modality-GradCAM (paper appendix E.3, eq. 18-19) of ``modality`` at recorded ``layer``: [B, H, W].

    The score y is the sum of the decomposed output logits (``head``) over ``region`` (a 0/1 map
    broadcastable to the head, default: the cells the model predicts, logit > 0, or all cells when
    it predicts none). A^k is channel k of the modality's component at ``layer`` — in the
    linearised model the activation with every other modality at zero minus the all-zero one
    (eq. 18). α_k is the spatial mean of ∂y/∂A^k, computed by autograd through the decomposer at
    the frozen operating point of ``inputs``; the map is ReLU(Σ_k α_k A^k). ``dec`` must record
    ``layer`` (``lmdfx.compile(..., record=[layer])`` or ``"all"``); the layer must be [B, C, H, W].
    """
    if modality not in dec.names[:-1]:
        raise LMDError(f"no modality {modality!r}; the modalities are {', '.join(dec.names[:-1])}.")
    index = dec.names.index(modality)
    if operating_point is None:
        with torch.no_grad():
            operating_point = dec.operating_point(**inputs)
    with torch.enable_grad():
        res = dec(**inputs, operating_point=operating_point)
        if layer not in res.layers:
            shown = ", ".join(list(res.layers)[:8]) or "none"
            raise LMDError(f"layer {layer!r} is not recorded (recorded: {shown}); compile with "
                           f"record=[{layer!r}] or record='all'.")
        stack = res.layers[layer]
        if stack.dim() != 5:
            raise LMDError(f"Modality-GradCAM needs a conv layer [B, C, H, W]; {layer!r} has component shape "
                           f"{tuple(stack.shape[1:])}.")
        logits = select(res.components, head).sum(0)
        if region is None:
            region = (select(res.output, head) > 0).to(logits.dtype)
            if float(region.sum()) == 0:
                region = torch.ones_like(logits)
        score = (logits * torch.as_tensor(region, dtype=logits.dtype, device=logits.device)).sum()
        if not stack.requires_grad or not score.requires_grad:
            raise LMDError(f"autograd does not reach layer {layer!r} from the output; make sure the model's "
                           "parameters/inputs are not all detached by the caller and no torch.no_grad is active "
                           "inside the model.")
        (grad,) = torch.autograd.grad(score, stack, allow_unused=True)
    if grad is None:
        raise LMDError(f"the output does not depend on layer {layer!r}; pick a layer between the fusion and the head.")
    component = stack[index].detach()
    alpha = grad[index].mean(dim=(-2, -1), keepdim=True)  # [B, C, 1, 1]
    return torch.relu((alpha * component).sum(1))


def gradcam_figure(
    dec: Any,
    inputs: dict[str, Any],
    layer: str,
    path: str | os.PathLike,
    region: Optional[torch.Tensor] = None,
    head: Any = HEAD,
    gt: Optional[torch.Tensor] = None,
    sample: int = 0,
    modalities: Optional[Sequence[str]] = None,
) -> Path:
    """Modality-GradCAM of every modality (or ``modalities``) at ``layer``, up-sampled to the output grid."""
    import torch.nn.functional as F

    with torch.no_grad():
        op = dec.operating_point(**inputs)
        out = select(dec(**inputs, operating_point=op).output, head)
    names = list(modalities or dec.names[:-1])
    size = out.shape[-2:]
    cams = []
    for name in names:
        cam = modality_gradcam(dec, inputs, layer, name, region, head, op)
        cams.append(F.interpolate(cam[:, None].float(), size=size, mode="bilinear", align_corners=False)[sample, 0])
    gt_map = _bev(gt, sample) if gt is not None else None
    fig = _figure(3.2 * (len(names) + 1), 3.6)
    ax = fig.add_subplot(1, len(names) + 1, 1)
    ax.imshow(torch.sigmoid(_bev(out, sample)).numpy(), origin="lower", cmap="magma", vmin=0, vmax=1)
    _contour(ax, gt_map, "w")
    ax.set_title("prediction")
    ax.axis("off")
    for k, (name, cam) in enumerate(zip(names, cams)):
        ax = fig.add_subplot(1, len(names) + 1, k + 2)
        im = ax.imshow(cam.cpu().numpy(), origin="lower", cmap="inferno", vmin=0, vmax=float(cam.max()) or 1.0)
        _contour(ax, gt_map, "c")
        ax.set_title(f"{name}-GradCAM @ {layer}", fontsize=9)
        ax.axis("off")
        fig.colorbar(im, ax=ax, fraction=0.046)
    return _save(fig, path)
