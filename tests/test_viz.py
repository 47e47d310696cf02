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


def test_component_maps_png(tiny, tmp_path):
    _, inputs, _, res = tiny
    gt = (torch.rand(1, 1, 32, 32) > 0.9).float()
    path = viz.component_maps(res, tmp_path / "c.png", gt=gt, images=inputs["images"], title="t")
    assert path.read_bytes()[:8] == PNG
    bare = viz.component_maps(res, tmp_path / "sub" / "bare.png")  # no images, no ground truth
    assert bare.is_file()
    with pytest.raises(lmdfx.LMDError, match="PNG"):
        viz.component_maps(res, tmp_path / "c.jpg")


def test_layer_shares_and_energy_plot(tiny, tmp_path):
    _, _, _, res = tiny
    names, shares = viz.layer_shares(res)
    assert names[0].startswith("bev_compressor")  # encoder layers are one modality: skipped
    assert not any(n.startswith("encoder") for n in names)
    torch.testing.assert_close(shares.sum(1), torch.ones(len(names)))
    stack = res.layers[names[-1]].double().flatten(1).pow(2).sum(1)
    torch.testing.assert_close(shares[-1].double(), stack / stack.sum(), rtol=1e-5, atol=1e-6)
    all_names, _ = viz.layer_shares(res, mixed_only=False)
    assert len(all_names) > len(names)
    assert viz.layer_energy(res, tmp_path / "e.png").read_bytes()[:8] == PNG


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


def test_layer_energy_needs_recorded_layers(tmp_path):
    class Net(nn.Module):
        def forward(self, a, b):
            return a + b

    dec = lmdfx.compile(Net().eval(), {"a": "a", "b": "b"})
    res = dec(torch.ones(1, 1, 2, 2), torch.ones(1, 1, 2, 2))
    with pytest.raises(lmdfx.LMDError, match="record"):
        viz.layer_energy(res, tmp_path / "x.png")
