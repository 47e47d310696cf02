"""The lmdfx command: the demo end to end, inspect, evaluate on the sensor world and on a tiny
nuScenes-format dataset, any model from a module:factory, --weights, --threads, progress bars,
one-line errors (exit status 2) for bad arguments checked before any model is built, failing
user models, and Ctrl-C (exit status 130, one line)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import lmdfx
from lmdfx.bev import cli
from lmdfx.bev.cli import main
from lmdfx.bev.weights import WORLD_WEIGHTS

PNG = b"\x89PNG\r\n\x1a\n"
# one intra-op thread: on a shared machine, more threads than free cores make torch spin and crawl
ENV = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmdfx", *args], capture_output=True, text=True, timeout=timeout,
                          env=ENV)


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "Traceback" not in err[0]
    return err[0]


@pytest.mark.skipif(not WORLD_WEIGHTS.is_file(), reason="shipped world weights missing")
def test_demo_end_to_end(tmp_path):
    # no timing assertion: speed is measured by the benchmarks, not by tests
    out = tmp_path / "demo"
    proc = _run("demo", "--out", str(out), "--no-progress", timeout=600)
    assert proc.returncode == 0, proc.stderr
    for name in ("components_scene0.png", "components_scene1.png", "layer_energy.png", "gradcam_scene0.png"):
        assert (out / name).read_bytes()[:8] == PNG, name
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left
    report = (out / "report.md").read_text()
    for needle in ("Cp/R", "Rp/C", "vehicle IoU", "LMD components", "Shapley", "components_scene0.png",
                   "squared logits", "A component alone is not a model", "alone has"):
        assert needle in report, needle
    assert not re.search(r"(?<![\d.])-?0\.0+(?![\d.e])", report), "a value printed as 0.00"
    for link in re.findall(r"\]\(([^)]+\.png)\)", report):  # every linked figure exists
        assert (out / link).is_file(), link
    record = json.loads((out / "report.json").read_text())
    rows = record["attribution"]["disagreements"]
    if record["attribution"]["lmd"]["hits"] < record["attribution"]["lmd"]["total"]:
        assert rows and "### The vehicles where they disagree" in report
    for row in rows:  # each vehicle LMD or Shapley gets wrong: in the table, with its scene's figure
        assert f"| {row['scene']} | {row['vehicle']} |" in report
        assert (out / f"components_scene{row['scene']}.png").is_file()
        assert f"Scene {row['scene']}, vehicle {row['vehicle']} ({row['sensor']} only)" in report
    pcc, mse = record["separation"]["pcc"], record["separation"]["mse"]
    assert pcc[0][1] > 1 - 1e-6 and pcc[1][0] > 1 - 1e-6  # frozen operating point: exact separation
    assert mse[0][1] < 1e-8 and mse[1][0] < 1e-8
    assert pcc[0][0] < 0.95 and pcc[1][1] < 0.95
    assert record["attribution"]["lmd"]["total"] > 0
    assert set(record["component_iou"]["iou"]) == {"camera", "radar", "bias", "full"}
    assert "Rp/C" in proc.stdout


def test_inspect_builtin_and_factory(tmp_path, monkeypatch, capsys):
    assert main(["inspect", "simplebev-tiny"]) == 0
    out = capsys.readouterr().out
    assert "fusion nodes" in out and "bev_compressor" in out
    (tmp_path / "my_models.py").write_text(
        "import torch\n"
        "from torch import nn\n"
        "class Net(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.mix = nn.Conv2d(2, 1, 1)\n"
        "    def forward(self, a, b):\n"
        "        return self.mix(torch.cat([a, b], 1))\n"
        "def make():\n"
        "    return Net(), {'left': 'a', 'right': 'b'}\n"
        "def bad():\n"
        "    return 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["inspect", "my_models:make"]) == 0
    assert "mix" in capsys.readouterr().out
    assert main(["inspect", "my_models:bad"]) == 2
    assert "nn.Module" in _error_line(capsys)
    assert main(["inspect", "my_models:missing"]) == 2
    assert "no callable 'missing'" in _error_line(capsys)
    assert main(["inspect", "no_such_module_xyz:make"]) == 2
    assert "cannot import" in _error_line(capsys)


def test_evaluate_world_writes_json_and_markdown(tmp_path, capsys):
    out = tmp_path / "ev"
    code = main(["evaluate", "--model", "simplebev-tiny", "--world", "--limit", "3", "--shift", "1", "--repeats", "1",
                 "--out", str(out), "--no-progress"])
    assert code == 0
    record = json.loads((out / "evaluation.json").read_text())
    assert record["samples"] == 3 and record["processes"] == 1
    assert record["separation"]["pairs"] == 3
    assert record["separation"]["pcc"][0][1] == pytest.approx(1.0, abs=1e-9)
    assert record["separation"]["mse"][1][0] == pytest.approx(0.0, abs=1e-12)
    md = (out / "evaluation.md").read_text()
    assert "Cp/C" in md and "vehicle IoU" in md and "simplebev-tiny" in md
    assert "Rp/R" in capsys.readouterr().out


def test_evaluate_nuscenes_with_checkpoint(tmp_path, capsys):
    pytest.importorskip("nuscenes")
    from lmdfx.bev.data.nuscenes_synthetic import write_tiny_nuscenes
    from lmdfx.bev.models.simplebev import SimpleBEV, SimpleBEVConfig

    root = tmp_path / "nusc"
    write_tiny_nuscenes(str(root), version="v1.0-mini", scenes=2, samples_per_scene=2)
    torch.manual_seed(1)
    folder = tmp_path / "checkpoints"  # a SimpleBEV init_dir: the last model-*.pth is loaded
    folder.mkdir()
    torch.save({"model_state_dict": SimpleBEV(SimpleBEVConfig.tiny()).state_dict()}, folder / "model-000002.pth")
    torch.save({"weights": 1}, folder / "model-000001.pth")
    out = tmp_path / "ev"
    code = main(["evaluate", "--model", "simplebev-tiny", "--checkpoint", str(folder), "--nuscenes", str(root),
                 "--version", "v1.0-mini", "--split", "mini_train", "--shift", "1", "--repeats", "1",
                 "--out", str(out), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    record = json.loads((out / "evaluation.json").read_text())
    assert record["samples"] == 2 and "v1.0-mini mini_train" in record["data"]
    assert record["separation"]["pcc"][1][0] == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("args, needle", [
    (["--model", "nope", "--world"], "unknown model 'nope'"),
    (["--model", "simplebev-tiny", "--nuscenes", "/no/such/dataroot"], "does not exist"),
    (["--model", "simplebev-tiny", "--nuscenes", "{tmp}", "--version", "v9.9"], "unknown nuScenes version 'v9.9'"),
    (["--model", "simplebev-tiny", "--nuscenes", "{tmp}", "--version", "v1.0-mini", "--split", "mini_train"],
     "not found in"),
    (["--model", "simplebev-tiny", "--nuscenes", "{tmp}", "--split", "mini_val"], "does not belong"),
    (["--model", "simplebev-tiny", "--world", "--checkpoint", "{tmp}/missing.pth"], "not found"),
    (["--model", "simplebev-tiny", "--world", "--checkpoint", "{tmp}/lidar.pth"], "does not match"),
    (["--model", "simplebev-tiny", "--world", "--checkpoint", "{tmp}/junk.pth"], "model_state_dict"),
    (["--model", "simplebev-tiny", "--world", "--checkpoint", "{tmp}"], "no model-*.pth"),
    (["--model", "simplebev-tiny", "--world", "--limit", "2", "--shift", "2", "--repeats", "1"], "with itself"),
    (["--model", "simplebev-tiny", "--world", "--device", "tpu"], "--device"),
])
def test_evaluate_errors_are_one_line(tmp_path, capsys, args, needle):
    from lmdfx.bev.models.simplebev import SimpleBEV, SimpleBEVConfig

    torch.save({"model_state_dict": SimpleBEV(SimpleBEVConfig.tiny(modalities=("camera", "lidar"))).state_dict()},
               tmp_path / "lidar.pth")
    torch.save({"weights": 1}, tmp_path / "junk.pth")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    code = main(["evaluate", *args, "--out", str(tmp_path / "out"), "--no-progress"])
    assert code == 2
    assert needle in _error_line(capsys)


def test_argument_errors_exit_2(capsys):
    for argv in (["evaluate", "--model", "simplebev-tiny", "--out", "x"],  # neither --nuscenes nor --world
                 ["evaluate", "--model", "simplebev-tiny", "--world", "--limit", "0", "--out", "x"],
                 ["evaluate", "--model", "m", "--world", "--nuscenes", "d", "--out", "x"],
                 ["frobnicate"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
        _error_line(capsys)


def test_console_entry_reports_errors_without_traceback(tmp_path):
    proc = _run("evaluate", "--model", "nope", "--world", "--out", str(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("lmdfx evaluate: error: unknown model") and "Traceback" not in proc.stderr
    assert not Path(tmp_path, "evaluation.json").exists()


# A model outside the registry: SimpleBEV's camera and radar inputs (so sensor-world items hold its
# forward arguments) to 32 x 32 BEV logits, with modality_args and example_inputs().
MYMODELS = """
import torch
from torch import nn


