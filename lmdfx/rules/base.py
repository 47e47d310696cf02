"""What every rule shares: the call it decomposes, the stacked representation, and helpers.

A decomposed ("mixed") value is one tensor of shape ``[K, *shape]`` with ``K = M + 1``: the M
modality components in declared order, then the bias component. A rule receives the node's
arguments with every decomposed tensor replaced by its stack (pure-modality operands arrive
already lifted into a stack with zeros elsewhere) and returns the stacked output.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from torch.utils import _pytree as pytree

BIAS = -1  # index of the bias component along the component axis


@dataclass(frozen=True)
class NodeRef:
    """Stands for an fx Node in an ``OpCall``'s argument template."""

    name: str
    decomposed: bool
    producer: str = ""  # canonical op that computed the value (through reshapes), for the gate rule


@dataclass
class OpCall:
    """A node's operation, frozen at compile time.

    ``decomposed`` flags every leaf of the flattened ``(args, kwargs)`` that arrives as a stack.
    ``operands`` flags the leaves that are tensor operands of an additive op (where a constant
    operand belongs to the bias component); it is empty for other ops.
    """

    kind: str  # "call_function" | "call_method" | "call_module"
    target: Any
    op: str  # canonical op name
    node: str  # fx node name
    layer: str  # innermost module qualified name ("" at top level)
    decomposed: tuple[bool, ...]
    args: tuple = ()  # the node's args, with every fx Node replaced by a NodeRef
    kwargs: dict = field(default_factory=dict)
    module: nn.Module | None = None
    source: str = ""
    extra: dict = field(default_factory=dict)

    def invoke(self, args: tuple, kwargs: dict) -> Any:
        """Run the original operation on plain (unstacked) values."""
        if self.kind == "call_function":
            return self.target(*args, **kwargs)
        if self.kind == "call_method":
            self_arg, *rest = args
            return getattr(self_arg, self.target)(*rest, **kwargs)
        return self.module(*args, **kwargs)

    @property
    def n_decomposed(self) -> int:
        return sum(self.decomposed)

    @property
    def slots(self) -> tuple[int | str, ...]:
        """For each leaf of the flattened ``(args, kwargs)``: its argument position (an index
        for a positional argument, the name for a keyword argument)."""
        out: list[int | str] = []
        for index, arg in enumerate(self.args):
            out += [index] * len(pytree.tree_leaves(arg))
        for name, arg in self.kwargs.items():
            out += [name] * len(pytree.tree_leaves(arg))
        return tuple(out)

    @property
    def decomposed_slots(self) -> frozenset[int | str]:
        """The argument positions that carry a decomposed value."""
        return frozenset(slot for slot, flag in zip(self.slots, self.decomposed) if flag)

    def static(self, params: tuple[tuple[str, Any], ...]) -> dict[str, Any]:
        """The compile-time arguments bound to ``params`` (NodeRefs for graph values)."""
        return bind(params, self.args, self.kwargs)


def lift(value: torch.Tensor, index: int, k: int) -> torch.Tensor:
    """Stack ``value`` as component ``index`` of ``k`` components, zeros elsewhere.

    A multi-output value (a module's tuple, e.g. ``nn.MultiheadAttention``'s) is lifted per
    tensor; ``None`` entries stay ``None``.
    """
    if not isinstance(value, torch.Tensor):
        return pytree.tree_map(lambda v: lift(v, index, k) if isinstance(v, torch.Tensor) else v, value)
    zeros = torch.zeros_like(value)
    return torch.stack([value if i == index % k else zeros for i in range(k)])


def as_bias_stack(value: Any, like: torch.Tensor) -> torch.Tensor:
    """A constant operand (tensor or Python number) as a stack whose bias component holds it."""
    k = like.shape[0]
    if not isinstance(value, torch.Tensor):
        value = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    return lift(value, BIAS, k)


def expand_like(coefficient: torch.Tensor, stack: torch.Tensor) -> torch.Tensor:
    """View a per-element coefficient of the original value so it broadcasts over components."""
    return coefficient.unsqueeze(0) if coefficient.dim() == stack.dim() - 1 else coefficient


def add_to_bias(stack: torch.Tensor, constant: torch.Tensor | float) -> torch.Tensor:
    """Return ``stack`` with ``constant`` added to the bias component only (out of place)."""
    if isinstance(constant, torch.Tensor):
        constant = constant.expand(stack.shape[1:]) if constant.dim() < stack.dim() else constant
    bias = stack[BIAS] + constant
    return torch.cat([stack[:BIAS], bias.unsqueeze(0)])


def add_to_bias_(stack: torch.Tensor, constant: torch.Tensor | float) -> torch.Tensor:
    """``add_to_bias`` in place, for a stack the caller has just computed and owns: it saves
    copying the M modality components (a concatenation) on every affine rule."""
    bias = stack[BIAS]
    if isinstance(constant, torch.Tensor) and (constant.dtype != bias.dtype or not fits(constant.shape, bias.shape)):
        return add_to_bias(stack, constant)
    bias.add_(constant)
    return stack


def fits(shape: torch.Size, target: torch.Size) -> bool:
    """Whether ``shape`` broadcasts to ``target`` without growing it (an in-place add fits)."""
    return len(shape) <= len(target) and all(a in (1, b) for a, b in zip(reversed(shape), reversed(target)))


def bind(params: tuple[tuple[str, Any], ...], args: tuple, kwargs: dict) -> dict[str, Any]:
    """Bind a call's arguments to parameter names; ``params`` is ((name, default), ...)."""
    bound = {name: default for name, default in params}
    for (name, _), value in zip(params, args):
        bound[name] = value
    bound.update(kwargs)
    return bound


