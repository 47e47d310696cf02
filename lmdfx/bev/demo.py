"""``lmdfx demo``: decompose the sensor-world SimpleBEV on unseen scenes; write figures and a report.

The report (``report.md`` / ``report.json``) holds the separation table, per-component vehicle
IoU and the ground-truth attribution score of LMD and of exact Shapley values, each explained in
words, and lists the vehicles where the two attributions disagree with the figures that show them.
Every file is written atomically (:mod:`lmdfx.bev.files`).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

import lmdfx
from lmdfx.bev import viz
from lmdfx.bev.attribution import AttributionScore, attribution_score, shapley_maps
from lmdfx.bev.data.sensor_world import SENSORS, SensorWorld
from lmdfx.bev.evaluation import GT_KEY, HEAD, VALID_KEY, Evaluation, evaluate
from lmdfx.bev.files import check_out_folder, write_text
from lmdfx.bev.registry import build_model
from lmdfx.errors import LMDError
from lmdfx.metrics import select

__all__ = ["SEED", "check_arguments", "run", "study_row"]

#: Scenes of this seed are unseen: training used seeds 0 (train) and 1 (validation).
SEED = 2


# ---------------------------------------------------------------------------
# Numbers in prose and tables
# ---------------------------------------------------------------------------
def _num(value: float, digits: int = 3) -> str:
    """``value`` with ``digits`` significant digits; small values in scientific notation (3.1e-04), 0 as 0."""
    value = float(value)
    if math.isnan(value):
        return "nan"
    if value == 0:
        return "0"
    if abs(value) < 0.01 or abs(value) >= 1e5:
        return f"{value:.{digits - 1}e}"
    return f"{value:#.{digits}g}".rstrip(".")


def _terms(values: list[tuple[float, str]]) -> str:
    """``a (x) + b (y) - c (z)``: signed terms of a sum, each with its label."""
    text = ""
    for k, (value, label) in enumerate(values):
        sign = ("-" if value < 0 else "") if k == 0 else (" - " if value < 0 else " + ")
        text += f"{sign}{_num(abs(value))} ({label})"
    return text


def _pcc(value: float) -> str:
    """A correlation; within 1e-3 of 1 written as 1 − d, so a near-perfect 0.9999 does not read as 1."""
    value = float(value)
    if value != 1 and abs(1 - value) < 1e-3:
        return f"1 − {_num(1 - value, 2)}"
    return _num(value)


# ---------------------------------------------------------------------------
# Argument checks (before any model is built)
# ---------------------------------------------------------------------------
def check_arguments(out: str | Path, scenes: int, weights: Optional[str]) -> Path:
    """Check the demo's arguments without building anything; returns the output folder.

    matplotlib must be installed, ``out`` must be a writable or creatable folder, ``scenes``
    at least 2 (the separation protocol pairs each scene with another) and ``weights`` (when
    given) an existing file. Each failure is an :class:`LMDError` naming the argument and the fix.
    """
    viz.require_matplotlib()  # before minutes of work, not after
    folder = check_out_folder(out)
    if isinstance(scenes, bool) or not isinstance(scenes, int) or scenes < 2:
        raise LMDError(f"--scenes must be an integer of 2 or more (the separation protocol pairs each scene with "
                       f"another), got {scenes!r}.")
    if weights is not None and not os.path.isfile(weights):
        raise LMDError(f"--weights {weights!r} not found; pass a file written by python -m lmdfx.bev.train_world "
                       "--out PATH (or leave --weights out: the shipped weights).")
    return folder


# ---------------------------------------------------------------------------
# What the figures and the report keep of each scene
# ---------------------------------------------------------------------------
@dataclass
class _Maps:
    """The output head of one decomposition, as :func:`viz.component_maps` reads it."""

    names: tuple[str, ...]
    components: dict[str, torch.Tensor]  # {HEAD: [M+1, 1, 1, Z, X]}
    output: dict[str, torch.Tensor]  # {HEAD: [1, 1, Z, X]}


def _keep(res: Any) -> _Maps:
    comps = select(res.components, HEAD).detach().cpu().clone()
    return _Maps(tuple(res.names), {HEAD: comps}, {HEAD: select(res.output, HEAD).detach().cpu().clone()})


def _means(maps: dict[int, _Maps], items: dict[int, dict[str, torch.Tensor]]) -> dict[str, dict[str, float]]:
    """Mean of each component and of the logit over the vehicle cells and the background cells (valid only)."""
    names = next(iter(maps.values())).names
    sums = {region: torch.zeros(len(names) + 1, dtype=torch.float64) for region in ("vehicle", "background")}
    counts = {region: 0 for region in sums}
    for k, m in maps.items():
        comps = m.components[HEAD][:, 0, 0].double()  # [M+1, Z, X]
        stack = torch.cat([comps, m.output[HEAD][0].double()])  # components and the logit
        gt, valid = items[k][GT_KEY][0] > 0, items[k][VALID_KEY][0] > 0
        for region, cells in (("vehicle", gt & valid), ("background", ~gt & valid)):
            sums[region] += stack[:, cells].sum(1)
            counts[region] += int(cells.sum())
    keys = (*names, "logit")
    return {region: {n: float(v) / max(counts[region], 1) for n, v in zip(keys, sums[region])} | {
        "cells": counts[region]} for region in sums}


def _footprint_means(m: _Maps, cells: torch.Tensor) -> dict[str, float]:
    """Mean of each component and of the logit over ``cells`` [Z, X]."""
    stack = torch.cat([m.components[HEAD][:, 0, 0], m.output[HEAD][0]]).double()
    return {n: float(v) for n, v in zip((*m.names, "logit"), stack[:, cells].mean(1))}


def _disagreements(lmd: AttributionScore, shap: AttributionScore, world: SensorWorld, dec: Any,
                   maps: dict[int, _Maps], items: dict[int, dict[str, torch.Tensor]]) -> list[dict]:
    """Single-sensor vehicles where LMD or Shapley names the wrong sensor, with both attributions.

    Each row also holds, over the vehicle's footprint, the logit and LMD's components with each
    sensor's input set to zero (the operating point recomputed): the coalitions Shapley compares,
    and what the other sensor's input does to LMD's components. ``background``: the scene's
    means over its valid cells without vehicles.
    """
    by_vehicle = {(r["scene"], r["object"]): r for r in shap.records}
    wrong = [(r, by_vehicle[(r["scene"], r["object"])]) for r in lmd.records]
    wrong = [(r, s) for r, s in wrong if r["dominant"] != r["sensor"] or s["dominant"] != s["sensor"]]
    args = dict(dec.modalities)  # sensor -> forward argument
    scenes: dict[int, Any] = {}
    for k in sorted({r["scene"] for r, _ in wrong}):
        scene = world.scene(k)
        inputs = {key: v[None] for key, v in scene.inputs.items()}
        without = {}
        for sensor in SENSORS:
            zeroed = {**inputs, args[sensor]: torch.zeros_like(inputs[args[sensor]])}
            with torch.no_grad():
                without[sensor] = _keep(dec(**zeroed))
        gt, valid = items[k][GT_KEY][0] > 0, items[k][VALID_KEY][0] > 0
        scenes[k] = (scene.objects, without, _footprint_means(maps[k], ~gt & valid))
    rows = []
    for r, s in wrong:
        objects, without, background = scenes[r["scene"]]
        obj = objects[r["object"]]
        cells = torch.from_numpy(obj.mask)
        rows.append(dict(scene=r["scene"], vehicle=r["object"], sensor=r["sensor"], center=obj.center,
                         camera_pixels=obj.camera_pixels, radar_points=obj.radar_points, cells=int(cells.sum()),
                         lmd=r["means"], lmd_names=r["dominant"], shapley=s["means"], shapley_names=s["dominant"],
                         real=_footprint_means(maps[r["scene"]], cells),
                         without={n: _footprint_means(m, cells) for n, m in without.items()},
                         background=background))
    return rows


# ---------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------
def _figures(out: Path, world: SensorWorld, maps: dict[int, _Maps], scenes: list[int], first: Any,
             dec: Any) -> list[Path]:
    """Component maps of ``scenes``; layer energy and Modality-GradCAM of scene 0 (``first``: its decomposition)."""
    figures = []
    for k in scenes:
        scene = world.scene(k)
        single = [(o.single_sensor, o.mask) for o in scene.objects if o.single_sensor]
        counts = {s: sum(sensor == s for sensor, _ in single) for s in SENSORS}
        figures.append(viz.component_maps(
            maps[k], out / f"components_scene{k}.png", gt=scene.vehicle_gt[None],
            images=scene.inputs["images"][None], single_sensor=single,
            title=f"scene {k}: {len(scene.objects)} vehicles, {counts['camera']} seen by the camera only, "
                  f"{counts['radar']} by the radar only"))
        if k == 0:
            figures.append(viz.layer_energy(first, out / "layer_energy.png", dec=dec,
                                            title="component energy per layer, scene 0"))
            inputs = {key: v[None] for key, v in scene.inputs.items()}
            figures.append(viz.gradcam_figure(dec, inputs, "decoder.up1_skip", out / "gradcam_scene0.png",
                                              gt=scene.vehicle_gt[None]))
    return figures


# ---------------------------------------------------------------------------
# report.md
# ---------------------------------------------------------------------------
def _separation_section(result: Evaluation, shift: int, repeats: int, scenes: int, cells: int) -> list[str]:
    sep = result.separation
    m = len(sep.names)
    pairs = [(i, j) for i in range(m) for j in range(m)]
    lines = ["## Separation: does each component depend on its own sensor only?", "",
             "| | " + " | ".join(sep.label(i, j) for i, j in pairs) + " |",
             "|---|" + "---|" * len(pairs),
             "| PCC (mean ± std) | " + " | ".join(
                 f"{_pcc(sep.pcc[i, j])} ± {_num(sep.pcc_std[i, j], 2)}" for i, j in pairs) + " |",
             "| MSE, squared logits (mean ± std) | " + " | ".join(
                 f"{_num(sep.mse[i, j])} ± {_num(sep.mse_std[i, j], 2)}" for i, j in pairs) + " |", "",
             f"**Xp/Y** is component Y measured after sensor X's input was replaced by another scene's (C = camera, "
             f"R = radar), with everything else kept: the other sensor's input and the operating point (the ReLU "
             f"on/off pattern and normalisation statistics of the original scene). It is compared cell by cell "
             f"with component Y on the original inputs, over the {cells} cells of the map, for {sep.pairs} (scene, "
             f"partner) pairs: partner p = (k + {shift}·r) mod {scenes} for r = 1..{repeats}. **PCC** is the "
             "Pearson correlation of the two maps (1: the same pattern); **MSE** is their mean squared difference, "
             "in squared logits (0: identical maps; its square root is the typical change of a cell in logits).", ""]
    verdicts = []
    for i, j in pairs:
        if i == j:
            continue
        mse, pcc = float(sep.mse[i, j]), float(sep.pcc[i, j])
        if mse == 0:
            verdict = "does not change at all (MSE exactly 0"
        elif mse < 1e-8:
            verdict = f"changes only by float rounding (MSE {_num(mse)} squared logits"
        else:
            verdict = f"changes (MSE {_num(mse)} squared logits: the separation is not exact here"
        verdicts.append(f"{sep.label(i, j)}: when the {sep.names[i]} input is swapped, the {sep.names[j]} component "
                        f"{verdict}, PCC {_pcc(pcc)})")
    lines.append("- " + "; ".join(verdicts) + ". This is what LMD guarantees: at the operating point each "
                 "component is a function of its own sensor's input only.")
    for i in range(m):
        mse, pcc = float(sep.mse[i, i]), float(sep.pcc[i, i])
        lines.append(f"- {sep.label(i, i)}: swapping the {sep.names[i]} input moves the {sep.names[i]} component "
                     f"by about {_num(math.sqrt(mse), 2)} logits per cell (√MSE, MSE {_num(mse)} squared logits), "
                     f"and the new map correlates with the old one at PCC {_pcc(pcc)}: the component follows its "
                     "own sensor. (A PCC of 1 here would mean it ignores its input.)")
    return lines + [""]


def _iou_section(result: Evaluation, means: dict[str, dict[str, float]]) -> list[str]:
    iou = result.iou.iou
    names = [n for n in iou if n not in ("bias", "full")]
    lines = ["## Per-component vehicle IoU", "",
             "| | " + " | ".join(names) + " | bias | full model |", "|---|" + "---|" * (len(names) + 2),
             "| vehicle IoU (%) | " + " | ".join(_num(100 * iou[n]) for n in (*names, "bias", "full")) + " |", "",
             f"The **full model** (its logit > 0) overlaps the ground-truth vehicles with IoU "
             f"{_num(100 * iou['full'])} %, counted over all scenes (cells of vehicles no sensor saw are ignored). "
             "Each other column thresholds **one component alone** at 0, as if it were the logit, and scores it "
             "the same way. A component alone is not a model: the network was trained to make the sum of the "
             "components right, not each of them, and its other components are missing from the sum."]
    low, high = min(names, key=iou.get), max(names, key=iou.get)
    share = _num(100 * iou[low])
    lines[-1] += (f" So \"{low} alone has {share} % IoU\" means only that the cells where the {low} component by "
                  f"itself is positive overlap the vehicles with {share} % IoU — not that a {low}-only model would "
                  f"find {share} % of the vehicles, nor that the {low} supplies that share of the detections")
    lines[-1] += (f"; likewise for the {high}'s {_num(100 * iou[high])} %." if high != low else ".")
    comps = [*names, "bias"]
    lines += ["", "How the components add up to the logit, on average over the cells of all scenes:", "",
              "| mean, logits | " + " | ".join(comps) + " | sum = logit | cells |", "|---|" + "---|" * (len(comps) + 2)]
    for region in ("vehicle", "background"):
        row = means[region]
        lines.append(f"| {region} cells | " + " | ".join(_num(row[c]) for c in comps) +
                     f" | {_num(row['logit'])} | {row['cells']} |")
    veh, bg = means["vehicle"], means["background"]
    lift = {n: veh[n] - bg[n] for n in names}
    text = (f"On vehicle cells the components average {_terms([(veh[c], c) for c in comps])} = "
            f"{_num(veh['logit'])}, the logit; on background cells {_terms([(bg[c], c) for c in comps])} = "
            f"{_num(bg['logit'])}. From background to vehicle cells " + " and ".join(
                f"the {n} component rises by {_num(lift[n])} logits" for n in names) + ".")
    big, small = max(names, key=lift.get), min(names, key=lift.get)
    if len(names) > 1 and lift[big] > 3 * max(lift[small], 0):
        text += (f" Most of the difference between vehicles and background runs through the {big} component in "
                 f"this model; the {small} component is small on average, which is why it alone, thresholded at 0, "
                 "covers few vehicles.")
    return lines + ["", text, ""]


def _attribution_section(lmd: AttributionScore, shap: AttributionScore, rows: list[dict],
                         figure_of: dict[int, str]) -> list[str]:
    per = lmd.per_sensor()
    seen = ", ".join(f"{t} by the {s} only" for s, (_, t) in sorted(per.items()))
    lines = ["## Which sensor saw each vehicle? LMD and Shapley against the ground truth", ""]
    if not lmd.total:
        return lines + ["No vehicle in these scenes was seen by one sensor only, so there is nothing to score; run "
                        "more scenes (--scenes).", ""]
    lines += [f"The sensor world knows which vehicles one sensor alone saw ({seen}; a camera-only vehicle has no "
              "radar return, a radar-only vehicle is not painted in any camera image). For each of them the "
              "attribution *names* the sensor whose map has the largest positive mean over the vehicle's footprint "
              "(no positive mean: it names none, a miss). **LMD**'s maps are its camera and radar components. "
              "**Shapley**'s are exact two-sensor Shapley values with a zero baseline: a sensor's value is the "
              "change of the model's real output when its input is set to zero (a grey image, an empty radar "
              "grid), averaged over the two orders of adding the sensors (with and without the other sensor).", "",
              lmd.table("LMD components"), "",
              shap.table("Shapley values (zero baseline)"), "",
              f"LMD names the sensor that saw the vehicle for {lmd.hits} of {lmd.total} vehicles, Shapley for "
              f"{shap.hits} of {shap.total}.", ""]
    if not rows:
        return lines + ["LMD and Shapley both name the right sensor for every single-sensor vehicle.", ""]
    lines += ["### The vehicles where they disagree", "",
              "Means over each vehicle's footprint, in logits. Position: metres right (x) and ahead (z) of the "
              "ego vehicle at the map's centre; in the figures x points right and z up, and a marker beside the "
              "vehicle shows the sensor that saw it (green triangle: camera only, yellow square: radar only).", "",
              "| scene | vehicle | position x, z (m) | seen by | model logit | LMD camera | LMD radar | LMD names | "
              "Shapley camera | Shapley radar | Shapley names | figure |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        evidence = (f"radar only ({r['radar_points']} radar points, {r['camera_pixels']} camera pixels)"
                    if r["sensor"] == "radar" else f"camera only ({r['camera_pixels']} pixels, no radar point)")
        lines.append(f"| {r['scene']} | {r['vehicle']} | {r['center'][0]:+.1f}, {r['center'][1]:+.1f} | {evidence} | "
                     f"{_num(r['real']['logit'])} | {_num(r['lmd']['camera'])} | {_num(r['lmd']['radar'])} | "
                     f"{r['lmd_names'] or 'none'} | {_num(r['shapley']['camera'])} | {_num(r['shapley']['radar'])} | "
                     f"{r['shapley_names'] or 'none'} | [{figure_of[r['scene']]}]({figure_of[r['scene']]}) |")
    lines += ["", "*Model logit*: the model's output over the footprint (above 0: detected). What each row says:", ""]
    lines += [f"- {_explain(r)}" for r in rows]
    kinds = {("none" if r["lmd_names"] is None else "other") for r in rows if r["lmd_names"] != r["sensor"]}
    lines += [""]
    if "other" in kinds:
        lines += [WHY_OTHER, ""]
    if "none" in kinds:
        rises = [r["lmd"][r["sensor"]] - r["background"][r["sensor"]] for r in rows if r["lmd_names"] is None]
        missed = all(r["real"]["logit"] <= 0 for r in rows if r["lmd_names"] is None)
        tail = (" In every such row above the model itself misses the vehicle (its logit is below 0): LMD reports "
                "a computation that found nothing there." if missed else "")
        lines += [WHY_NONE.format(low=_num(min(rises)), high=_num(max(rises))) + tail, ""]
    return lines


def _explain(r: dict) -> str:
    """One vehicle of the disagreement table in words, with the numbers that show why."""
    saw = r["sensor"]
    other = next(s for s in SENSORS if s != saw)
    real, without, bg = r["real"], r["without"], r["background"]
    head = f"Scene {r['scene']}, vehicle {r['vehicle']} ({saw} only): "
    coalitions = (f"the logit is {_num(real['logit'])} with both inputs, {_num(without[other]['logit'])} with the "
                  f"{other} input zeroed and {_num(without[saw]['logit'])} with the {saw} input zeroed")
    if r["lmd_names"] == saw:
        return (head + f"LMD names the {saw}; Shapley names {r['shapley_names'] or 'no sensor'} ({coalitions}).")
    if r["lmd_names"] is None:
        detected = "the model does not detect it" if real["logit"] <= 0 else "the model detects it only weakly"
        return (head + f"{coalitions} (background of the scene: {_num(bg['logit'])}), so {detected}. LMD's {saw} "
                f"component is {_num(r['lmd'][saw])} here, {_num(r['lmd'][saw] - bg[saw])} logits above its "
                f"background level of {_num(bg[saw])} but not above 0, so no component has a positive mean and LMD "
                f"names no sensor. Shapley measures the change from the zeroed {saw} input, where the logit is lower, "
                f"so the {saw} gets a positive value ({_num(r['shapley'][saw])}).")
    wrong = r["lmd_names"]
    own = without[wrong][wrong]
    if abs(own) > 0.1:  # the branch's response to an empty input: a learned prior, no vehicle needed
        source = (f" — features that need no vehicle in the {wrong} data: with the {wrong} input itself zeroed the "
                  f"{wrong} component is still {_num(own)} —")
    elif wrong == "radar":
        source = " (of the returns around it: clutter, poles, other vehicles; this vehicle has none)"
    else:
        source = " (of the image around it: road, sky, clutter; the vehicle is not painted)"
    return (head + f"{coalitions}: the {saw} makes the detection (Shapley {saw} {_num(r['shapley'][saw])}, {wrong} "
            f"{_num(r['shapley'][wrong])}). LMD's {wrong} component is {_num(r['lmd'][wrong])} here, but "
            f"{_num(without[saw][wrong])} once the {saw} input is zeroed (operating point recomputed): the {saw} "
            f"data switched on the gates through which the {wrong} branch's features{source} reach the logit, and "
            f"LMD books those features under the {wrong}.")


WHY_OTHER = (
    "**Why LMD can credit the camera for a vehicle only the radar saw.** The two methods answer different "
    "questions. LMD splits the logit the model actually computed at the scene's operating point: the ReLU "
    "gates and normalisations stay those the real inputs switched on, and the camera component is everything the "
    "camera branch contributes through them — its features of the image, which exist for any image, even a "
    "uniform grey one (the zeroed input). The model learned to use those camera features, background included "
    "(empty road, sky, clutter), as a prior on where a vehicle can be; where radar returns open the fused gates, "
    "the camera features flow through the same gates and can add more to the logit than the radar features do. "
    "So the camera component comes out largest although the camera shows no vehicle: the radar's influence on "
    "it goes through the operating point, which LMD holds fixed, not through the radar component. Shapley values "
    "instead rerun the model with a sensor's input set to zero and average the change over the coalitions (with "
    "and without the other sensor): zeroing the radar removes the detection, zeroing the image moves it much less, "
    "so the radar gets the credit. Neither is wrong: LMD says how the logit is composed at this operating point "
    "(and its components are separated, see above), Shapley says how much the output changes when a sensor is "
    "removed. The reverse case, radar credited for a camera-only vehicle, has the same cause with the roles "
    "swapped.")

WHY_NONE = (
    "**Why LMD can name no sensor at all.** LMD's components are absolute contributions to the logit, and in "
    "this model they are negative on empty cells (see the table of means above). On a vehicle the model does not "
    "detect (its logit stays below 0), the component of the sensor that saw it rises above its background level "
    "(by {low} to {high} logits in these rows) but stays below 0, and the score's rule — the largest *positive* "
    "mean — counts a miss. Shapley values with a zero baseline are differences from the output with the sensor's "
    "input zeroed, which is lower still, so the sensor that saw the vehicle gets a positive value even where the "
    "model misses it.")


def study_row(result: Evaluation, lmd: AttributionScore, residual: float) -> dict:
    """The default rules' row in the terms of ``lmdfx study``: Table 4 entries, attribution with 95 %
    bootstrap intervals, per-component IoU and the largest relative residual."""
    from lmdfx.bev.study import score_intervals

    sep = result.separation
    m = len(sep.names)
    entries = {sep.label(i, j): {"pcc": float(sep.pcc[i, j]), "mse": float(sep.mse[i, j])}
               for i in range(m) for j in range(m)}
    return {"method": "default", "separation": entries, "attribution": score_intervals(lmd),
            "iou": result.iou.iou, "max_relative_residual": residual}


def _study_section(row: dict) -> list[str]:
    from lmdfx.bev.study import DEFAULT_SCENES, STUDY_MODELS, TABLE4_LABELS, format_score

    att, iou = row["attribution"], row["iou"]
    docs = Path(__file__).resolve().parents[2] / "docs" / "faithfulness.md"
    where = f"[docs/faithfulness.md]({docs.as_uri()})" if docs.is_file() else "docs/faithfulness.md"
    return ["## In the terms of the rule study", "",
            "| rules | " + " | ".join(f"PCC {x}" for x in TABLE4_LABELS) + " | " +
            " | ".join(f"MSE {x}" for x in TABLE4_LABELS) + " | camera-only % | radar-only % | all single-sensor % "
            "| IoU cam / radar / bias / full % | max rel. residual |",
            "|---" * (2 * len(TABLE4_LABELS) + 6) + "|",
            "| default | " + " | ".join(_pcc(row["separation"][x]["pcc"]) for x in TABLE4_LABELS) + " | " +
            " | ".join(_num(row["separation"][x]["mse"]) for x in TABLE4_LABELS) +
            f" | {format_score(att['camera-only'])} | {format_score(att['radar-only'])} | {format_score(att['all'])} | "
            + " / ".join(_num(100 * iou[k]) for k in ("camera", "radar", "bias", "full")) +
            f" | {_num(row['max_relative_residual'], 2)} |", "",
            f"Scores in % with a 95 % bootstrap interval over vehicles and the vehicle count. This is the default "
            f"row of `lmdfx study`, which sets it beside the other rule sets, Shapley, occlusion and Captum on "
            f"{DEFAULT_SCENES} scenes and {len(STUDY_MODELS)} models; what it found: {where}.", ""]


def _report(meta: dict, scenes: int, shift: int, repeats: int, result: Evaluation, means: dict, lmd: AttributionScore,
            shap: AttributionScore, rows: list[dict], figures: list[Path], cells: int,
            timings: dict[str, float], row: Optional[dict] = None) -> str:
    """report.md."""
    figure_of = {int(p.stem.removeprefix("components_scene")): p.name for p in figures
                 if p.stem.startswith("components_scene")}
    lines = [
        "# lmdfx demo: which sensor found each vehicle?", "",
        f"Model: SimpleBEV trained on the synthetic sensor world ({meta.get('steps', '?')} steps on "
        f"{meta.get('train_scenes', '?')} scenes; validation vehicle IoU "
        f"{_num(100 * meta.get('val_iou', float('nan')))} %). Data: {scenes} unseen scenes (seed {SEED}) seen by "
        "6 cameras and a radar; some vehicles are seen by the camera only (no radar returns), some by the radar "
        "only (not painted), most by both.", "",
        "LMD (layer-wise modality decomposition) splits the model's vehicle **logit** at every bird's-eye-view "
        "cell (the value before the sigmoid; above 0 means \"vehicle\") into a camera component, a radar component "
        "and a bias component. The three add up exactly to the logit, so every number below is in logits: a "
        "component of +2 at a cell raises that cell's logit by 2, one of −2 lowers it by 2.", "",
        "![components](components_scene0.png)", "",
        "*Scene 0: the six camera images, the ground truth and the prediction (top); the three components on one "
        "colour scale, red raising and blue lowering the vehicle logit (bottom).*", "",
        *_separation_section(result, shift, repeats, scenes, cells),
        *_iou_section(result, means),
        *_attribution_section(lmd, shap, rows, figure_of),
        *(_study_section(row) if row is not None else []),
        "## Figures", "",
        *[f"- [{p.name}]({p.name})" for p in figures], "",
        "## Timings (s)", "",
        *[f"- {k}: {_num(v)}" for k, v in timings.items()], "",
    ]
    return "\n".join(lines)


def run(out: str | Path, scenes: int = 12, weights: Optional[str] = None, progress: bool = True) -> None:
    """Write the demo's figures, ``report.md`` and ``report.json`` to ``out``; print the tables.

    ``weights``: a file from ``python -m lmdfx.bev.train_world --out PATH`` (default: the shipped one).
    The arguments are checked (:func:`check_arguments`) before the model is built.
    """
    out = check_arguments(out, scenes, weights)
    timings: dict[str, float] = {}
    t0 = time.time()
    model, modalities, _ = build_model("simplebev-world", weights)
    world = SensorWorld(num_scenes=scenes, seed=SEED, config=model.config)
    dec = lmdfx.compile(model, modalities, record="all", exact_output=True)  # residuals measured at every node
    timings["load + compile"] = time.time() - t0

    t = time.time()
    shift, repeats = max(1, scenes // 3), 2
    maps: dict[int, _Maps] = {}
    items: dict[int, dict[str, torch.Tensor]] = {}
    first: dict[int, Any] = {}
    residual = [0.0]

    def keep(k: int, item: Any, res: Any) -> None:
        # the reference pass of each scene also gives the LMD maps and the figures
        maps[k] = _keep(res)
        residual[0] = max(residual[0], dec.report().max_relative_residual or 0.0)
        items[k] = {key: item[key] for key in (GT_KEY, VALID_KEY)}
        if k == 0:
            first[k] = res  # every recorded layer: the layer-energy figure

    result = evaluate(dec, world, shift=shift, repeats=repeats, progress=progress, on_reference=keep)
    lmd = attribution_score({k: m.components[HEAD][:-1, 0, 0] for k, m in maps.items()}, world, progress=progress)
    timings["separation, IoU and attribution (LMD)"] = time.time() - t
    t = time.time()
    shap = attribution_score(shapley_maps(dec), world, progress=progress)
    timings["attribution (Shapley, zero baseline)"] = time.time() - t

    t = time.time()
    rows = _disagreements(lmd, shap, world, dec, maps, items)
    timings["disagreements (each sensor zeroed)"] = time.time() - t
    t = time.time()
    drawn = sorted({k for k in (0, 1) if k < len(world)} | {r["scene"] for r in rows})
    out.mkdir(parents=True, exist_ok=True)
    figures = _figures(out, world, maps, drawn, first.get(0), dec)
    timings["figures"] = time.time() - t
    timings["total"] = time.time() - t0

    means = _means(maps, items)
    cells = int(maps[0].output[HEAD][0, 0].numel())
    meta = getattr(model, "world_meta", {})
    row = study_row(result, lmd, residual[0])
    write_text(out / "report.md", _report(meta, len(world), shift, repeats, result, means, lmd, shap, rows, figures,
                                          cells, timings, row))
    record = {"scenes": len(world), "seed": SEED, "shift": shift, "repeats": repeats, **result.to_dict(),
              "mean_components": means,
              "study_row": row,
              "attribution": {"lmd": lmd.to_dict(), "shapley_zero_baseline": shap.to_dict(),
                              "disagreements": [{**r, "center": list(r["center"])} for r in rows]},
              "model": {"name": "simplebev-world", "weights": weights, **meta}, "figures": [p.name for p in figures],
              "seconds": {k: round(v, 2) for k, v in timings.items()}}
    write_text(out / "report.json", json.dumps(record, indent=2))
    print("\n\n".join(["\n".join(_separation_section(result, shift, repeats, len(world), cells)[2:6]),
                       "\n".join(_iou_section(result, means)[2:5]), lmd.table("LMD components"),
                       shap.table("Shapley values (zero baseline)")]))
    print()
    entry = row["attribution"]["all"]
    print(f"default rules: LMD names the right sensor for {_num(100 * entry['score'])} % of {entry['total']} "
          f"single-sensor vehicles (95 % interval {_num(100 * entry['ci95'][0])}–{_num(100 * entry['ci95'][1])} %); "
          "lmdfx study compares rule sets and models (report.md, last section).")
    print(f"wrote {out / 'report.md'} and {len(figures)} figures in {timings['total']:.0f} s")
