"""Pass 5 — rewrite into the reference trunk plus stacked ``[M+1, ...]`` branches.

Requires: ``assign_rules`` (``meta["lmd_rule"]`` on mixed nodes).
Ensures: a new GraphModule whose forward takes the original inputs plus ``lmd_frozen`` (an
operating point, or None) and ``lmd_check`` (compute equality residuals), and returns
``{"output", "components", "layers", "operating_point", "residuals"}``:

- the trunk is the original graph, unchanged: it gives ``output`` and the reference values;
- every mixed node gets a branch: its rule module called on the branch views of its inputs
  (stacks for decomposed values, lifted stacks for pure ones, constants otherwise);
- every data-dependent constant comes from ``lmd_frozen`` when given, else from the trunk.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from ..errors import LMDError
from ..ops import METADATA_ATTRS
from ..rules.base import BIAS, lift

RULES_ATTR = "lmd_rules"


def rule_key(node_name: str) -> str:
    """The rule module's name under ``RULES_ATTR``: any fx node name (``to``, ``double``) is a
    valid ``ModuleDict`` key once prefixed."""
    return f"node_{node_name}"


def operating_point_entry(rule: nn.Module, frozen: dict | None, key: str, out: Any, args: tuple, kwargs: dict,
                          stacked_args: tuple, stacked_kwargs: dict) -> dict:
    """A rule's constants: the stored ones under a frozen operating point, else from this pass."""
    if frozen is not None:
        return frozen[key]
    return rule.operating_point(out, args, kwargs, stacked_args, stacked_kwargs)


def frozen_value(frozen: dict | None, key: str, value: Any) -> Any:
    """A discrete value (mask, indices) of the operating point."""
    return value if frozen is None else frozen[key]


def constant_components(value: Any, k: int) -> torch.Tensor | None:
    """A context value in an output or record: wholly the bias component (None if not a tensor)."""
    return lift(value, BIAS, k) if isinstance(value, torch.Tensor) else None


def residual(check: bool, frozen: dict | None, stack: Any, value: Any, derived: bool = False) -> tuple | None:
    """The equality check of one node at the operating point: ``(error, scale, per_component)``
    = (max |Σ components − value|, max |value|, max |component k| for each k), 0-d tensors and
    a ``[K]`` tensor, read by ``Report.update_residuals`` in one batch after the call (a few
    kernels per node and no device sync here). ``derived``: the node's value is the sum of its
    components (``value``, or None to sum them here), so ``error`` is None and only the
    cancellation is measured. Equal infinities count as exact (an additive ``-inf`` mask); a
    NaN component shows in ``per_component``; an infinite max|value| means the value holds ``±inf``."""
    if not check or frozen is not None or not isinstance(stack, torch.Tensor) or stack[0].numel() == 0:
        return None
    if derived and value is None:
        value = stack.sum(0)
    elif not isinstance(value, torch.Tensor) or value.shape != stack.shape[1:]:
        return None
    if not value.is_floating_point():
        return None
    inf = float("inf")
    error = None
    if not derived:
        # inf − inf (equal infinities) is NaN: counted as 0; unequal infinities stay infinite
        error = (stack.sum(0) - value).nan_to_num_(nan=0.0, posinf=inf, neginf=-inf).abs_().amax()
    per_component = max_abs(stack, tuple(range(1, stack.dim()))) if stack.dim() > 1 else stack.abs()
    return error, max_abs(value), per_component


def max_abs(t: torch.Tensor, dims: tuple[int, ...] | None = None) -> torch.Tensor:
    """max |t| (over ``dims``), NaN if any element is NaN; several times faster on CPU than
    ``vector_norm(t, inf)``. A small tensor takes two kernel calls (|t| is a cheap copy); a
    large one is read once for its extremes instead of copied."""
    if t.numel() <= SMALL:
        return t.abs().amax(dims) if dims is not None else t.abs().amax()
    if dims is None:
        low, high = torch.aminmax(t)
    else:
        low, high = t.amin(dims), t.amax(dims)
    return torch.maximum(high, low.neg())


SMALL = 1 << 16  # elements


@dataclass
class Layout:
    """What the runtime needs to read the rewritten module's result."""

    output_spec: Any  # pytree spec of the model output
    modality_names: tuple[str, ...]
    recorded: tuple[str, ...]


