"""Figures of a decomposition (matplotlib, Agg, PNG); every plotting function returns the file path.

- :func:`component_maps`: per-component BEV maps as in the paper's figures 3-4: signed logits on
  one symmetric diverging scale, beside the camera images, the ground truth and the prediction;
  optionally one component's sigmoid view.
- :func:`layer_energy`: each component's share of Σ_k ||D_k||² at every recorded layer, in
  network order.
- :func:`modality_gradcam` / :func:`gradcam_figure`: Modality-GradCAM (appendix E.3): Grad-CAM on
  one modality's component of an intermediate layer, gradients taken through the decomposition.

BEV maps [Z, X] are drawn with row 0 (Z = min) at the bottom: X points right and Z forward in the
reference camera's frame, as in :func:`lmdfx.bev.models.simplebev.lifting_grids`.
matplotlib is imported inside the functions, so ``import lmdfx.bev.viz`` stays cheap.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from lmdfx.bev.evaluation import HEAD
from lmdfx.bev.files import atomic_open
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
    with atomic_open(path, "wb") as handle:  # an interrupted run leaves no truncated PNG
        fig.savefig(handle, format="png")
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


#: Marker and colour of a vehicle seen by one sensor only, per sensor (others cycle through the rest).
_SENSOR_STYLE = {"camera": ("^", "#3ddc3d"), "radar": ("s", "#ffd21f"), "lidar": ("D", "#ff66ff")}
_SPARE_STYLES = (("o", "#00e5ff"), ("P", "#ff9933"), ("X", "#ffffff"))


def _outline_style() -> dict:
    """Black line with a white halo: visible on dark and light maps alike."""
    from matplotlib import patheffects

    return dict(colors="k", linewidths=1.0, path_effects=[patheffects.withStroke(linewidth=2.4, foreground="w")])


def _contour(ax: Any, gt: Optional[torch.Tensor]) -> None:
    if gt is not None and float(gt.max()) > 0 and float(gt.min()) < 1:
        ax.contour(gt.numpy(), levels=[0.5], origin="lower", **_outline_style())


def _bev_panel(ax: Any, title: str, oriented: bool = False) -> None:
    """Title a BEV panel; ``oriented`` labels its axes with the grid's directions."""
    ax.set_title(title, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    if oriented:
        ax.set_xlabel("X → right", fontsize=9)
        ax.set_ylabel("Z → forward", fontsize=9)


def _sensor_style(sensor: str, order: list[str]) -> tuple[str, str]:
    """(marker, colour) of a sensor; ``order`` lists every sensor drawn, for the spare styles."""
    if sensor in _SENSOR_STYLE:
        return _SENSOR_STYLE[sensor]
    return _SPARE_STYLES[order.index(sensor) % len(_SPARE_STYLES)]


def _mark_single_sensor(ax: Any, vehicles: Sequence[tuple[str, Any]]) -> None:
    """A marker just forward of every vehicle seen by one sensor, styled by the sensor."""
    order = sorted({sensor for sensor, _ in vehicles})
    limits = ax.get_xlim(), ax.get_ylim()
    for sensor, footprint in vehicles:
        rows, cols = torch.as_tensor(footprint).nonzero(as_tuple=True)
        if len(rows):
            marker, colour = _sensor_style(sensor, order)
            # beside the footprint, not on it: the cells under the vehicle stay readable
            ax.scatter([float(cols.float().mean())], [float(rows.max()) + 1.6], marker=marker, s=50,
                       facecolors=colour, edgecolors="k", linewidths=0.9, zorder=3, clip_on=False)
    # a marker beyond the map's edge (a vehicle in the last row) is drawn there, but must not widen the axes
    ax.set_xlim(*limits[0])
    ax.set_ylim(*limits[1])


def _legend_handles(gt: bool, vehicles: Sequence[tuple[str, Any]]) -> list:
    from matplotlib.lines import Line2D

    handles = []
    if gt:
        handles.append(Line2D([], [], color="k", lw=1.0, label="ground-truth outline",
                              path_effects=_outline_style()["path_effects"]))
    order = sorted({sensor for sensor, _ in vehicles})
    for sensor in order:
        marker, colour = _sensor_style(sensor, order)
        handles.append(Line2D([], [], ls="", marker=marker, markersize=8, markerfacecolor=colour,
                              markeredgecolor="k", label=f"seen by the {sensor} only"))
    return handles


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


def _sigmoid_panel(fig: Any, cells: Any, name: str, comp: torch.Tensor, gt_map: Optional[torch.Tensor],
                   vehicles: Sequence[tuple[str, Any]]) -> None:
    """sigmoid(component) in the first cell, with the caveat on how to read it in the second."""
    ax = fig.add_subplot(cells[0, 0])
    image = ax.imshow(torch.sigmoid(comp).numpy(), origin="lower", cmap="RdBu_r", vmin=0, vmax=1)
    _contour(ax, gt_map)
    _mark_single_sensor(ax, vehicles)
    _bev_panel(ax, f"sigmoid({name} component)", oriented=True)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.03).set_label("sigmoid(logits)", fontsize=9)
    note = fig.add_subplot(cells[0, 1])
    note.axis("off")
    note.text(0.02, 0.5, f"How to read sigmoid({name} component):\n"
              "sigmoid(0) = 0.5 (white) means no contribution, not a 50 % vehicle probability.\n"
              "Above 0.5 the component raises the vehicle logit, below it lowers it.\n"
              "The sigmoid squashes large logits together; compare sizes on the logit maps above.",
              fontsize=9, va="center", transform=note.transAxes)


