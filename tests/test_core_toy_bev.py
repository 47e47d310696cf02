"""A SimpleBEV-shaped toy: pure encoders -> cat -> conv (no bias) -> InstanceNorm -> GELU ->
ResNet blocks with BatchNorm -> bilinear up-block with skip add -> head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import lmdfx
from nets import randomize_batchnorm


class Block(nn.Module):
    def __init__(self, c: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c if stride == 1 else c // 2, c, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.downsample = None if stride == 1 else nn.Sequential(nn.Conv2d(c // 2, c, 1, stride, bias=False),
                                                                 nn.BatchNorm2d(c))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class ToyBEV(nn.Module):
    def __init__(self):
        super().__init__()
        self.camera_encoder = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1))
        self.radar_encoder = nn.Conv2d(4, 4, 1)
        self.bev_compressor = nn.Sequential(nn.Conv2d(12, 8, 3, padding=1, bias=False), nn.InstanceNorm2d(8), nn.GELU())
        self.layer1 = Block(8, 1)
        self.layer2 = Block(16, 2)
        self.up = nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                                nn.Conv2d(16, 8, 1, bias=False), nn.InstanceNorm2d(8))
        self.head = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.InstanceNorm2d(8), nn.ReLU(inplace=True),
                                  nn.Conv2d(8, 1, 1))

    def forward(self, images, radar_bev, grid):
        camera = F.grid_sample(self.camera_encoder(images), grid, align_corners=False)
        x = self.bev_compressor(torch.cat([camera, self.radar_encoder(radar_bev)], dim=1))
        skip = self.layer1(x)
        x = self.up(self.layer2(skip)) + skip
        return {"segmentation": self.head(x)}


def make_toy(seed: int = 0) -> ToyBEV:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = ToyBEV().double().eval()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            randomize_batchnorm(module, generator)
    return model


def toy_inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return dict(images=torch.rand(2, 3, 12, 20, generator=g, dtype=torch.float64) - 0.5,
                radar_bev=torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64),
                grid=torch.rand(2, 8, 8, 2, generator=g, dtype=torch.float64) * 2 - 1)


def test_toy_bev_compiles_and_is_exact():
    model = make_toy()
    inputs = toy_inputs()
    dec = lmdfx.compile(model, {"camera": "images", "radar": "radar_bev"}, record="all", exact_output=True)
    res = dec(**inputs)
    expected = model(**inputs)["segmentation"]
    assert torch.equal(res.output["segmentation"], expected)
    stack = res.components["segmentation"]
    assert stack.shape == (3, *expected.shape)
    torch.testing.assert_close(stack.sum(0), expected, rtol=0, atol=1e-12)
    assert dec.report().fusion_nodes == ["cat"]
    assert dec.report().max_relative_residual < 1e-12
    for name in ("bev_compressor", "layer1", "layer2", "up", "head"):
        assert name in res.layers


def test_fusion_conv_camera_component_is_the_camera_slice_of_its_weight():
    model = make_toy(1)
    inputs = toy_inputs(1)
    res = lmdfx.compile(model, {"camera": "images", "radar": "radar_bev"}, record=["bev_compressor.0"])(**inputs)
    camera_features = F.grid_sample(model.camera_encoder(inputs["images"]), inputs["grid"], align_corners=False)
    radar_features = model.radar_encoder(inputs["radar_bev"])
    weight = model.bev_compressor[0].weight
    fusion = res.layers["bev_compressor.0"]
    torch.testing.assert_close(fusion[0], F.conv2d(camera_features, weight[:, :8], padding=1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fusion[1], F.conv2d(radar_features, weight[:, 8:], padding=1), rtol=1e-12, atol=1e-12)
    assert torch.count_nonzero(fusion[2]) == 0  # no bias in the fusion conv


def test_compile_leaves_the_model_unchanged():
    model = make_toy(2)
    hooks_before = len(model._forward_hooks), sum(len(m._forward_hooks) for m in model.modules())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    inputs = toy_inputs(2)
    expected = model(**inputs)["segmentation"]
    dec = lmdfx.compile(model, {"camera": "images", "radar": "radar_bev"}, record="all",
                        rules=lmdfx.Rules(bias_split="ratio"))
    dec(**inputs)
    dec(**toy_inputs(3), operating_point=dec.operating_point(**inputs))
    assert not model.training and all(not m.training for m in model.modules())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert (len(model._forward_hooks), sum(len(m._forward_hooks) for m in model.modules())) == hooks_before
    assert isinstance(model.layer1.relu, nn.ReLU) and model.layer1.relu.inplace  # in-place flag untouched
    assert torch.equal(model(**inputs)["segmentation"], expected)
