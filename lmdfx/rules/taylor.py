"""Taylor fallback (paper appendix F, eq. 20): any differentiable op g is replaced by its
Jacobian at the operating point: D_k -> J·D_k, and g(A) − J·A goes to the bias component."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils import _pytree as pytree

from .base import Rule, add_to_bias
from .registry import register


@register("taylor")
class TaylorRule(Rule):
    name = "taylor"
    has_operating_point = True

    def operating_point(self, out, args, kwargs, stacked_args, stacked_kwargs):
        g, primals = self.as_function(args, kwargs)
        value, linear_part = torch.func.jvp(g, primals, primals)
        remainder = pytree.tree_map(torch.sub, value, linear_part)
        return {"primals": primals, "remainder": remainder}

    def forward(self, constants: dict, args: tuple, kwargs: dict) -> Any:
        g, stacks = self.as_function(args, kwargs)
        primals = tuple(constants["primals"])

        def directional(*tangents):
            return torch.func.jvp(g, primals, tangents)[1]

        components = torch.vmap(directional)(*stacks)
        return pytree.tree_map(add_to_bias, components, constants["remainder"])


