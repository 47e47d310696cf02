"""Runtime behaviour: call conventions, pytree outputs, report, backends, and the example."""

from __future__ import annotations

import runpy
from pathlib import Path

import torch
from torch import nn

import lmdfx

ROOT = Path(__file__).resolve().parents[1]


class Heads(nn.Module):
    def __init__(self):
        super().__init__()
        self.cam = nn.Conv2d(3, 4, 1)
        self.rad = nn.Conv2d(1, 4, 1)
        self.seg = nn.Conv2d(4, 1, 1)
        self.off = nn.Conv2d(4, 2, 1)

    def forward(self, cam, calib, radar, gain: float = 1.0):
        x = torch.relu(self.cam(cam) * calib + self.rad(radar))
        return {"seg": self.seg(x) * gain, "aux": (self.off(x), x.shape[-1])}


def test_call_by_position_or_name_with_defaults_and_pytree_outputs():
    model = Heads().double().eval()
    cam, radar = torch.randn(1, 3, 4, 4, dtype=torch.float64), torch.randn(1, 1, 4, 4, dtype=torch.float64)
    calib = torch.rand(1, 4, 1, 1, dtype=torch.float64)
    dec = lmdfx.compile(model, {"camera": "cam", "radar": "radar"})
    a = dec(cam, calib, radar)
    b = dec(radar=radar, cam=cam, calib=calib, gain=1.0)
    expected = model(cam, calib, radar)
    for res in (a, b):
        torch.testing.assert_close(res.output["seg"], expected["seg"])
        assert res.output["aux"][1] == 4
        assert res.components["seg"].shape == (3, 1, 1, 4, 4)
        assert res.components["aux"][1] is None  # a Python int has no components
        torch.testing.assert_close(res.components["aux"][0].sum(0), expected["aux"][0], rtol=0, atol=1e-12)
        assert res["radar"]["seg"].shape == expected["seg"].shape
    assert a.names == ("camera", "radar", "bias")


def test_report_lists_every_node_with_provenance_rule_and_residual():
    model = Heads().double().eval()
    dec = lmdfx.compile(model, {"camera": "cam", "radar": "radar"})
    report = dec.report()
    rows = {row.node: row for row in report.rows}
    assert rows["conv2d"].kind == "pure" and rows["conv2d"].provenance == ("camera",)
    assert rows["mul"].kind == "pure"  # calibration is context: camera * calib stays camera's
    assert rows["add"].kind == "mixed" and rows["add"].rule == "additive"
    assert rows["relu"].rule == "secant" and rows["relu"].residual is None  # no call yet
    dec(torch.randn(1, 3, 4, 4, dtype=torch.float64), torch.rand(1, 4, 1, 1, dtype=torch.float64),
        torch.randn(1, 1, 4, 4, dtype=torch.float64))
    # by default the ReLU's components are built to sum to its value: only cancellation is measured
    assert rows["relu"].derived and rows["relu"].ratio is not None and report.max_relative_residual is None
    assert "built" in str(report)
    measured = lmdfx.compile(model, {"camera": "cam", "radar": "radar"}, exact_output=True)
    measured(torch.randn(1, 3, 4, 4, dtype=torch.float64), torch.rand(1, 4, 1, 1, dtype=torch.float64),
             torch.randn(1, 1, 4, 4, dtype=torch.float64))
    assert measured.report().max_relative_residual < 1e-14
    text = str(report)
    assert "relu" in text and "mixed:camera+radar" in text and "fusion nodes" in text
    assert report.fusion_nodes == ["add"]


def test_inductor_backend_matches_eager():
    model = Heads().eval()
    cam, radar, calib = torch.randn(1, 3, 4, 4), torch.randn(1, 1, 4, 4), torch.rand(1, 4, 1, 1)
    eager = lmdfx.compile(model, {"camera": "cam", "radar": "radar"})(cam, calib, radar)
    dec = lmdfx.compile(model, {"camera": "cam", "radar": "radar"}, backend="inductor")
    compiled = dec(cam, calib, radar)
    torch.testing.assert_close(compiled.components["seg"], eager.components["seg"], rtol=1e-5, atol=1e-6)
    frozen = dec(cam, calib, torch.randn(1, 1, 4, 4), operating_point=compiled.operating_point)
    torch.testing.assert_close(frozen["camera"]["seg"], compiled["camera"]["seg"], rtol=1e-5, atol=1e-6)


