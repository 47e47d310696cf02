"""Pass 6 — clean-up.

Requires: ``rewrite``.
Ensures: nodes whose values nothing uses (trunk values no rule reads, unused lifts) are gone.
"""

from __future__ import annotations

from torch import fx


def optimize(gm: fx.GraphModule) -> fx.GraphModule:
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return gm
