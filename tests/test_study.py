"""``lmdfx study``: the rule ablation on the sensor world, run small; its statistics and shortcuts
checked against direct computations; its argument errors."""

from __future__ import annotations

import json

import pytest
import torch

import lmdfx
from lmdfx.bev import study
from lmdfx.bev.attribution import shapley_maps
from lmdfx.bev.cli import main
from lmdfx.bev.data.sensor_world import SensorWorld
from lmdfx.bev.evaluation import HEAD
from lmdfx.bev.registry import build_model
from lmdfx.errors import LMDError
from lmdfx.metrics import select

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world_model():
    model, _, _ = build_model("simplebev-world")
    return model


@pytest.fixture(scope="module")
def scene(world_model):
    return SensorWorld(num_scenes=1, seed=study.SEED, config=world_model.config).scene(0)


# ---------------------------------------------------------------------------
# The bootstrap interval
# ---------------------------------------------------------------------------
def test_bootstrap_interval_matches_the_exact_bootstrap_distribution():
    # hits [1, 1, 1, 0]: a resample's hit count is Binomial(4, 3/4), so its mean is k/4 with
    # P(k) = C(4, k) 0.75^k 0.25^(4-k): 1/256, 12/256, 54/256, 108/256, 81/256. The cumulative
    # probabilities 0.004, 0.051, 0.262, 0.684, 1 put the 2.5 % quantile at k = 1 and the 97.5 %
    # one at k = 4; the 10 % quantile at k = 2 and the 90 % one at k = 4.
    assert study.bootstrap_ci([1, 1, 1, 0], level=0.95, resamples=20000) == (0.25, 1.0)
    assert study.bootstrap_ci([1, 1, 1, 0], level=0.80, resamples=20000) == (0.5, 1.0)


def test_bootstrap_interval_width_follows_the_binomial_standard_error():
    hits = [1.0] * 300 + [0.0] * 100  # p = 0.75, n = 400: 1.96·sqrt(p(1-p)/n) = 0.0424
    lo, hi = study.bootstrap_ci(hits)
    assert lo < 0.75 < hi
    assert (hi - lo) / 2 == pytest.approx(0.0424, abs=0.005)


def test_bootstrap_interval_of_a_constant_and_of_nothing():
    assert study.bootstrap_ci([1, 1, 1]) == (1.0, 1.0)
    assert all(x != x for x in study.bootstrap_ci([]))  # NaN
    with pytest.raises(LMDError, match="level"):
        study.bootstrap_ci([1, 0], level=95)


# ---------------------------------------------------------------------------
# The shortcuts the study takes are exact
# ---------------------------------------------------------------------------
def test_cached_camera_path_gives_the_full_models_components(world_model, scene):
    for rules in (None, lmdfx.Rules(bias_split="ratio", norm="uniform")):
        assert study.check_fused(world_model, scene, rules) <= 1e-6


def _cached(model, scene):
    inputs = {k: v[None] for k, v in scene.inputs.items()}
    cam = study.camera_bev(model, inputs["images"], inputs["lift_grid"], inputs["lift_valid"])
    blank = study.camera_bev(model, torch.zeros_like(inputs["images"]), inputs["lift_grid"], inputs["lift_valid"])
    return inputs, cam, blank


