"""Each benchmark script runs on a tiny configuration and writes its JSON (timings are not
checked here; see benchmarks/README.md), and Captum agrees with lmdfx on a bias-free ReLU net."""

from __future__ import annotations

import json

import pytest
import torch


pytestmark = pytest.mark.usefixtures("one_thread")


def test_overhead_runs(tmp_path):
    from benchmarks import overhead

    path = tmp_path / "overhead.json"
    result = overhead.main(["--config", "tiny", "--no-compiled", "--repeats", "1", "--json", str(path)])
    saved = json.loads(path.read_text())
    for key in ("forward_s", "decompose_s", "ratio", "ratio_compiled", "peak_mem_forward_mb",
                "peak_mem_decompose_mb", "ratio_post_fusion", "ratio_fast", "ratio_default"):
        assert key in saved
    assert result["ratio"] > 0 and result["forward_s"] > 0


def test_naive_runs_and_agrees(tmp_path):
    from benchmarks import naive

    path = tmp_path / "naive.json"
    result = naive.main(["--config", "tiny", "--repeats", "1", "--json", str(path)])
    assert result["max_relative_difference"]["exact"] <= 1e-4  # also asserted inside the script
    assert json.loads(path.read_text())["speedup"] > 0


def test_naive_matches_lmdfx_in_float64():
    import lmdfx
    from benchmarks.common import PostFusion, post_fusion_inputs, simplebev, simplebev_config
    from benchmarks.naive import NaiveLMD, max_relative_difference, stacked

    model, _ = simplebev(simplebev_config("tiny"), torch.device("cpu"), dtype=torch.float64)
    post = PostFusion(model).eval()
    inputs = post_fusion_inputs(model)
    modalities = {"camera": "feat_bev", "radar": "radar_bev"}
    output, components = NaiveLMD(post, modalities)(**inputs)
    res = lmdfx.compile(post, modalities, exact_output=True)(**inputs)
    assert max_relative_difference(res.components, stacked(components)) <= 1e-12
    for key in output:
        assert torch.equal(output[key], res.output[key])


def test_captum_agrees_with_lmdfx_on_bias_free_relu():
    pytest.importorskip("captum")
    from benchmarks.captum_bench import check_agreement

    agreement = check_agreement(size=8)
    assert agreement["bias_component"] == 0.0
    assert agreement["InputXGradient"] <= 1e-12
    assert agreement["DeepLift"] <= 1e-12


def test_captum_bench_runs(tmp_path):
    pytest.importorskip("captum")
    from benchmarks import captum_bench

    path = tmp_path / "captum.json"
    result = captum_bench.main(["--pixels", "4", "--chunk", "4", "--repeats", "1", "--json", str(path)])
    assert result["speedup"] > 0 and path.exists()


def test_scaling_runs_and_plots(tmp_path):
    from benchmarks import scaling

    png, path = tmp_path / "scaling.png", tmp_path / "scaling.json"
    result = scaling.main(["--quick", "--repeats", "1", "--plot", str(png), "--json", str(path)])
    assert png.stat().st_size > 0
    assert [r["modalities"] for r in result["modalities"]] == [1, 2, 3]


def test_zoo_runs_on_two_transformers_models(tmp_path):
    """benchmarks.zoo at the tiny sizes: a row per model with the documented fields, components that
    sum to model(...), and a model whose library is missing is listed as skipped, not failed."""
    pytest.importorskip("transformers")
    from benchmarks import zoo

    path = tmp_path / "zoo.json"
    zoo.main(["--size", "tiny", "--repeats", "1", "--json", str(path),
              "--models", "transformers-visualbert", "transformers-clip", "timm-resnet18"])
    saved = json.loads(path.read_text())
    assert saved["failed"] == [] and "machine" in saved
    rows = {row["model"]: row for row in saved["models"]}
    for name in ("transformers-visualbert", "transformers-clip"):
        row = rows[name]
        assert row["frontend"] == "export" and row["residual"] <= 1e-4
        assert min(row[key] for key in ("params", "forward_s", "decompose_s", "ratio", "ratio_cpu_time", "mem_ratio")) > 0
    assert rows["transformers-visualbert"]["target"] == 5.0
    assert len(rows) + len(saved["skipped"]) == 3


def test_gpu_script_runs_on_cpu_quick(tmp_path):
    """benchmarks/gpu.sh is the one GPU command; on CPU --quick it runs its pieces on the tiny sizes."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1", "PATH": f"{Path(sys.executable).parent}:"
           + __import__("os").environ.get("PATH", "")}
    subprocess.run(["bash", str(root / "benchmarks" / "gpu.sh"), "--device", "cpu", "--quick", str(tmp_path)],
                   check=True, cwd=root, env=env, capture_output=True)
    assert json.loads((tmp_path / "overhead_tiny.json").read_text())["ratio_default"] > 0
    assert (tmp_path / "scaling.json").exists()
    assert json.loads((tmp_path / "zoo_tiny.json").read_text())["failed"] == []


def test_rule_costs_split_a_call_into_rules_and_steps(tmp_path):
    """benchmarks.rule_costs: the timed parts are the rules and steps the call runs, and they
    account for no more than the timed call itself."""
    pytest.importorskip("transformers")
    from benchmarks import rule_costs

    path = tmp_path / "costs.json"
    rule_costs.main(["--size", "tiny", "--repeats", "2", "--json", str(path),
                     "--models", "transformers-visualbert", "timm-resnet18"])
    saved = json.loads(path.read_text())
    (row,) = [r for r in saved["models"] if r["model"] == "transformers-visualbert"]
    parts = {p["part"]: p for p in row["parts"]}
    assert {"operating points", "residual checks"} <= set(parts)
    assert any(name.startswith("rule AffineRule (linear)") for name in parts)
    assert 0 < sum(p["s"] for p in row["parts"]) <= row["timed_call_s"]
    assert len(saved["models"]) + len(saved["skipped"]) == 2
