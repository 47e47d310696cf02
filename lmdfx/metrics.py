"""Evaluation metrics for modality decompositions.

- :func:`pearson`, :func:`mse`: the paper's per-map scores (appendix D.2, eq. 14-15).
- :func:`perturbation_matrix`: the separation protocol of appendix D.2 for M modalities.
- :func:`component_iou`: what each component alone segments (vehicle IoU of its logits).
- :func:`evaluate`: both in one pass over a dataset (one reference call per sample).
- :func:`modality_shapley`: exact modality Shapley values (2^M forward passes), a baseline.

Datasets are sequences (``len`` and integer indexing) of dicts. Forward arguments are picked
from an item by name (other keys, such as ground truth, are ignored) or built by ``to_inputs``.
Under an initialised ``torch.distributed`` process group the dataset functions shard the samples
over the ranks and all-reduce their sums, so every rank returns the full result.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import nn

from .errors import LMDError

__all__ = [
    "pearson",
    "mse",
    "labels",
    "PerturbationResult",
    "perturbation_matrix",
    "ComponentIoU",
    "component_iou",
    "Evaluation",
    "evaluate",
    "ShapleyResult",
    "modality_shapley",
]


# ---------------------------------------------------------------------------
# Per-map scores
# ---------------------------------------------------------------------------
def _flat_pair(a: Any, b: Any, what: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    a, b = torch.as_tensor(a).detach(), torch.as_tensor(b).detach()
    if a.shape != b.shape:
        raise LMDError(f"{what}: the maps must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}.")
    if a.numel() == 0:
        raise LMDError(f"{what}: the maps are empty.")
    eps = max(torch.finfo(t.dtype).eps if t.is_floating_point() else 0.0 for t in (a, b))
    return a.reshape(-1).to(torch.float64), b.reshape(-1).to(torch.float64), eps or torch.finfo(torch.float64).eps


def pearson(a: Any, b: Any) -> float:
    """Pearson correlation of two maps over all their elements (computed in float64).

    Constant maps carry no pattern to correlate: a constant map is treated as equal to the other
    when both are constant and agree to rounding (64 ulp of the larger magnitude), giving 1.0;
    otherwise a constant map gives 0.0. Bitwise identical maps give exactly 1.0.
    """
    x, y, eps = _flat_pair(a, b, "pearson")
    if torch.equal(x, y):
        return 1.0
    scale = max(float(x.abs().max()), float(y.abs().max()), torch.finfo(torch.float64).tiny)
    tol = 64 * eps * scale
    const_x = float(x.max() - x.min()) <= tol
    const_y = float(y.max() - y.min()) <= tol
    if const_x or const_y:
        return 1.0 if const_x and const_y and float((x - y).abs().max()) <= tol else 0.0
    dx, dy = x - x.mean(), y - y.mean()
    r = float((dx * dy).sum() / (dx.norm() * dy.norm()))
    return min(1.0, max(-1.0, r))


def mse(a: Any, b: Any) -> float:
    """Mean squared difference of two maps over all their elements (computed in float64)."""
    x, y, _ = _flat_pair(a, b, "mse")
    return float((x - y).pow(2).mean())


def labels(names: Sequence[str]) -> list[str]:
    """Short names for tables: capitalised initials when they are unique (camera -> C), else the names."""
    initials = [n[:1].upper() for n in names]
    return initials if len(set(initials)) == len(initials) and all(initials) else list(names)


# ---------------------------------------------------------------------------
# Plumbing shared by the dataset metrics
# ---------------------------------------------------------------------------
def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _all_reduce(tensors: Sequence[torch.Tensor]) -> None:
    """Sum ``tensors`` in place over the process group (no-op without one)."""
    if _dist()[1] == 1:
        return
    dist = torch.distributed
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    for t in tensors:
        moved = t.to(device)
        dist.all_reduce(moved, op=dist.ReduceOp.SUM)
        t.copy_(moved.to(t.device))


def _model_of(dec: Any) -> nn.Module:
    model = getattr(dec, "model", None)
    if not isinstance(model, nn.Module) or not hasattr(dec, "modalities"):
        raise LMDError(f"expected an lmdfx Decomposer (from lmdfx.compile), got {type(dec).__name__}.")
    return model


def _device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


class _Inputs:
    """Turns dataset items into forward keyword arguments for one model."""

    def __init__(self, dec: Any, to_inputs: Optional[Callable[[Any], Mapping[str, Any]]], batched: Optional[bool]):
        self.model = _model_of(dec)
        self.params = list(inspect.signature(self.model.forward).parameters)
        self.modalities = dict(dec.modalities)
        self.to_inputs = to_inputs
        self.batched = batched
        self.device = _device(self.model)

    def __call__(self, item: Any) -> dict[str, Any]:
        raw = self.to_inputs(item) if self.to_inputs is not None else item
        if not isinstance(raw, Mapping):
            raise LMDError(f"dataset items must be dicts of forward arguments (or pass to_inputs=), got "
                           f"{type(raw).__name__}.")
        args = {k: v for k, v in raw.items() if k in self.params}
        missing = [p for p in self.modalities.values() if p not in args]
        if missing:
            raise LMDError(f"dataset item lacks the modality argument(s) {missing}; it has keys {sorted(raw)}. "
                           "Pass to_inputs= to map items to forward arguments.")
        tensors = [v for v in args.values() if isinstance(v, torch.Tensor)]
        batched = self.batched
        if batched is None:
            # an item whose tensors all lead with 1 already carries a batch of one
            batched = all(t.dim() > 0 and t.shape[0] == 1 for t in tensors)
        return {k: (v if batched else v.unsqueeze(0)).to(self.device) if isinstance(v, torch.Tensor) else v
                for k, v in args.items()}


def _select(tree: Any, head: Any) -> torch.Tensor:
    if isinstance(tree, torch.Tensor):
        return tree
    if isinstance(tree, Mapping):
        if head not in tree:
            raise LMDError(f"the model's output has no head {head!r}; its heads are {sorted(tree)}. Pass head=.")
        return tree[head]
    if isinstance(tree, (list, tuple)) and isinstance(head, int) and -len(tree) <= head < len(tree):
        return tree[head]
    raise LMDError(f"cannot pick head {head!r} from an output of type {type(tree).__name__}; pass head= as a "
                   "dict key or tuple index.")


def _check_dataset(dataset: Any) -> int:
    try:
        n = len(dataset)
    except TypeError:
        raise LMDError(f"the dataset must support len() and indexing (a list or map-style Dataset), got "
                       f"{type(dataset).__name__}.") from None
    if n == 0:
        raise LMDError("the dataset is empty.")
    return n


def _progress(iterable: Sequence, enabled: bool, desc: str):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, unit="sample", leave=False)


def _fmt(value: float, digits: int) -> str:
    if math.isnan(value):
        return "nan"
    return f"{value:.{digits}f}" if abs(value) < 1e5 else f"{value:.3g}"


# ---------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------
@dataclass
class PerturbationResult:
    """Separation scores: entry [i, j] = change of component j when modality i is replaced.

    ``pcc``/``mse`` (and ``pcc_std``/``mse_std``) are the mean (and population standard deviation)
    over all (sample, partner) pairs; ``per_sample_pcc``/``per_sample_mse`` [N, M, M] average each
    sample's partners (NaN for a sample without a partner). ``pairs``: pairs evaluated.
    """

    names: tuple[str, ...]
    pcc: torch.Tensor
    mse: torch.Tensor
    pcc_std: torch.Tensor
    mse_std: torch.Tensor
    per_sample_pcc: torch.Tensor
    per_sample_mse: torch.Tensor
    pairs: int
    head: Any = "segmentation"
    offsets: tuple[int, ...] = ()

    def label(self, i: int, j: int) -> str:
        """Paper-style label of entry [i, j]: ``"<i>p/<j>"`` (e.g. ``Rp/C``)."""
        short = labels(self.names)
        return f"{short[i]}p/{short[j]}"

    def table(self, digits: int = 2) -> str:
        """Markdown table of mean ± std per entry, paper style, with the direction that means separation."""
        m = len(self.names)
        cells = [(i, j) for i in range(m) for j in range(m)]
        head = "| metric | " + " | ".join(self.label(i, j) for i, j in cells) + " |"
        rule = "|---|" + "---|" * len(cells)
        pcc = "| PCC | " + " | ".join(
            f"{_fmt(float(self.pcc[i, j]), digits)} ± {_fmt(float(self.pcc_std[i, j]), digits)} "
            f"({'↓' if i == j else '↑'})" for i, j in cells) + " |"
        err = "| MSE | " + " | ".join(
            f"{_fmt(float(self.mse[i, j]), digits)} ± {_fmt(float(self.mse_std[i, j]), digits)} "
            f"({'↑' if i == j else '↓'})" for i, j in cells) + " |"
        legend = (f"Xp/Y: component Y when modality X's input is replaced by another sample's, operating point "
                  f"frozen; {self.pairs} pairs. Separated: off-diagonal PCC 1 and MSE 0 (↑/↓ mark the better "
                  "direction).")
        return "\n".join([head, rule, pcc, err, "", legend])

    def to_dict(self) -> dict:
        """JSON-ready summary (matrices as nested lists, labels included)."""
        m = len(self.names)
        return {"names": list(self.names), "head": self.head, "pairs": self.pairs, "offsets": list(self.offsets),
                "labels": [[self.label(i, j) for j in range(m)] for i in range(m)],
                "pcc": self.pcc.tolist(), "pcc_std": self.pcc_std.tolist(),
                "mse": self.mse.tolist(), "mse_std": self.mse_std.tolist()}


@dataclass
class ComponentIoU:
    """Vehicle IoU of each component alone (``logit > 0``) and of the full model, summed over a dataset."""

    names: tuple[str, ...]  # modalities..., "bias", "full"
    intersection: torch.Tensor
    union: torch.Tensor

    @property
    def iou(self) -> dict[str, float]:
        """name -> intersection / union (1.0 when the union is empty)."""
        return {n: float(i / u) if u > 0 else 1.0 for n, i, u in zip(self.names, self.intersection, self.union)}

    def table(self, digits: int = 1) -> str:
        """Markdown table of IoU (in %) per component and for the full model."""
        head = "| | " + " | ".join(self.names) + " |"
        rule = "|---|" + "---|" * len(self.names)
        row = "| vehicle IoU (%) | " + " | ".join(_fmt(100 * v, digits) for v in self.iou.values()) + " |"
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


# ---------------------------------------------------------------------------
# The dataset pass
# ---------------------------------------------------------------------------
def evaluate(
    dec: Any,
    dataset: Any,
    shift: int = 500,
    repeats: int = 12,
    offsets: Optional[Sequence[int]] = None,
    head: Any = "segmentation",
    to_inputs: Optional[Callable[[Any], Mapping[str, Any]]] = None,
    batched: Optional[bool] = None,
    separation: bool = True,
    iou: bool = True,
    gt_key: str = "vehicle_gt",
    valid_key: Optional[str] = "valid_mask",
    progress: bool = False,
    on_reference: Optional[Callable[[int, Any, Any], None]] = None,
) -> Evaluation:
    """One pass over ``dataset``: :func:`perturbation_matrix` and/or :func:`component_iou`.

    The reference call of each sample serves both; ``on_reference(k, item, decomposition)`` is
    called with it (on this rank's samples), e.g. to keep maps for figures. See those functions
    for the other arguments.
    """
    n = _check_dataset(dataset)
    make = _Inputs(dec, to_inputs, batched)
    names = tuple(make.modalities)
    params = list(make.modalities.values())
    m = len(names)
    if offsets is None:
        if repeats < 1:
            raise LMDError(f"repeats must be >= 1, got {repeats}.")
        offsets = [shift * r for r in range(1, repeats + 1)]
    offsets = tuple(int(o) for o in offsets)
    if separation and not offsets:
        raise LMDError("offsets is empty; give at least one partner offset.")
    rank, world = _dist()
    f64 = dict(dtype=torch.float64)
    sums = torch.zeros(4, m, m, **f64)  # pcc, pcc^2, mse, mse^2 over pairs
    count = torch.zeros(1, **f64)
    sample_sums = torch.zeros(2, n, m, m, **f64)
    sample_count = torch.zeros(n, **f64)
    inter = torch.zeros(m + 2, **f64)
    union = torch.zeros(m + 2, **f64)
    mine = list(range(rank, n, world))
    for k in _progress(mine, progress, "evaluate"):
        item = dataset[k]
        base = make(item)
        with torch.no_grad():
            ref = dec(**base)
        comps = _select(ref.components, head)
        if on_reference is not None:
            on_reference(k, item, ref)
        if iou:
            if not isinstance(item, Mapping) or gt_key not in item:
                raise LMDError(f"component IoU needs ground truth {gt_key!r} in each dataset item; item {k} has "
                               f"{sorted(item) if isinstance(item, Mapping) else type(item).__name__}. "
                               "Pass gt_key= or iou=False.")
            gt = item[gt_key].to(comps.device)
            valid = item[valid_key].to(comps.device) if valid_key and valid_key in item else None
            maps = list(comps) + [_select(ref.output, head)]
            for c, logits in enumerate(maps):
                pred = (logits.detach() > 0).double().reshape(-1)
                tgt = (gt > 0).double().expand(logits.shape).reshape(-1)
                v = torch.ones_like(pred) if valid is None else (valid > 0).double().expand(logits.shape).reshape(-1)
                inter[c] += float((pred * tgt * v).sum())
                union[c] += float(((pred + tgt).clamp(max=1) * v).sum())
        if not separation:
            continue
        before = comps[:m].detach()
        for off in offsets:
            p = (k + off) % n
            if p == k:
                continue
            partner = make(dataset[p])
            for i, param in enumerate(params):
                with torch.no_grad():
                    moved = dec(**dict(base, **{param: partner[param]}), operating_point=ref.operating_point)
                after = _select(moved.components, head)[:m]
                for j in range(m):
                    r, e = pearson(before[j], after[j]), mse(before[j], after[j])
                    sums[:, i, j] += torch.tensor([r, r * r, e, e * e], **f64)
                    sample_sums[0, k, i, j] += r
                    sample_sums[1, k, i, j] += e
            count += 1
            sample_count[k] += 1
    _all_reduce([sums, count, sample_sums, sample_count, inter, union])
    result = Evaluation(samples=n)
    if separation:
        c = float(count)
        if c == 0:
            raise LMDError(f"no (sample, partner) pair: every offset {list(offsets)} maps each of the {n} samples "
                           "onto itself. Use a shift that is not a multiple of the dataset length.")
        mean = sums / c
        std = (mean[[1, 3]] - mean[[0, 2]].pow(2)).clamp(min=0).sqrt()
        per = sample_sums / sample_count.clamp(min=1).reshape(1, n, 1, 1)
        per[:, sample_count == 0] = float("nan")
        result.separation = PerturbationResult(names, mean[0], mean[2], std[0], std[1], per[0], per[1], int(c),
                                               head, offsets)
    if iou:
        result.iou = ComponentIoU((*names, "bias", "full"), inter, union)
    return result


def perturbation_matrix(
    dec: Any,
    dataset: Any,
    shift: int = 500,
    repeats: int = 12,
    offsets: Optional[Sequence[int]] = None,
    head: Any = "segmentation",
    to_inputs: Optional[Callable[[Any], Mapping[str, Any]]] = None,
    batched: Optional[bool] = None,
    progress: bool = False,
) -> PerturbationResult:
    """The separation protocol of appendix D.2, for M modalities.

    For sample k and each offset (default ``shift * r`` for r = 1..repeats) the partner is
    p = (k + offset) mod N (skipped when p == k). For each modality i, sample k's inputs with
    modality i taken from p are run at sample k's frozen operating point, and every modality
    component j of the output logits (``head`` of a dict output; a tensor output as is) is
    compared with its value on the clean inputs: PCC and MSE over the output pixels, averaged over
    partners and samples. ``dataset`` items are dicts holding the forward arguments (extra keys,
    e.g. ground truth, are ignored) or anything ``to_inputs`` maps to such a dict. ``batched``:
    whether items already carry a batch dimension (None: yes when every tensor leads with size 1;
    otherwise a batch dimension of 1 is added). Tensors move to the model's device.
    """
    return evaluate(dec, dataset, shift, repeats, offsets, head, to_inputs, batched, separation=True, iou=False,
                    progress=progress).separation


def component_iou(
    dec: Any,
    dataset: Any,
    head: Any = "segmentation",
    to_inputs: Optional[Callable[[Any], Mapping[str, Any]]] = None,
    batched: Optional[bool] = None,
    gt_key: str = "vehicle_gt",
    valid_key: Optional[str] = "valid_mask",
    progress: bool = False,
) -> ComponentIoU:
    """Vehicle IoU of each component alone and of the full model over ``dataset``.

    A component "predicts" where its logits are > 0. Ground truth ``item[gt_key]`` (> 0 is a
    vehicle) and, when present, ``item[valid_key]`` (cells where it is 0 are ignored) come from the
    raw dataset item; intersections and unions are summed over the samples before dividing.
    """
    return evaluate(dec, dataset, head=head, to_inputs=to_inputs, batched=batched, separation=False, iou=True,
                    gt_key=gt_key, valid_key=valid_key, progress=progress).iou


# ---------------------------------------------------------------------------
# Shapley baseline
# ---------------------------------------------------------------------------
@dataclass
class ShapleyResult:
    """Exact modality Shapley values of one output head.

    ``values`` [M, *shape] (per element) or [M] (summed); ``empty`` = output with every modality
    at the baseline, ``full`` = output on the real inputs; efficiency: values.sum(0) + empty == full.
    """

    names: tuple[str, ...]
    values: torch.Tensor
    empty: torch.Tensor
    full: torch.Tensor
    baseline: str = "zeros"

    @property
    def residual(self) -> float:
        """max |Σ_i φ_i + f(∅) − f(all)| (rounding only)."""
        return float((self.values.sum(0) + self.empty - self.full).abs().max())


def modality_shapley(
    dec: Any,
    inputs: Mapping[str, Any],
    baseline: Any = "zeros",
    head: Any = "segmentation",
    per_pixel: bool = True,
    modalities: Optional[Mapping[str, str]] = None,
    batch: bool = True,
) -> ShapleyResult:
    """Exact Shapley values of the modalities for ``head`` of the model's output (2^M forward passes).

    A modality outside a coalition is replaced by zeros (``baseline="zeros"``) or by the same
    argument of ``baseline``, a dict of forward arguments of a reference sample. ``dec`` is a
    Decomposer (its model and modalities are used) or an ``nn.Module`` with ``modalities`` given.
    ``inputs`` are forward keyword arguments as the model takes them (batched). ``per_pixel=False``
    sums each modality's values over all output elements. ``batch``: run the 2^M coalitions as one
    forward pass stacked along the batch axis when every tensor argument shares its leading size
    (the model must treat batch entries independently, as eval-mode models do). Computed in float64
    from the model's outputs.
    """
    if isinstance(dec, nn.Module):
        model = dec
        if modalities is None:
            modalities = getattr(dec, "modality_args", None)
        if not modalities:
            raise LMDError("modality_shapley on a plain nn.Module needs modalities={name: forward parameter}.")
    else:
        model = _model_of(dec)
        modalities = dict(dec.modalities) if modalities is None else modalities
    names, params = tuple(modalities), list(modalities.values())
    missing = [p for p in params if p not in inputs]
    if missing:
        raise LMDError(f"inputs lack the modality argument(s) {missing}; they have {sorted(inputs)}.")
    if isinstance(baseline, str):
        if baseline != "zeros":
            raise LMDError(f"baseline must be 'zeros' or a dict of forward arguments, got {baseline!r}.")
        base = {p: torch.zeros_like(inputs[p]) for p in params}
        label = "zeros"
    elif isinstance(baseline, Mapping):
        lacking = [p for p in params if p not in baseline]
        if lacking:
            raise LMDError(f"the baseline dict lacks the modality argument(s) {lacking}.")
        base = {p: baseline[p] for p in params}
        label = "reference sample"
    else:
        raise LMDError(f"baseline must be 'zeros' or a dict of forward arguments, got {type(baseline).__name__}.")
    m = len(params)
    coalitions = []
    for mask in range(2 ** m):
        args = dict(inputs)
        for i, p in enumerate(params):
            if not mask >> i & 1:
                args[p] = base[p]
        coalitions.append(args)
    values: dict[int, torch.Tensor] = {}
    tensors = [v for v in inputs.values() if isinstance(v, torch.Tensor)]
    sizes = {t.shape[0] if t.dim() else None for t in tensors} | {
        v.shape[0] if v.dim() else None for v in base.values()}
    with torch.no_grad():
        if batch and len(sizes) == 1 and None not in sizes:
            # one forward pass with the coalitions stacked along the batch axis
            b = sizes.pop()
            stacked = {k: torch.cat([c[k] for c in coalitions]) if isinstance(v, torch.Tensor) else v
                       for k, v in inputs.items()}
            out = _select(model(**stacked), head).detach().to(torch.float64)
            for mask in range(2 ** m):
                values[mask] = out[mask * b:(mask + 1) * b]
        else:
            for mask, args in enumerate(coalitions):
                values[mask] = _select(model(**args), head).detach().to(torch.float64)
    phi = torch.zeros(m, *values[0].shape, dtype=torch.float64, device=values[0].device)
    for i in range(m):
        for mask in range(2 ** m):
            if mask >> i & 1:
                continue
            s = bin(mask).count("1")
            weight = math.factorial(s) * math.factorial(m - s - 1) / math.factorial(m)
            phi[i] += weight * (values[mask | 1 << i] - values[mask])
    empty, full = values[0], values[2 ** m - 1]
    if not per_pixel:
        phi, empty, full = phi.reshape(m, -1).sum(1), empty.sum(), full.sum()
    return ShapleyResult(names, phi, empty, full, label)
