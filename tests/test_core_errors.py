"""Every error path: type, and a message that names the node or parameter and the fix."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lmdfx


class Fusion(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1)

    def forward(self, cam, radar, scale=2.0):
        return self.conv(torch.cat([cam, radar], 1)) * scale


class Branchy(nn.Module):
    def forward(self, cam, radar):
        if cam.sum() > 0:  # data-dependent control flow
            return cam + radar
        return cam - radar


class Unsupported(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1)

    def forward(self, cam, radar):
        x = self.conv(cam + radar)
        y = torch.cumprod(x, dim=1)
        return torch.logcumsumexp(y, dim=2) + torch.erfinv(torch.tanh(x) * 0.5)


def test_untraceable_model_raises_trace_error_naming_the_construct():
    with pytest.raises(lmdfx.TraceError) as info:
        lmdfx.compile(Branchy().eval(), {"camera": "cam", "radar": "radar"})
    message = str(info.value)
    assert "test_core_errors.py:" in message  # where it failed
    assert "control flow" in message and "concrete_args" in message and "leaf_modules" in message


def test_unknown_modality_parameter_lists_the_real_ones():
    with pytest.raises(lmdfx.LMDError) as info:
        lmdfx.compile(Fusion().eval(), {"camera": "cam", "lidar": "points"})
    assert "'points'" in str(info.value) and "cam, radar, scale" in str(info.value)


def test_training_mode_says_to_call_eval():
    model = Fusion()
    with pytest.raises(lmdfx.LMDError, match=r"model\.eval\(\)"):
        lmdfx.compile(model, {"camera": "cam", "radar": "radar"})
    assert model.training  # the flag is not changed for the user
    model.eval()
    dec = lmdfx.compile(model, {"camera": "cam", "radar": "radar"})
    model.train()
    with pytest.raises(lmdfx.LMDError, match=r"eval\(\)"):
        dec(torch.ones(1, 1, 2, 2), torch.ones(1, 2, 2, 2))


def test_modality_argument_that_is_not_a_tensor():
    dec = lmdfx.compile(Fusion().eval(), {"camera": "cam", "radar": "radar"})
    with pytest.raises(lmdfx.LMDError, match=r"'radar'.*must be a tensor"):
        dec(torch.ones(1, 1, 2, 2), [1.0, 2.0])


def test_arguments_not_matching_forward():
    dec = lmdfx.compile(Fusion().eval(), {"camera": "cam", "radar": "radar"})
    with pytest.raises(lmdfx.LMDError, match="do not match"):
        dec(torch.ones(1, 1, 2, 2))


def test_unsupported_ops_are_all_listed_with_module_and_source_line():
    with pytest.raises(lmdfx.UnsupportedOpError) as info:
        lmdfx.compile(Unsupported().eval(), {"camera": "cam", "radar": "radar"})
    message = str(info.value)
    for op in ("cumprod", "logcumsumexp", "erfinv"):
        assert f"'{op}'" in message
    assert message.count("test_core_errors.py:") == 3  # the source line of each
    assert "fallback='taylor'" in message
    assert {u["op"] for u in info.value.nodes} == {"cumprod", "logcumsumexp", "erfinv"}


def test_taylor_fallback_decomposes_the_unsupported_ops_exactly():
    model = Unsupported().double().eval()
    cam, radar = torch.randn(1, 2, 3, 3, dtype=torch.float64), torch.randn(1, 2, 3, 3, dtype=torch.float64)
    res = lmdfx.compile(model, {"camera": "cam", "radar": "radar"}, rules=lmdfx.Rules(fallback="taylor"))(cam, radar)
    torch.testing.assert_close(res.components.sum(0), model(cam, radar), rtol=0, atol=1e-12)


def test_bad_rule_choices_and_overrides():
    with pytest.raises(lmdfx.LMDError, match="activation='linear'.*secant, tangent"):
        lmdfx.Rules(activation="linear")
    model = Fusion().eval()
    with pytest.raises(lmdfx.LMDError, match="'conv'.*affine"):
        lmdfx.compile(model, {"camera": "cam", "radar": "radar"}, rules=lmdfx.Rules(overrides={"conv": "tangent"}))


def test_record_of_unknown_layer_names_it():
    with pytest.raises(lmdfx.LMDError, match=r"\['decoder'\]"):
        lmdfx.compile(Fusion().eval(), {"camera": "cam", "radar": "radar"}, record=["decoder"])


def test_operating_point_of_another_model_is_rejected():
    a = lmdfx.compile(Fusion().eval(), {"camera": "cam", "radar": "radar"})
    b = lmdfx.compile(Fusion().eval(), {"camera": "cam", "radar": "radar"})
    cam, radar = torch.ones(1, 1, 2, 2), torch.ones(1, 2, 2, 2)
    with pytest.raises(lmdfx.LMDError, match="operating_point"):
        b(cam, radar, operating_point=a.operating_point(cam, radar))