def resolve_record(gm: fx.GraphModule, record: None | str | Sequence[str]) -> dict[str, fx.Node]:
    """Map the ``record`` argument to nodes: module qualified names, then fx node names."""
    by_module = {name: node for node in gm.graph.nodes for name in node.meta.get("lmd_module_outputs", [])}
    by_node = {node.name: node for node in gm.graph.nodes if node.op not in ("output",)}
    if record is None:
        return {}
    if record == "all":
        chosen = {name: node for name, node in by_module.items() if node.meta.get("lmd_kind") in ("mixed", "pure")}
        covered = set(chosen.values())
        chosen.update({node.name: node for node in gm.graph.nodes
                       if node.meta.get("lmd_kind") == "mixed" and node not in covered})
        order = {node: i for i, node in enumerate(gm.graph.nodes)}
        return dict(sorted(chosen.items(), key=lambda item: order[item[1]]))  # graph (topological) order
    if isinstance(record, str):
        record = [record]
    chosen, unknown = {}, []
    for name in record:
        node = by_module.get(name) or by_node.get(name)
        if node is None:
            unknown.append(name)
        else:
            chosen[name] = node
    if unknown:
        modules = ", ".join(sorted(by_module)[:30])
        raise LMDError(f"record names {unknown} are neither module names nor fx node names of the traced model. "
                       f"Module outputs available include: {modules}. Use record='all' to record every layer.")
    return chosen


def component_sum(stack: Any) -> Any:
    """The value a stack (or a tuple of stacks) decomposes: the sum over the component axis."""
    if isinstance(stack, torch.Tensor):
        return stack.sum(0)
    return pytree.tree_map(lambda t: t.sum(0) if isinstance(t, torch.Tensor) else t, stack)


def reads_metadata(node: fx.Node) -> bool:
    """``getattr(x, "ndim" / "shape" / ...)``, ``x.size(...)`` or ``x.dim()``: what is read of ``x``
    is its description, not its values."""
    if node.op == "call_function" and node.target is getattr:
        return len(node.args) == 2 and node.args[1] in METADATA_ATTRS
    return node.op == "call_method" and node.target in ("size", "dim") and not node.kwargs


def stack_metadata(stack: torch.Tensor, what: str, *args: Any) -> Any:
    """``what`` (an attribute, or the method ``size`` / ``dim`` with ``args``) of the value that
    ``stack`` decomposes: its shape is the stack's without the component axis."""
    if what in ("shape", "size"):
        return stack.shape[1:] if not args else stack.shape[1:][args[0]]
    if what in ("ndim", "dim"):
        return stack.dim() - 1
    return getattr(stack, what)


def read_components(gm: fx.GraphModule, record: dict[str, fx.Node]) -> set[fx.Node]:
    """The mixed nodes whose components something reads: an output, a recorded layer, or a
    mixed node that reads them. Scores that only feed frozen softmax weights are not among
    them (only their value is needed)."""
    read: set[fx.Node] = set(record.values())
    for node in reversed(gm.graph.nodes):
        if node.op == "output":
            read.update(n for n in node.all_input_nodes)
        elif node in read and node.meta.get("lmd_kind") == "mixed":
            read.update(node.all_input_nodes)
    return {node for node in read if node.meta.get("lmd_kind") == "mixed"}