class BEVNet(nn.Module):
    modality_args = {"camera": "images", "radar": "radar_bev"}

    def __init__(self):
        super().__init__()
        self.cam = nn.Conv2d(18, 4, 3, padding=1)
        self.pool = nn.AvgPool2d((2, 4))
        self.rad = nn.Conv2d(128, 4, 1)
        self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(8, 1, 1))

    def forward(self, images, radar_bev):
        cam = self.pool(self.cam(images.flatten(1, 2)))
        return self.head(torch.cat([cam, self.rad(radar_bev)], 1))

    def example_inputs(self):
        return {"images": torch.rand(1, 6, 3, 64, 128) - 0.5, "radar_bev": torch.randn(1, 128, 32, 32)}


class NeedsArgs(nn.Module):
    def __init__(self, width):
        super().__init__()


def build():
    torch.manual_seed(0)
    return BEVNet()


class Explodes(BEVNet):
    # traces and compiles; fails when it runs (its output does not broadcast)

    def forward(self, images, radar_bev):
        return super().forward(images, radar_bev) + torch.ones(5, 5)


def explodes():
    return Explodes()


class Sleeper(BEVNet):
    # signals that it is being traced, then takes a minute

    def forward(self, images, radar_bev):
        import os, pathlib, time
        pathlib.Path(os.environ["LMDFX_TEST_STARTED"]).touch()
        time.sleep(60)
        return super().forward(images, radar_bev)


