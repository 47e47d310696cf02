"""Ground-truth attribution score: does an attribution name the sensor that saw each vehicle?

The sensor world (:mod:`lmdfx.bev.data.sensor_world`) knows which vehicles only one sensor saw;
:func:`attribution_score` checks whether per-modality maps, from LMD (:func:`lmd_maps`) or from
exact Shapley values (:func:`shapley_maps`), put the most positive evidence on that sensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

from lmdfx.bev.data.sensor_world import SENSORS, SensorWorld
from lmdfx.bev.evaluation import HEAD
from lmdfx.errors import LMDError
from lmdfx.metrics import modality_shapley, progress_bar, select

__all__ = ["AttributionScore", "attribution_score", "lmd_maps", "shapley_maps"]


@dataclass
class AttributionScore:
    """How often the dominant component of a single-sensor vehicle names the sensor that saw it.

    ``records``: one dict per single-sensor vehicle (scene, object, sensor, dominant, means).
    ``dominant`` is the modality with the largest mean over the vehicle's cells, or None when no
    modality's mean is positive (then the vehicle counts as a miss).
    """

    names: tuple[str, ...]
    records: list[dict]

    @property
    def total(self) -> int:
        """Single-sensor vehicles scored."""
        return len(self.records)

    @property
    def hits(self) -> int:
        """Vehicles whose dominant component names their sensor."""
        return sum(r["dominant"] == r["sensor"] for r in self.records)

    @property
    def score(self) -> float:
        """hits / total (NaN when there are no single-sensor vehicles)."""
        return self.hits / self.total if self.total else float("nan")

    def per_sensor(self) -> dict[str, tuple[int, int]]:
        """sensor -> (hits, total)."""
        out: dict[str, tuple[int, int]] = {}
        for r in self.records:
            h, t = out.get(r["sensor"], (0, 0))
            out[r["sensor"]] = (h + (r["dominant"] == r["sensor"]), t + 1)
        return out

    def table(self, label: str = "attribution") -> str:
        """A markdown table: hits / total per sensor and overall."""
        rows = [f"| {label} | vehicles | correct | score |", "|---|---|---|---|"]
        for sensor, (h, t) in sorted(self.per_sensor().items()):
            rows.append(f"| {sensor}-only | {t} | {h} | {h / t:.2f} |")
        rows.append(f"| all single-sensor | {self.total} | {self.hits} | {self.score:.2f} |")
        return "\n".join(rows)

    def to_dict(self) -> dict:
        """JSON-ready summary (without the per-vehicle records' masks)."""
        return {"score": self.score, "hits": self.hits, "total": self.total,
                "per_sensor": {k: {"hits": h, "total": t} for k, (h, t) in self.per_sensor().items()}}


def _batched(inputs: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.unsqueeze(0).to(device) for k, v in inputs.items()}


def lmd_maps(dec: Any, head: Any = HEAD) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
    """Maps function for :func:`attribution_score`: the LMD modality components [M, Z, X] of ``head``."""

    def maps(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        device = next(dec.model.parameters()).device
        with torch.no_grad():
            res = dec(**_batched(inputs, device))
        return select(res.components, head)[:-1, 0, 0].detach().cpu()

    maps.names = tuple(dec.names[:-1])  # type: ignore[attr-defined]
    return maps


def shapley_maps(dec: Any, head: Any = HEAD, baseline: Any = "zeros") -> Callable[[dict], torch.Tensor]:
    """Maps function for :func:`attribution_score`: exact per-pixel modality Shapley values [M, Z, X]."""

    def maps(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        device = next(dec.model.parameters()).device
        base = baseline if isinstance(baseline, str) else _batched(baseline, device)
        return modality_shapley(dec, _batched(inputs, device), baseline=base, head=head).values[:, 0, 0].cpu()

    maps.names = tuple(dec.names[:-1])  # type: ignore[attr-defined]
    return maps


def attribution_score(maps: Callable[[dict[str, torch.Tensor]], torch.Tensor] | Mapping[int, torch.Tensor],
                      world: SensorWorld, indices: Optional[Sequence[int]] = None,
                      names: Optional[Sequence[str]] = None, progress: bool = False) -> AttributionScore:
    """Score a per-modality attribution on the world's single-sensor vehicles.

    ``maps(inputs)`` returns per-modality maps [M, Z, X] for one scene's forward arguments (no
    batch dim), e.g. :func:`lmd_maps` (LMD components) or :func:`shapley_maps`; or ``maps`` is a
    dict {scene index: [M, Z, X]} of precomputed maps (``indices`` default to its keys). For each vehicle
    seen by exactly one sensor, the dominant modality is the one with the largest positive mean
    over the vehicle's cells; the score is the fraction of such vehicles whose dominant modality
    is the sensor that saw it. ``names`` (default ``maps.names``) are the modality names in map
    order and must include the world's sensors.
    """
    names = tuple(names if names is not None else getattr(maps, "names", SENSORS))
    missing = [s for s in SENSORS if s not in names]
    if missing:
        raise LMDError(f"attribution_score needs maps for the sensors {SENSORS}; the maps are named {names}. "
                       "Pass names= in the order of the maps' first axis.")
    if indices is None:
        indices = sorted(maps) if isinstance(maps, Mapping) else range(len(world))
    records = []
    for k in progress_bar(indices, progress, "attribution", unit="scene"):
        scene = world.scene(int(k))
        singles = [(j, o) for j, o in enumerate(scene.objects) if o.single_sensor is not None and o.mask.any()]
        if not singles:
            continue
        values = maps[int(k)] if isinstance(maps, Mapping) else maps(scene.inputs)
        if values.shape[0] != len(names):
            raise LMDError(f"maps returned {values.shape[0]} maps but {len(names)} names were given.")
        for j, obj in singles:
            cells = torch.from_numpy(obj.mask)
            means = values[:, cells].double().mean(dim=1)
            best = int(means.argmax())
            records.append(dict(scene=int(k), object=j, sensor=obj.single_sensor,
                                dominant=names[best] if means[best] > 0 else None,
                                means={n: float(m) for n, m in zip(names, means)}))
    return AttributionScore(names=names, records=records)
