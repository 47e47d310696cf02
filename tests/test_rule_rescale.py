"""``Rules(activation="rescale")``: DeepLIFT's rescale multiplier against the bias component.

The registry-driven tests (tests/test_registry_rules.py) run it on every activation op, where the
bias component is zero; these tests give it a non-zero bias component."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lmdfx

MODALITIES = {"camera": "cam", "radar": "radar"}


class Biased(nn.Module):
    """act(cam + radar + b) with a constant b, then a linear read-out with a bias."""

    def __init__(self, act: nn.Module):
        super().__init__()
        self.b = nn.Parameter(torch.linspace(-1.5, 1.5, 12, dtype=torch.float64))
        self.act = act
        self.head = nn.Linear(12, 3).double()

    def forward(self, cam, radar):
        return self.head(self.act(cam + radar + self.b))


def _inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 12, generator=g, dtype=torch.float64), torch.randn(2, 12, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("act", [nn.ReLU(), nn.GELU(), nn.Sigmoid(), nn.Softplus()], ids=lambda a: type(a).__name__)
def test_bias_component_is_the_activation_of_the_bias(act):
    model = Biased(act).eval()
    cam, radar = _inputs(0)
    dec = lmdfx.compile(model, MODALITIES, rules=lmdfx.Rules(activation="rescale"), record=["act"])
    res = dec(cam, radar)  # check="raise": exact at every node
    torch.testing.assert_close(res.components.sum(0), model(cam, radar), rtol=1e-12, atol=1e-12)
    layer = res.layers["act"]
    torch.testing.assert_close(layer[-1], act(model.b).expand(2, 12), rtol=1e-12, atol=1e-12)
    # the modalities share O − f(b) in proportion to their pre-activations
    a, out = cam + radar + model.b, act(cam + radar + model.b)
    slope = (out - act(model.b)) / (a - model.b)
    torch.testing.assert_close(layer[0], slope * cam, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(layer[1], slope * radar, rtol=1e-9, atol=1e-12)


def test_rescale_separates_at_a_frozen_operating_point():
    model = Biased(nn.GELU()).eval()
    cam, radar = _inputs(0)
    _, other = _inputs(1)
    dec = lmdfx.compile(model, MODALITIES, rules=lmdfx.Rules(activation="rescale"))
    res = dec(cam, radar)
    moved = dec(cam, other, operating_point=res.operating_point)
    assert torch.equal(moved.components[0], res.components[0])
    assert not torch.allclose(moved.components[1], res.components[1])


def test_rescale_differs_from_secant_only_through_the_bias():
    model = Biased(nn.ReLU()).eval()
    cam, radar = _inputs(0)
    secant = lmdfx.compile(model, MODALITIES, rules=lmdfx.Rules(activation="secant"))(cam, radar).components
    rescale = lmdfx.compile(model, MODALITIES, rules=lmdfx.Rules(activation="rescale"))(cam, radar).components
    assert not torch.allclose(secant, rescale)
    with torch.no_grad():
        model.b.zero_()  # a zero bias component: the segment from (0, f(0)) is the secant
    secant = lmdfx.compile(model, MODALITIES, rules=lmdfx.Rules(activation="secant"))(cam, radar).components
    rescale = lmdfx.compile(model, MODALITIES, rules=lmdfx.Rules(activation="rescale"))(cam, radar).components
    torch.testing.assert_close(secant, rescale, rtol=1e-12, atol=1e-12)
