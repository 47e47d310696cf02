"""Running a compiled decomposition: ``Decomposer`` (callable), ``Decomposition`` (its result)
and ``OperatingPoint`` (the constants of one reference pass)."""

from __future__ import annotations

import inspect
import warnings
from typing import Any, Callable, Mapping

import torch
from torch import nn
from torch.utils import _pytree as pytree

from .errors import ExactnessError, LMDError
from .passes import Layout
from .passes.export import describe
from .passes.rewrite import RULES_ATTR
from .report import Report

CHECKS = ("raise", "warn", "off")


def tolerance(dtype_eps: float, device: torch.device | None = None) -> float:
    """The largest residual |Σ components − value| allowed at a node, relative to max |value|:
    1e-8 in float64, 1e-3 in float32 (2e-2 where CUDA may use TF32 for float32 matmuls and
    convolutions), 5e-2 in float16 and bfloat16."""
    if dtype_eps < 1e-12:
        return 1e-8
    if dtype_eps < 1e-6:
        tf32 = device is not None and device.type == "cuda" and (
            torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32)
        return 2e-2 if tf32 else 1e-3
    return 5e-2


class OperatingPoint:
    """The data-dependent constants of one reference forward pass, keyed by fx node name, and
    the shapes, dtypes and devices of the inputs they were computed for.

    Pass it back as ``dec(..., operating_point=op)`` to evaluate the linearised model at this
    point on other inputs (the paper's separation protocol).
    """

    def __init__(self, constants: dict[str, Any], owner: int, signature: dict[str, tuple] | None = None):
        self.constants = constants
        self.signature = signature or {}
        self._owner = owner

    def to(self, *args: Any, **kwargs: Any) -> "OperatingPoint":
        """A copy with every tensor moved/cast like ``Tensor.to`` (integer tensors keep their dtype)."""

        def move(t):
            if not isinstance(t, torch.Tensor):
                return t
            if t.is_floating_point():
                return t.to(*args, **kwargs)
            device = kwargs.get("device", next((a for a in args if isinstance(a, (str, torch.device))), None))
            return t.to(device) if device is not None else t

        signature = {}
        for name, (shape, dtype, device) in self.signature.items():
            probe = move(torch.empty(0, dtype=dtype, device=device))
            signature[name] = (shape, probe.dtype, probe.device)
        return OperatingPoint(pytree.tree_map(move, self.constants), self._owner, signature)

    def __len__(self) -> int:
        return len(self.constants)

    def __repr__(self) -> str:
        return f"OperatingPoint({len(self.constants)} nodes)"


class Decomposition:
    """The result of a decomposer call: the model output and its components. ``operating_point``
    is None after a reference call of a decomposer compiled with ``keep_operating_point=False``."""

    def __init__(self, output: Any, names: tuple[str, ...], components: Any, layers: dict[str, torch.Tensor],
                 operating_point: OperatingPoint | None):
        self.output = output
        self.names = names
        self.components = components
        self.layers = layers
        self.operating_point = operating_point

    def __getitem__(self, name: str) -> Any:
        """One component (a modality name or ``"bias"``), with the structure of ``output``."""
        if name not in self.names:
            raise LMDError(f"No component named {name!r}; the components are {', '.join(self.names)}.")
        index = self.names.index(name)
        return pytree.tree_map(lambda stack: None if stack is None else stack[index], self.components)

    def __repr__(self) -> str:
        return f"Decomposition(names={self.names}, layers={list(self.layers)})"


def _resolve(root: nn.Module, target: str) -> Any:
    value: Any = root
    for part in target.split("."):
        value = getattr(value, part, None)
        if value is None:
            return None
    return value


def _member(owner: nn.Module, name: str) -> Any:
    """``getattr(owner, name, None)`` by dictionary lookups (no ``Module.__getattr__``: this
    runs for every parameter on every call)."""
    for members in (owner._parameters, owner._buffers, owner.__dict__):
        if name in members:
            return members[name]
    return getattr(owner, name, None)


def _assign(root: nn.Module, target: str, value: torch.Tensor) -> None:
    *path, name = target.split(".")
    owner = root.get_submodule(".".join(path)) if path else root
    delattr(owner, name)  # a Parameter slot refuses a plain tensor; re-register by type
    setattr(owner, name, value)


