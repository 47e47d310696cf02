"""``lmdfx study``: which LMD rules tell the truth? A rule ablation on the sensor world.

For every rule set of a grid and every model, on the same unseen scenes (seed 2, as the demo):
separation (the paper's Table 4: Rp/R, Rp/C, Cp/R, Cp/C PCC and MSE), the ground-truth
attribution score on camera-only, radar-only and all single-sensor vehicles with a bootstrap
confidence interval over vehicles, per-component vehicle IoU, cost (decomposition / forward CPU
time, one thread) and exactness (the largest relative residual of any node; the decomposer's
check stays on, so an inexact result raises). Beside them the baselines: exact modality Shapley
values (zero and mean-input baselines), occlusion (output minus output with one sensor zeroed)
and, when ``captum`` is installed, DeepLift and InputXGradient summed per modality.

Speed: the camera encoder of the world model depends on the images only, so LMD does not
decompose it (its whole value is the camera's). The study computes each scene's camera BEV
features once per model and decomposes the fused part (:class:`FusedBEV`) under every rule set;
:func:`check_fused` verifies, per model, that this gives the full model's components exactly.
Writes ``study.json``, ``study.md`` and ``study.png`` atomically (:mod:`lmdfx.bev.files`).
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
import multiprocessing
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

import lmdfx
from lmdfx.bev import viz
from lmdfx.bev.attribution import AttributionScore, attribution_score
from lmdfx.bev.data.sensor_world import SENSORS, Scene, SensorWorld
from lmdfx.bev.evaluation import GT_KEY, HEAD, VALID_KEY, ComponentIoU, evaluate
from lmdfx.bev.files import check_out_folder, write_text
from lmdfx.bev.registry import MODELS, build_model
from lmdfx.errors import LMDError
from lmdfx.metrics import Sample, modality_shapley, progress_bar, select

__all__ = ["SEED", "DEFAULT_SCENES", "QUICK_SCENES", "STUDY_MODELS", "GRIDS", "REFERENCES", "TABLE4_LABELS",
           "rule_sets", "taylor_everywhere", "bootstrap_ci", "score_intervals", "format_score", "FusedBEV",
           "ReferencedBEV", "camera_bev", "check_fused", "occlusion_maps", "check_arguments", "run"]

#: Unseen scenes: training used seeds 0 (train) and 1 (validation), as for the demo.
SEED = 2
#: Default scenes: ~2.4 single-sensor vehicles per scene, so ~400 vehicles, a 95 % interval of at most
#: ±4.9 points on all single-sensor vehicles (worst case, a score of 50 %).
DEFAULT_SCENES = 168
#: ``--quick``: a smoke run (intervals of ±15–25 points).
QUICK_SCENES = 16
#: Scenes of the separation protocol (a binary property at rounding level; the first scenes).
SEPARATION_SCENES = 8
#: Scenes (batch 1, full model) whose CPU time gives the cost column.
COST_SCENES = 2
#: Scenes per batched reference call of the fused part.
BATCH = 8
#: The models of the study: the shipped one and two with another sensor balance.
STUDY_MODELS = ("simplebev-world", "simplebev-world-nodropout", "simplebev-world-radarheavy")
#: The Table 4 entries in the paper's order: (perturbed modality, component), indices into (camera, radar).
TABLE4 = ((1, 1), (1, 0), (0, 1), (0, 0))
#: Their labels.
TABLE4_LABELS = ("Rp/R", "Rp/C", "Cp/R", "Cp/C")
#: Rules fields of the grid and their values (defaults first).
FACTORS = {"activation": ("secant", "tangent", "rescale"), "bias_split": ("none", "sum", "ratio"),
           "batchnorm": ("identity", "uniform"), "norm": ("ratio", "identity", "uniform")}
#: Grid names: ``ofat`` (default) varies one factor at a time around the defaults; ``full`` is the
#: whole 2×3×2×3 product; both add ``taylor-everywhere``.
GRIDS = ("ofat", "full")
TAYLOR = "taylor-everywhere"
DEFAULT = "default"


# ---------------------------------------------------------------------------
# The grid
# ---------------------------------------------------------------------------
#: Reference inputs LMD can decompose against besides zero (:class:`ReferencedBEV`): the input with
#: every sensor zeroed (a grey image, an empty radar grid: Shapley's zero baseline) and the scenes' mean input.
REFERENCES = ("blank", "mean")


def _name(fields: dict[str, str]) -> str:
    changed = [f"{k}={v}" for k, v in fields.items() if k == "reference" or v != FACTORS[k][0]]
    return ", ".join(changed) or DEFAULT


def rule_sets(grid: str = "ofat") -> dict[str, dict[str, str]]:
    """Row name -> ``lmdfx.Rules`` fields for ``grid`` (plus ``taylor-everywhere``, whose fields are {}).

    ``ofat``: the defaults, then each factor's other values with the rest at their defaults (the
    paper's Table 4 rows are ``bias_split=sum`` and ``bias_split=ratio``). ``full``: every
    combination of :data:`FACTORS`. Both add the default rules decomposed against each of
    :data:`REFERENCES` (field ``reference``; not a ``Rules`` field).
    """
    if grid not in GRIDS:
        raise LMDError(f"unknown rule grid {grid!r}; use one of {', '.join(GRIDS)}.")
    defaults = {k: v[0] for k, v in FACTORS.items()}
    if grid == "full":
        combos = [dict(zip(FACTORS, values)) for values in itertools.product(*FACTORS.values())]
    else:
        combos = [defaults] + [{**defaults, k: v} for k, values in FACTORS.items() for v in values[1:]]
    combos += [{**defaults, **extra, "reference": r} for r in REFERENCES for extra in ({}, {"activation": "rescale"})]
    out = {_name(c): c for c in combos}
    out[TAYLOR] = {}
    return out


def taylor_everywhere(dec: Any) -> lmdfx.Rules:
    """Rules that linearise every mixed op of ``dec``'s model by the Taylor rule (first order).

    ``Rules(fallback="taylor")`` alone only catches ops without a rule; every op that has one is
    overridden by its canonical name (taken from ``dec.report()``), which the registry resolves to
    the Taylor rule whatever the op's family.
    """
    ops = sorted({row.op for row in dec.report().rows if row.kind == "mixed"})
    return lmdfx.Rules(fallback="taylor", overrides={op: "taylor" for op in ops})


# ---------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------
def bootstrap_ci(hits: Sequence[float], level: float = 0.95, resamples: int = 4000,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``hits`` (1 = correct, 0 = not) over resampled vehicles.

    ``resamples`` samples of len(hits) vehicles drawn with replacement (torch generator ``seed``);
    the interval is the (1 − level)/2 and (1 + level)/2 quantiles of their means. NaNs when empty.
    """
    if not 0 < level < 1:
        raise LMDError(f"level must lie between 0 and 1, got {level!r}.")
    x = torch.as_tensor(list(hits), dtype=torch.float64)
    if x.numel() == 0:
        return (math.nan, math.nan)
    gen = torch.Generator().manual_seed(seed)
    means = x[torch.randint(x.numel(), (resamples, x.numel()), generator=gen)].mean(1)
    lo, hi = torch.quantile(means, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64))
    return float(lo), float(hi)