class NormedFusion(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm, self.fc = nn.LayerNorm(8), nn.Linear(8, 4)

    def forward(self, cam, radar):
        return self.fc(self.norm(cam + radar))


def test_taylor_rules_run_under_inductor():
    """Forward-mode AD of layer_norm inside torch.compile hits an internal assert of torch
    (fake tensors); the Taylor rule's Jacobian products run eagerly, the rest compiled."""
    model = NormedFusion().eval()
    cam, radar = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    rules = lmdfx.Rules(overrides={"layer_norm": "taylor"})
    eager = lmdfx.compile(model, {"camera": "cam", "radar": "radar"}, rules=rules)(cam, radar)
    compiled = lmdfx.compile(model, {"camera": "cam", "radar": "radar"}, rules=rules, backend="inductor")(cam, radar)
    torch.testing.assert_close(compiled.components, eager.components, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled.components.sum(0), model(cam, radar), rtol=1e-5, atol=1e-5)


def test_quickstart_example_runs(capsys):
    runpy.run_path(str(ROOT / "examples" / "quickstart.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "camera" in out and "radar" in out and "% of the output" in out
    assert "unchanged after replacing the radar input: True" in out


class Flip(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1)

    def forward(self, cam, radar, flip: bool = False):
        x = self.conv(cam + radar)
        if flip:
            x = x.flip(-1)
        return torch.tanh(x)


class Opaque(nn.Module):
    """A block the user keeps as a leaf: it has no rule, so the Taylor fallback takes it."""

    def forward(self, x):
        return x * torch.sigmoid(x) + x.pow(3)


class WithLeaf(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = Opaque()

    def forward(self, cam, radar):
        return self.block(cam - radar)


def test_concrete_args_and_leaf_modules_reach_the_tracer():
    cam, radar = torch.randn(1, 2, 3, 3, dtype=torch.float64), torch.randn(1, 2, 3, 3, dtype=torch.float64)
    model = Flip().double().eval()
    with __import__("pytest").raises(lmdfx.TraceError):
        lmdfx.compile(model, {"camera": "cam", "radar": "radar"})
    dec = lmdfx.compile(model, {"camera": "cam", "radar": "radar"}, concrete_args={"flip": True})
    torch.testing.assert_close(dec(cam, radar, True).components.sum(0), model(cam, radar, True), rtol=0, atol=1e-12)

    leafy = WithLeaf().double().eval()
    with __import__("pytest").raises(lmdfx.UnsupportedOpError, match="Opaque"):
        lmdfx.compile(leafy, {"camera": "cam", "radar": "radar"}, leaf_modules=[Opaque])
    for rules in (lmdfx.Rules(fallback="taylor"), lmdfx.Rules(overrides={Opaque: "taylor"}),
                  lmdfx.Rules(overrides={"block": "taylor"})):
        dec = lmdfx.compile(leafy, {"camera": "cam", "radar": "radar"}, leaf_modules=["block"], rules=rules)
        res = dec(cam, radar)
        assert {row.node: row.rule for row in dec.report().rows}["block"] == "taylor"
        torch.testing.assert_close(res.components.sum(0), leafy(cam, radar), rtol=0, atol=1e-12)
        # First-order: each modality component is the Jacobian applied to that modality's input.
        _, expected = torch.func.jvp(leafy.block, (cam - radar,), (cam,))
        torch.testing.assert_close(res.components[0], expected, rtol=1e-12, atol=1e-12)


def test_readme_quick_start_runs_as_written(capsys):
    import re

    readme = (ROOT / "README.md").read_text()
    code = re.search(r"## Quick start\n\n```python\n(.*?)```", readme, re.S).group(1)
    exec(compile(code, "README.md", "exec"), {})
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "('camera', 'radar', 'bias')"
    assert lines[2] == "True" and lines[4] == "True"  # exact sum; camera unchanged under new radar
