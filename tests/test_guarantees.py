"""The guarantees in docs/guarantees.md and the README's "Guarantees" section, one test per case:
no silent wrong result, the model as it is now, checked operating points, clear errors."""

from __future__ import annotations

import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lmdfx
from lmdfx.passes.trace import user_source
from lmdfx.rules.activations import SecantRule
from lmdfx.rules.linear import AffineRule, LinearRule


class Fusion(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 3, 3, padding=1)
        self.head = nn.Conv2d(3, 1, 1)

    def forward(self, cam, radar):
        return self.head(F.relu(self.conv(torch.cat([cam, radar], 1))))


def inputs(batch=1, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 2, 6, 6, generator=g, dtype=dtype),
            torch.randn(batch, 2, 6, 6, generator=g, dtype=dtype))


def fusion(dtype=torch.float64):
    torch.manual_seed(0)
    return Fusion().to(dtype).eval()


MODALITIES = {"camera": "cam", "radar": "radar"}


# -- no silent wrong result ---------------------------------------------------------------------
class GridFromModalities(nn.Module):
    def forward(self, cam, radar):
        grid = torch.tanh(cam + radar).permute(0, 2, 3, 1)  # [B, H, W, 2]: the grid is mixed
        return F.grid_sample(cam + radar, grid, align_corners=False)


def test_grid_sample_with_a_mixed_grid_is_unsupported_not_linear():
    cam, radar = inputs()
    with pytest.raises(lmdfx.UnsupportedOpError, match="grid_sample.*argument 1") as info:
        lmdfx.compile(GridFromModalities().eval(), MODALITIES)
    assert info.value.nodes[0]["op"] == "grid_sample"
    # torch has no forward-mode derivative of grid_sample: Taylor says so instead of guessing.
    dec = lmdfx.compile(GridFromModalities().eval(), MODALITIES, rules=lmdfx.Rules(fallback="taylor"))
    with pytest.raises(lmdfx.LMDError, match="forward-mode derivative"):
        dec(cam, radar)


class TrainingDropout(nn.Module):
    def forward(self, cam, radar):
        return F.dropout(cam + radar, 0.5)  # training=True by default: random in eval mode too


class Noise(nn.Module):
    def forward(self, cam, radar):
        x = cam + radar
        return x + torch.rand_like(x)


@pytest.mark.parametrize("model", [TrainingDropout(), Noise()], ids=["dropout", "rand_like"])
def test_random_ops_on_a_mixed_path_are_refused_at_compile_time(model):
    with pytest.raises(lmdfx.LMDError, match="(?s)random numbers at eval time.*training=self.training"):
        lmdfx.compile(model.eval(), MODALITIES)


class WrongAffine(AffineRule):
    """A broken rule: drops the layer's bias."""

    def forward(self, constants, args, kwargs):
        return super().forward(constants, args, {**kwargs, "bias": None})


def test_a_wrong_rule_is_caught_by_the_default_check():
    model = fusion()
    dec = lmdfx.compile(model, MODALITIES, rules=lmdfx.Rules(overrides={"head": WrongAffine}))
    with pytest.raises(lmdfx.ExactnessError, match="head.*residual.*cancellation ratio") as info:
        dec(*inputs())
    assert info.value.row.layer == "head" and info.value.row.rule == "affine"
    warn = lmdfx.compile(model, MODALITIES, rules=lmdfx.Rules(overrides={"head": WrongAffine}), check="warn")
    with pytest.warns(UserWarning, match="do not sum"):
        warn(*inputs())
    off = lmdfx.compile(model, MODALITIES, rules=lmdfx.Rules(overrides={"head": WrongAffine}), check="off")
    off(*inputs())  # the user asked for no check


class WrongTranspose(LinearRule):
    """A user's rule subclassing a registered element-moving one, and broken: scales the
    stack. Its node must still be checked (only registered rules skip the check)."""

    def forward(self, constants, args, kwargs):
        return 2 * super().forward(constants, args, kwargs)


class Transposed(nn.Module):
    def forward(self, cam, radar):
        return (cam + radar).transpose(-1, -2)


def test_a_subclass_of_an_element_moving_rule_is_still_checked():
    model = Transposed().eval()
    cam, radar = torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(2, 3, 4, dtype=torch.float64)
    torch.testing.assert_close(lmdfx.compile(model, MODALITIES)(cam, radar).components.sum(0), model(cam, radar))
    dec = lmdfx.compile(model, MODALITIES, rules=lmdfx.Rules(overrides={"transpose": WrongTranspose}))
    with pytest.raises(lmdfx.ExactnessError, match="transpose"):
        dec(cam, radar)


