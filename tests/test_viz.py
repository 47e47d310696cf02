"""lmdfx.bev.viz: figures are written as PNGs; Modality-GradCAM follows eq. 18-19 through autograd."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

import lmdfx
from lmdfx.bev import viz
from lmdfx.bev.models.simplebev import SimpleBEV, SimpleBEVConfig

PNG = b"\x89PNG\r\n\x1a\n"


class Sum(nn.Module):
    def forward(self, a, b):
        return a + b


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = SimpleBEV(SimpleBEVConfig.tiny()).eval()
    inputs = model.example_inputs(generator=torch.Generator().manual_seed(0))
    dec = lmdfx.compile(model, model.modality_args, record="all")
    with torch.no_grad():
        res = dec(**inputs)
    return model, inputs, dec, res


def test_import_does_not_load_matplotlib():
    code = "import sys, lmdfx, lmdfx.bev.viz; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.fixture
def figures(monkeypatch):
    """The matplotlib figures the viz functions save, in order."""
    saved = []
    save = viz._save

    def keep(fig, path):
        saved.append(fig)
        return save(fig, path)

    monkeypatch.setattr(viz, "_save", keep)
    return saved


def _axes(fig, title_part):
    return [ax for ax in fig.axes if title_part in ax.get_title()]


def test_component_maps_png(tiny, tmp_path, figures):
    _, inputs, _, res = tiny
    gt = (torch.rand(1, 1, 32, 32) > 0.9).float()
    footprint = torch.zeros(32, 32, dtype=torch.bool)
    footprint[4:7, 10:12] = True
    singles = [("camera", footprint), ("radar", footprint.roll(12, 0))]
    path = viz.component_maps(res, tmp_path / "c.png", gt=gt, images=inputs["images"], title="t",
                              single_sensor=singles)
    assert path.read_bytes()[:8] == PNG
    fig = figures[-1]
    # signed logits on one symmetric scale shared by all components
    panels = _axes(fig, "component (logits)")
    assert len(panels) == len(res.names)
    limits = {ax.images[0].get_clim() for ax in panels}
    assert len(limits) == 1 and next(iter(limits))[0] == -next(iter(limits))[1]
    assert {ax.images[0].get_cmap().name for ax in panels} == {"RdBu_r"}
    assert not _axes(fig, "component)")  # the sigmoid view of a component only when asked
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == ["ground-truth outline", "seen by the camera only", "seen by the radar only"]
    # orientation: X right, Z forward on the first map of each row
    ground_truth = _axes(fig, "ground truth")[0]
    assert (ground_truth.get_xlabel(), ground_truth.get_ylabel()) == ("X → right", "Z → forward")
    assert len(ground_truth.collections) == 2  # one marker per single-sensor vehicle

    viz.component_maps(res, tmp_path / "s.png", gt=gt, sigmoid="radar")
    (view,) = _axes(figures[-1], "sigmoid(radar component)")
    assert view.images[0].get_clim() == (0.0, 1.0)
    assert any("not a 50 % vehicle probability" in t.get_text() for ax in figures[-1].axes for t in ax.texts)
    with pytest.raises(lmdfx.LMDError, match="sigmoid='lidar' is not a component"):
        viz.component_maps(res, tmp_path / "x.png", sigmoid="lidar")

    bare = viz.component_maps(res, tmp_path / "sub" / "bare.png")  # no images, no ground truth
    assert bare.is_file()
    with pytest.raises(lmdfx.LMDError, match="PNG"):
        viz.component_maps(res, tmp_path / "c.jpg")


def test_layer_shares_in_network_order_each_value_once(tiny):
    _, _, dec, res = tiny
    names, shares = viz.layer_shares(res, dec=dec)
    rows = dec.report().rows
    # the fusion comes first, then the BEV layers; encoder layers are one modality: skipped
    assert names[0] == dec.report().fusion_nodes[0]
    assert names[1].startswith("bev_compressor")
    assert not any(n.startswith("encoder") for n in names)
    # a residual add (a bare fx node, recorded last by lmdfx) sits inside its block
    (add,) = [r.node for r in rows if r.layer == "decoder.layer1.0" and r.op == "add"]
    every, _ = viz.layer_shares(res, mixed_only=False, dec=dec)
    assert every.index("decoder.layer1.0.conv2") < every.index(add) < every.index("decoder.layer1.0")
    assert every[0].startswith("encoder") and every[-1].startswith("decoder.feat_head")
    # a container and its last child are one value: named once, by the container
    assert "decoder.layer1" in names and "decoder.layer1.1" not in names and "decoder.layer1.1.relu:1" not in names
    assert len({res.layers[n].data_ptr() for n in names}) == len(names)
    # without the decomposer: the same layers (recording order), duplicates found by memory
    assert set(viz.layer_shares(res)[0]) == set(names)
    torch.testing.assert_close(shares.sum(1), torch.ones(len(names)))
    stack = res.layers[names[-1]].double().flatten(1).pow(2).sum(1)
    torch.testing.assert_close(shares[-1].double(), stack / stack.sum(), rtol=1e-5, atol=1e-6)


def test_layer_energy_plot_reads(tiny, tmp_path, figures):
    _, _, dec, res = tiny
    assert viz.layer_energy(res, tmp_path / "e.png", dec=dec).read_bytes()[:8] == PNG
    (ax,) = figures[-1].axes
    names, _ = viz.layer_shares(res, dec=dec)
    ticks = ax.get_xticklabels()
    assert len(ticks) == len(names) and min(t.get_fontsize() for t in ticks) >= 8
    assert "fusion" in ticks[0].get_text() and ticks[1].get_text() == names[1]
    assert ax.get_xlabel() and ax.get_ylabel()
    # the legend sits right of the plot, off the bars
    assert ax.get_legend().get_window_extent().x0 >= ax.get_window_extent().x1
    other = lmdfx.compile(Sum().eval(), {"a": "a", "b": "b"}, record="all")
    with pytest.raises(lmdfx.LMDError, match="not in the decomposer's graph"):
        viz.layer_energy(res, tmp_path / "x.png", dec=other)


def test_modality_gradcam_matches_a_hand_computation(tiny):
    _, inputs, dec, res = tiny
    layer = "decoder.layer1"
    region = torch.zeros(1, 1, 32, 32)
    region[..., 10:20, 5:15] = 1
    cam = viz.modality_gradcam(dec, inputs, layer, "radar", region=region)
    assert cam.shape == res.layers[layer].shape[1:2] + res.layers[layer].shape[-2:]
    assert (cam >= 0).all() and cam.max() > 0
    # By hand: autograd through a frozen-point call, gradient of the region score w.r.t. the layer stack.
    op = res.operating_point
    again = dec(**inputs, operating_point=op)
    stack = again.layers[layer]
    score = (again.components["segmentation"].sum(0) * region).sum()
    (grad,) = torch.autograd.grad(score, stack)
    alpha = grad[1].mean(dim=(-2, -1), keepdim=True)
    expected = torch.relu((alpha * stack[1].detach()).sum(1))
    torch.testing.assert_close(cam, expected)
    # the gradient of the linearised model is shared by all components (a linear map)
    torch.testing.assert_close(grad[0], grad[1])


def test_gradcam_errors_and_figure(tiny, tmp_path):
    model, inputs, dec, _ = tiny
    with pytest.raises(lmdfx.LMDError, match="no modality"):
        viz.modality_gradcam(dec, inputs, "decoder.layer1", "lidar")
    plain = lmdfx.compile(model, model.modality_args, record=["bev_compressor"])
    with pytest.raises(lmdfx.LMDError, match="not recorded"):
        viz.modality_gradcam(plain, inputs, "decoder.layer1", "camera")
    path = viz.gradcam_figure(plain, inputs, "bev_compressor", tmp_path / "g.png")
    assert path.read_bytes()[:8] == PNG


def test_gradcam_panels_share_one_scale(tiny, tmp_path, figures):
    _, inputs, dec, _ = tiny
    viz.gradcam_figure(dec, inputs, "decoder.layer1", tmp_path / "g.png", gt=torch.ones(1, 1, 32, 32))
    fig = figures[-1]
    panels = _axes(fig, "-GradCAM")
    assert len(panels) == 2 and len({ax.images[0].get_clim() for ax in panels}) == 1
    assert panels[0].images[0].get_clim()[0] == 0
    assert fig.get_suptitle() == "Modality-GradCAM at decoder.layer1"
    assert "one colour scale for all modalities" in fig.get_supxlabel()


def test_layer_energy_needs_recorded_layers(tmp_path):
    dec = lmdfx.compile(Sum().eval(), {"a": "a", "b": "b"})
    res = dec(torch.ones(1, 1, 2, 2), torch.ones(1, 1, 2, 2))
    with pytest.raises(lmdfx.LMDError, match="record"):
        viz.layer_energy(res, tmp_path / "x.png")
