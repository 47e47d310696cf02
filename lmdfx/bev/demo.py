"""``lmdfx demo``: decompose the sensor-world SimpleBEV on unseen scenes; write figures and a report.

The report (``report.md`` / ``report.json``) holds the separation table, per-component vehicle
IoU and the ground-truth attribution score of LMD and of exact Shapley values.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Optional

import torch

import lmdfx
from lmdfx.bev import viz
from lmdfx.bev.attribution import attribution_score, shapley_maps
from lmdfx.bev.data.sensor_world import SensorWorld
from lmdfx.bev.evaluation import HEAD, Evaluation, evaluate
from lmdfx.bev.files import check_out_folder, write_text
from lmdfx.bev.registry import build_model
from lmdfx.errors import LMDError
from lmdfx.metrics import select

__all__ = ["SEED", "check_arguments", "run"]

#: Scenes of this seed are unseen: training used seeds 0 (train) and 1 (validation).
SEED = 2


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


def _figures(out: Path, world: SensorWorld, shown: dict[int, Any], dec: Any) -> list[Path]:
    """Component maps of the shown scenes; layer energy and Modality-GradCAM of scene 0."""
    figures = []
    for k, res in sorted(shown.items()):
        scene = world.scene(k)
        single = {s: sum(o.single_sensor == s for o in scene.objects) for s in ("camera", "radar")}
        figures.append(viz.component_maps(
            res, out / f"components_scene{k}.png", gt=scene.vehicle_gt[None], images=scene.inputs["images"][None],
            title=f"scene {k}: {len(scene.objects)} vehicles, {single['camera']} seen by the camera only, "
                  f"{single['radar']} by the radar only"))
        if k == 0:
            figures.append(viz.layer_energy(res, out / "layer_energy.png", title="component energy per layer, scene 0"))
            inputs = {key: v[None] for key, v in scene.inputs.items()}
            figures.append(viz.gradcam_figure(dec, inputs, "decoder.up1_skip", out / "gradcam_scene0.png",
                                              gt=scene.vehicle_gt[None]))
    return figures


def _report(meta: dict, scenes: int, shift: int, repeats: int, result: Evaluation, lmd: Any, shap: Any,
            figures: list[Path], timings: dict[str, float]) -> str:
    """report.md."""
    lines = [
        "# lmdfx demo: which sensor found each vehicle?", "",
        f"Model: SimpleBEV trained on the synthetic sensor world ({meta.get('steps', '?')} steps on "
        f"{meta.get('train_scenes', '?')} scenes; validation vehicle IoU "
        f"{100 * meta.get('val_iou', float('nan')):.1f} %). Data: {scenes} unseen scenes (seed {SEED}) seen by "
        "6 cameras and a radar; some vehicles are seen by the camera only (no radar returns), some by the radar "
        "only (not painted), most by both.", "",
        "![components](components_scene0.png)", "",
        f"Protocol: partner p = (k + {shift}·r) mod {scenes}, r = 1..{repeats}.", "",
        result.markdown(),
        "## Ground-truth attribution", "",
        "For each vehicle seen by one sensor only: is the modality with the largest positive mean logit over the "
        "vehicle's cells the sensor that saw it? (No positive mean counts as a miss.)", "",
        lmd.table("LMD components"), "",
        shap.table("Shapley values (zero baseline)"), "",
        "## Figures", "",
        *[f"- [{p.name}]({p.name})" for p in figures], "",
        "## Timings (s)", "",
        *[f"- {k}: {v:.1f}" for k, v in timings.items()], "",
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
    dec = lmdfx.compile(model, modalities, record="all")
    timings["load + compile"] = time.time() - t0

    t = time.time()
    shift, repeats = max(1, scenes // 3), 2
    maps: dict[int, torch.Tensor] = {}
    shown: dict[int, Any] = {}

    def keep(k: int, item: Any, res: Any) -> None:
        # the reference pass of each scene also gives the LMD maps and the figures
        maps[k] = select(res.components, HEAD)[:-1, 0, 0].detach()
        if k < 2:
            shown[k] = res

    result = evaluate(dec, world, shift=shift, repeats=repeats, progress=progress, on_reference=keep)
    lmd = attribution_score(maps, world, progress=progress)
    timings["separation, IoU and attribution (LMD)"] = time.time() - t
    t = time.time()
    shap = attribution_score(shapley_maps(dec), world, progress=progress)
    timings["attribution (Shapley, zero baseline)"] = time.time() - t

    t = time.time()
    out.mkdir(parents=True, exist_ok=True)
    figures = _figures(out, world, shown, dec)
    timings["figures"] = time.time() - t
    timings["total"] = time.time() - t0

    meta = getattr(model, "world_meta", {})
    write_text(out / "report.md", _report(meta, len(world), shift, repeats, result, lmd, shap, figures, timings))
    record = {"scenes": len(world), "seed": SEED, "shift": shift, "repeats": repeats, **result.to_dict(),
              "attribution": {"lmd": lmd.to_dict(), "shapley_zero_baseline": shap.to_dict()},
              "model": {"name": "simplebev-world", "weights": weights, **meta}, "figures": [p.name for p in figures],
              "seconds": {k: round(v, 2) for k, v in timings.items()}}
    write_text(out / "report.json", json.dumps(record, indent=2))
    for table in (result.separation.table(), result.iou.table(), lmd.table("LMD components")):
        print(table)
        print()
    print(f"wrote {out / 'report.md'} and {len(figures)} figures in {timings['total']:.0f} s")