class WrongSecant(SecantRule):
    """A user's subclass of the secant rule, broken: doubles the stack. Its node must be
    compared with the model's value (only registered rules are trusted to close with their
    remainder)."""

    def forward(self, constants, args, kwargs):
        return 2 * super().forward(constants, args, kwargs)


def test_an_element_wise_rule_closing_with_its_remainder_is_trusted_only_when_registered():
    model = fusion()
    dec = lmdfx.compile(model, MODALITIES)
    dec(*inputs())
    relu = next(r for r in dec.report().rows if r.op == "relu")
    assert relu.derived and relu.spread is not None  # built: cancellation measured, no comparison
    torch.testing.assert_close(dec(*inputs()).components.sum(0), model(*inputs()))
    exact = lmdfx.compile(model, MODALITIES, exact_output=True)
    exact(*inputs())
    assert next(r for r in exact.report().rows if r.op == "relu").relative_residual <= 1e-12
    wrong = lmdfx.compile(model, MODALITIES, rules=lmdfx.Rules(overrides={"relu": WrongSecant}))
    with pytest.raises(lmdfx.ExactnessError, match="relu"):
        wrong(*inputs())


class Cancelling(nn.Module):
    """Camera and radar features carry huge opposite offsets that cancel in the fused value."""

    def __init__(self, offset):
        super().__init__()
        self.offset = offset
        self.conv = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, cam, radar):
        return self.conv((cam + self.offset) + (radar - self.offset))


def test_cancelling_components_raise_with_the_ratio_not_a_tiny_relative_residual():
    torch.manual_seed(0)
    model = Cancelling(1e5).eval()
    cam, radar = inputs(dtype=torch.float32)
    dec = lmdfx.compile(model, MODALITIES, exact_output=True)
    with pytest.raises(lmdfx.ExactnessError, match=r"cancellation ratio Σ\|components\|/\|value\| [0-9.]+e\+0?4"):
        dec(cam, radar)
    # The default (a summed trunk) cannot measure the residual: it refuses on the cancellation.
    with pytest.raises(lmdfx.ExactnessError, match=r"cancel.*[0-9.]+e\+0?4× the value.*exact_output=True"):
        lmdfx.compile(model, MODALITIES)(cam, radar)
    warn = lmdfx.compile(model, MODALITIES, check="warn", exact_output=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn(cam, radar)
    assert any("Components cancel" in str(w.message) for w in caught)
    assert dec.report().max_relative_residual > 1e-3  # relative to the value, not to Σ|components|


def test_nonfinite_inputs_are_reported_by_argument_before_any_work():
    cam, radar = inputs()
    radar[0, 0, 0, 0] = float("nan")
    dec = lmdfx.compile(fusion(), MODALITIES)
    with pytest.raises(lmdfx.LMDError, match="'radar'.*NaN or Inf"):
        dec(cam, radar)


class MakesInf(nn.Module):
    def forward(self, cam, radar):
        x = cam + radar
        return torch.exp(x * 1000.0)


def test_a_nonfinite_value_inside_the_model_names_the_first_node():
    dec = lmdfx.compile(MakesInf().eval(), MODALITIES)
    with pytest.raises(lmdfx.ExactnessError, match="NaN or Inf at node 'exp'"):
        dec(*inputs())


# -- the model as it is now -------------------------------------------------------------------------
def test_rebound_parameters_and_buffers_are_followed():
    model = fusion()
    dec = lmdfx.compile(model, MODALITIES)
    model.conv.weight = nn.Parameter(torch.randn_like(model.conv.weight))
    model.head.bias = nn.Parameter(torch.randn_like(model.head.bias))
    cam, radar = inputs()
    res = dec(cam, radar)
    torch.testing.assert_close(res.output, model(cam, radar))  # to rounding: the trunk is summed
    with torch.no_grad():
        model.conv.weight.mul_(2.0)  # in-place edits are followed as well
    torch.testing.assert_close(dec(cam, radar).output, model(cam, radar))


def test_a_replaced_submodule_asks_to_compile_again():
    model = fusion()
    dec = lmdfx.compile(model, MODALITIES)
    model.conv = nn.Conv2d(4, 3, 3, padding=2, dilation=2).double()
    with pytest.raises(lmdfx.LMDError, match="model.conv was replaced.*compile"):
        dec(*inputs())


def test_dtype_change_after_compile_works():
    model = fusion(torch.float32)
    dec = lmdfx.compile(model, MODALITIES)
    model.double()
    cam, radar = inputs(dtype=torch.float64)
    res = dec(cam, radar)
    torch.testing.assert_close(res.output, model(cam, radar))  # to rounding: the trunk is summed
    torch.testing.assert_close(res.components.sum(0), res.output, rtol=0, atol=1e-12)


# -- operating points -----------------------------------------------------------------------------
def test_operating_points_are_checked_against_the_call():
    dec = lmdfx.compile(fusion(), MODALITIES)
    op = dec.operating_point(*inputs(batch=1))
    with pytest.raises(lmdfx.LMDError, match=r"cam: \(\(1, 2, 6, 6\).*\(\(2, 2, 6, 6\)"):
        dec(*inputs(batch=2), operating_point=op)
    with pytest.raises(lmdfx.LMDError, match="float32"):
        dec(*inputs(dtype=torch.float32), operating_point=op)
    moved = op.to(torch.float32)
    dec_32 = lmdfx.compile(fusion(torch.float32), MODALITIES)
    with pytest.raises(lmdfx.LMDError, match="this decomposer"):
        dec_32(*inputs(dtype=torch.float32), operating_point=moved)


class Deep(nn.Module):
    """Twelve mixed ReLU convolutions: every one keeps a slope and a remainder as large as its
    activation in the operating point."""

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(4, 4, 3, padding=1) for _ in range(12))

    def forward(self, cam, radar):
        x = torch.cat([cam, radar], 1)
        for conv in self.convs:
            x = F.relu(conv(x))
        return x


