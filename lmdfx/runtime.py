"""Running a compiled decomposition: ``Decomposer`` (callable), ``Decomposition`` (its result)
and ``OperatingPoint`` (the constants of one reference pass)."""

from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from .errors import LMDError
from .passes import Layout
from .report import Report


class OperatingPoint:
    """The data-dependent constants of one reference forward pass, keyed by fx node name.

    Pass it back as ``dec(..., operating_point=op)`` to evaluate the linearised model at this
    point on other inputs (the paper's separation protocol).
    """

    def __init__(self, constants: dict[str, Any], owner: int):
        self.constants = constants
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

        return OperatingPoint(pytree.tree_map(move, self.constants), self._owner)

    def __len__(self) -> int:
        return len(self.constants)

    def __repr__(self) -> str:
        return f"OperatingPoint({len(self.constants)} nodes)"


class Decomposition:
    """The result of a decomposer call: the model output and its components."""

    def __init__(self, output: Any, names: tuple[str, ...], components: Any, layers: dict[str, torch.Tensor],
                 operating_point: OperatingPoint):
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


class Decomposer:
    """A model compiled for LMD. Call it like ``model.forward``; see ``lmdfx.compile``."""

    def __init__(self, model: nn.Module, module: fx.GraphModule, layout: Layout, modalities: Mapping[str, str],
                 report: Report, backend: Any = None):
        self.model = model
        self.module = module
        self.layout = layout
        self.modalities = dict(modalities)
        self.names = (*layout.modality_names, "bias")
        self._report = report
        self._signature = inspect.signature(model.forward)
        self._inputs = [n.meta["lmd_param"] for n in module.graph.nodes if "lmd_param" in n.meta]
        self._run: Callable = torch.compile(module, backend=backend) if backend is not None else module
        self.check_residuals = True

    # -- calling --------------------------------------------------------------------------------
    def _inputs_from(self, args: tuple, kwargs: dict) -> list[Any]:
        if any(m.training for m in self.model.modules()):
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
            if not isinstance(values.get(param), torch.Tensor):
                raise LMDError(f"Modality {name!r} (parameter {param!r}) must be a tensor, got "
                               f"{type(values.get(param)).__name__}. Pass the {name} input as a torch.Tensor.")
        return [values[name] for name in self._inputs]

    def __call__(self, *args: Any, operating_point: OperatingPoint | None = None, **kwargs: Any) -> Decomposition:
        inputs = self._inputs_from(args, kwargs)
        frozen = None
        if operating_point is not None:
            if not isinstance(operating_point, OperatingPoint) or operating_point._owner != id(self):
                raise LMDError("operating_point must come from this decomposer's operating_point(...) or a result's "
                               ".operating_point; operating points of other compiled models do not fit.")
            frozen = operating_point.constants
        result = self._run(*inputs, lmd_frozen=frozen, lmd_check=self.check_residuals and frozen is None)
        if frozen is None and self.check_residuals:
            self._report.update_residuals(result["residuals"])
        components = pytree.tree_unflatten(result["components"], self.layout.output_spec)
        op = operating_point if operating_point is not None else OperatingPoint(result["operating_point"], id(self))
        return Decomposition(result["output"], self.names, components, result["layers"], op)

    def operating_point(self, *args: Any, **kwargs: Any) -> OperatingPoint:
        """The operating point (all data-dependent constants) of a reference pass on these inputs."""
        return self(*args, **kwargs).operating_point

    def report(self) -> Report:
        """Every node: layer, op, provenance, rule, and the largest residual of the last call."""
        return self._report
