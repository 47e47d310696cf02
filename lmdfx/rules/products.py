"""Products of two decomposed values (gating, attention, bilinear forms).

``gate`` (default): the operand computed by a gating function (sigmoid, hardsigmoid, softmax,
tanh; through reshapes), on whichever side it stands, is an operating-point constant, so the
product is linear in the other operand and separates; with no gate, the operand that is wholly
in the bias component at the operating point is frozen; with neither, the Shapley split below
(which does not separate: ``dec.report()`` lists such nodes).

``shapley``: x·y = Σ_k Σ_l x_k y_l; a term with k = l goes to k, a term with the bias goes to
the other partner, a cross term of two modalities is split half-half — the exact Shapley split
of the bilinear game with the bias as baseline. ``freeze``: one operand is an operating-point
constant, so the product is linear in the other: the operand that is wholly in the bias
component at the operating point (frozen softmax weights in P·V, a frozen gate), else the
second one (Kᵀ in Q·Kᵀ, the gate in x·σ(g)).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils import _pytree as pytree

from ..ops import GATES
from .base import BIAS, NodeRef, OpCall, Rule
from .linear import MULTIPLICATIVE, MULTIPLICATIVE_SLOTS
from .registry import register
from .stacked import broadcasts, matmul_broadcasts


def _shapley(op: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Modality k receives op(x_k, Y/2 + y_b) + op(X/2 + x_b, y_k), with X, Y the modality sums;
    the bias op(x_b, y_b)."""
    x_half = 0.5 * x[:BIAS].sum(0) + x[BIAS]
    y_half = 0.5 * y[:BIAS].sum(0) + y[BIAS]
    modal = torch.vmap(op, in_dims=(0, None))(x[:BIAS], y_half) + torch.vmap(op, in_dims=(None, 0))(x_half, y[:BIAS])
    return torch.cat([modal, op(x[BIAS], y[BIAS]).unsqueeze(0)])


class _BinaryProduct(Rule):
    op_slots = MULTIPLICATIVE_SLOTS

    @classmethod
    def supports(cls, call: OpCall) -> bool:
        return super().supports(call) and call.n_decomposed == 2

    @classmethod
    def limitation(cls, call: OpCall) -> str:
        return f"{call.n_decomposed} decomposed operands (a product rule takes exactly two)"

    def _bilinear(self, args: tuple, kwargs: dict):
        """The op as a function of its two decomposed operands, and those operands."""
        op, (x, y) = self.as_function(args, kwargs)
        return op, x, y

    def _with_frozen(self, op: Any, x: torch.Tensor, y: torch.Tensor, constants: dict) -> torch.Tensor:
        """The product with one operand frozen at its operating-point value (``constants``),
        linear in the other operand's stack: at once where the op broadcasts over the
        component axis, else per component (vmap)."""
        frozen, first = constants["frozen"], constants["first"]
        stack = y if first else x
        if self.call.op == "mul" and broadcasts(stack, frozen):
            return op(frozen, stack) if first else op(stack, frozen)
        if self.call.op in ("matmul", "mm", "bmm") and matmul_broadcasts(stack, frozen, stack_first=not first):
            return torch.matmul(frozen, stack) if first else torch.matmul(stack, frozen)
        if first:
            return torch.vmap(op, in_dims=(None, 0))(frozen, stack)
        return torch.vmap(op, in_dims=(0, None))(stack, frozen)


@register("product", "shapley", ops=MULTIPLICATIVE)
class ShapleyProductRule(_BinaryProduct):
    name = "shapley"
    summable = True
    # A modality's share of a cross term moves with the other modality's input.
    separates = False

    def forward(self, constants: Any, args: tuple, kwargs: dict) -> torch.Tensor:
        op, x, y = self._bilinear(args, kwargs)
        return _shapley(op, x, y)


@register("product", "freeze")
class FreezeProductRule(_BinaryProduct):
    name = "freeze"
    has_operating_point = True

    def operating_point(self, out, args, kwargs, stacked_args, stacked_kwargs):
        _, first, second = self._bilinear(args, kwargs)
        _, x, y = self._bilinear(stacked_args, stacked_kwargs)
        # Freezing an operand with no modality part (P = frozen softmax in P·V) keeps all of the
        # other operand's components; freezing the other one would move everything to the bias.
        freeze_first = not bool(x[:BIAS].any()) and bool(y[:BIAS].any())
        return {"frozen": first if freeze_first else second, "first": freeze_first}

    def forward(self, constants: dict, args: tuple, kwargs: dict) -> torch.Tensor:
        op, x, y = self._bilinear(args, kwargs)
        return self._with_frozen(op, x, y, constants)


def _gate_operand(call: OpCall) -> int | None:
    """0 or 1: the operand (in decomposed order) computed by a gating function, if exactly one is."""
    refs = [leaf for leaf in pytree.tree_leaves((call.args, call.kwargs)) if isinstance(leaf, NodeRef) and leaf.decomposed]
    gates = [i for i, ref in enumerate(refs) if ref.producer in GATES]
    return gates[0] if len(gates) == 1 else None


@register("product", "gate")
class GateProductRule(_BinaryProduct):
    name = "gate"
    has_operating_point = True

    def __init__(self, call: OpCall, options: Any):
        super().__init__(call, options)
        self.gate = _gate_operand(call)

    @property
    def separates(self) -> bool:
        return self.gate is not None

    def operating_point(self, out, args, kwargs, stacked_args, stacked_kwargs):
        _, first, second = self._bilinear(args, kwargs)
        _, x, y = self._bilinear(stacked_args, stacked_kwargs)
        if self.gate is not None:
            frozen = self.gate
        elif not bool(x[:BIAS].any()) and bool(y[:BIAS].any()):
            frozen = 0
        elif not bool(y[:BIAS].any()) and bool(x[:BIAS].any()):
            frozen = 1
        else:
            return {"frozen": None}
        return {"frozen": (first, second)[frozen], "first": frozen == 0}

    def forward(self, constants: dict, args: tuple, kwargs: dict) -> torch.Tensor:
        op, x, y = self._bilinear(args, kwargs)
        if constants["frozen"] is None:
            return _shapley(op, x, y)
        return self._with_frozen(op, x, y, constants)
