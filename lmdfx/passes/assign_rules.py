"""Pass 4 — rule assignment.

Requires: ``provenance`` (``meta["lmd_kind"]``).
Ensures: every mixed node has ``meta["lmd_rule"]``, a ``Rule`` module from the registry under
the user's ``Rules`` (overrides by module name, module type, then op). If any mixed node has no
rule, raises one ``UnsupportedOpError`` that lists them all.
"""

from __future__ import annotations

from torch import fx
from torch.utils import _pytree as pytree

from ..errors import UnsupportedOpError
from ..rules import OpCall, Rules, resolve
from ..rules.base import NodeRef

DECOMPOSED_KINDS = ("mixed", "pure")


def op_call(gm: fx.GraphModule, node: fx.Node) -> OpCall:
    """The compile-time description of a node's operation that rules work from."""

    def ref(value):
        if isinstance(value, fx.Node):
            return NodeRef(value.name, value.meta["lmd_kind"] in DECOMPOSED_KINDS)
        return value

    args = fx.node.map_aggregate(node.args, ref)
    kwargs = fx.node.map_aggregate(dict(node.kwargs), ref)
    leaves, _ = pytree.tree_flatten((args, kwargs))
    module = gm.get_submodule(node.target) if node.op == "call_module" else None
    return OpCall(
        kind=node.op,
        target=node.target,
        op=node.meta["lmd_op"],
        node=node.name,
        layer=node.meta.get("lmd_layer", ""),
        decomposed=tuple(isinstance(leaf, NodeRef) and leaf.decomposed for leaf in leaves),
        args=tuple(args),
        kwargs=dict(kwargs),
        module=module,
        source=node.meta.get("lmd_source", ""),
        extra={"module_type": node.meta.get("lmd_module_type")},
    )


def assign_rules(gm: fx.GraphModule, rules: Rules) -> fx.GraphModule:
    unsupported = []
    for node in gm.graph.nodes:
        if node.meta.get("lmd_kind") != "mixed":
            continue
        call = op_call(gm, node)
        rule = resolve(call, rules)
        if rule is None:
            unsupported.append({"node": node.name, "op": call.op, "layer": call.layer or "<top level>",
                                "source": call.source or "<unknown source>"})
        node.meta["lmd_rule"] = rule
    if unsupported:
        lines = "\n".join(f"  - {u['node']}: op {u['op']!r} in {u['layer']} ({u['source']})" for u in unsupported)
        raise UnsupportedOpError(
            f"{len(unsupported)} mixed node(s) have no decomposition rule:\n{lines}\n"
            "Linearise them at the operating point with lmdfx.Rules(fallback='taylor'), give a rule "
            "per op/module via Rules(overrides={...}), or register a rule for the op in lmdfx.rules.",
            unsupported,
        )
    return gm
