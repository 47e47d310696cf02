"""Pass 3b — operating-point constants chosen by the rules.

Requires: ``provenance``.
Ensures: a mixed node whose rule makes its whole output an operating-point constant
(``Rule.constant_output``: softmax weights under ``Rules(softmax="freeze")``) is marked
``meta["lmd_constant"]`` and is ``"frozen"``, with the provenance downstream of it recomputed.
A product with frozen attention weights is then linear in the values (no product rule), and
the scores Q·Kᵀ that only feed the frozen weights get no components (pass ``rewrite`` gives
branches only to mixed nodes whose components something reads).
"""

from __future__ import annotations

from typing import Sequence

from torch import fx

from ..rules import Rules, resolve
from .assign_rules import op_call
from .provenance import provenance


def constant_outputs(gm: fx.GraphModule, rules: Rules, modality_params: Sequence[str]) -> fx.GraphModule:
    while True:  # a frozen node can change what is mixed downstream, and so other rules
        marked = False
        for node in gm.graph.nodes:
            if node.meta.get("lmd_kind") != "mixed" or node.meta.get("lmd_constant"):
                continue
            rule = resolve(op_call(gm, node), rules)
            if rule is not None and rule.constant_output and rule.verified:  # a user's subclass keeps its forward
                node.meta["lmd_constant"] = marked = True
        if not marked:
            return gm
        provenance(gm, modality_params)