def rewrite(gm: fx.GraphModule, modality_names: Sequence[str], record: dict[str, fx.Node],
            trunk_mode: str = "exact", keep_constants: bool = True) -> tuple[fx.GraphModule, Layout]:
    """``trunk_mode="exact"``: the trunk is the original graph. ``"sum"``: the trunk value of a
    mixed node whose rule is ``summable`` and ``verified`` (linear, affine, additive: covered by
    the registry-driven tests) is the sum of its components, so those layers run once per
    component and not once more for the trunk; outputs then equal the model's to rounding. Such a
    node, and a ``closes_with_remainder`` rule's node on summed inputs, is checked for cancellation
    only (``derived``), and only where its value is formed or its components recorded; the other
    nodes are compared with the op applied to the summed inputs. Frozen-point calls need the
    exact trunk. ``keep_constants=False``: ``operating_point`` is
    None, so each constant is freed after its last use instead of living until the call returns."""
    k = len(modality_names) + 1
    graph = fx.Graph()
    trunk: dict[fx.Node, fx.Node] = {}
    views: dict[fx.Node, fx.Node] = {}
    rules = nn.ModuleDict()
    constants: dict[str, fx.Node] = {}
    residuals: dict[str, fx.Node] = {}

    original_placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node in original_placeholders:
        trunk[node] = graph.node_copy(node, lambda n: trunk[n])
    frozen = graph.placeholder("lmd_frozen", default_value=None)
    check = graph.placeholder("lmd_check", default_value=True)

    def view(node: fx.Node) -> fx.Node:
        """The value a rule sees for ``node``: a stack if decomposed, else the constant."""
        if node in views:
            return views[node]
        kind = node.meta["lmd_kind"]
        if kind == "pure" and not node.meta.get("lmd_discrete"):
            (index,) = node.meta["lmd_provenance"]
            views[node] = graph.call_function(lift, (reference(node), index, k))
        elif kind in ("frozen", "pure"):  # a pure mask or index is an operating-point constant here
            views[node] = graph.call_function(frozen_value, (frozen, node.name, reference(node)))
            constants[node.name] = reference(node)
        else:
            views[node] = reference(node)
        return views[node]

    def as_components(node: Any) -> Any:
        """A value as a component stack, for outputs and records (None if not a tensor value)."""
        if not isinstance(node, fx.Node) or node.meta.get("lmd_discrete"):
            return None
        if node.meta.get("lmd_kind") == "frozen":  # an operating-point constant: the bias's, if a value
            return graph.call_function(lift, (view(node), BIAS, k)) if node.meta.get("lmd_constant") else None
        if node.meta["lmd_kind"] == "context":
            return graph.call_function(constant_components, (reference(node), k))
        return view(node)

    summed: dict[fx.Node, fx.Node] = {}
    unchecked: dict[fx.Node, fx.Node] = {}  # summed nodes whose cancellation check waits for their sum

    def reference(node: fx.Node) -> fx.Node:
        """The trunk value of ``node``; in "sum" mode made on first use from its stack (and
        the node's cancellation check then reads that sum instead of summing again)."""
        if node not in trunk:
            trunk[node] = graph.call_function(component_sum, (summed[node],))
            if node in unchecked:
                residuals[node.name] = graph.call_function(residual, (check, frozen, unchecked.pop(node), trunk[node], True))
        return trunk[node]

    branched = read_components(gm, record)
    output_node = None
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            continue
        if node.op == "output":
            output_node = node
            break
        if "lmd_rule" in node.meta:  # every rule, for dec.report() and tests, also those of frozen nodes
            rules[rule_key(node.name)] = node.meta["lmd_rule"]
        by_sum = (trunk_mode == "sum" and node in branched
                  and node.meta["lmd_rule"].summable and node.meta["lmd_rule"].verified)
        if not by_sum:
            source = node.args[0] if node.args else None
            if source in summed and source not in trunk and reads_metadata(node):
                # x.ndim / x.shape / x.size() of a summed value: read off its stack, not summed for it
                rest = fx.node.map_arg(node.args[1:], reference)  # x.size(d) with d computed in the graph
                what = rest if node.target is getattr else (node.target, *rest)
                trunk[node] = graph.call_function(stack_metadata, (summed[source], *what))
            else:
                trunk[node] = graph.node_copy(node, reference)
        if node not in branched:
            continue
        rule = node.meta["lmd_rule"]
        key = rule_key(node.name)
        stacked_args = fx.node.map_arg(node.args, view)
        stacked_kwargs = fx.node.map_arg(dict(node.kwargs), view)
        constant = None
        if rule.has_operating_point:
            reference_args = fx.node.map_arg(node.args, reference)
            reference_kwargs = fx.node.map_arg(dict(node.kwargs), reference)
            rule_module = graph.get_attr(f"{RULES_ATTR}.{key}")
            constant = graph.call_function(
                operating_point_entry,
                (rule_module, frozen, node.name, trunk[node], reference_args, reference_kwargs, stacked_args, stacked_kwargs),
            )
            constants[node.name] = constant
        stack = graph.call_module(f"{RULES_ATTR}.{key}", (constant, stacked_args, stacked_kwargs))
        stack.meta.update(lmd_branch_of=node.name)
        views[node] = stack
        if by_sum:
            summed[node] = stack
        if rule.moves_values and rule.verified:
            continue  # its components sum to its value wherever its input's did (registry-tested)
        if by_sum:
            # Its value is its own sum: nothing to compare, but how much the components cancel
            # bounds how far that sum can be from the model's value.
            unchecked[node] = stack
            residuals[node.name] = None  # keeps graph order; made when the sum is
            continue
        # Components built to sum to the value from inputs whose values are their sums need
        # only the cancellation measured (the bound on their rounding), like a summed node.
        closed = (rule.closes_with_remainder and rule.verified
                  and all(arg in summed or arg.meta["lmd_kind"] != "mixed" for arg in node.all_input_nodes))
        residuals[node.name] = graph.call_function(residual, (check, frozen, stack, trunk[node], closed))

    if output_node is None:
        raise LMDError("The traced graph has no output node.")
    leaves, spec = pytree.tree_flatten(output_node.args[0])
    layers = {name: as_components(node) for name, node in record.items()}
    output = fx.node.map_arg(output_node.args[0], reference)
    recorded = set(record.values())
    for node, stack in unchecked.items():
        # Nothing forms this node's value (its components only feed other linear layers): no
        # sum is rounded here, so there is nothing to check unless its components are shown
        # (recorded); the layers that read them are checked.
        residuals.pop(node.name)
        if node in recorded:
            with graph.inserting_after(stack):
                residuals[node.name] = graph.call_function(residual, (check, frozen, stack, None, True))
    result = {
        "output": output,
        "components": [as_components(leaf) for leaf in leaves],
        "layers": layers,
        "operating_point": constants if keep_constants else None,
        "residuals": residuals,
    }
    graph.output(result)
    setattr(gm, RULES_ATTR, rules)
    rewritten = fx.GraphModule(gm, graph, class_name="Decomposed" + type(gm).__name__)
    setattr(rewritten, RULES_ATTR, rules)  # all of them, also the rules no branch calls
    return rewritten, Layout(output_spec=spec, modality_names=tuple(modality_names), recorded=tuple(record))