def component_maps(
    res: Any,
    path: str | os.PathLike,
    head: Any = HEAD,
    sample: int = 0,
    gt: Optional[torch.Tensor] = None,
    images: Optional[torch.Tensor] = None,
    title: Optional[str] = None,
    single_sensor: Optional[Sequence[tuple[str, Any]]] = None,
    sigmoid: Optional[str] = None,
) -> Path:
    """Per-component BEV maps of one output head, as in the paper's figures 3 and 4.

    ``res`` is a :class:`lmdfx.Decomposition`. Top row: the camera images (``images``, optional),
    the ground truth (``gt``, optional) and the prediction sigmoid(output). Middle row: each
    component's signed logits on one diverging scale symmetric around 0 (red raises the vehicle
    logit, blue lowers it). ``single_sensor``: (sensor, footprint [Z, X]) of each vehicle that one
    sensor alone saw, marked per sensor on the ground truth and the components. ``sigmoid``: a
    component name to show once more as sigmoid(logits), captioned so that 0.5 reads as "no
    contribution". Ground-truth outlines are drawn on every map; X points right, Z forward.
    """
    names = list(res.names)
    if sigmoid is not None and sigmoid not in names:
        raise LMDError(f"sigmoid={sigmoid!r} is not a component; the components are {', '.join(names)}.")
    stack = select(res.components, head)
    comps = [_bev(stack[k], sample) for k in range(len(names))]
    pred = torch.sigmoid(_bev(select(res.output, head), sample))
    gt_map = _bev(gt, sample) if gt is not None else None
    vehicles = list(single_sensor or ())
    fig = _figure(3.0 * max(len(names), 3) + 1.0, 6.8 if sigmoid is None else 9.8)
    grid = fig.add_gridspec(2 if sigmoid is None else 3, 1)
    ratios = [2.4] * (images is not None) + [1] * (gt_map is not None) + [1]
    # panels keep their size and start at the left; an empty column takes what missing panels leave
    top = grid[0].subgridspec(1, len(ratios) + 1, width_ratios=ratios + [4.4 - sum(ratios) + 1e-3])
    if images is not None:
        ax = fig.add_subplot(top[0, 0])
        ax.imshow(_mosaic(images, sample).numpy())
        ax.set_title("camera images", fontsize=10)
        ax.axis("off")
    if gt_map is not None:
        ax = fig.add_subplot(top[0, len(ratios) - 2])
        ax.imshow(gt_map.numpy(), origin="lower", cmap="gray", vmin=0, vmax=1)
        _mark_single_sensor(ax, vehicles)
        _bev_panel(ax, "ground truth", oriented=True)
    ax = fig.add_subplot(top[0, len(ratios) - 1])
    image = ax.imshow(pred.numpy(), origin="lower", cmap="magma", vmin=0, vmax=1)
    _contour(ax, gt_map)
    _bev_panel(ax, "prediction sigmoid(output)", oriented=gt_map is None)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.03).set_label("P(vehicle)", fontsize=9)

    # one symmetric scale for all components, so their sizes compare
    vmax = max(float(c.abs().max()) for c in comps) or 1.0
    middle = grid[1].subgridspec(1, len(names))
    row = []
    for k, (name, comp) in enumerate(zip(names, comps)):
        ax = fig.add_subplot(middle[0, k])
        image = ax.imshow(comp.numpy(), origin="lower", cmap="RdBu_r", vmin=-vmax, vmax=vmax)
        _contour(ax, gt_map)
        _mark_single_sensor(ax, vehicles)
        _bev_panel(ax, f"{name} component (logits)", oriented=k == 0)
        row.append(ax)
    fig.colorbar(image, ax=row, fraction=0.03, pad=0.02).set_label("logit contribution", fontsize=9)
    caption = ("Components are signed logits on one scale: red raises the vehicle logit, blue lowers it, "
               "white adds nothing; the components sum to the prediction's logit.")
    if sigmoid is not None:
        _sigmoid_panel(fig, grid[2].subgridspec(1, 2, width_ratios=[1, max(len(names), 3) - 1]), sigmoid,
                       comps[names.index(sigmoid)], gt_map, vehicles)
    handles = _legend_handles(gt_map is not None, vehicles)
    if handles:  # the reading guide heads the legend: both at the bottom, neither hides the other
        fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=9, frameon=False,
                   title=caption, title_fontsize=9)
    else:
        fig.supxlabel(caption, fontsize=9)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def _graph_positions(dec: Any) -> dict[str, int]:
    """Recorded layer names (module or fx node names) -> position of their node in the traced graph."""
    # the exact-trunk graph copies every traced node in order, with the module names it outputs
    module = dec.module
    graph = getattr(module, "graphs", (module,))[-1].graph
    where: dict[str, int] = {}
    for i, node in enumerate(graph.nodes):
        for name in (*node.meta.get("lmd_module_outputs", ()), node.name):
            where.setdefault(name, i)
    return where


