"""Ops applied to a whole component stack ``[K, *shape]`` in one call, without ``torch.vmap``.

``vmap`` costs about 0.2 ms of Python per call, more than the kernel of a small layer. For an
op that works on trailing axes (an element-wise op, a matrix product) or names its axes (a
view, a transpose, a reduction), the stack can go through the op itself: axis arguments
shift by one past the component axis, shapes gain the component axis in front, and a constant
operand broadcasts over it when its rank does not exceed a component's. Each function
returns ``None`` where it cannot tell (an unusual spelling, a rank that would broadcast into
the component axis); the caller then uses ``vmap``. The registry-driven tests check every
structural op's components against the model in float64, and the tangent map against a
reverse-mode Jacobian (``tests/test_registry_rules.py``).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from .base import bind

Handler = Callable[[torch.Tensor, tuple, dict], Any]


def _shift(dim: Any) -> Any:
    """A component axis as an axis of the stack: non-negative axes move past the component
    axis; negative ones already count from the end."""
    if isinstance(dim, int):
        return dim + 1 if dim >= 0 else dim
    if isinstance(dim, (tuple, list)) and all(isinstance(d, int) for d in dim):
        return type(dim)(_shift(d) for d in dim)
    return None


def _sizes(rest: tuple, kwargs: dict, name: str) -> tuple[int, ...] | None:
    """A shape given as varargs (``x.view(2, 3)``), one sequence (``x.view((2, 3))``,
    ``aten.view(x, [2, 3])``) or a keyword."""
    value = kwargs.get(name, rest[0] if len(rest) == 1 else rest)
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,)  # x.view(-1)
    if (len(rest) > 1 and name in kwargs) or not isinstance(value, (tuple, list, torch.Size)):
        return None
    return tuple(value) if all(isinstance(v, int) for v in value) else None


def _reshape(method: str) -> Handler:
    def handler(stack, rest, kwargs):
        shape = _sizes(rest, kwargs, "shape" if method == "reshape" else "size")
        return None if shape is None else getattr(stack, method)(stack.shape[0], *shape)
    return handler


def _axis_args(names: Sequence[str], method: str, defaults: Sequence[Any] = (), min_rank: int = 0) -> Handler:
    """A method whose leading arguments ``names`` are axes (the rest passed through): call it
    on the stack with those axes shifted; ``defaults`` fill the trailing ones when omitted.
    ``min_rank``: the component rank the op needs for this to hold."""
    params = tuple((name, defaults[i] if i < len(defaults) else None) for i, name in enumerate(names))

    def handler(stack, rest, kwargs):
        axes = bind(params, rest[:len(names)], {k: v for k, v in kwargs.items() if k in names})
        shifted = [_shift(axes[name]) for name in names]
        if stack.dim() - 1 < min_rank or any(s is None for s in shifted):
            return None
        others = {k: v for k, v in kwargs.items() if k not in names}
        return getattr(stack, method)(*shifted, *rest[len(names):], **others)
    return handler


def _permute(stack, rest, kwargs):
    dims = _sizes(rest, kwargs, "dims")
    return None if dims is None else stack.permute(0, *_shift(list(dims)))


def _expand(stack, rest, kwargs):
    sizes = _sizes(rest, kwargs, "size")
    if sizes is None or len(sizes) != stack.dim() - 1:  # new leading axes would go before K
        return None
    return stack.expand(stack.shape[0], *sizes)


def _transpose_2d(stack, rest, kwargs):
    return stack.transpose(1, 2) if stack.dim() == 3 else (stack if stack.dim() <= 2 else None)


def _reduction(method: str) -> Handler:
    def handler(stack, rest, kwargs):
        dim = rest[0] if rest else kwargs.get("dim")
        shifted = _shift(dim)
        if shifted is None or (isinstance(dim, (tuple, list)) and not dim):  # None or () reduce every axis
            return None
        others = {k: v for k, v in kwargs.items() if k != "dim"}
        return getattr(torch, method)(stack, shifted, *rest[1:], **others)
    return handler


def _basic_index(stack, rest, kwargs):
    (index,) = rest
    parts = index if isinstance(index, tuple) else (index,)
    if not all(p is None or p is Ellipsis or isinstance(p, (int, slice)) for p in parts):
        return None  # tensor or list indices: advanced indexing may move the component axis
    return stack[(slice(None), *parts)]


HANDLERS: dict[str, Handler] = {
    "view": _reshape("reshape"),  # reshape: a view where the stack allows it, the same values always
    "reshape": _reshape("reshape"),
    "permute": _permute,
    "expand": _expand,
    "t": _transpose_2d,
    "transpose": _axis_args(("dim0", "dim1"), "transpose"),
    "flatten": _axis_args(("start_dim", "end_dim"), "flatten", (0, -1), min_rank=1),
    "unflatten": _axis_args(("dim",), "unflatten"),
    "unsqueeze": _axis_args(("dim",), "unsqueeze"),
    "select": _axis_args(("dim",), "select"),
    "narrow": _axis_args(("dim",), "narrow"),
    "movedim": _axis_args(("source", "destination"), "movedim"),
    "cumsum": _axis_args(("dim",), "cumsum"),
    "sum": _reduction("sum"),
    "mean": _reduction("mean"),
    "getitem": _basic_index,
}


def _slice(stack, rest, kwargs):
    """``aten.slice(x, dim=0, start=None, end=None, step=1)``."""
    p = bind((("dim", 0), ("start", None), ("end", None), ("step", 1)), rest, kwargs)
    return torch.ops.aten.slice.Tensor(stack, _shift(p["dim"]), p["start"], p["end"], p["step"])


HANDLERS["slice"] = _slice


def on_stack(op: str, stack: torch.Tensor, rest: tuple, kwargs: dict) -> Any:
    """``op`` applied to every component of ``stack`` (its first argument; ``rest`` and
    ``kwargs`` the others), or None where this module has no exact way to do it at once."""
    handler = HANDLERS.get(op)
    return None if handler is None else handler(stack, rest, kwargs)


def broadcasts(stack: torch.Tensor, *constants: Any) -> bool:
    """Whether an element-wise op of ``stack`` and ``constants`` broadcasts them against each
    component: no constant has more axes than a component (else it would broadcast into the
    component axis)."""
    rank = stack.dim() - 1
    return all(not isinstance(c, torch.Tensor) or c.dim() <= rank for c in constants)


def matmul_broadcasts(stack: torch.Tensor, constant: torch.Tensor, stack_first: bool) -> bool:
    """Whether ``torch.matmul`` of a stack and a constant matrix operand is the stack of the
    per-component products: the component axis must land among the batch axes."""
    rank = stack.dim() - 1
    if stack_first:
        return (rank >= 2 and constant.dim() <= rank) or (rank == 1 and constant.dim() <= 2)
    return rank >= 2 and constant.dim() <= rank


def aligned(stacks: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Stacks of components of different ranks, given axes of size 1 after the component axis
    so that they broadcast against each other as their components do."""
    rank = max(s.dim() for s in stacks)
    return [s if s.dim() == rank else s.reshape(s.shape[0], *([1] * (rank - s.dim())), *s.shape[1:]) for s in stacks]