def test_occlusion_is_output_minus_output_with_the_sensor_zeroed(world_model, scene):
    inputs, cam, blank = _cached(world_model, scene)
    fused = study.FusedBEV(world_model).eval()
    maps = study.occlusion_maps(fused, {"cam_bev": cam, "radar_bev": inputs["radar_bev"]},
                                {"cam_bev": blank, "radar_bev": torch.zeros_like(inputs["radar_bev"])})
    with torch.no_grad():  # directly, on the full model with its raw inputs zeroed
        full = world_model(**inputs)[HEAD]
        no_camera = world_model(**{**inputs, "images": torch.zeros_like(inputs["images"])})[HEAD]
        no_radar = world_model(**{**inputs, "radar_bev": torch.zeros_like(inputs["radar_bev"])})[HEAD]
    torch.testing.assert_close(maps[0], full - no_camera, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(maps[1], full - no_radar, atol=1e-5, rtol=1e-5)
    assert maps[0].abs().max() > 0.1 and maps[1].abs().max() > 0.1  # both sensors matter somewhere


def test_shapley_on_cached_features_equals_shapley_of_the_full_model(world_model, scene):
    inputs, cam, blank = _cached(world_model, scene)
    fused = study.FusedBEV(world_model).eval()
    dec = lmdfx.compile(fused, fused.modality_args)
    base = {"cam_bev": blank[0], "radar_bev": torch.zeros_like(scene.inputs["radar_bev"])}
    ours = shapley_maps(dec, baseline=base)({"cam_bev": cam[0], "radar_bev": scene.inputs["radar_bev"]})
    full = shapley_maps(lmdfx.compile(world_model, world_model.modality_args))(scene.inputs)
    torch.testing.assert_close(ours, full, atol=2e-4, rtol=1e-4)  # float32 logits of ~10: batched rounding


def test_taylor_everywhere_overrides_every_mixed_op(world_model):
    fused = study.FusedBEV(world_model).eval()
    dec = lmdfx.compile(fused, fused.modality_args, rules=study.taylor_everywhere(
        lmdfx.compile(fused, fused.modality_args)))
    rules = {row.rule for row in dec.report().rows if row.kind == "mixed"}
    assert rules == {"taylor"}


def test_grids():
    ofat, full = study.rule_sets("ofat"), study.rule_sets("full")
    references = 2 * len(study.REFERENCES)  # default and rescale rules against each reference input
    assert len(ofat) == 1 + 2 + 2 + 1 + 2 + references + 1  # defaults, each other value, references, taylor
    assert len(full) == 3 * 3 * 2 * 3 + references + 1
    assert "activation=rescale, reference=blank" in ofat and ofat["reference=mean"]["reference"] == "mean"
    assert set(ofat) <= set(full)
    assert ofat["default"] == {"activation": "secant", "bias_split": "none", "batchnorm": "identity", "norm": "ratio"}


# ---------------------------------------------------------------------------
# A small study, end to end
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    record = study.run(out, scenes=4, models=("simplebev-world",),
                       methods=["default", "bias_split=ratio", "taylor-everywhere"], progress=False)
    return out, record


def test_study_writes_every_row_with_exactness_and_separation(small):
    out, record = small
    assert {p.name for p in out.iterdir()} >= {"study.json", "study.md", "study.png"}
    saved = json.loads((out / "study.json").read_text())
    rows = saved["models"][0]["rows"]
    lmd = [r for r in rows if r["kind"] == "lmd"]
    assert [r["method"] for r in lmd] == ["default", "bias_split=ratio", "taylor-everywhere"]
    for row in lmd:
        assert 0 <= row["exactness"]["max_relative_residual"] < 1e-5, row["method"]  # float32 rounding
        entries = row["separation"]["entries"]
        assert set(entries) == {"Rp/R", "Rp/C", "Cp/R", "Cp/C"}
        for label in ("Rp/C", "Cp/R"):  # separated at a frozen operating point
            assert entries[label]["mse"] <= 1e-12 and entries[label]["pcc"] >= 1 - 1e-6, (row["method"], label)
        for label in ("Rp/R", "Cp/C"):  # and each component follows its own sensor
            assert entries[label]["mse"] > 1e-3, (row["method"], label)
        assert row["separation"]["separated"]
        assert row["cost"]["ratio"] > 0
    kinds = {r["kind"] for r in rows}
    assert {"shapley", "occlusion", "captum"} <= kinds
    for row in rows:
        if "attribution" not in row:
            assert row["note"] == "captum not installed (pip install captum)"
            continue
        att = row["attribution"]
        assert att["all"]["total"] == att["camera-only"]["total"] + att["radar-only"]["total"] > 0
        lo, hi = att["all"]["ci95"]
        assert lo <= att["all"]["score"] <= hi


def test_study_markdown_has_the_table4_layout(small):
    out, record = small
    text = (out / "study.md").read_text()
    assert "| method | PCC Rp/R | PCC Rp/C | PCC Cp/R | PCC Cp/C | MSE Rp/R |" in text
    assert "| Shapley, zero baseline |" in text
    assert text.count("| default |") == 1


def test_zero_baseline_shapley_names_the_sensor_of_single_sensor_vehicles(small):
    # exact Shapley values of the logit with a zero baseline: on the world model they credit the
    # sensor that saw a single-sensor vehicle (the comparison LMD is measured against)
    rows = {r["method"]: r for r in small[1]["models"][0]["rows"]}
    att = rows["Shapley, zero baseline"]["attribution"]["all"]
    assert att["score"] >= 0.8


# ---------------------------------------------------------------------------
# Argument errors
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, message", [
    (dict(scenes=1), "--scenes must be an integer of 2 or more"),
    (dict(models=("simplebev-tiny",)), "the study runs on sensor-world models only"),
    (dict(models=()), "--models is empty"),
    (dict(grid="half"), "unknown rule grid 'half'; use one of ofat, full"),
    (dict(methods=["norm=layer"]), "unknown rule set(s) 'norm=layer'"),
])
def test_bad_arguments_are_lmd_errors(tmp_path, kwargs, message):
    args = dict(scenes=4, models=study.STUDY_MODELS[:1], grid="ofat") | kwargs
    with pytest.raises(LMDError) as info:
        study.check_arguments(tmp_path / "out", **args)
    assert message in str(info.value)


def test_bad_out_folder_is_an_lmd_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(LMDError, match="--out"):
        study.check_arguments(blocker, 4, study.STUDY_MODELS[:1], "ofat")


def test_cli_reports_bad_arguments_in_one_line(tmp_path, capsys):
    assert main(["study", "--out", str(tmp_path / "o"), "--models", "simplebev-world,nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lmdfx study: error: --models 'nope'")
    assert main(["study", "--out", str(tmp_path / "o"), "--grid", "half"]) == 2
    assert "unknown rule grid 'half'" in capsys.readouterr().err