def sleeper():
    return Sleeper()
"""


@pytest.fixture
def in_model_folder(tmp_path, monkeypatch):
    """A temporary current folder holding mymodels.py; sys.path and sys.modules restored after."""
    (tmp_path / "mymodels.py").write_text(MYMODELS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "mymodels", raising=False)
    yield tmp_path
    sys.modules.pop("mymodels", None)


@pytest.mark.parametrize("spec", ["mymodels:build", "mymodels.py:build"])
def test_inspect_and_evaluate_a_model_from_the_current_folder(in_model_folder, capsys, spec):
    assert main(["inspect", spec, "--run"]) == 0
    assert "fusion nodes (first to mix modalities): cat" in capsys.readouterr().out
    sys.modules.pop("mymodels", None)
    out = in_model_folder / "ev"
    assert main(["evaluate", "--model", spec, "--data", "examples", "--limit", "2", "--shift", "1", "--repeats", "1",
                 "--out", str(out), "--no-progress"]) == 0
    record = json.loads((out / "evaluation.json").read_text())
    assert record["head"] is None and record["component_iou"] is None  # the whole output; no ground truth
    assert record["separation"]["pcc"][0][1] == pytest.approx(1.0, abs=1e-9)


def test_evaluate_a_model_without_config_on_the_sensor_world(in_model_folder, capsys):
    out = in_model_folder / "ev"
    code = main(["evaluate", "--model", "mymodels:build", "--world", "--limit", "2", "--shift", "1", "--repeats", "1",
                 "--out", str(out), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    record = json.loads((out / "evaluation.json").read_text())
    assert record["data"] == "sensor world, seed 2, 2 scenes"
    assert set(record["component_iou"]["iou"]) == {"camera", "radar", "bias", "full"}
    assert main(["evaluate", "--model", "simplebev-tiny", "--world", "--limit", "2", "--shift", "1", "--repeats", "1",
                 "--no-iou", "--out", str(out), "--no-progress"]) == 0
    assert json.loads((out / "evaluation.json").read_text())["component_iou"] is None


def test_failing_factories_are_one_line_errors(in_model_folder, capsys):
    assert main(["inspect", "mymodels:NeedsArgs"]) == 2
    line = _error_line(capsys)
    assert line.startswith("lmdfx inspect: error: model factory 'mymodels:NeedsArgs' failed: TypeError")
    assert main(["inspect", "no_such_pkg.mod:Class"]) == 2
    assert "cannot import module 'no_such_pkg.mod'" in _error_line(capsys)
    assert main(["inspect", "missing.py:build"]) == 2
    assert "cannot import module 'missing.py'" in _error_line(capsys)
    with pytest.raises(lmdfx.LMDError, match="NeedsArgs"):  # --debug: the exception itself, traceback and all
        main(["inspect", "mymodels:NeedsArgs", "--debug"])


def test_console_script_imports_from_the_current_folder(in_model_folder):
    script = shutil.which("lmdfx")
    if script is None:
        pytest.skip("the lmdfx console script is not installed")
    run = lambda *a: subprocess.run([script, *a], capture_output=True, text=True, timeout=120,  # noqa: E731
                                    env=ENV, cwd=in_model_folder)
    assert "cat" in run("inspect", "mymodels:build").stdout
    bad = run("inspect", "no_such_pkg.mod:Class")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines() == [bad.stderr.strip()]


def test_threads_option_sets_intra_op_threads(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    assert main(["inspect", "simplebev-tiny"]) == 0
    assert main(["inspect", "simplebev-tiny", "--threads", "2"]) == 0
    assert calls == [1, 2]
    with pytest.raises(SystemExit):
        main(["inspect", "simplebev-tiny", "--threads", "0"])


def test_evaluate_shows_a_progress_bar_with_eta(tmp_path, capsys):
    assert main(["evaluate", "--model", "simplebev-tiny", "--data", "examples", "--limit", "2", "--shift", "1",
                 "--repeats", "1", "--out", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "metrics: 100%" in err and "2/2 [" in err and "<" in err  # tqdm: [elapsed<remaining, rate]


def test_demo_without_matplotlib_fails_early_naming_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed: find_spec gives None
    assert main(["demo", "--out", str(tmp_path / "demo")]) == 2
    assert 'pip install "lmdfx[viz]"' in _error_line(capsys)
    assert not (tmp_path / "demo").exists()


@pytest.fixture(scope="module")
def trained_weights(tmp_path_factory):
    from lmdfx.bev.train_world import train

    path = tmp_path_factory.mktemp("weights") / "world.pt"
    train(str(path), scenes=4, val_scenes=2, steps=2, batch=2, progress=False, log=lambda *_: None)
    return path


def test_demo_and_evaluate_load_trained_weights(trained_weights, tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--weights", str(trained_weights), "--scenes", "2", "--out", str(out), "--no-progress"]) == 0
    record = json.loads((out / "report.json").read_text())
    assert record["model"]["steps"] == 2 and record["model"]["weights"] == str(trained_weights)
    assert record["scenes"] == 2
    ev = tmp_path / "ev"
    assert main(["evaluate", "--model", "simplebev-world", "--weights", str(trained_weights), "--world", "--limit",
                 "2", "--shift", "1", "--repeats", "1", "--out", str(ev), "--no-progress"]) == 0
    assert json.loads((ev / "evaluation.json").read_text())["weights"] == str(trained_weights)
    capsys.readouterr()
    assert main(["evaluate", "--model", "simplebev-tiny", "--weights", str(trained_weights), "--world",
                 "--out", str(ev), "--no-progress"]) == 2
    assert "--weights works with simplebev-world" in _error_line(capsys)
    assert main(["demo", "--weights", str(tmp_path / "missing.pt"), "--out", str(out)]) == 2
    assert "not found" in _error_line(capsys)


def test_checkpoint_of_a_factory_model(in_model_folder, capsys):
    sys.path.insert(0, str(in_model_folder))
    from mymodels import BEVNet

    torch.save(BEVNet().state_dict(), in_model_folder / "net.pt")
    torch.save({"mix.weight": torch.zeros(1)}, in_model_folder / "other.pt")
    args = ["evaluate", "--model", "mymodels:build", "--data", "examples", "--limit", "2", "--shift", "1",
            "--repeats", "1", "--out", str(in_model_folder / "ev"), "--no-progress"]
    assert main([*args, "--checkpoint", str(in_model_folder / "net.pt")]) == 0
    assert main([*args, "--checkpoint", str(in_model_folder / "other.pt")]) == 2
    assert "does not fit the model" in _error_line(capsys)


# ---------------------------------------------------------------------------
# Bad arguments: one line, exit status 2, before any model is built
# ---------------------------------------------------------------------------
@pytest.fixture
def no_model_building(monkeypatch):
    """Any model building fails the test: the checks must come first."""
    def built(*args, **kwargs):
        raise AssertionError("a model was built before the arguments were checked")

    from lmdfx.bev import demo

    monkeypatch.setattr(cli, "build_model", built)
    monkeypatch.setattr(demo, "build_model", built)


EVALUATE = ["evaluate", "--model", "simplebev-tiny", "--world", "--no-progress"]
DEMO = ["demo", "--no-progress"]


@pytest.mark.parametrize("command", [EVALUATE, DEMO], ids=["evaluate", "demo"])
def test_out_is_checked_before_any_model_is_built(tmp_path, monkeypatch, capsys, no_model_building, command):
    name = command[0]
    (tmp_path / "file.txt").write_text("keep me")
    for out, needle in ((tmp_path / "file.txt", "is an existing file, not a folder"),
                        (tmp_path / "file.txt" / "sub", "is a file, not a folder")):
        assert main([*command, "--out", str(out)]) == 2
        line = _error_line(capsys)
        assert line.startswith(f"lmdfx {name}: error: --out '{out}'") and needle in line
    assert (tmp_path / "file.txt").read_text() == "keep me"
    # not writable: a folder, or the parent of a folder to create (os.access: root may write anywhere)
    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == locked else real(p, mode))
    assert main([*command, "--out", str(locked)]) == 2
    assert "is not writable; pick a folder you can write to" in _error_line(capsys)
    assert main([*command, "--out", str(locked / "a" / "b")]) == 2
    assert f"cannot be created: '{locked}' is not writable" in _error_line(capsys)
    assert not (locked / "a").exists()


def test_out_in_a_read_only_place_is_an_error_in_a_real_run(tmp_path):
    if os.access("/proc/sys", os.W_OK) or not os.path.isdir("/proc/sys"):
        pytest.skip("needs a folder this user cannot write to (/proc/sys on Linux)")
    proc = _run("evaluate", "--model", "simplebev-tiny", "--world", "--out", "/proc/sys/lmdfx-out")
    assert proc.returncode == 2
    assert proc.stderr == ("lmdfx evaluate: error: --out '/proc/sys/lmdfx-out' cannot be created: '/proc/sys' is not "
                           "writable; pick a folder you can write to.\n")


@pytest.mark.parametrize("argv, needle", [
    ([*EVALUATE, "--limit", "0"], "argument --limit: must be a positive integer (1 or more), got 0"),
    ([*EVALUATE, "--limit", "ten"], "argument --limit: must be a positive integer (1 or more), got 'ten'"),
    ([*EVALUATE, "--shift", "0"], "argument --shift: must be a positive integer (1 or more), got 0"),
    ([*EVALUATE, "--repeats", "-3"], "argument --repeats: must be a positive integer (1 or more), got -3"),
    ([*EVALUATE, "--seed", "-1"], "argument --seed: must be an integer >= 0, got -1"),
    ([*DEMO, "--scenes", "1"], "argument --scenes: must be an integer of 2 or more"),
    ([*DEMO, "--scenes", "0"], "argument --scenes: must be an integer of 2 or more"),
    (["inspect", "simplebev-tiny", "--threads", "0"], "argument --threads: must be a positive integer"),
])
def test_bad_numbers_are_argparse_errors(tmp_path, capsys, argv, needle):
    with pytest.raises(SystemExit) as info:
        main([*argv, "--out", str(tmp_path)] if argv[0] != "inspect" else argv)
    assert info.value.code == 2
    line = _error_line(capsys)
    assert line.startswith(f"lmdfx {argv[0]}: error: ") and needle in line and line.endswith("--help)")


@pytest.mark.parametrize("args, needle", [
    (["--limit", "1"], "the dataset has 1 sample; the separation protocol pairs each sample with another one, so it "
                       "needs at least 2 (raise --limit)."),
    (["--limit", "4", "--shift", "4", "--repeats", "3"],
     "--shift 4 with --repeats 3 pairs each of the 4 samples with itself (partner p = (k + 4·r) mod 4 = k for every "
     "r), so nothing would be measured; use a --shift that is not a multiple of 4, e.g. --shift 1."),
    (["--limit", "3", "--shift", "6", "--repeats", "2"], "not a multiple of 3"),
    (["--model", "nope"], "unknown model 'nope'; pass as --model one of simplebev-world"),
    (["--model", "mymodels:missing"], "module 'mymodels' has no callable 'missing'"),
    (["--model", "no_such_pkg_xyz:build"], "cannot import module 'no_such_pkg_xyz' of model"),
    (["--model", "missing.py:build"], "cannot import module 'missing.py' of model 'missing.py:build': no such file"),
    (["--model", ":build"], "is not module:factory"),
    (["--weights", "missing.pt", "--model", "simplebev-world"], "--weights 'missing.pt' not found"),
    (["--checkpoint", "missing.pth"], "--checkpoint 'missing.pth' not found"),
    (["--device", "tpu"], "--device must be cpu or cuda"),
])
def test_evaluate_arguments_are_checked_before_any_model_is_built(in_model_folder, capsys, no_model_building,
                                                                   args, needle):
    argv = ["evaluate", "--model", "simplebev-tiny", "--world", "--out", str(in_model_folder / "ev"), "--no-progress"]
    if "--model" in args:
        argv[1:3] = []
    assert main([*argv, *args]) == 2
    line = _error_line(capsys)
    assert line.startswith("lmdfx evaluate: error: ") and needle in line, line
    assert not (in_model_folder / "ev").exists()


def test_nuscenes_dataroot_is_checked_before_any_model_is_built(tmp_path, capsys, no_model_building):
    assert main(["evaluate", "--model", "simplebev-tiny", "--nuscenes", str(tmp_path / "none"),
                 "--out", str(tmp_path / "ev")]) == 2
    assert "does not exist; pass the folder holding samples/" in _error_line(capsys)


def test_demo_arguments_are_checked_before_any_model_is_built(tmp_path, capsys, no_model_building):
    assert main(["demo", "--weights", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "demo")]) == 2
    assert _error_line(capsys) == (f"lmdfx demo: error: --weights '{tmp_path / 'missing.pt'}' not found; pass a file "
                                   "written by python -m lmdfx.bev.train_world --out PATH (or leave --weights out: "
                                   "the shipped weights).")
    from lmdfx.bev import demo

    with pytest.raises(lmdfx.LMDError, match="--scenes must be an integer of 2 or more"):
        demo.run(tmp_path / "demo", scenes=1)
    assert not (tmp_path / "demo").exists()


def test_partners_that_wrap_around_are_explained(tmp_path, capsys):
    # 4 samples, offsets 2, 4, 6: r = 2 is the sample itself, r = 1 and 3 reach the same partner
    assert main(["evaluate", "--model", "simplebev-tiny", "--data", "examples", "--limit", "4", "--shift", "2",
                 "--repeats", "3", "--out", str(tmp_path), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert ("lmdfx evaluate: note: partner p = (k + 2·r) mod 4 wraps around the 4 samples: for r = 2 the partner is "
            "the sample itself and is skipped; the other 2 offsets reach only 1 distinct partner") in err
    assert json.loads((tmp_path / "evaluation.json").read_text())["separation"]["pairs"] == 8
    assert main(["evaluate", "--model", "simplebev-tiny", "--data", "examples", "--limit", "3", "--shift", "1",
                 "--repeats", "2", "--out", str(tmp_path), "--no-progress"]) == 0
    assert "note" not in capsys.readouterr().err


# ---------------------------------------------------------------------------
# A user's model that fails: one line, exit status 2; --debug: the traceback
# ---------------------------------------------------------------------------
def test_a_failing_user_model_is_a_one_line_error(in_model_folder, capsys):
    args = ["--data", "examples", "--limit", "2", "--shift", "1", "--repeats", "1",
            "--out", str(in_model_folder / "ev"), "--no-progress"]
    assert main(["evaluate", "--model", "mymodels:explodes", *args]) == 2
    line = _error_line(capsys)
    assert line.startswith("lmdfx evaluate: error: model 'mymodels:explodes' failed while running on 2 samples of "
                           "example_inputs(), seed 2: RuntimeError: The size of tensor a")
    assert line.endswith("--debug shows the traceback)")
    assert not (in_model_folder / "ev").exists()
    with pytest.raises(lmdfx.LMDError) as info:  # --debug: the exception, its cause the model's own
        main(["evaluate", "--model", "mymodels:explodes", *args, "--debug"])
    assert isinstance(info.value.__cause__, RuntimeError)
    assert main(["inspect", "mymodels:explodes", "--run"]) == 2
    assert _error_line(capsys).startswith("lmdfx inspect: error: model 'mymodels:explodes' failed while running "
                                          "on example_inputs(): RuntimeError")
    assert main(["evaluate", "--model", "mymodels:NeedsArgs", *args]) == 2  # at build time
    assert "model factory 'mymodels:NeedsArgs' failed: TypeError" in _error_line(capsys)


def test_a_failing_user_model_in_a_real_run(in_model_folder):
    proc = subprocess.run([sys.executable, "-m", "lmdfx", "evaluate", "--model", "mymodels:explodes", "--data",
                           "examples", "--limit", "2", "--shift", "1", "--repeats", "1", "--out", "ev",
                           "--no-progress"], capture_output=True, text=True, timeout=120, env=ENV, cwd=in_model_folder)
    assert proc.returncode == 2
    assert len(proc.stderr.splitlines()) == 1 and "Traceback" not in proc.stderr
    assert "model 'mymodels:explodes' failed while running" in proc.stderr


# ---------------------------------------------------------------------------
# Ctrl-C: exit status 130, one line, no file half-written
# ---------------------------------------------------------------------------
def _interrupt(argv: list[str], cwd: Path, ready, env: dict | None = None, timeout: float = 120) -> tuple[int, str]:
    """Run ``lmdfx argv``, send SIGINT once ``ready(stderr so far)`` holds; (exit status, stderr)."""
    proc = subprocess.Popen([sys.executable, "-m", "lmdfx", *argv], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, cwd=cwd, env=env or ENV)
    err: list[str] = []
    reader = threading.Thread(target=lambda: err.extend(iter(lambda: proc.stderr.read(1), "")), daemon=True)
    reader.start()
    deadline = time.time() + timeout
    try:
        while not ready("".join(err)):
            assert proc.poll() is None, f"lmdfx ended before the interrupt: {''.join(err)}"
            assert time.time() < deadline, f"lmdfx did not get going: {''.join(err)}"
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(timeout=10)
    return code, "".join(err)


def test_ctrl_c_while_a_model_is_traced(in_model_folder):
    started = in_model_folder / "started"
    code, err = _interrupt(["evaluate", "--model", "mymodels:sleeper", "--data", "examples", "--limit", "2",
                            "--shift", "1", "--repeats", "1", "--out", "ev", "--no-progress"], in_model_folder,
                           lambda _: started.exists(), env=dict(ENV, LMDFX_TEST_STARTED=str(started)))
    assert code == 130
    assert err == "lmdfx evaluate: interrupted\n"


def test_ctrl_c_during_an_evaluation(tmp_path):
    code, err = _interrupt(["evaluate", "--model", "simplebev-tiny", "--world", "--limit", "50", "--shift", "1",
                            "--repeats", "12", "--out", "ev"], tmp_path, lambda e: "metrics:" in e)
    assert code == 130
    assert err.replace("\r", "\n").splitlines()[-1] == "lmdfx evaluate: interrupted"
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert not (tmp_path / "ev").exists() or not list((tmp_path / "ev").iterdir())


def test_ctrl_c_while_writing_leaves_old_files_whole(tmp_path, monkeypatch, capsys):
    out = tmp_path / "ev"
    out.mkdir()
    (out / "evaluation.json").write_text("old json")
    (out / "evaluation.md").write_text("old md")
    from lmdfx.bev import files

    replaced = []

    def replace(src, dst):  # the first file lands, Ctrl-C comes while the second is written
        if replaced:
            raise KeyboardInterrupt
        replaced.append(dst)
        os.rename(src, dst)

    monkeypatch.setattr(files.os, "replace", replace)
    code = main(["evaluate", "--model", "simplebev-tiny", "--data", "examples", "--limit", "2", "--shift", "1",
                 "--repeats", "1", "--out", str(out), "--no-progress"])
    assert code == 130
    assert capsys.readouterr().err == "lmdfx evaluate: interrupted\n"
    assert json.loads((out / "evaluation.json").read_text())["samples"] == 2
    assert (out / "evaluation.md").read_text() == "old md"
    assert sorted(p.name for p in out.iterdir()) == ["evaluation.json", "evaluation.md"]
