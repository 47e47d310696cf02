"""Evaluation metrics for modality decompositions, for any model and dataset.

- :func:`pearson`, :func:`mse`: the paper's per-map scores (appendix D.2, eq. 14-15).
- :func:`perturbation_matrix`: the separation protocol of appendix D.2 for M modalities.
- :func:`accumulate`: one pass over a dataset that feeds :class:`Metric` accumulators (such as
  :class:`Separation`) from one reference call per sample.
- :func:`modality_shapley`: exact modality Shapley values (2^M forward passes), a baseline.

``head`` picks what is measured: a dict key or sequence index of the model's output, or ``None``
for the whole output (its tensor leaves flattened and concatenated, see :func:`select`).
Datasets are sequences (``len`` and integer indexing) of dicts. Forward arguments are picked
from an item by name (other keys, such as ground truth, are ignored) or built by ``to_inputs``.
Under an initialised ``torch.distributed`` process group :func:`accumulate` shards the samples
over the ranks and merges the metrics with an all-reduce, so every rank returns the full result.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Optional, Protocol, Sequence

import torch
from torch import nn
from torch.utils import _pytree as pytree
from tqdm import tqdm

from .errors import LMDError

if TYPE_CHECKING:
    from .runtime import Decomposer, Decomposition

__all__ = [
    "pearson",
    "mse",
    "labels",
    "format_number",
    "select",
    "progress_bar",
    "dataset_size",
    "Sample",
    "Metric",
    "accumulate",
    "PerturbationResult",
    "Separation",
    "partner_offsets",
    "perturbation_matrix",
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


def format_number(value: float, digits: int) -> str:
    """``value`` for a table: ``digits`` decimals, 3 significant digits from 1e5 on, ``nan`` as is."""
    if math.isnan(value):
        return "nan"
    return f"{value:.{digits}f}" if abs(value) < 1e5 else f"{value:.3g}"


def select(tree: Any, head: Any = None, keep: int = 0) -> torch.Tensor:
    """``head`` of a model output (or of a components tree): a dict key or a sequence index.

    ``head=None`` selects the whole output: a tensor as is, otherwise every tensor leaf flattened
    after its first ``keep`` dimensions and concatenated along dimension ``keep`` (``keep=1``
    keeps the component axis of a components tree, or the batch axis of an output).
    """
    if head is None:
        if isinstance(tree, torch.Tensor):
            return tree
        leaves = [leaf for leaf in pytree.tree_leaves(tree) if isinstance(leaf, torch.Tensor)]
        if not leaves:
            raise LMDError(f"the output ({type(tree).__name__}) holds no tensor to measure.")
        return torch.cat([leaf.reshape(*leaf.shape[:keep], -1) for leaf in leaves], dim=keep)
    if isinstance(tree, Mapping):
        if head not in tree:
            raise LMDError(f"the model's output has no head {head!r}; its heads are {sorted(tree)}. Pick one of "
                           "them as the head, or None for the whole output.")
        return tree[head]
    if isinstance(tree, (list, tuple)) and isinstance(head, int) and -len(tree) <= head < len(tree):
        return tree[head]
    raise LMDError(f"cannot pick head {head!r} from an output of type {type(tree).__name__}; the head must be a "
                   "dict key or tuple index, or None for the whole output.")


def progress_bar(iterable: Iterable, enabled: bool, desc: str, unit: str = "sample") -> Iterable:
    """``iterable`` wrapped in a tqdm bar (rate and ETA on stderr) when ``enabled``."""
    return tqdm(iterable, desc=desc, unit=unit, leave=False) if enabled else iterable


def dataset_size(dataset: Any) -> int:
    """``len(dataset)``, with an :class:`LMDError` for a dataset without ``len`` or an empty one."""
    try:
        n = len(dataset)
    except TypeError:
        raise LMDError(f"the dataset must support len() and indexing (a list or map-style Dataset), got "
                       f"{type(dataset).__name__}.") from None
    if n == 0:
        raise LMDError("the dataset is empty.")
    return n


# ---------------------------------------------------------------------------
# Plumbing of the dataset pass
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


# ---------------------------------------------------------------------------
# Metric accumulators and the dataset pass
# ---------------------------------------------------------------------------
@dataclass
class Sample:
    """One sample of a dataset pass, as :meth:`Metric.update` sees it."""

    index: int  # position in the dataset
    item: Any  # the raw dataset item (ground truth lives here)
    inputs: dict[str, Any]  # its forward arguments, batched, on the model's device
    reference: Decomposition  # dec(**inputs)
    dec: Decomposer
    inputs_of: Callable[[int], dict[str, Any]]  # forward arguments of another sample (e.g. a partner)
    size: int  # samples in the dataset


class Metric(Protocol):
    """An accumulator that :func:`accumulate` feeds; adding a metric is writing one such class.

    ``update`` sees each sample of this rank once. After the pass ``merge`` is called once with
    ``all_reduce``, which sums a list of tensors in place over the ranks (a no-op in one process),
    so the state a result depends on lives in tensors of the same shape on every rank. ``result``
    then returns the metric's value.
    """

    def update(self, sample: Sample) -> None:
        """Add one sample."""

    def merge(self, all_reduce: Callable[[Sequence[torch.Tensor]], None]) -> None:
        """Combine the ranks' states."""

    def result(self) -> Any:
        """The metric over the whole dataset."""