@pytest.mark.parametrize("exact_output", [False, True])
def test_without_keeping_the_operating_point_the_constants_are_freed_and_results_unchanged(exact_output):
    from benchmarks.zoo import peak_bytes

    torch.manual_seed(0)
    model = Deep().double().eval()
    cam, radar = torch.randn(1, 2, 32, 32, dtype=torch.float64), torch.randn(1, 2, 32, 32, dtype=torch.float64)
    keep = lmdfx.compile(model, MODALITIES, exact_output=exact_output)
    lean = lmdfx.compile(model, MODALITIES, exact_output=exact_output, keep_operating_point=False)
    with torch.no_grad():
        kept, dropped = keep(cam, radar), lean(cam, radar)
        assert dropped.operating_point is None and len(kept.operating_point) == 12
        assert torch.equal(dropped.output, kept.output)
        for name in kept.names:
            assert torch.equal(dropped[name], kept[name])
        # the operating point is still there on request, and a frozen call uses it
        op = lean.operating_point(cam, radar)
        moved = torch.randn_like(radar)
        assert torch.equal(lean(cam, moved, operating_point=op)["camera"],
                           keep(cam, moved, operating_point=kept.operating_point)["camera"])
        # 12 layers' slopes and remainders (24 activations) no longer live to the end of the call
        activation = 4 * 32 * 32 * 8
        saved = peak_bytes(lambda: keep(cam, radar), cam.device) - peak_bytes(lambda: lean(cam, radar), cam.device)
        assert saved >= 20 * activation


def test_two_modalities_on_one_parameter_is_an_error():
    with pytest.raises(lmdfx.LMDError, match="share a forward parameter"):
        lmdfx.compile(fusion(), {"a": "cam", "b": "cam"})


def test_empty_batches_decompose():
    dec = lmdfx.compile(fusion(), MODALITIES)
    res = dec(*inputs(batch=0))
    assert res.components.shape == (3, 0, 1, 6, 6)


# -- overrides ----------------------------------------------------------------------------------------
def test_override_keys_that_match_nothing_are_errors_with_the_closest_names():
    with pytest.raises(lmdfx.LMDError, match="'conb'.*closest names: conv"):
        lmdfx.compile(fusion(), MODALITIES, rules=lmdfx.Rules(overrides={"conb": "taylor"}))
    with pytest.raises(lmdfx.LMDError, match="module type GELU"):
        lmdfx.compile(fusion(), MODALITIES, rules=lmdfx.Rules(overrides={nn.GELU: "tangent"}))