def _memory(value: Any) -> Any:
    """What identifies a recorded value without the graph: the memory its tensor views."""
    if isinstance(value, torch.Tensor):
        return (value.data_ptr(), value.storage_offset(), tuple(value.shape), value.stride())
    return id(value)


def _distinct_layers(res: Any, dec: Any = None) -> list[str]:
    """The recorded layers, one name per distinct value (the outermost module), in network order.

    A container whose output is its last child's is the same value recorded twice. With ``dec``
    the order and the duplicates come from its graph; without, the recording order is kept and
    duplicates are found by the tensors' memory.
    """
    if dec is not None:
        where = _graph_positions(dec)
        unknown = [name for name in res.layers if name not in where]
        if unknown:
            raise LMDError(f"layers {unknown[:3]} are not in the decomposer's graph; pass the decomposer that "
                           "produced this decomposition as dec=.")
        key = where.__getitem__
    else:
        key = lambda name: _memory(res.layers[name])  # noqa: E731
    groups: dict[Any, list[str]] = {}
    for name in res.layers:
        groups.setdefault(key(name), []).append(name)
    ordered = sorted(groups) if dec is not None else list(groups)
    return [min(groups[k], key=len) for k in ordered]


def layer_shares(res: Any, mixed_only: bool = True, dec: Any = None) -> tuple[list[str], torch.Tensor]:
    """(layer names, shares [L, M+1]): each component's share of Σ_k ||D_k||² per recorded layer.

    Layers come in network order, each value once (a container and its last child are one layer,
    named by the container). Pass the decomposer as ``dec`` for the order of its graph; without
    it the layers keep the recording order. ``mixed_only`` keeps layers where at least two
    components carry energy (after the fusion); layers that belong to one modality entirely
    (encoders) are skipped. Batches are pooled.
    """
    if not res.layers:
        raise LMDError("the decomposition recorded no layers; compile with record='all' (or a list of layers).")
    names, shares = [], []
    for layer in _distinct_layers(res, dec):
        stack = res.layers[layer]
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