def score_intervals(score: AttributionScore) -> dict[str, dict]:
    """Score, hits, total and 95 % bootstrap interval on camera-only, radar-only and all single-sensor vehicles."""
    out = {}
    for group in (*[f"{s}-only" for s in SENSORS], "all"):
        hits = [float(r["dominant"] == r["sensor"]) for r in score.records
                if group == "all" or r["sensor"] == group.removesuffix("-only")]
        lo, hi = bootstrap_ci(hits)
        out[group] = {"score": sum(hits) / len(hits) if hits else math.nan, "hits": int(sum(hits)),
                      "total": len(hits), "ci95": [lo, hi]}
    return out


# ---------------------------------------------------------------------------
# The fused part of the world model, on cached camera features
# ---------------------------------------------------------------------------
class FusedBEV(nn.Module):
    """SimpleBEV after the camera lifting: ``decoder(bev_compressor(cat(cam_bev, radar_bev)))``.

    Shares the parameters of ``model``; ``cam_bev`` is :func:`camera_bev` of the images.
    """

    modality_args = {"camera": "cam_bev", "radar": "radar_bev"}

    def __init__(self, model: nn.Module):
        super().__init__()
        self.bev_compressor, self.decoder = model.bev_compressor, model.decoder

    def forward(self, cam_bev: torch.Tensor, radar_bev: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.decoder(self.bev_compressor(torch.cat([cam_bev, radar_bev], dim=1)))


@torch.no_grad()
def camera_bev(model: nn.Module, images: torch.Tensor, lift_grid: torch.Tensor,
               lift_valid: torch.Tensor) -> torch.Tensor:
    """The camera path of the world SimpleBEV (encoder, lifting, camera average): [B, C·Y, Z, X]."""
    cfg = model.config
    (h, w), s, (z, y, x), c = cfg.image_size, cfg.num_cameras, cfg.grid, cfg.latent_dim
    feat = model.encoder((images.reshape(-1, 3, h, w) + 0.5 - model.mean) / model.std)
    sampled = F.grid_sample(feat, lift_grid.reshape(-1, z, y * x, 2), mode="bilinear", padding_mode="zeros",
                            align_corners=False).reshape(-1, s, c, z, y, x)
    valid = lift_valid.reshape(-1, s, 1, z, y, x)
    mem = (sampled * valid).sum(dim=1) / valid.sum(dim=1).clamp(min=1.0)
    return mem.permute(0, 1, 3, 2, 4).reshape(-1, c * y, z, x)


def _batched(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v[None] for k, v in inputs.items()}


def check_fused(model: nn.Module, scene: Scene, rules: Optional[lmdfx.Rules] = None) -> float:
    """Max |difference| between the full model's and :class:`FusedBEV`'s components on ``scene``,
    relative to the largest component; raises :class:`LMDError` above 1e-5 (the shortcut is then wrong)."""
    inputs = _batched(scene.inputs)
    fused = FusedBEV(model).eval()
    with torch.no_grad():
        full = select(lmdfx.compile(model, model.modality_args, rules=rules)(**inputs).components, HEAD)
        cam = camera_bev(model, inputs["images"], inputs["lift_grid"], inputs["lift_valid"])
        part = select(lmdfx.compile(fused, fused.modality_args, rules=rules)(
            cam_bev=cam, radar_bev=inputs["radar_bev"]).components, HEAD)
    diff = float((full - part).abs().max() / full.abs().max().clamp(min=1e-30))
    if not diff <= 1e-5:
        raise LMDError(f"the study's cached camera path does not reproduce the model's components (relative "
                       f"difference {diff:.2e}); lmdfx.bev.study.camera_bev no longer matches SimpleBEV.forward.")
    return diff


class _Scenes:
    """The study's scenes, rendered once; ``scene(k)`` and ``len`` as :class:`SensorWorld` has them."""

    def __init__(self, world: SensorWorld, progress: bool):
        self.seed = world.seed
        self.scenes = [world.scene(k) for k in progress_bar(range(len(world)), progress, "scenes", unit="scene")]

    def __len__(self) -> int:
        return len(self.scenes)

    def scene(self, k: int) -> Scene:
        return self.scenes[k]


@dataclass
class _Data:
    """One model's inputs to the fused part, for every scene."""

    cam: torch.Tensor  # [N, C·Y, Z, X]
    radar: torch.Tensor  # [N, C_radar, Z, X]
    blank_cam: torch.Tensor  # [1, ...]: camera features of all-zero images (the zero baseline)
    mean_cam: torch.Tensor  # [1, ...]: camera features of the scenes' mean images (the mean-input baseline)
    gt: list[dict]  # ground truth per scene (vehicle_gt, valid_mask)
    args: dict[str, torch.Tensor] = field(default_factory=dict)  # forward argument -> [N, ...] (default: FusedBEV's)
    context: dict[str, torch.Tensor] = field(default_factory=dict)  # forward argument -> one sample's value

    def __post_init__(self) -> None:
        self.args = self.args or {"cam_bev": self.cam, "radar_bev": self.radar}
        self.items = [{**{k: v[i] for k, v in self.args.items()}, **self.context, **self.gt[i]}
                      for i in range(len(self.gt))]

    def inputs(self, ks: Sequence[int]) -> dict[str, torch.Tensor]:
        ks = list(ks)
        return {**{k: v[ks] for k, v in self.args.items()},
                **{k: v.expand(len(ks), *v.shape) for k, v in self.context.items()}}

    def against(self, reference: str) -> "_Data":
        """The inputs of :class:`ReferencedBEV`: differences from the ``blank`` (zero-input) or ``mean`` input."""
        cam = self.blank_cam if reference == "blank" else self.mean_cam
        radar = torch.zeros_like(self.radar[:1]) if reference == "blank" else self.radar.mean(0, keepdim=True)
        return _Data(self.cam, self.radar, self.blank_cam, self.mean_cam, self.gt,
                     {"cam_delta": self.cam - cam, "radar_delta": self.radar - radar},
                     {"reference": torch.cat([cam, radar], dim=1)[0]})


class ReferencedBEV(nn.Module):
    """:class:`FusedBEV` decomposed against a reference input instead of zero.

    The modality inputs are the differences from the reference (``cam_delta``, ``radar_delta``);
    the reference, a context input, is added right after the concatenation that mixes them, so
    LMD books its whole effect under the bias (a context value entering a mixed node is the bias's).
    Added before the mixing it would be part of the camera-only path and belong to the camera.
    """

    modality_args = {"camera": "cam_delta", "radar": "radar_delta"}

    def __init__(self, model: nn.Module):
        super().__init__()
        self.bev_compressor, self.decoder = model.bev_compressor, model.decoder

    def forward(self, cam_delta: torch.Tensor, radar_delta: torch.Tensor,
                reference: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.decoder(self.bev_compressor(torch.cat([cam_delta, radar_delta], dim=1) + reference))


def _prepare(model: nn.Module, scenes: _Scenes, progress: bool) -> _Data:
    n = len(scenes)
    rig = scenes.scene(0).inputs
    grid, valid = rig["lift_grid"][None], rig["lift_valid"][None]
    cams = []
    for start in progress_bar(range(0, n, BATCH), progress, "camera features", unit="batch"):
        ks = range(start, min(start + BATCH, n))
        images = torch.stack([scenes.scene(k).inputs["images"] for k in ks])
        cams.append(camera_bev(model, images, grid.expand(len(ks), *grid.shape[1:]),
                               valid.expand(len(ks), *valid.shape[1:])))
    cam = torch.cat(cams)
    radar = torch.stack([scenes.scene(k).inputs["radar_bev"] for k in range(n)])
    images = torch.stack([scenes.scene(k).inputs["images"] for k in range(n)])
    blank = camera_bev(model, torch.zeros_like(images[:1]), grid, valid)
    mean = camera_bev(model, images.mean(0, keepdim=True), grid, valid)
    gt = [{GT_KEY: scenes.scene(k).vehicle_gt, VALID_KEY: scenes.scene(k).valid_mask} for k in range(n)]
    return _Data(cam, radar, blank, mean, gt)


# ---------------------------------------------------------------------------
# One rule set
# ---------------------------------------------------------------------------
def _component_iou(names: Sequence[str], maps: torch.Tensor, output: torch.Tensor, data: _Data) -> dict[str, float]:
    """Vehicle IoU of each map in ``maps`` [N, K, Z, X] alone (> 0) and of ``output`` [N, Z, X]."""
    metric = ComponentIoU(tuple(names[:-1]) if names[-1] == "bias" else tuple(names), HEAD)
    if names[-1] != "bias":  # baselines: no bias map; score the modality maps and the output
        metric.names = (*names, "full")
        metric.intersection = torch.zeros(len(metric.names), dtype=torch.float64)
        metric.union = torch.zeros(len(metric.names), dtype=torch.float64)
    for k in range(len(data.items)):
        ref = SimpleNamespace(components={HEAD: maps[k][:, None, None]}, output={HEAD: output[k][None, None]})
        metric.update(Sample(k, data.items[k], {}, ref, None, None, len(data.items)))
    return metric.iou


def _cpu_seconds(call: Callable[[], Any], repeats: int = 5) -> float:
    """Least CPU time of ``call`` over ``repeats`` runs (one thread; CPU time and the minimum keep most of
    the noise of other processes on the machine out)."""
    times = []
    for _ in range(repeats):
        start = time.process_time()
        call()
        times.append(time.process_time() - start)
    return min(times)


def _cost_inputs(scenes: _Scenes) -> list[dict[str, torch.Tensor]]:
    return [_batched(scenes.scene(k).inputs) for k in range(min(COST_SCENES, len(scenes)))]


def _forward_seconds(model: nn.Module, scenes: _Scenes) -> float:
    """CPU seconds per scene of the full model's forward (batch 1; least of 10 runs per scene)."""
    inputs = _cost_inputs(scenes)
    with torch.no_grad():
        model(**inputs[0])  # warm-up
        return sum(_cpu_seconds(lambda x=x: model(**x), 10) for x in inputs) / len(inputs)


def _cost(model: nn.Module, rules: lmdfx.Rules, scenes: _Scenes, forward: float) -> dict[str, float]:
    """CPU seconds per scene of the full model's decomposition (batch 1), and its ratio to ``forward``."""
    dec = lmdfx.compile(model, model.modality_args, rules=rules)
    inputs = _cost_inputs(scenes)
    with torch.no_grad():
        dec(**inputs[0])  # warm-up
        d = sum(_cpu_seconds(lambda x=x: dec(**x)) for x in inputs) / len(inputs)
    return {"decomposition_s": d, "forward_s": forward, "ratio": d / forward}


def _separation(dec: Any, data: _Data) -> dict:
    """Table 4 on the first :data:`SEPARATION_SCENES` scenes (partner k + n/3, one per scene)."""
    n = min(SEPARATION_SCENES, len(data.items))
    result = evaluate(dec, data.items[:n], shift=max(1, n // 3), repeats=1, iou=False).separation
    entries = {result.label(i, j): {"pcc": float(result.pcc[i, j]), "pcc_std": float(result.pcc_std[i, j]),
                                    "mse": float(result.mse[i, j]), "mse_std": float(result.mse_std[i, j])}
               for i, j in TABLE4}
    off = [result.label(i, j) for i, j in TABLE4 if i != j]
    worst_mse = max(entries[k]["mse"] for k in off)
    worst_pcc = min(entries[k]["pcc"] for k in off)
    return {"pairs": result.pairs, "scenes": n, "entries": entries, "off_diagonal_max_mse": worst_mse,
            "off_diagonal_min_pcc": worst_pcc, "separated": worst_mse <= 1e-12 and worst_pcc >= 1 - 1e-6}


def _lmd_row(name: str, rules: lmdfx.Rules, fused: nn.Module, data: _Data, scenes: _Scenes,
             progress: bool) -> tuple[dict, AttributionScore]:
    """Every column of one rule set's row; and the per-vehicle records."""
    # check="raise": an inexact call raises; exact_output=True: every node's residual is measured
    dec = lmdfx.compile(fused, fused.modality_args, rules=rules, exact_output=True)
    n = len(data.items)
    maps, outs, residual = [], [], 0.0
    for start in progress_bar(range(0, n, BATCH), progress, name, unit="batch"):
        with torch.no_grad():
            res = dec(**data.inputs(range(start, min(start + BATCH, n))))
        maps.append(select(res.components, HEAD)[:, :, 0].transpose(0, 1))  # [B, M+1, Z, X]
        outs.append(select(res.output, HEAD)[:, 0])
        residual = max(residual, dec.report().max_relative_residual or 0.0)
    comps, output = torch.cat(maps), torch.cat(outs)
    score = attribution_score({k: comps[k, :-1] for k in range(n)}, scenes, names=dec.names[:-1])
    row = {"method": name, "kind": "lmd", "rules": {k: getattr(rules, k) for k in FACTORS} if name != TAYLOR
           else {"fallback": "taylor", "overrides": {str(k): v for k, v in rules.overrides.items()}},
           "attribution": score_intervals(score), "iou": _component_iou(dec.names, comps, output, data),
           "separation": _separation(dec, data),
           "exactness": {"max_relative_residual": residual, "check": dec.check}}
    return row, score


# ---------------------------------------------------------------------------
# Baselines
# ---------------------------------------------------------------------------
def occlusion_maps(model: nn.Module, inputs: dict[str, torch.Tensor], blank: dict[str, torch.Tensor],
                   head: Any = HEAD) -> torch.Tensor:
    """Per modality m: output − output with m's input replaced by ``blank[m's argument]`` ([M, ...] of ``head``).

    ``inputs`` are batched forward arguments; ``model.modality_args`` names the modalities.
    """
    with torch.no_grad():
        full = select(model(**inputs), head)
        return torch.stack([full - select(model(**{**inputs, arg: blank[arg]}), head)
                            for arg in model.modality_args.values()])


def _maps_row(name: str, kind: str, maps: torch.Tensor, output: torch.Tensor, data: _Data, scenes: _Scenes,
              extra: dict) -> tuple[dict, AttributionScore]:
    score = attribution_score({k: maps[k] for k in range(len(maps))}, scenes, names=SENSORS)
    row = {"method": name, "kind": kind, "attribution": score_intervals(score),
           "iou": _component_iou(SENSORS, maps, output, data), "separation": None, **extra}
    return row, score


def _baselines(fused: nn.Module, data: _Data, scenes: _Scenes, progress: bool) -> list[tuple[dict, Any]]:
    n = len(data.items)
    rows = []
    zero = {"cam_bev": data.blank_cam, "radar_bev": torch.zeros_like(data.radar[:1])}
    mean = {"cam_bev": data.mean_cam, "radar_bev": data.radar.mean(0, keepdim=True)}
    chunks = [range(s, min(s + BATCH, n)) for s in range(0, n, BATCH)]
    with torch.no_grad():
        output = torch.cat([select(fused(**data.inputs(ks)), HEAD)[:, 0] for ks in chunks])
    for label, base in (("zero", zero), ("mean-input", mean)):
        # exact two-sensor Shapley values, the 4 coalitions of BATCH scenes in one forward pass
        maps = torch.cat([modality_shapley(fused, data.inputs(ks), {k: v.expand(len(ks), *v.shape[1:])
                                                                     for k, v in base.items()}, head=HEAD).values
                          for ks in progress_bar(chunks, progress, f"Shapley ({label})", unit="batch")], dim=1)
        rows.append(_maps_row(f"Shapley, {label} baseline", "shapley", maps[:, :, 0].transpose(0, 1).float(), output,
                              data, scenes, {"exactness": {"sums_to": f"output − output at the {label} baseline"}}))
    occ = torch.cat([occlusion_maps(fused, data.inputs(ks), {k: v.expand(len(ks), *v.shape[1:])
                                                               for k, v in zero.items()})[:, :, 0]
                     for ks in chunks], dim=1).transpose(0, 1)
    rows.append(_maps_row("occlusion (drop one sensor)", "occlusion", occ, output, data, scenes,
                          {"exactness": {"sums_to": "not additive"}}))
    rows += _captum_rows(fused, data, scenes, progress)
    return rows


def _captum_rows(fused: nn.Module, data: _Data, scenes: _Scenes, progress: bool) -> list[tuple[dict, Any]]:
    """DeepLift and InputXGradient of each vehicle's mean logit, summed per modality (captum, optional)."""
    names = ("Captum DeepLift (zero-input baseline)", "Captum InputXGradient")
    if importlib.util.find_spec("captum") is None:
        return [({"method": n, "kind": "captum", "note": "captum not installed (pip install captum)"}, None)
                for n in names]
    from captum.attr import DeepLift, InputXGradient

    records: dict[str, list] = {n: [] for n in names}
    n = len(data.items)
    for start in progress_bar(range(0, n, BATCH), progress, "Captum", unit="batch"):
        # every single-sensor vehicle of BATCH scenes: one batch entry each (its scene's inputs, its footprint)
        singles = [(k, j, o) for k in range(start, min(start + BATCH, n))
                   for j, o in enumerate(scenes.scene(k).objects) if o.single_sensor is not None and o.mask.any()]
        if not singles:
            continue
        ks = [k for k, _, _ in singles]
        target = _VehicleMeans(fused, torch.stack([torch.from_numpy(o.mask).float() for *_, o in singles]))
        inputs = (data.cam[ks].clone(), data.radar[ks].clone())
        base = (data.blank_cam.expand(len(ks), -1, -1, -1).clone(), torch.zeros_like(inputs[1]))
        for name, attr in ((names[0], lambda: DeepLift(target).attribute(inputs, baselines=base)),
                           (names[1], lambda: InputXGradient(target).attribute(inputs))):
            with warnings.catch_warnings():  # captum announces its hooks and that it enabled gradients
                warnings.simplefilter("ignore", UserWarning)
                parts = attr()
            values = torch.stack([p.detach().flatten(1).sum(1) for p in parts], 1).double()  # [V, M]
            for (k, j, obj), means in zip(singles, values):
                best = int(means.argmax())
                records[name].append(dict(scene=k, object=j, sensor=obj.single_sensor,
                                          dominant=SENSORS[best] if means[best] > 0 else None,
                                          means={s: float(m) for s, m in zip(SENSORS, means)}))
    rows = []
    for name in names:
        score = AttributionScore(SENSORS, records[name])
        rows.append(({"method": name, "kind": "captum", "attribution": score_intervals(score), "iou": None,
                      "separation": None, "exactness": {"sums_to": "output − output at the baseline"
                                                        if "DeepLift" in name else "not additive"},
                      "note": "at the camera BEV features and the radar grid (the encoder is camera-only)"}, score))
    return rows


class _VehicleMeans(nn.Module):
    """Each batch entry's mean segmentation logit over its own vehicle footprint (captum's scalar output)."""

    def __init__(self, fused: nn.Module, masks: torch.Tensor):
        super().__init__()
        self.fused, self.masks = fused, masks

    def forward(self, cam_bev: torch.Tensor, radar_bev: torch.Tensor) -> torch.Tensor:
        logits = self.fused(cam_bev, radar_bev)[HEAD][:, 0]
        # DeepLift runs the inputs and the baselines as one batch: the masks repeat
        masks = self.masks.repeat(logits.shape[0] // self.masks.shape[0], 1, 1)
        return (logits * masks).sum((1, 2)) / masks.sum((1, 2))


# ---------------------------------------------------------------------------
# One model
# ---------------------------------------------------------------------------
def _disagreements(lmd: AttributionScore, shap: AttributionScore, scenes: _Scenes,
                   scores: dict[str, Optional[AttributionScore]]) -> list[dict]:
    """Single-sensor vehicles where LMD (default rules) and Shapley (zero baseline) name different sensors,
    with every method's values there (``by_method``: method -> sensor -> mean over the footprint)."""
    by_vehicle = {(r["scene"], r["object"]): r for r in shap.records}
    values = {name: {(r["scene"], r["object"]): r["means"] for r in score.records}
              for name, score in scores.items() if score is not None}
    rows = []
    for r in lmd.records:
        s = by_vehicle[(r["scene"], r["object"])]
        if r["dominant"] != s["dominant"]:
            obj = scenes.scene(r["scene"]).objects[r["object"]]
            rows.append({"scene": r["scene"], "vehicle": r["object"], "sensor": r["sensor"],
                         "center_m": [round(float(c), 1) for c in obj.center], "camera_pixels": obj.camera_pixels,
                         "radar_points": obj.radar_points, "lmd": r["means"], "lmd_names": r["dominant"],
                         "shapley": s["means"], "shapley_names": s["dominant"],
                         "by_method": {name: v[(r["scene"], r["object"])] for name, v in values.items()}})
    return rows


def _rules(name: str, fields: dict[str, str], fused: nn.Module) -> lmdfx.Rules:
    """The ``Rules`` of a grid row (``reference`` is not a Rules field)."""
    if name == TAYLOR:
        return taylor_everywhere(lmdfx.compile(fused, fused.modality_args))
    return lmdfx.Rules(**{k: v for k, v in fields.items() if k != "reference"})


def _costs(spec: str, grid: dict[str, dict], scenes: _Scenes) -> dict[str, dict]:
    """Rule set -> cost on model ``spec`` (the study's models share one architecture, so one model
    gives the column). A reference adds one addition to the model: its row costs its rules'."""
    model, _, _ = build_model(spec)
    fused = FusedBEV(model).eval()
    forward = _forward_seconds(model, scenes)  # the same for every rule set: measured once
    by_rules: dict[str, dict] = {}
    out = {}
    for name, fields in grid.items():
        key = _name({k: v for k, v in fields.items() if k != "reference"}) if "reference" in fields else name
        if key not in by_rules:
            by_rules[key] = _cost(model, _rules(name, fields, fused), scenes, forward)
        out[name] = by_rules[key]
    return out


def _study_model(spec: str, weights: Optional[str], grid: dict[str, dict], scenes: _Scenes, progress: bool) -> dict:
    """Every row for one model, but the cost column (:func:`_costs`)."""
    start = time.time()
    model, _, _ = build_model(spec, weights)
    fused = FusedBEV(model).eval()
    data = _prepare(model, scenes, progress)
    check = check_fused(model, scenes.scene(0))
    rows, scores = [], {}
    referenced = ReferencedBEV(model).eval()
    for name, fields in grid.items():
        t = time.time()
        rules = _rules(name, fields, fused)
        reference = fields.get("reference")
        net, inputs = (referenced, data.against(reference)) if reference else (fused, data)
        row, scores[name] = _lmd_row(name, rules, net, inputs, scenes, progress)
        row["rules"]["reference"] = reference or "zero"
        row["seconds"] = round(time.time() - t, 1)
        rows.append(row)
    for row, score in _baselines(fused, data, scenes, progress):
        rows.append(row)
        scores[row["method"]] = score
    shap = scores.get("Shapley, zero baseline")
    lmd = scores.get(DEFAULT, next(iter(scores.values())))
    return {"model": spec, "weights": weights, "meta": dict(getattr(model, "world_meta", {})),
            "fused_check_relative_difference": check, "rows": rows,
            "disagreements": _disagreements(lmd, shap, scenes, scores) if shap is not None else [],
            "seconds": round(time.time() - start, 1)}


# ---------------------------------------------------------------------------
# study.md and study.png
# ---------------------------------------------------------------------------
def format_score(entry: dict) -> str:
    """``78.4 [73.9, 82.6] (n)``: a score in percent with its interval and vehicle count."""
    if entry["total"] == 0:
        return "–"
    lo, hi = entry["ci95"]
    return f"{100 * entry['score']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}] ({entry['total']})"


def _g(value: Optional[float], digits: int = 2) -> str:
    if value is None:
        return "–"
    if value == 0:
        return "0"
    return f"{value:.{digits}g}" if abs(value) < 1e-3 or abs(value) >= 1e4 else f"{value:.{digits}f}"


def _table(model: dict) -> list[str]:
    labels = TABLE4_LABELS
    head = ("| method | " + " | ".join(f"PCC {x}" for x in labels) + " | " + " | ".join(f"MSE {x}" for x in labels)
            + " | camera-only % | radar-only % | all single-sensor % | IoU cam / radar / bias / full % "
              "| cost (dec/fwd) | max rel. residual |")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for row in model["rows"]:
        if "attribution" not in row:
            lines.append(f"| {row['method']} | {row['note']} |" + " |" * (head.count("|") - 3))
            continue
        sep = row.get("separation")
        pcc = [_g(sep["entries"][x]["pcc"]) for x in labels] if sep else ["–"] * 4
        mse = [_g(sep["entries"][x]["mse"]) for x in labels] if sep else ["–"] * 4
        att = row["attribution"]
        iou = row.get("iou")
        parts = ("camera", "radar", "bias", "full")
        iou_text = " / ".join(f"{100 * iou[k]:.1f}" if k in iou else "–" for k in parts) if iou else "–"
        cost = f"{row['cost']['ratio']:.2f}" if "cost" in row else "–"
        exact = row["exactness"]
        residual = _g(exact["max_relative_residual"]) if "max_relative_residual" in exact else exact["sums_to"]
        scores = " | ".join(format_score(att[group]) for group in ("camera-only", "radar-only", "all"))
        cells = " | ".join([row["method"], *pcc, *mse, scores, iou_text, cost, residual])
        lines.append(f"| {cells} |")
    return lines


def _markdown(record: dict) -> str:
    lines = ["# lmdfx study: which rules tell the truth?", "",
             f"{record['scenes']} unseen sensor-world scenes (seed {record['seed']}); rule grid "
             f"`{record['grid']}` ({len(record['rule_sets'])} rule sets); {record['seconds']:.0f} s in all "
             f"({record['threads']} torch thread). Attribution: the share of single-sensor vehicles whose "
             "largest positive per-sensor value (mean over the vehicle's cells) names the sensor that saw it, "
             "with a 95 % percentile-bootstrap interval over vehicles and the vehicle count. Separation "
             f"(the paper's Table 4): on the first {record['separation_scenes']} scenes, each paired with one "
             "other; Xp/Y is component Y after sensor X's input is swapped, operating point frozen (separated: "
             "off-diagonal PCC 1, MSE 0). Cost: CPU seconds of the full model's decomposition over its forward "
             f"(one thread, batch 1, least of 5 runs (forward: 10) on {COST_SCENES} scenes, the first model's: the "
             "architecture is shared). Max rel. residual: the largest |Σ components "
             "− value| / max|value| of any node over every call (the check raises above 1e-3 in float32).", ""]
    for model in record["models"]:
        meta = model["meta"]
        lines += [f"## {model['model']}", "",
                  f"Trained {meta.get('steps', '?')} steps in {meta.get('seconds', '?')} s (sensor dropout "
                  f"{meta.get('sensor_dropout', '?')}, camera share {meta.get('camera_share', 0.5)}, camera-only / "
                  f"radar-only training mix {meta.get('p_camera_only', '?')} / {meta.get('p_radar_only', '?')}); "
                  f"validation vehicle IoU {100 * meta.get('val_iou', math.nan):.1f} %. Study time for this model: "
                  f"{model['seconds']:.0f} s.", "", *_table(model), ""]
        if model["disagreements"]:
            lines.append(f"{len(model['disagreements'])} vehicles where the default LMD row and Shapley (zero "
                         "baseline) name different sensors (`study.json` lists them with their values).")
            lines.append("")
    lines += ["See docs/faithfulness.md for what the numbers mean and which rule set to use when.", ""]
    return "\n".join(lines)


def _figure(record: dict, path: Path) -> Path:
    """Attribution score on all single-sensor vehicles with its 95 % interval, per method and model."""
    models = record["models"]
    methods = [r["method"] for r in models[0]["rows"] if "attribution" in r]
    fig = viz._figure(4.2 * len(models), 0.32 * len(methods) + 1.2)
    for m, model in enumerate(models):
        ax = fig.add_subplot(1, len(models), m + 1)
        rows = {r["method"]: r for r in model["rows"] if "attribution" in r}
        for y, method in enumerate(methods):
            if method not in rows:
                continue
            row = rows[method]
            entry = row["attribution"]["all"]
            lo, hi = entry["ci95"]
            colour = {"lmd": "tab:blue", "shapley": "tab:orange", "occlusion": "tab:green"}.get(row["kind"], "tab:gray")
            low, high = 100 * (entry["score"] - lo), 100 * (hi - entry["score"])
            ax.errorbar([100 * entry["score"]], [y], xerr=[[low], [high]], fmt="o", color=colour, capsize=3)
        ax.axvline(90, color="k", lw=0.6, ls="--")
        ax.set_yticks(range(len(methods)))
        ax.set_yticklabels(methods if m == 0 else [""] * len(methods), fontsize=7)
        ax.invert_yaxis()
        ax.set_xlim(0, 102)  # a score of 100 stays visible
        ax.set_xlabel("attribution score, all single-sensor vehicles (%)", fontsize=7)
        ax.set_title(model["model"], fontsize=8)
        ax.tick_params(labelsize=7)
    return viz._save(fig, path)


# ---------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------
def check_arguments(out: str | Path, scenes: int, models: Sequence[str], grid: str,
                    methods: Optional[Sequence[str]] = None, jobs: int = 1) -> Path:
    """Check the study's arguments before anything is built; returns the output folder.

    ``scenes`` ≥ 2 (separation pairs scenes), ``models`` registered world models, ``grid`` one of
    :data:`GRIDS`, ``methods`` (when given) rule-set names of that grid. Each failure is an
    :class:`LMDError` naming the argument and the fix.
    """
    viz.require_matplotlib()
    folder = check_out_folder(out)
    if isinstance(scenes, bool) or not isinstance(scenes, int) or scenes < 2:
        raise LMDError(f"--scenes must be an integer of 2 or more (the separation protocol pairs each scene with "
                       f"another), got {scenes!r}.")
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise LMDError(f"--jobs must be a positive integer (models studied at once), got {jobs!r}.")
    world = [m for m in MODELS if m.startswith("simplebev-world")]
    if not models:
        raise LMDError(f"--models is empty; name one or more of {', '.join(world)}.")
    wrong = [m for m in models if m not in world]
    if wrong:
        raise LMDError(f"--models {', '.join(map(repr, wrong))}: the study runs on sensor-world models only; use "
                       f"{', '.join(world)}.")
    known = rule_sets(grid)
    unknown = [m for m in methods or () if m not in known]
    if unknown:
        raise LMDError(f"unknown rule set(s) {', '.join(map(repr, unknown))} for grid {grid!r}; use "
                       f"{'; '.join(known)}.")
    from lmdfx.bev.weights import WORLD_VARIANTS

    missing = [f"{m} ({WORLD_VARIANTS[m.removeprefix('simplebev-world-')]})" for m in models
               if m.removeprefix("simplebev-world-") in WORLD_VARIANTS
               and not WORLD_VARIANTS[m.removeprefix("simplebev-world-")].is_file()]
    if missing:
        raise LMDError(f"the weights of {', '.join(missing)} are missing: reinstall lmdfx, or leave the model out of "
                       "--models.")
    return folder


def _worker_model(spec: str, grid: dict[str, dict], n: int) -> dict:
    # a fresh (spawned) process: one torch thread, the scenes rendered again (scene k depends on (seed, k) only)
    torch.set_num_threads(1)
    return _study_model(spec, None, grid, _Scenes(SensorWorld(num_scenes=n, seed=SEED), False), False)


def _all_models(models: Sequence[str], grid: dict[str, dict], scenes: _Scenes, jobs: int, progress: bool) -> list[dict]:
    """:func:`_study_model` for every model, ``jobs`` at a time in spawned processes of one torch thread
    each; the cost column is measured in this process meanwhile (CPU time: the workers do not inflate it)."""
    if jobs <= 1 or len(models) <= 1:
        results = [_study_model(spec, None, grid, scenes, progress) for spec in models]
        costs = _costs(models[0], grid, scenes)
    else:
        # spawn, not fork: forked workers of a process that has run torch crawl (thread pools)
        with ProcessPoolExecutor(max_workers=min(jobs, len(models)),
                                 mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(_worker_model, spec, grid, len(scenes)) for spec in models]
            costs = _costs(models[0], grid, scenes)
            results = []
            for spec, future in zip(models, futures):
                results.append(future.result())
                if progress:
                    print(f"{spec}: {results[-1]['seconds']:.0f} s", file=sys.stderr)
    for result in results:
        for row in result["rows"]:
            if row["method"] in costs:
                row["cost"] = costs[row["method"]]
    return results


def run(out: str | Path, scenes: Optional[int] = None, quick: bool = False, models: Sequence[str] = STUDY_MODELS,
        grid: str = "ofat", methods: Optional[Sequence[str]] = None, progress: bool = True, jobs: int = 3) -> dict:
    """Write ``study.json``, ``study.md`` and ``study.png`` to ``out``; return the record.

    ``scenes``: unseen scenes (default :data:`DEFAULT_SCENES`, :data:`QUICK_SCENES` with ``quick``);
    ``models``: registered sensor-world models; ``grid``: ``ofat`` or ``full`` (:func:`rule_sets`);
    ``methods``: a subset of the grid's rule sets (default all). The baselines always run.
    ``jobs``: models studied at once, in spawned processes of one torch thread each (the results do
    not depend on it; the cost column is CPU time, measured in this process).
    """
    scenes = scenes if scenes is not None else (QUICK_SCENES if quick else DEFAULT_SCENES)
    out = check_arguments(out, scenes, models, grid, methods, jobs)
    start = time.time()
    chosen = {k: v for k, v in rule_sets(grid).items() if methods is None or k in methods}
    world = _Scenes(SensorWorld(num_scenes=scenes, seed=SEED), progress)
    results = _all_models(models, chosen, world, jobs, progress)
    record = {"scenes": scenes, "seed": SEED, "grid": grid, "rule_sets": list(chosen),
              "separation_scenes": min(SEPARATION_SCENES, scenes), "threads": torch.get_num_threads(),
              "jobs": min(jobs, len(models)),
              "captum": importlib.util.find_spec("captum") is not None, "models": results}
    record["seconds"] = round(time.time() - start, 1)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "study.md", _markdown(record))
    _figure(record, out / "study.png")
    record["seconds"] = round(time.time() - start, 1)
    write_text(out / "study.json", json.dumps(record, indent=2, default=float))
    print("\n".join(_table(results[0])))
    print(f"wrote {out / 'study.md'}, study.json and study.png in {record['seconds']:.0f} s")
    return record
