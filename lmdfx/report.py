"""``dec.report()``: one row per node of the traced model — layer, op, provenance, rule — and,
after a reference call, each mixed node's equality residual and cancellation ratio."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import networkx as nx
import torch
from torch import fx

from .rules.linear import MULTIPLICATIVE


@dataclass
class Row:
    node: str
    layer: str
    op: str
    kind: str  # context | pure | mixed | frozen
    provenance: tuple[str, ...]
    rule: str
    source: str = ""
    separates: bool = True  # at a frozen operating point, a component depends on its own modality only
    residual: float | None = None  # max |Σ components − value| in the last reference call
    scale: float | None = None  # max |value| at the same node (finite elements)
    spread: float | None = None  # Σ_k max|component k| (an upper bound of max Σ|components|)
    tolerance: float | None = None  # allowed residual / scale for the node's dtype
    eps: float | None = None  # machine epsilon of the node's dtype
    upstream: float = 0.0  # magnitude of the values this node is computed from (see Report.allowed)
    # The components sum to the value by construction (exact_output=False): the value is their
    # sum (a summed linear node) or the bias took the remainder (an element-wise rule whose
    # input is a sum); only their cancellation is measured.
    derived: bool = False
    value_finite: bool = True

    @property
    def ratio(self) -> float | None:
        """Cancellation ratio Σ|components| / |value| (maxima over elements)."""
        if self.spread is None:
            return None
        return self.spread / self.scale if self.scale else (0.0 if self.spread == 0 else math.inf)

    @property
    def relative_residual(self) -> float | None:
        if self.residual is None or self.derived:
            return None
        return self.residual / self.scale if self.scale else (0.0 if self.residual == 0 else math.inf)

    def where(self) -> str:
        return (f"node {self.node!r} (op {self.op!r}, module {self.layer or '<top level>'!r}, rule {self.rule!r}, "
                f"{self.source or '<unknown source>'})")


class Report:
    """Rows for every computing node, plus the fusion frontier and residual summary."""

    def __init__(self, gm: fx.GraphModule, modality_names: Sequence[str], frontend: str = "fx"):
        self.frontend = frontend
        self.rows: list[Row] = []
        for node in gm.graph.nodes:
            if node.op in ("output", "get_attr"):
                continue
            rule = node.meta.get("lmd_rule")
            self.rows.append(Row(
                node=node.name,
                layer=node.meta.get("lmd_layer", ""),
                op=node.meta.get("lmd_op", node.op),
                kind=node.meta["lmd_kind"],
                provenance=tuple(modality_names[i] for i in sorted(node.meta["lmd_provenance"])),
                rule=rule.name if rule is not None else {"pure": "whole (one modality)", "frozen": "operating point"}.get(
                    node.meta["lmd_kind"], "-"),
                source=node.meta.get("lmd_source", ""),
                separates=rule.separates if rule is not None else True,
            ))
        self.graph = to_networkx(gm)
        self.fusion_nodes = fusion_frontier(self.graph)
        self._by_node = {row.node: row for row in self.rows}
        # Each row's input rows (for the rounding allowance of Report.allowed).
        self._inputs = {row.node: [self._by_node[p] for p in self.graph.predecessors(row.node) if p in self._by_node]
                        for row in self.rows}

    def update_residuals(self, residuals: dict[str, tuple | None],
                         tolerance: Callable[[float], float]) -> tuple[str, Row] | None:
        """Store the last reference call's checks (``rewrite.residual`` triples, in graph
        order); return (message, row) for the first node that is not finite or not exact,
        else None. One device sync per dtype."""
        checked = [(name, value) for name, value in residuals.items() if value is not None]
        if not checked:
            return None
        numbers: dict[str, tuple[float, float, float, float]] = {}
        by_dtype: dict[torch.dtype, list] = {}
        for name, value in checked:
            by_dtype.setdefault(value[1].dtype, []).append((name, value))
        for dtype, group in by_dtype.items():
            scales = torch.stack([scale for _, (_, scale, _) in group])
            spreads = torch.stack([per_component.sum() for _, (_, _, per_component) in group])
            # a derived node's error is 0 by construction (None): read only the others
            errors = [error for _, (error, _, _) in group if error is not None]
            read = torch.cat([scales, spreads, torch.stack(errors) if errors else scales[:0]]).double().tolist()
            n, measured = len(group), iter(read[2 * len(group):])
            eps = torch.finfo(dtype).eps
            for i, (name, (error, _, _)) in enumerate(group):
                numbers[name] = (0.0 if error is None else next(measured), read[i], read[n + i], eps)
        tolerances: dict[float, float] = {}
        failure = None
        for name, value in checked:
            error, scale, spread, eps = numbers[name]
            row = self._by_node[name]
            row.derived = value[0] is None
            row.value_finite = math.isfinite(scale)
            # A value holding ±inf (an additive mask) is checked for equal infinities only.
            row.residual, row.scale, row.spread = error, scale if row.value_finite else 0.0, spread
            if eps not in tolerances:
                tolerances[eps] = tolerance(eps)
            row.tolerance, row.eps = tolerances[eps], eps
            row.upstream = max((self._magnitude(p) for p in self._inputs[name] if p.scale is not None), default=0.0)
            if failure is not None:
                continue
            if not math.isfinite(error) or math.isnan(spread) or (row.derived and math.isnan(scale)):
                failure = (self._nonfinite_message(row), row)
            elif error > self.allowed(row):
                failure = (self._inexact_message(row), row)
            elif row.derived and self._meaningless(row):
                failure = (self._derived_message(row), row)
        return failure

    def _meaningless(self, row: Row) -> bool:
        """Components so large against the value that their rounding alone (eps × Σ|components|)
        can exceed the residual allowed at the node."""
        return row.value_finite and row.spread is not None and row.eps * row.spread > self.allowed(row)

    @staticmethod
    def _magnitude(row: Row) -> float:
        """The magnitude a node's value is rounded at: its own max|value|, or, where that is
        rounding noise of larger values upstream (the mean of a normalised map), theirs."""
        return row.scale if row.scale >= math.sqrt(row.eps) * row.upstream else row.upstream

    def allowed(self, row: Row) -> float:
        """The largest residual accepted at ``row``: ``tolerance`` × max|value|, plus the rounding
        of the op itself, 256·eps × the magnitude of its decomposed inputs."""
        return row.tolerance * row.scale + 256 * row.eps * row.upstream

    def _nonfinite_message(self, row: Row) -> str:
        if not row.value_finite:
            return (f"The model's own value is NaN or Inf at {row.where()}, the first node where it appears; "
                    "its decomposition cannot be exact. Check the inputs and the model at that layer.")
        return (f"The components became NaN or Inf at {row.where()} (the model's value is finite there). "
                f"{self._suggestion(row)}")

    def _derived_message(self, row: Row) -> str:
        return (f"The components cancel at {row.where()}: Σ|components| is {row.ratio:.3g}× the value, so the "
                f"rounding of their sum can exceed the tolerance {row.tolerance:.0e} (with exact_output=False their "
                "sum is not compared with the model's value there: it equals it by construction). "
                f"{self._suggestion(row)} Compile with exact_output=True to measure the residual against the model.")

    def _inexact_message(self, row: Row) -> str:
        return (f"The components do not sum to the value at {row.where()}: residual {row.residual:.3g}, "
                f"value scale max|value| {row.scale:.3g} (relative {row.relative_residual:.3g}; allowed "
                f"{self.allowed(row):.3g} from tolerance {row.tolerance:.0e}), cancellation ratio Σ|components|/|value| {row.ratio:.3g}. "
                f"{self._suggestion(row)}")

    def _suggestion(self, row: Row) -> str:
        """Where the components started to cancel and which rule choice avoids it."""
        first = self.first_cancelling(row)
        text = ""
        if first is not None and first is not row:
            text = f"Components first grew past the value at {first.where()} (ratio {first.ratio:.3g}). "
        upstream = nx.ancestors(self.graph, row.node) | {row.node}
        split = [r for r in self.rows if r.node in upstream and r.op in MULTIPLICATIVE and r.rule in ("shapley", "gate")]
        if split:
            text += (f"Products of two decomposed values upstream (e.g. {split[0].where()}) may split cross terms "
                     "(Shapley), which multiplies large opposite-signed components; Rules(product='freeze') keeps "
                     "them bounded. ")
        return text + ("Inspect dec.report(); compile with check='warn' to get the result anyway, or report the "
                       "rule as a bug if no choice helps.")

    def first_cancelling(self, row: Row | None = None) -> Row | None:
        """The first node (in graph order, upstream of ``row`` if given) whose cancellation ratio
        makes its components meaningless at its dtype: ratio > tolerance / eps."""
        upstream = None if row is None else nx.ancestors(self.graph, row.node) | {row.node}
        for r in self.rows:
            if r.ratio is None or (upstream is not None and r.node not in upstream):
                continue
            if self._meaningless(r):
                return r
        return None

    def cancellation_warning(self) -> str | None:
        first = self.first_cancelling()
        if first is None:
            return None
        return (f"Components cancel: at {first.where()} Σ|components| is {first.ratio:.3g}× the value, so their "
                f"rounding alone can exceed the tolerance; the components are not meaningful there. "
                f"{self._suggestion(first)}")

    @property
    def max_relative_residual(self) -> float | None:
        """max over nodes of residual / max|value| in the last reference call; None before any,
        or where no node was compared with its value (every mixed node ``built``: compile with
        ``exact_output=True`` to measure them all)."""
        ratios = [r.relative_residual for r in self.rows if r.relative_residual is not None]
        return max(ratios) if ratios else None

    @property
    def non_separating(self) -> list[Row]:
        """Mixed nodes whose rule lets a component move with another modality's input at a frozen
        operating point (a Shapley product of two decomposed values, secant attention with
        Shapley products), where that reaches the output."""
        # A frozen value (a frozen softmax) is an operating-point constant: what lies only
        # upstream of it (the Q·Kᵀ product of attention) cannot move any component of the output.
        cut = self.graph.subgraph([n for n in self.graph if self.graph.nodes[n]["kind"] != "frozen"])
        outputs = [n for n in self.graph if self.graph.nodes[n]["op"] == "output"]
        reaching = set(outputs).union(*(nx.ancestors(cut, o) for o in outputs if o in cut))
        return [row for row in self.rows if not row.separates and row.node in reaching]

    def separation_warning(self) -> str | None:
        rows = self.non_separating
        if not rows:
            return None
        listed = "; ".join(f"{r.where()}" for r in rows[:3]) + ("; ..." if len(rows) > 3 else "")
        return (f"{len(rows)} node(s) will not separate at a frozen operating point under these rules: {listed}. "
                "Their rule splits a product of two decomposed values between the modalities, so one modality's "
                "component moves with another's input. Rules(product='gate') freezes gating operands, "
                "Rules(product='freeze') freezes one operand of every product.")

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for row in self.rows:
            out[row.kind] = out.get(row.kind, 0) + 1
        return out

    def __str__(self) -> str:
        header = ("node", "layer", "op", "provenance", "rule", "residual", "cancellation")
        table = [header] + [
            (r.node, r.layer or "-", r.op, f"{r.kind}:{'+'.join(r.provenance) or '-'}", r.rule,
             "built" if r.derived else "-" if r.relative_residual is None else f"{r.relative_residual:.1e}",
             "-" if r.ratio is None else f"{r.ratio:.3g}")
            for r in self.rows
        ]
        widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
        lines = ["  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table]
        lines.insert(1, "  ".join("-" * w for w in widths))
        counts = ", ".join(f"{v} {k}" for k, v in sorted(self.counts().items()))
        summary = [f"frontend: {self.frontend}", f"nodes: {counts}",
                   f"fusion nodes (first to mix modalities): {', '.join(self.fusion_nodes) or 'none'}"]
        if self.non_separating:
            summary.append("separation not guaranteed at (rule splits a product): "
                           + ", ".join(r.node for r in self.non_separating))
        if self.max_relative_residual is None and any(r.derived for r in self.rows):
            summary.append("every checked node was built (components sum to the value by construction; their "
                           "cancellation is checked); compile with exact_output=True to measure residuals")
        if self.max_relative_residual is not None:
            summary.append(f"largest residual relative to the node's value in the last call: "
                           f"{self.max_relative_residual:.2e} (residual = max|Σ components − value| / max|value|; "
                           "cancellation = max Σ|components| / max|value|; built = the components sum to the "
                           "value by construction, and their cancellation is checked)")
        return "\n".join(lines + [""] + summary)

    __repr__ = __str__


def to_networkx(gm: fx.GraphModule) -> nx.DiGraph:
    """The traced graph as a networkx DiGraph; node attributes are the report's columns."""
    graph = nx.DiGraph()
    for node in gm.graph.nodes:
        graph.add_node(node.name, op=node.meta.get("lmd_op", node.op), kind=node.meta.get("lmd_kind", "-"),
                       layer=node.meta.get("lmd_layer", ""))
        for source in node.all_input_nodes:
            graph.add_edge(source.name, node.name)
    return graph


def fusion_frontier(graph: nx.DiGraph) -> list[str]:
    """Mixed nodes with no mixed predecessor: where the modalities first meet."""
    return [n for n, data in graph.nodes(data=True) if data["kind"] == "mixed"
            and not any(graph.nodes[p]["kind"] == "mixed" for p in graph.predecessors(n))]