def _compiled(module: nn.Module, backend: Any) -> Callable:
    """``torch.compile`` of each generated graph module on its own: their forward code is unique
    to the decomposer, so a second decomposer is compiled for its own (static) shapes instead of
    counting as a recompile of a forward shared by all (``TrunkDispatch.forward``)."""
    graphs = getattr(module, "graphs", None)
    if graphs is None:
        return torch.compile(module, backend=backend, dynamic=False)
    return type(module)(*(torch.compile(graph, backend=backend, dynamic=False) for graph in graphs))


def _signature_of(values: Mapping[str, Any]) -> dict[str, tuple]:
    return {name: (tuple(v.shape), v.dtype, v.device) for name, v in values.items() if isinstance(v, torch.Tensor)}


class Decomposer:
    """A model compiled for LMD. Call it like ``model.forward``; see ``lmdfx.compile``.

    ``check`` (``"raise"``, ``"warn"`` or ``"off"``) is what a reference call does when a
    node's components miss its value by more than ``tolerance`` or are not finite.
    """

    def __init__(self, model: nn.Module, module: nn.Module, layout: Layout, modalities: Mapping[str, str],
                 report: Report, backend: Any = None, check: str = "raise",
                 specialised: Mapping[str, Any] | None = None, exact_output: bool = False,
                 lean: nn.Module | None = None):
        self.model = model
        self.module = module
        self.layout = layout
        self.modalities = dict(modalities)
        self.names = (*layout.modality_names, "bias")
        self.check = check
        self.exact_output = exact_output
        self._specialised = dict(specialised or {})
        self._report = report
        self._signature = inspect.signature(model.forward)
        graphs = list(getattr(module, "graphs", (module,))) + ([lean] if lean is not None else [])
        self._inputs = [n.meta["lmd_param"] for n in graphs[0].graph.nodes if "lmd_param" in n.meta]
        # (parent, attribute, submodule, qualified name) of every submodule, and (graph module,
        # target, owner module, attribute, tensor) of every parameter or buffer the graphs read:
        # checked on each call with one attribute lookup each.
        self._submodules = [(model.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2], module, name)
                            for name, module in model.named_modules() if name]
        self._tensors = []
        for graph in graphs:
            for node in graph.graph.nodes:
                target = str(node.target)
                if node.op != "get_attr" or target.startswith(RULES_ATTR):
                    continue
                owner_name, _, attr = target.rpartition(".")
                owner = _resolve(model, owner_name) if owner_name else model
                if isinstance(owner, nn.Module) and isinstance(getattr(owner, attr, None), torch.Tensor):
                    self._tensors.append((graph, target, owner, attr, getattr(owner, attr)))
        self._run: Callable = _compiled(module, backend) if backend is not None else module
        # Without an operating point to return (compile's keep_operating_point=False).
        self._run_lean: Callable | None = None if lean is None else (
            _compiled(lean, backend) if backend is not None else lean)

    # -- the model as it is now ---------------------------------------------------------------
    def _follow_model(self) -> None:
        """Read parameters and buffers from the user's model; a replaced submodule (whose
        hyper-parameters were compiled in) needs a new ``compile``."""
        for parent, child, module, name in self._submodules:
            if parent._modules.get(child) is not module:
                raise LMDError(f"model.{name} was replaced after lmdfx.compile; the decomposer was built for the old "
                               "module. Call lmdfx.compile(model, ...) again.")
        for i, (graph, target, owner, attr, tensor) in enumerate(self._tensors):
            current = _member(owner, attr)
            if current is not tensor:
                if not isinstance(current, torch.Tensor):
                    raise LMDError(f"model.{target} is no longer a tensor ({type(current).__name__}) since "
                                   "lmdfx.compile. Call lmdfx.compile(model, ...) again.")
                _assign(graph, target, current)
                self._tensors[i] = (graph, target, owner, attr, current)

    # -- calling --------------------------------------------------------------------------------
    def _arguments(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        if self.model.training or any(m.training for _, _, m, _ in self._submodules):
            raise LMDError(f"{type(self.model).__name__} is in training mode; call model.eval() before "
                           "decomposing (dropout and batch statistics make the operating point meaningless).")
        try:
            bound = self._signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise LMDError(f"The arguments do not match {type(self.model).__name__}.forward{self._signature}: {exc}. "
                           "Call the decomposer exactly like the model.") from None
        bound.apply_defaults()
        values = bound.arguments
        for name, param in self.modalities.items():
            value = values.get(param)
            if not isinstance(value, torch.Tensor):
                raise LMDError(f"Modality {name!r} (parameter {param!r}) must be a tensor, got "
                               f"{type(value).__name__}. Pass the {name} input as a torch.Tensor.")
            if self.check != "off" and value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise LMDError(f"Modality {name!r} (parameter {param!r}) contains NaN or Inf values; "
                               "a decomposition of them is NaN. Clean the input first.")
        for param, example in self._specialised.items():
            now = describe(values.get(param))
            if now != example:
                raise LMDError(f"Argument {param!r} is {now} but the model was captured by torch.export for {example}; "
                               "the captured program is specialised to those. Compile again with example_inputs "
                               "like this call's.")
        if self.check != "off":
            for param, value in values.items():
                if isinstance(value, torch.Tensor) and value.is_floating_point() and bool(torch.isnan(value).any()):
                    raise LMDError(f"Context argument {param!r} contains NaN values (Inf is allowed: masks).")
        return values

    def _check_operating_point(self, op: Any, values: Mapping[str, Any]) -> None:
        if not isinstance(op, OperatingPoint) or op._owner != id(self):
            raise LMDError("operating_point must come from this decomposer's operating_point(...) or a result's "
                           ".operating_point; operating points of other compiled models do not fit.")
        now = _signature_of({name: values[name] for name in self._inputs})
        differences = [f"{name}: {op.signature.get(name)} then, {now.get(name)} now"
                       for name in sorted(set(now) | set(op.signature)) if now.get(name) != op.signature.get(name)]
        if differences:
            raise LMDError("The operating point was computed for inputs of other shapes, dtypes or devices "
                           "(shape, dtype, device): " + "; ".join(differences)
                           + ". Compute it on inputs like these (one per sample), or move it with op.to(...).")

    def __call__(self, *args: Any, operating_point: OperatingPoint | None = None, **kwargs: Any) -> Decomposition:
        return self._call(args, kwargs, operating_point, keep=self._run_lean is None)

    def _call(self, args: tuple, kwargs: dict, operating_point: OperatingPoint | None, keep: bool) -> Decomposition:
        self._follow_model()
        values = self._arguments(args, kwargs)
        frozen = None
        if operating_point is not None:
            self._check_operating_point(operating_point, values)
            frozen = operating_point.constants
        inputs = [values[name] for name in self._inputs]
        checking = self.check != "off" and frozen is None
        run = self._run if keep or frozen is not None else self._run_lean
        result = run(*inputs, lmd_frozen=frozen, lmd_check=checking)
        if checking:
            device = next((v.device for v in inputs if isinstance(v, torch.Tensor)), None)
            self._verify(result["residuals"], device)
        components = pytree.tree_unflatten(result["components"], self.layout.output_spec)
        op = operating_point
        if op is None and result["operating_point"] is not None:
            op = OperatingPoint(result["operating_point"], id(self),
                                _signature_of({name: values[name] for name in self._inputs}))
        return Decomposition(result["output"], self.names, components, result["layers"], op)

    def _verify(self, residuals: dict[str, torch.Tensor | None], device: torch.device | None) -> None:
        """Record every node's residual in the report, then raise or warn (``self.check``) on the
        first node that is not exact or not finite, and warn where components cancel."""
        failure = self._report.update_residuals(residuals, lambda eps: tolerance(eps, device))
        if failure is not None:
            if self.check == "raise":
                raise ExactnessError(failure[0], failure[1])
            warnings.warn(failure[0], stacklevel=3)
        cancellation = self._report.cancellation_warning()
        if cancellation is not None:
            warnings.warn(cancellation, stacklevel=3)

    def operating_point(self, *args: Any, **kwargs: Any) -> OperatingPoint:
        """The operating point (all data-dependent constants) of a reference pass on these inputs."""
        return self._call(args, kwargs, None, keep=True).operating_point

    def report(self) -> Report:
        """Every node: layer, op, provenance, rule, and the residual and cancellation of the last call."""
        return self._report
