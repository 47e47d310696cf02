"""Taylor fallback (paper appendix F, eq. 20): any differentiable op g is replaced by its
Jacobian at the operating point: D_k -> J·D_k, and g(A) − J·A goes to the bias component."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils import _pytree as pytree

from .base import BIAS, Rule, add_to_bias
from .registry import register


@register("taylor")
class TaylorRule(Rule):
    name = "taylor"
    has_operating_point = True

    def _function(self, args: tuple, kwargs: dict):
        leaves, spec = pytree.tree_flatten((args, kwargs))
        positions = [i for i, flag in enumerate(self.call.decomposed) if flag]

        def g(*values):
            filled = list(leaves)
            for position, value in zip(positions, values):
                filled[position] = value
            a, k = pytree.tree_unflatten(filled, spec)
            return self.call.invoke(a, k)

        return g, tuple(leaves[p] for p in positions)

    def operating_point(self, out, args, kwargs, stacked_args, stacked_kwargs):
        g, primals = self._function(args, kwargs)
        value, linear_part = torch.func.jvp(g, primals, primals)
        remainder = pytree.tree_map(torch.sub, value, linear_part)
        return {"primals": primals, "remainder": remainder}

    def forward(self, constants: dict, args: tuple, kwargs: dict) -> Any:
        g, stacks = self._function(args, kwargs)
        primals = tuple(constants["primals"])

        def directional(*tangents):
            return torch.func.jvp(g, primals, tangents)[1]

        components = torch.vmap(directional)(*stacks)
        return pytree.tree_map(add_to_bias, components, constants["remainder"])


__all__ = ["TaylorRule", "BIAS"]
