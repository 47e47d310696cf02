"""Pass 6 — clean-up and optimisation.

Requires: ``rewrite``.
Ensures: with ``structural=True`` the ``structural_zeros`` rewrite has run (affine layers over
concatenated undecomposed inputs cost one layer, not one per component); nodes whose values
nothing uses (trunk values no rule reads, unused lifts) are gone. Results are unchanged up to
floating-point summation order.
"""

from __future__ import annotations

from typing import Any

from torch import fx, nn

from .structural_zeros import structural_zeros


def optimize(gm: fx.GraphModule, structural: bool = True) -> fx.GraphModule:
    if structural:
        structural_zeros(gm)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return gm


class TrunkDispatch(nn.Module):
    """Runs ``summed`` (trunk of the mixed part = sum of components) for reference calls and
    ``exact`` (trunk = the original graph) for frozen-operating-point calls, where the
    components no longer sum to the model's value on the new inputs.

    Both graphs take the same inputs and return the same structure; ``graph`` is the
    reference graph's (its placeholders are the call signature).
    """

    def __init__(self, summed: fx.GraphModule, exact: fx.GraphModule):
        super().__init__()
        self.summed = summed
        self.exact = exact

    @property
    def graph(self) -> fx.Graph:
        return self.summed.graph

    @property
    def lmd_rules(self) -> nn.Module:
        """The rule modules (shared by both graphs)."""
        return self.exact.lmd_rules

    @property
    def graphs(self) -> tuple[fx.GraphModule, fx.GraphModule]:
        return self.summed, self.exact

    def forward(self, *inputs: Any, lmd_frozen: Any = None, lmd_check: bool = True) -> dict:
        module = self.summed if lmd_frozen is None else self.exact
        return module(*inputs, lmd_frozen=lmd_frozen, lmd_check=lmd_check)
