"""Selection ops: which element wins is an operating-point constant; every component is
gathered where the reference value was selected."""

from __future__ import annotations

from typing import Any

import torch

from .base import NodeRef, OpCall, Rule, as_bias_stack, bind, first_decomposed
from .registry import register

_POOLS = {
    "max_pool1d": 1, "max_pool2d": 2, "max_pool3d": 3,
    "adaptive_max_pool1d": 1, "adaptive_max_pool2d": 2, "adaptive_max_pool3d": 3,
}


def _gather(stack: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """Gather every component along ``dim`` (of the original value) at ``index``."""
    return stack.gather(dim + 1, index.unsqueeze(0).expand(stack.shape[0], *index.shape))


@register("max_pool", ops=tuple(_POOLS))
class MaxPoolRule(Rule):
    """Max pooling: the reference pass's argmax indices, applied to every component."""

    name = "indices"
    has_operating_point = True
    tangent = True

    def _returns_indices(self) -> bool:
        params = {"input": None, "kernel_size": None, "stride": None, "padding": 0, "dilation": 1,
                  "ceil_mode": False, "return_indices": False}
        if self.call.op.startswith("adaptive"):
            params = {"input": None, "output_size": None, "return_indices": False}
        return bool(self.call.static(tuple(params.items()))["return_indices"])

    def operating_point(self, out, args, kwargs, stacked_args, stacked_kwargs):
        if self._returns_indices():
            return {"indices": out[1]}
        kwargs = dict(kwargs, return_indices=True)
        return {"indices": self.call.invoke(args, kwargs)[1]}

    def forward(self, constants: dict, args: tuple, kwargs: dict) -> Any:
        stack = first_decomposed(args, kwargs, self.call.decomposed)
        indices = constants["indices"]
        spatial = _POOLS[self.call.op]
        flat = stack.flatten(-spatial)
        picked = _gather(flat, flat.dim() - 2, indices.flatten(-spatial)).view(stack.shape[0], *indices.shape)
        return (picked, indices) if self._returns_indices() else picked


_REDUCE = (("input", None), ("dim", None), ("keepdim", False))
_TOPK = (("input", None), ("k", None), ("dim", -1), ("largest", True), ("sorted", True))
_SORT = (("input", None), ("dim", -1), ("descending", False), ("stable", False))


@register("selection", ops=("max", "min", "amax", "amin", "topk", "sort", "maximum", "minimum",
                                       "fmax", "fmin"))
class SelectRule(Rule):
    """max/min (over a dim, global or element-wise of two tensors), amax/amin over one dim,
    topk and sort values: indices (or the winner mask) from the reference pass."""

    name = "indices"
    has_operating_point = True
    tangent = True
    op_slots = {op: (0, 1, "input", "other") for op in ("maximum", "minimum", "fmax", "fmin", "max", "min")}

    def __init__(self, call: OpCall, options: Any):
        super().__init__(call, options)
        op = call.op
        second = call.args[1] if len(call.args) > 1 else call.kwargs.get("other", call.kwargs.get("dim"))
        if op in ("maximum", "minimum", "fmax", "fmin") or isinstance(second, NodeRef):
            self.mode = "elementwise"
        elif op in ("topk", "sort"):
            self.mode = op
        elif second is None and "dim" not in call.kwargs:
            self.mode = "global"
        else:
            self.mode = "reduce"

    @classmethod
    def supports(cls, call: OpCall) -> bool:
        return super().supports(call) and not cls.limitation(call)

    @classmethod
    def limitation(cls, call: OpCall) -> str:
        if call.op in ("amax", "amin"):
            dim = call.static(_REDUCE)["dim"]
            if not (isinstance(dim, int) or (isinstance(dim, (tuple, list)) and len(dim) == 1)):
                return "amax/amin over several dims (or all) is not handled; reduce one dim at a time"
        return ""

    def _larger(self) -> bool:
        return self.call.op in ("max", "amax", "maximum", "fmax")

    def operating_point(self, out, args, kwargs, stacked_args, stacked_kwargs):
        if self.mode == "elementwise":
            a, b = args[0], (args[1] if len(args) > 1 else kwargs["other"])
            return {"first": (a >= b) if self._larger() else (a <= b)}
        x = args[0]
        if self.mode == "global":
            flat = x.flatten()
            return {"indices": (flat.argmax() if self._larger() else flat.argmin()).view(1)}
        if self.mode in ("topk", "sort"):
            return {"indices": out[1]}
        p = bind(_REDUCE, args, kwargs)
        dim = p["dim"][0] if isinstance(p["dim"], (tuple, list)) else p["dim"]
        pick = x.argmax if self._larger() else x.argmin
        return {"indices": pick(dim, keepdim=True)}

    def forward(self, constants: dict, args: tuple, kwargs: dict) -> Any:
        if self.mode == "elementwise":
            a, b = args[0], (args[1] if len(args) > 1 else kwargs["other"])
            d = self.call.decomposed
            a = a if d[0] else as_bias_stack(a, b)
            b = b if d[1] else as_bias_stack(b, a)
            return torch.where(constants["first"], a, b)
        stack, indices = args[0], constants["indices"]
        if self.mode == "global":
            return stack.flatten(1)[:, indices[0]]
        if self.mode in ("topk", "sort"):
            p = bind(_TOPK if self.mode == "topk" else _SORT, args, kwargs)
            dim = p["dim"] % indices.dim()
            return _gather(stack, dim, indices), indices
        p = bind(_REDUCE, args, kwargs)
        dim = p["dim"][0] if isinstance(p["dim"], (tuple, list)) else p["dim"]
        dim = dim % (stack.dim() - 1)
        values = _gather(stack, dim, indices)
        if not p["keepdim"]:
            values = values.squeeze(dim + 1)
            indices = indices.squeeze(dim)
        if self.call.op in ("amax", "amin"):
            return values
        return values, indices


__all__ = ["MaxPoolRule", "SelectRule"]