def test_an_override_rule_that_cannot_decompose_the_node_is_an_error():
    with pytest.raises(lmdfx.LMDError, match="cannot decompose node 'relu'"):
        lmdfx.compile(fusion(), MODALITIES, rules=lmdfx.Rules(overrides={"relu": AffineRule}))


# -- names and tracing -------------------------------------------------------------------------------
class Casts(nn.Module):
    def forward(self, cam, radar):
        x = (cam + radar).to(torch.float64)
        return x.double() * 2


class TupleConcat(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(6, 6)

    def forward(self, cam, radar):
        x = cam + radar
        outs = (x * 2, x * 3, self.proj(x))
        outs = (torch.tanh(x),) + outs[1:]  # timm / transformers style
        return outs[0] + outs[2]


class MinGPTHeads(nn.Module):
    def forward(self, cam, radar):
        b, c, h, w = cam.shape
        y = (cam + radar).view(b, c, h * w).transpose(1, 2).contiguous().view(b, h * w * c)
        return y


class NoneOutput(nn.Module):
    def forward(self, cam, radar):
        return helper(cam + radar, cam.long())[0]


@torch.fx.wrap
def helper(x, ids):
    return torch.sin(x) + ids.float(), None


@pytest.mark.parametrize("model", [Casts(), TupleConcat(), MinGPTHeads()], ids=["to-double", "tuple-concat", "contiguous"])
def test_names_and_container_arithmetic_decompose_exactly(model):
    cam, radar = inputs()
    model = model.double().eval()
    res = lmdfx.compile(model, MODALITIES)(cam, radar)
    torch.testing.assert_close(res.components.sum(0), model(cam, radar), rtol=0, atol=1e-12)


def test_taylor_fallback_takes_none_outputs_and_integer_inputs():
    cam, radar = inputs()
    dec = lmdfx.compile(NoneOutput().eval(), MODALITIES, rules=lmdfx.Rules(fallback="taylor"), exact_output=True)
    res = dec(cam, radar)
    torch.testing.assert_close(res.components.sum(0), NoneOutput()(cam, radar), rtol=0, atol=1e-12)
    assert dec.report().max_relative_residual < 1e-12


def test_source_lines_survive_a_checkout_named_lmdfx():
    trace = ('File "/home/me/lmdfx/tests/model.py", line 7, in forward\n    return self.conv(x)\n'
             f'File "{sys.modules["lmdfx.passes.trace"].__file__}", line 1, in trace\n    x\n')
    assert user_source(trace) == "/home/me/lmdfx/tests/model.py:7: return self.conv(x)"


class SqueezeExcite(nn.Module):
    """timm / torchvision style gating: x · hardsigmoid(fc(mean(x))), the gate on either side."""

    def __init__(self, gate_first: bool):
        super().__init__()
        self.gate_first = gate_first
        self.fc = nn.Conv2d(4, 4, 1)

    def forward(self, cam, radar):
        x = torch.cat([cam, radar], 1)
        gate = F.hardsigmoid(self.fc(x.mean((2, 3), keepdim=True)))
        return gate * x if self.gate_first else x * gate


@pytest.mark.parametrize("gate_first", [True, False])
def test_the_default_product_freezes_the_gate_on_either_side(gate_first):
    torch.manual_seed(0)
    model = SqueezeExcite(gate_first).double().eval()
    cam, radar = inputs()
    dec = lmdfx.compile(model, MODALITIES)
    assert [r.rule for r in dec.report().rows if r.op == "mul"] == ["gate"] and not dec.report().non_separating
    res = dec(cam, radar)
    torch.testing.assert_close(res.components.sum(0), model(cam, radar))
    moved = dec(cam, inputs(seed=1)[1], operating_point=res.operating_point)
    torch.testing.assert_close(moved["camera"], res["camera"], rtol=0, atol=0)
    # the gate is frozen, so each modality keeps its own features: components are not degenerate
    assert res["camera"].abs().max() > 0.01 * res["bias"].abs().max()


def test_rules_that_do_not_separate_are_named_at_compile_time():
    class Bilinear(nn.Module):
        def forward(self, cam, radar):
            return (cam * radar).sum((2, 3))

    with pytest.warns(UserWarning, match="will not separate"):
        dec = lmdfx.compile(Bilinear().eval(), MODALITIES, rules=lmdfx.Rules(product="shapley"))
    assert [r.node for r in dec.report().non_separating] == ["mul"]
    assert "separation not guaranteed at" in str(dec.report())