def accumulate(
    dec: Any,
    dataset: Any,
    metrics: Sequence[Metric],
    to_inputs: Optional[Callable[[Any], Mapping[str, Any]]] = None,
    batched: Optional[bool] = None,
    progress: bool = False,
    on_reference: Optional[Callable[[int, Any, Any], None]] = None,
) -> list[Any]:
    """One pass over ``dataset`` feeding every metric; returns their results in order.

    Each sample gets one reference call ``dec(**inputs)`` that all metrics share;
    ``on_reference(k, item, decomposition)`` is called with it first (e.g. to keep maps for
    figures). Under ``torch.distributed`` this rank takes samples rank, rank + world size, ...,
    and the metrics are merged over the ranks. ``to_inputs`` and ``batched``: see
    :func:`perturbation_matrix`.
    """
    n = dataset_size(dataset)
    make = _Inputs(dec, to_inputs, batched)
    rank, world = _dist()
    for k in progress_bar(range(rank, n, world), progress, "metrics"):
        item = dataset[k]
        inputs = make(item)
        with torch.no_grad():
            reference = dec(**inputs)
        if on_reference is not None:
            on_reference(k, item, reference)
        sample = Sample(k, item, inputs, reference, dec, lambda p: make(dataset[p]), n)
        for metric in metrics:
            metric.update(sample)
    for metric in metrics:
        metric.merge(_all_reduce)
    return [metric.result() for metric in metrics]