def _layer_labels(layers: list[str], dec: Any) -> list[str]:
    """Tick labels: module names as they are; a bare fx node with its module and op, the fusion marked."""
    if dec is None:
        return layers
    report = dec.report()
    rows = {row.node: row for row in report.rows}
    labels = []
    for name in layers:
        row = rows.get(name)
        if row is None:
            labels.append(name)
            continue
        fusion = ", fusion" if name in report.fusion_nodes else ""
        labels.append(f"{row.layer or name} ({row.op}{fusion})")
    return labels


def _component_colours(names: Sequence[str]) -> list[str]:
    """One colour per modality (matplotlib's cycle), grey for the bias."""
    return ["0.6" if name == "bias" else f"C{k}" for k, name in enumerate(names)]


def layer_energy(res: Any, path: str | os.PathLike, mixed_only: bool = True, title: Optional[str] = None,
                 dec: Any = None) -> Path:
    """Stacked bars of each component's share of Σ_k ||D_k||² at every recorded layer, in network order.

    Use a decomposer compiled with ``record="all"`` and pass it as ``dec`` (network order and
    readable names for bare fx nodes); see :func:`layer_shares` for ``mixed_only``.
    """
    layers, shares = layer_shares(res, mixed_only, dec)
    n = len(layers)
    # every layer gets a readable 8 pt label while that fits ~24 inches; beyond, every step-th
    step = max(1, -(-n // 140))
    fig = _figure(min(24.0, max(8.0, 0.16 * n + 3.0)), 7.0)
    ax = fig.add_subplot()
    bottom = torch.zeros(n)
    for k, (name, colour) in enumerate(zip(res.names, _component_colours(res.names))):
        ax.bar(range(n), shares[:, k].numpy(), bottom=bottom.numpy(), width=0.85, color=colour, label=name)
        bottom += shares[:, k]
    ax.set_xlim(-0.6, n - 0.4)
    ax.set_ylim(0, 1)
    labels = _layer_labels(layers, dec)
    ticks = list(range(0, n, step))
    ax.set_xticks(ticks, [labels[i] for i in ticks], rotation=90, fontsize=8)
    ax.set_xlabel("recorded layer, in network order" + (f" (every {step}th labelled)" if step > 1 else ""))
    ax.set_ylabel("share of Σ_k ‖D_k‖² (component energy)")
    ax.legend(title="component", loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=9)
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
    title: Optional[str] = None,
) -> Path:
    """Modality-GradCAM of every modality (or ``modalities``) at ``layer``, up-sampled to the output grid.

    The modality panels share one colour scale (0 to the largest value of any of them), so their
    brightness compares across modalities; the prediction is shown first.
    """
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
    fig = _figure(3.2 * (len(names) + 1) + 1.0, 4.4)
    ax = fig.add_subplot(1, len(names) + 1, 1)
    image = ax.imshow(torch.sigmoid(_bev(out, sample)).numpy(), origin="lower", cmap="magma", vmin=0, vmax=1)
    _contour(ax, gt_map)
    _bev_panel(ax, "prediction sigmoid(output)", oriented=True)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.03).set_label("P(vehicle)", fontsize=9)
    vmax = max(float(cam.max()) for cam in cams) or 1.0
    panels = []
    for k, (name, cam) in enumerate(zip(names, cams)):
        ax = fig.add_subplot(1, len(names) + 1, k + 2)
        image = ax.imshow(cam.cpu().numpy(), origin="lower", cmap="inferno", vmin=0, vmax=vmax)
        _contour(ax, gt_map)
        _bev_panel(ax, f"{name}-GradCAM")
        panels.append(ax)
    fig.colorbar(image, ax=panels, fraction=0.03, pad=0.02).set_label("Modality-GradCAM (shared scale)", fontsize=9)
    fig.suptitle(title or f"Modality-GradCAM at {layer}")
    fig.supxlabel(f"Brighter: that modality's features at {layer} raise the vehicle logits more; one colour scale "
                  "for all modalities; outlines: ground truth.", fontsize=9)
    return _save(fig, path)
