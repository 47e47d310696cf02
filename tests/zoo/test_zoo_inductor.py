"""``backend="inductor"``: the compiled decomposer equals the eager one (float32, rtol 1e-4)
on one small CNN (timm resnet18, early fusion) and one small transformer (torchvision's
VisionTransformer with nn.MultiheadAttention); and a second decomposer in the same process is
compiled for its own static shapes."""

from __future__ import annotations

import pytest
import torch
from test_zoo_models import case_for
from torch import nn
from zoo_checks import check_inductor

import lmdfx

pytestmark = pytest.mark.usefixtures("one_thread")


# resnet18 takes ~95 s with a cold inductor cache on 2 cores (~28 s warm); the ViT ~47 s (~12 s warm).
@pytest.mark.parametrize("name", [pytest.param("timm-resnet18", marks=pytest.mark.slow), "torchvision-vit"])
def test_inductor_matches_eager(name):
    check_inductor(case_for(name))


class Tiny(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(5, channels, 3, padding=1)

    def forward(self, camera, lidar):
        return torch.relu(self.conv(torch.cat([camera, lidar], 1)))


def test_a_second_decomposer_is_compiled_for_static_shapes():
    dynamic = []

    def backend(gm, example_inputs):
        dynamic.append(any(isinstance(a, torch.SymInt) or (isinstance(a, torch.Tensor)
                                                           and any(isinstance(s, torch.SymInt) for s in a.shape))
                           for a in example_inputs))
        return gm.forward

    torch._dynamo.reset()
    for channels, hw in [(4, 8), (6, 12)]:
        torch.manual_seed(0)
        dec = lmdfx.compile(Tiny(channels).eval(), {"camera": "camera", "lidar": "lidar"}, backend=backend)
        dec(torch.randn(1, 3, hw, hw), torch.randn(1, 2, hw, hw))
    assert dynamic == [False, False]