# ---------------------------------------------------------------------------
# Separation
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
    head: Any = None
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
            f"{format_number(float(self.pcc[i, j]), digits)} ± {format_number(float(self.pcc_std[i, j]), digits)} "
            f"({'↓' if i == j else '↑'})" for i, j in cells) + " |"
        err = "| MSE | " + " | ".join(
            f"{format_number(float(self.mse[i, j]), digits)} ± {format_number(float(self.mse_std[i, j]), digits)} "
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


class Separation:
    """Metric: the perturbation protocol of appendix D.2 (see :func:`perturbation_matrix`).

    ``size``: samples in the dataset; ``offsets``: partner offsets (:func:`partner_offsets`).
    The result is a :class:`PerturbationResult`.
    """

    def __init__(self, dec: Any, size: int, offsets: Sequence[int], head: Any = None):
        _model_of(dec)
        self.names, self.params = tuple(dec.modalities), list(dec.modalities.values())
        self.offsets = tuple(int(o) for o in offsets)
        if not self.offsets:
            raise LMDError("offsets is empty; give at least one partner offset.")
        self.head = head
        m = len(self.names)
        self.sums = torch.zeros(4, m, m, dtype=torch.float64)  # pcc, pcc^2, mse, mse^2 over pairs
        self.count = torch.zeros(1, dtype=torch.float64)
        self.sample_sums = torch.zeros(2, size, m, m, dtype=torch.float64)  # pcc, mse per sample
        self.sample_count = torch.zeros(size, dtype=torch.float64)

    def update(self, sample: Sample) -> None:
        """Score every partner of ``sample`` at its frozen operating point."""
        m, k = len(self.names), sample.index
        before = select(sample.reference.components, self.head, keep=1)[:m].detach()
        for off in self.offsets:
            p = (k + off) % sample.size
            if p == k:
                continue
            partner = sample.inputs_of(p)
            for i, param in enumerate(self.params):
                with torch.no_grad():
                    moved = sample.dec(**dict(sample.inputs, **{param: partner[param]}),
                                       operating_point=sample.reference.operating_point)
                after = select(moved.components, self.head, keep=1)[:m]
                for j in range(m):
                    r, e = pearson(before[j], after[j]), mse(before[j], after[j])
                    self.sums[:, i, j] += torch.tensor([r, r * r, e, e * e], dtype=torch.float64)
                    self.sample_sums[:, k, i, j] += torch.tensor([r, e], dtype=torch.float64)
            self.count += 1
            self.sample_count[k] += 1

    def merge(self, all_reduce: Callable[[Sequence[torch.Tensor]], None]) -> None:
        """Sum the pair scores over the ranks."""
        all_reduce([self.sums, self.count, self.sample_sums, self.sample_count])

    def result(self) -> PerturbationResult:
        """Means and standard deviations over all (sample, partner) pairs."""
        c, n = float(self.count), len(self.sample_count)
        if c == 0:
            raise LMDError(f"no (sample, partner) pair: every offset {list(self.offsets)} maps each of the {n} "
                           "samples onto itself. Use a shift that is not a multiple of the dataset length.")
        mean = self.sums / c
        std = (mean[[1, 3]] - mean[[0, 2]].pow(2)).clamp(min=0).sqrt()
        per = self.sample_sums / self.sample_count.clamp(min=1).reshape(1, n, 1, 1)
        per[:, self.sample_count == 0] = float("nan")
        return PerturbationResult(self.names, mean[0], mean[2], std[0], std[1], per[0], per[1], int(c), self.head,
                                  self.offsets)


def partner_offsets(shift: int = 500, repeats: int = 12, offsets: Optional[Sequence[int]] = None) -> tuple[int, ...]:
    """``offsets`` as ints, or by default ``shift * r`` for r = 1..repeats."""
    if offsets is None:
        if repeats < 1:
            raise LMDError(f"repeats must be >= 1, got {repeats}.")
        offsets = [shift * r for r in range(1, repeats + 1)]
    return tuple(int(o) for o in offsets)


def perturbation_matrix(
    dec: Any,
    dataset: Any,
    shift: int = 500,
    repeats: int = 12,
    offsets: Optional[Sequence[int]] = None,
    head: Any = None,
    to_inputs: Optional[Callable[[Any], Mapping[str, Any]]] = None,
    batched: Optional[bool] = None,
    progress: bool = False,
) -> PerturbationResult:
    """The separation protocol of appendix D.2, for M modalities.

    For sample k and each offset (default ``shift * r`` for r = 1..repeats) the partner is
    p = (k + offset) mod N (skipped when p == k). For each modality i, sample k's inputs with
    modality i taken from p are run at sample k's frozen operating point, and every modality
    component j of ``head`` (default: the whole output) is compared with its value on the clean
    inputs: PCC and MSE over the output elements, averaged over partners and samples.
    ``dataset`` items are dicts holding the forward arguments (extra keys, e.g. ground truth, are
    ignored) or anything ``to_inputs`` maps to such a dict. ``batched``: whether items already
    carry a batch dimension (None: yes when every tensor leads with size 1; otherwise a batch
    dimension of 1 is added). Tensors move to the model's device.
    """
    metric = Separation(dec, dataset_size(dataset), partner_offsets(shift, repeats, offsets), head)
    return accumulate(dec, dataset, [metric], to_inputs, batched, progress)[0]


# ---------------------------------------------------------------------------
# Shapley baseline
# ---------------------------------------------------------------------------
@dataclass
class ShapleyResult:
    """Exact modality Shapley values of one output head (or of the whole output).

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
    head: Any = None,
    per_pixel: bool = True,
    modalities: Optional[Mapping[str, str]] = None,
    batch: bool = True,
) -> ShapleyResult:
    """Exact Shapley values of the modalities for ``head`` of the model's output (2^M forward passes).

    ``head=None`` (default) takes the whole output, each batch entry's tensor leaves flattened
    (:func:`select` with ``keep=1``). A modality outside a coalition is replaced by zeros
    (``baseline="zeros"``) or by the same argument of ``baseline``, a dict of forward arguments of
    a reference sample. ``dec`` is a Decomposer (its model and modalities are used) or an
    ``nn.Module`` with ``modalities`` given. ``inputs`` are forward keyword arguments as the model
    takes them (batched). ``per_pixel=False`` sums each modality's values over all output
    elements. ``batch``: run the 2^M coalitions as one forward pass stacked along the batch axis
    when every tensor argument shares its leading size (the model must treat batch entries
    independently, as eval-mode models do). Computed in float64 from the model's outputs.
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
            out = select(model(**stacked), head, keep=1).detach().to(torch.float64)
            for mask in range(2 ** m):
                values[mask] = out[mask * b:(mask + 1) * b]
        else:
            for mask, args in enumerate(coalitions):
                values[mask] = select(model(**args), head, keep=1).detach().to(torch.float64)
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
