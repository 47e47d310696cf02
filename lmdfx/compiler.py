"""``lmdfx.compile``: trace -> passes -> codegen -> Decomposer."""

from __future__ import annotations

import inspect
import warnings
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import fx, nn

from .errors import LMDError, TraceError, UnsupportedOpError
from .passes import assign_rules, constant_outputs, normalize, provenance, resolve_record, rewrite, trace
from .passes.export import Capture, export, exported_program, graph_module
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
    exact_output: bool = False,
    check: str = "raise",
    frontend: str = "auto",
    example_inputs: Any = None,
    keep_operating_point: bool = True,
) -> Decomposer:
    """Compile ``model`` into a decomposer returning one component per modality plus bias.

    ``modalities`` maps modality name -> ``forward`` parameter (order = component order);
    other parameters are context. ``record``: None, ``"all"`` or module/fx node names.
    ``backend``: a ``torch.compile`` backend for the generated module. ``leaf_modules``
    (types or qualified names) and ``concrete_args`` are passed to the tracer.
    ``optimize``: run the structural-zeros rewrite (same results up to summation order).
    ``exact_output``: by default (False) the trunk of a mixed node whose rule is linear and
    covered by the registry-driven tests is the sum of its components, so the layers after the
    fusion run once per component and not once more for the trunk; ``res.output`` then equals
    ``model(...)`` to rounding. ``True`` runs the original graph as the trunk: ``res.output`` is
    bitwise ``model(...)`` and every mixed node is checked, at the cost of one more run of the
    post-fusion layers.
    ``check``: after every reference call each mixed node's components must sum to its value
    within a dtype-aware tolerance relative to max |value| (``lmdfx.runtime.tolerance``) and be
    finite; ``"raise"`` raises ``ExactnessError`` naming the first node that is not, ``"warn"``
    warns, ``"off"`` skips the check (and the input NaN/Inf check).
    ``frontend``: ``"fx"`` (symbolic tracing), ``"export"`` (``torch.export`` on
    ``example_inputs`` — a tuple of positional arguments, a dict of keyword arguments, or an
    ``(args, kwargs)`` pair; the program is specialised to their shapes and non-tensor values),
    or ``"auto"``: fx, then export when fx cannot trace, or traces ops no rule decomposes, and
    ``example_inputs`` are given (``dec.report().frontend`` says which ran). A
    pre-traced ``fx.GraphModule`` or a ``torch.export.ExportedProgram`` is taken as it is.
    ``keep_operating_point``: ``False`` makes ``res.operating_point`` None, so every slope,
    remainder and frozen attention map is freed once used instead of living until the call
    returns (peak memory near (M+1)× the forward's activations when the whole network is
    decomposed); ``dec.operating_point(...)`` still returns one.
    The model is never modified.
    """
    if isinstance(model, torch.export.ExportedProgram):
        model = _ExportedModel(model)
    if not isinstance(model, nn.Module):
        raise LMDError(f"lmdfx.compile expects a torch.nn.Module, fx.GraphModule or torch.export.ExportedProgram, "
                       f"got {type(model).__name__}.")
    if frontend not in FRONTENDS:
        raise LMDError(f"frontend={frontend!r} is not a known choice; use one of {', '.join(FRONTENDS)}.")
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
    capture = _capture(model, frontend, example_inputs, leaf_modules, concrete_args)
    try:
        gm = _assign(capture, modalities, rules)
    except UnsupportedOpError:
        if not (frontend == "auto" and capture.frontend == "fx" and example_inputs is not None):
            raise
        # fx captured the model but kept calls no rule knows; export records them as ATen ops.
        capture = export(model, example_inputs)
        gm = _assign(capture, modalities, rules)
    recorded = resolve_record(gm, record)
    report = Report(gm, list(modalities), frontend=capture.frontend)
    separation = report.separation_warning()  # walks the graph once
    if separation:
        warnings.warn(separation, stacklevel=2)

    def build(trunk_mode: str = "exact", keep_constants: bool = True) -> tuple[fx.GraphModule, Any]:
        decomposed, layout = rewrite(gm, list(modalities), recorded, trunk_mode, keep_constants)
        return optimize_graph(decomposed, structural=optimize), layout

    exact, layout = build()
    decomposed = exact if exact_output else TrunkDispatch(build("sum")[0], exact)
    # Reference calls that return no operating point run a graph that does not collect one.
    lean = None if keep_operating_point else build("exact" if exact_output else "sum", keep_constants=False)[0]
    return Decomposer(model, decomposed, layout, modalities, report, backend=backend, check=check,
                      specialised=capture.examples, exact_output=exact_output, lean=lean)


FRONTENDS = ("auto", "fx", "export")


def _assign(capture: Capture, modalities: Mapping[str, str], rules: Rules) -> fx.GraphModule:
    """Passes normalize -> provenance -> assign_rules on a captured graph."""
    gm = capture.gm
    normalize(gm)
    provenance(gm, list(modalities.values()))
    constant_outputs(gm, rules, list(modalities.values()))
    return assign_rules(gm, rules)


class _ExportedModel(nn.Module):
    """An ``ExportedProgram`` given to ``compile``: its unlifted module, with the program's
    call signature and state."""

    def __init__(self, program: torch.export.ExportedProgram):
        super().__init__()
        self.program = program
        self.module = program.module()
        self.forward = self.module.forward  # the program's signature, for binding calls
        for module in self.modules():  # a program has no training mode of its own (its module refuses train())
            module.training = False


def _capture(model: nn.Module, frontend: str, example_inputs: Any, leaf_modules: Iterable[Any],
             concrete_args: dict[str, Any] | None) -> Capture:
    """Run the frontend: a given graph as it is, else fx tracing and/or torch.export."""
    if isinstance(model, _ExportedModel):
        return exported_program(model.program)
    params = [p.name for p in inspect.signature(model.forward).parameters.values()
              if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if isinstance(model, fx.GraphModule) and frontend != "export":
        return graph_module(model, params)
    if frontend == "export":
        return export(model, example_inputs)
    try:
        return Capture(trace(model, leaf_modules, concrete_args), "fx")
    except TraceError as exc:
        if frontend == "auto" and example_inputs is not None:
            return export(model, example_inputs)
        if "frontend='export'" in str(exc):
            raise
        raise TraceError(f"{exc} Or capture it with torch.export: lmdfx.compile(..., frontend='export', "
                         "example_inputs=...).") from exc.__cause__
