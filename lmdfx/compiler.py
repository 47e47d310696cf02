"""``lmdfx.compile``: trace -> passes -> codegen -> Decomposer."""

from __future__ import annotations

import inspect
from typing import Any, Iterable, Mapping, Sequence

from torch import nn

from .errors import LMDError
from .passes import assign_rules, normalize, provenance, resolve_record, rewrite, trace
from .passes import optimize as optimize_graph
from .passes.optimize import TrunkDispatch
from .report import Report
from .rules import Rules
from .runtime import CHECKS, Decomposer

_RESERVED = ("operating_point", "lmd_frozen", "lmd_check")


def compile(
    model: nn.Module,
    modalities: Mapping[str, str],
    rules: Rules | None = None,
    record: None | str | Sequence[str] = None,
    backend: Any = None,
    leaf_modules: Iterable[Any] = (),
    concrete_args: dict[str, Any] | None = None,
    optimize: bool = True,
    exact_output: bool = True,
    check: str = "raise",
) -> Decomposer:
    """Compile ``model`` into a decomposer returning one component per modality plus bias.

    ``modalities`` maps modality name -> ``forward`` parameter (order = component order);
    other parameters are context. ``record``: None, ``"all"`` or module/fx node names.
    ``backend``: a ``torch.compile`` backend for the generated module. ``leaf_modules``
    (types or qualified names) and ``concrete_args`` are passed to the tracer.
    ``optimize``: run the structural-zeros rewrite (same results up to summation order).
    ``exact_output=False``: after the fusion layer the trunk is, where no rule needs its own
    value, the sum of the components, which saves one run of the post-fusion layers per call;
    ``res.output`` then equals ``model(...)`` to rounding instead of bitwise.
    ``check``: after every reference call each mixed node's components must sum to its value
    within a dtype-aware tolerance relative to max |value| (``lmdfx.runtime.tolerance``) and be
    finite; ``"raise"`` raises ``ExactnessError`` naming the first node that is not, ``"warn"``
    warns, ``"off"`` skips the check (and the input NaN/Inf check).
    The model is never modified.
    """
    if not isinstance(model, nn.Module):
        raise LMDError(f"lmdfx.compile expects a torch.nn.Module, got {type(model).__name__}.")
    if any(m.training for m in model.modules()):
        raise LMDError(f"{type(model).__name__} (or a submodule) is in training mode; call model.eval() first.")
    rules = rules if rules is not None else Rules()
    if not isinstance(rules, Rules):
        raise LMDError(f"rules must be an lmdfx.Rules, got {type(rules).__name__}.")
    params = list(inspect.signature(model.forward).parameters)
    if not modalities:
        raise LMDError(f"modalities is empty; map each modality name to a forward parameter of "
                       f"{type(model).__name__}: one of {', '.join(params)}.")
    for name, param in modalities.items():
        if param not in params:
            raise LMDError(f"Modality {name!r} names forward parameter {param!r}, but "
                           f"{type(model).__name__}.forward has parameters: {', '.join(params)}.")
    shared = sorted({p for p in modalities.values() if list(modalities.values()).count(p) > 1})
    if shared:
        names = {p: [m for m, q in modalities.items() if q == p] for p in shared}
        raise LMDError(f"Modalities {names} share a forward parameter; each modality needs its own input "
                       "(one component per parameter).")
    if check not in CHECKS:
        raise LMDError(f"check={check!r} is not a known choice; use one of {', '.join(CHECKS)}.")
    if "bias" in modalities:
        raise LMDError("'bias' is the name of the bias component; give that modality another name.")
    clash = [p for p in params if p in _RESERVED]
    if clash:
        raise LMDError(f"forward parameter(s) {clash} clash with lmdfx's own call arguments; rename them.")
    fixed = sorted(set(concrete_args or {}) & set(modalities.values()))
    if fixed:
        raise LMDError(f"Modality parameter(s) {fixed} are fixed by concrete_args; a modality input must stay an input.")
    gm = trace(model, leaf_modules, concrete_args)
    normalize(gm)
    provenance(gm, list(modalities.values()))
    assign_rules(gm, rules)
    recorded = resolve_record(gm, record)
    report = Report(gm, list(modalities))
    decomposed, layout = rewrite(gm, list(modalities), recorded)
    optimize_graph(decomposed, structural=optimize)
    if not exact_output:
        summed, _ = rewrite(gm, list(modalities), recorded, trunk_mode="sum")
        decomposed = TrunkDispatch(optimize_graph(summed, structural=optimize), decomposed)
    return Decomposer(model, decomposed, layout, modalities, report, backend=backend, check=check)