class Rule(nn.Module):
    """How one node is decomposed.

    ``operating_point`` computes the node's data-dependent constants from the reference pass:
    ``out`` and ``args``/``kwargs`` are the plain values of the unmodified model, ``stacked_args``
    the components arriving at the node. ``forward(constants, args, kwargs)`` returns the
    stacked output; with a frozen operating point ``constants`` are the stored ones.
    """

    name = "rule"
    has_operating_point = False
    # Declared properties the passes and tests rely on (never class lists):
    # ``summable``: reads no operating point, and its output stack is linear in the input stacks,
    # so the node's value is the sum of its components (the trunk may be computed that way);
    # ``tangent``: each modality component is the op's tangent map J·D_k (checked against jvp);
    # ``separates``: at a frozen operating point a component depends on its own modality only.
    # ``moves_values``: every output element of every component is an element of the same
    # component of an input, or zero (views, transposes, selections, concatenations), so the
    # components sum to the value exactly where they did at the input: the node needs no
    # equality check of its own (the registry-driven tests check the sums bit for bit, so
    # only ``verified`` rules are trusted with it, as with ``constant_output``).
    summable = False
    tangent = False
    separates = True
    moves_values = False
    # ``closes_with_remainder``: the bias component takes the remainder value − Σ(the other
    # terms), computed from the reference input, so where that input's value is the sum of its
    # components the node's components sum to its value up to rounding by construction (the
    # check then measures their cancellation, as for a summed node; verified rules only).
    closes_with_remainder = False
    # ``constant_output``: the whole output is an operating-point constant (frozen softmax
    # weights): the node is treated as frozen, so nothing downstream sees components of it.
    constant_output = False
    # Argument positions (index or keyword name) that may carry a decomposed value, per op.
    slots: tuple[int | str, ...] = (0, "input", "self")
    op_slots: dict[str, tuple[int | str, ...]] = {}

    def __init__(self, call: OpCall, options: Any):
        super().__init__()
        self.call = call
        self.options = options

    @property
    def verified(self) -> bool:
        """Whether this exact class is in the registry, so the registry-driven tests cover it (a
        user's rule class, even a subclass of a registered one, is not)."""
        return type(self).__dict__.get("registered", False)

    @classmethod
    def decomposable(cls, op: str) -> tuple[int | str, ...]:
        """The argument positions of ``op`` this rule decomposes."""
        return cls.op_slots.get(op, cls.slots)

    @classmethod
    def supports(cls, call: OpCall) -> bool:
        """Whether this rule can decompose ``call``: every decomposed operand sits in a position
        the rule declares (subclasses add their own conditions)."""
        used = call.decomposed_slots
        return bool(used) and used <= set(cls.decomposable(call.op))

    @classmethod
    def why_not(cls, call: OpCall) -> str:
        """Why ``supports(call)`` is False, in words."""
        outside = sorted(map(str, call.decomposed_slots - set(cls.decomposable(call.op))))
        if outside:
            return (f"a decomposed operand at argument {', '.join(outside)}, where the op is not linear "
                    f"(decomposable: {', '.join(map(str, cls.decomposable(call.op)))})")
        return cls.limitation(call)

    @classmethod
    def limitation(cls, call: OpCall) -> str:
        """What else keeps this rule from ``call`` (subclasses with extra conditions say)."""
        return "its arguments are outside what the rule handles"

    def operating_point(
        self, out: Any, args: tuple, kwargs: dict, stacked_args: tuple, stacked_kwargs: dict
    ) -> dict[str, torch.Tensor]:
        return {}

    def forward(self, constants: dict | None, args: tuple, kwargs: dict) -> Any:  # pragma: no cover
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"{self.call.node}: {self.call.op} -> {self.name}"

    # -- helpers shared by rule families ------------------------------------------------------
    def as_function(self, args: tuple, kwargs: dict, positions: list[int] | None = None) -> tuple[Callable, tuple]:
        """The op as a function of the leaves at ``positions`` of the flattened (args, kwargs)
        (default: the decomposed ones), every other argument fixed; and those leaves' values."""
        if positions is None:
            positions = [i for i, flag in enumerate(self.call.decomposed) if flag]
        if positions == [0] and args and isinstance(args[0], torch.Tensor):
            # A unary op on its first argument, without flattening the call
            return (lambda value: self.call.invoke((value, *args[1:]), kwargs)), (args[0],)
        leaves, spec = pytree.tree_flatten((args, kwargs))

        def op(*values):
            filled = list(leaves)
            for position, value in zip(positions, values):
                filled[position] = value
            a, k = pytree.tree_unflatten(filled, spec)
            return self.call.invoke(a, k)

        return op, tuple(leaves[p] for p in positions)

    def vmap_call(self, args: tuple, kwargs: dict) -> Any:
        """Apply the op to every component (the op must be linear in the decomposed leaves)."""
        op, stacks = self.as_function(args, kwargs)
        return torch.vmap(op)(*stacks)


def first_decomposed(args: tuple, kwargs: dict, flags: tuple[bool, ...]) -> Any:
    """The leaf at the first decomposed position of a call: the input of a unary op.

    Called with stacked arguments it gives the input stack; called with the reference
    arguments, the reference input at the same position.
    """
    if flags and flags[0] and args and isinstance(args[0], torch.Tensor):
        return args[0]  # the usual case, without flattening the call
    leaves, _ = pytree.tree_flatten((args, kwargs))
    return next(leaf for leaf, flag in zip(leaves, flags) if flag)


RuleFactory = Callable[[OpCall, Any], Rule]
