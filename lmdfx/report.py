"""``dec.report()``: one row per node of the traced model — layer, op, provenance, rule and
the largest equality residual seen in the last call."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import networkx as nx
import torch
from torch import fx


@dataclass
class Row:
    node: str
    layer: str
    op: str
    kind: str  # context | pure | mixed | frozen
    provenance: tuple[str, ...]
    rule: str
    residual: float | None = None  # max |Σ components − value| in the last call
    scale: float | None = None  # max Σ|components| at the same node


class Report:
    """Rows for every computing node, plus the fusion frontier and residual summary."""

    def __init__(self, gm: fx.GraphModule, modality_names: Sequence[str]):
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
            ))
        self.graph = to_networkx(gm)
        self.fusion_nodes = fusion_frontier(self.graph)
        self._by_node = {row.node: row for row in self.rows}

    def update_residuals(self, residuals: dict[str, torch.Tensor | None]) -> None:
        for name, value in residuals.items():
            if value is not None:
                row = self._by_node[name]
                row.residual, row.scale = float(value[0]), float(value[1])

    @property
    def max_relative_residual(self) -> float | None:
        """max over nodes of residual / scale in the last call (None before any call)."""
        ratios = [r.residual / max(r.scale, 1e-300) for r in self.rows if r.residual is not None]
        return max(ratios) if ratios else None

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for row in self.rows:
            out[row.kind] = out.get(row.kind, 0) + 1
        return out

    def __str__(self) -> str:
        header = ("node", "layer", "op", "provenance", "rule", "residual")
        table = [header] + [
            (r.node, r.layer or "-", r.op, f"{r.kind}:{'+'.join(r.provenance) or '-'}", r.rule,
             "-" if r.residual is None else f"{r.residual:.2e}")
            for r in self.rows
        ]
        widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
        lines = ["  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table]
        lines.insert(1, "  ".join("-" * w for w in widths))
        counts = ", ".join(f"{v} {k}" for k, v in sorted(self.counts().items()))
        summary = [f"nodes: {counts}", f"fusion nodes (first to mix modalities): {', '.join(self.fusion_nodes) or 'none'}"]
        if self.max_relative_residual is not None:
            summary.append(f"largest relative equality residual in the last call: {self.max_relative_residual:.2e}")
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
