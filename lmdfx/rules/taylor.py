"""Taylor fallback (paper appendix F, eq. 20): any differentiable op g is replaced by its
Jacobian at the operating point: D_k -> J·D_k, and g(A) − J·A goes to the bias component.

Only floating-point tensors are linearised: integer or boolean operands (token ids, masks) are
held at their reference values, and output leaves that are not floating tensors (``None``,
indices) are returned as the reference pass produced them.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.utils import _pytree as pytree

from ..errors import LMDError
from .base import BIAS, OpCall, Rule, add_to_bias, first_decomposed, lift
from .registry import register


def _floating(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.is_floating_point()


@register("taylor")
class TaylorRule(Rule):
    name = "taylor"
    has_operating_point = True
    tangent = True

    @classmethod
    def supports(cls, call: OpCall) -> bool:
        return call.n_decomposed > 0

    # torch.compile traces forward-mode AD of some ops (layer_norm) into an internal assert under
    # fake tensors: the Jacobian products run eagerly, a graph break for a compiled decomposer.
    @torch.compiler.disable
    def _jvp(self, g: Callable, primals: tuple, tangents: tuple) -> tuple:
        try:
            return torch.func.jvp(g, primals, tangents)
        except NotImplementedError as exc:
            raise LMDError(f"Taylor fallback at node {self.call.node!r} (op {self.call.op!r}, module "
                           f"{self.call.layer or '<top level>'!r}, {self.call.source or 'no source'}): torch has no "
                           f"forward-mode derivative for an op inside it ({str(exc).splitlines()[0]}). Register a rule "
                           "for the op, or make the part that mixes the modalities into it a leaf with its own rule.") \
                from None

    def _linearised(self, args: tuple, kwargs: dict, keep: tuple[int, ...], fixed: dict) -> tuple[Callable, tuple]:
        """g as a function of the floating decomposed leaves, returning the floating output leaves
        ``keep``; decomposed leaves that are not floating take their reference values ``fixed``."""
        leaves, spec = pytree.tree_flatten((args, kwargs))
        for position, value in fixed.items():
            leaves[int(position)] = value
        args, kwargs = pytree.tree_unflatten(leaves, spec)
        positions = [i for i, flag in enumerate(self.call.decomposed) if flag and str(i) not in fixed]
        op, values = self.as_function(args, kwargs, positions)

        def g(*primals):
            out_leaves = pytree.tree_leaves(op(*primals))
            return tuple(out_leaves[i] for i in keep)

        return g, values

    def operating_point(self, out, args, kwargs, stacked_args, stacked_kwargs):
        leaves = pytree.tree_leaves((args, kwargs))
        fixed = {str(i): leaves[i] for i, flag in enumerate(self.call.decomposed) if flag and not _floating(leaves[i])}
        out_leaves, out_spec = pytree.tree_flatten(out)
        keep = tuple(i for i, leaf in enumerate(out_leaves) if _floating(leaf))
        g, primals = self._linearised(args, kwargs, keep, fixed)
        if primals:
            value, linear_part = self._jvp(g, primals, primals) if keep else ((), ())
            remainder = tuple(v - lin for v, lin in zip(value, linear_part))
        else:  # only integer operands are decomposed: the output is wholly the bias component's
            remainder = tuple(out_leaves[i] for i in keep)
        return {"primals": primals, "remainder": remainder,
                "keep": keep, "fixed": fixed, "spec": out_spec,
                "others": [None if i in keep else leaf for i, leaf in enumerate(out_leaves)]}

    @torch.compiler.disable
    def forward(self, constants: dict, args: tuple, kwargs: dict) -> Any:
        keep = tuple(constants["keep"])
        g, stacks = self._linearised(args, kwargs, keep, constants["fixed"])
        primals = tuple(constants["primals"])

        def directional(*tangents):
            return self._jvp(g, primals, tangents)[1]

        leaves = list(constants["others"])
        if stacks:
            components = torch.vmap(directional)(*stacks) if keep else ()
            for i, stack, remainder in zip(keep, components, constants["remainder"]):
                leaves[i] = add_to_bias(stack, remainder)
        else:
            k = first_decomposed(args, kwargs, self.call.decomposed).shape[0]
            for i, remainder in zip(keep, constants["remainder"]):
                leaves[i] = lift(remainder, BIAS, k)
        return pytree.tree_unflatten(leaves, constants["spec"])
