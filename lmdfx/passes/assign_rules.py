"""Pass 4 — rule assignment.

Requires: ``provenance`` (``meta["lmd_kind"]``).
Ensures: every mixed node (and every node pass ``constant_outputs`` froze) has ``meta["lmd_rule"]``, a ``Rule`` module from the registry under
the user's ``Rules`` (overrides by module name, module type, then op). Raises, before any
rule runs: ``LMDError`` for override keys that match nothing in the model, and for ops that
are random at eval time on a mixed path (dropout with ``training=True``, ``rand*``,
``bernoulli``, ...); one ``UnsupportedOpError`` listing every mixed node no rule decomposes.
"""

from __future__ import annotations

from torch import fx
from torch.utils import _pytree as pytree

from ..errors import LMDError, UnsupportedOpError
from ..ops import RESHAPES, is_random
from ..rules import OpCall, Rules, resolve
from ..rules.base import NodeRef
from ..rules.registry import check_override_keys, matched_overrides, why_unsupported

def op_call(gm: fx.GraphModule, node: fx.Node) -> OpCall:
    """The compile-time description of a node's operation that rules work from."""

    def ref(value):
        if isinstance(value, fx.Node):
            decomposed = value.meta["lmd_kind"] == "mixed" or (
                value.meta["lmd_kind"] == "pure" and not value.meta.get("lmd_discrete"))
            return NodeRef(value.name, decomposed, producer(value))
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


def producer(node: fx.Node, hops: int = 4) -> str:
    """The op that computed ``node``'s values, looking through reshapes and broadcasts (a
    squeeze-excite gate is often ``sigmoid(s).view(B, C, 1, 1)``)."""
    op = node.meta.get("lmd_op", node.op)
    while op in RESHAPES and hops and node.args and isinstance(node.args[0], fx.Node):
        node, hops = node.args[0], hops - 1
        op = node.meta.get("lmd_op", node.op)
    return op


def _where(node: fx.Node) -> str:
    return (f"{node.name}: op {node.meta.get('lmd_op', node.op)!r} in {node.meta.get('lmd_layer') or '<top level>'} "
            f"({node.meta.get('lmd_source') or '<unknown source>'})")


def _check_random(gm: fx.GraphModule) -> None:
    """Refuse random ops whose value reaches a mixed node: the decomposition of one call would
    not be the model's on the next."""
    reaches_mixed: dict[fx.Node, bool] = {}
    for node in reversed(list(gm.graph.nodes)):
        reaches_mixed[node] = node.meta.get("lmd_kind") == "mixed" or any(reaches_mixed.get(u, False)
                                                                        for u in node.users)
    random = [n for n in gm.graph.nodes if n.op.startswith("call_") and reaches_mixed[n]
              and is_random(n.meta.get("lmd_op", ""), n.args, n.kwargs)]
    if random:
        lines = "\n".join(f"  - {_where(n)}" for n in random)
        raise LMDError(f"{len(random)} op(s) on a mixed path draw random numbers at eval time:\n{lines}\n"
                       "A decomposition of a random value is not the model's on the next call. Pass "
                       "training=self.training to functional dropout (or use nn.Dropout), and take random "
                       "draws as an input of forward.")


def _override_targets(gm: fx.GraphModule) -> tuple[set[str], set[type], set[str]]:
    """Module names, module types and canonical ops an override key may name."""
    names = {name for name, _ in gm.named_modules() if name}
    types = {type(m) for m in gm.modules()}
    ops = set()
    for node in gm.graph.nodes:
        names.update(filter(None, [node.meta.get("lmd_layer")]))
        names.update(node.meta.get("lmd_module_outputs", []))
        if node.meta.get("lmd_module_type") is not None:
            types.add(node.meta["lmd_module_type"])
        if "lmd_op" in node.meta:
            ops.add(node.meta["lmd_op"])
    return names, types, ops


def assign_rules(gm: fx.GraphModule, rules: Rules) -> fx.GraphModule:
    _check_random(gm)
    matched_overrides().clear()
    unsupported = []
    for node in gm.graph.nodes:
        if node.meta.get("lmd_kind") != "mixed" and not node.meta.get("lmd_constant"):
            continue
        call = op_call(gm, node)
        rule = resolve(call, rules)
        if rule is None:
            unsupported.append({"node": node.name, "op": call.op, "layer": call.layer or "<top level>",
                                "source": call.source or "<unknown source>", "reason": why_unsupported(call)})
        node.meta["lmd_rule"] = rule
    if rules.overrides:
        names, types, ops = _override_targets(gm)
        matched = matched_overrides()
        check_override_keys({key: v for key, v in rules.overrides.items() if key not in matched}, names, types, ops)
    if unsupported:
        lines = "\n".join(f"  - {u['node']}: op {u['op']!r} in {u['layer']} ({u['source']}): {u['reason']}"
                          for u in unsupported)
        raise UnsupportedOpError(
            f"{len(unsupported)} mixed node(s) have no decomposition rule:\n{lines}\n"
            "Linearise them at the operating point with lmdfx.Rules(fallback='taylor'), give a rule "
            "per op/module via Rules(overrides={...}), or register a rule for the op in lmdfx.rules.",
            unsupported,
        )
    return gm
