"""The optimisations leave results unchanged: structural zeros (``optimize``) and the summed
trunk (``exact_output=False``) against the unoptimised decomposition, in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import lmdfx
from lmdfx.bev.models.simplebev import SimpleBEV, SimpleBEVConfig
from lmdfx.rules.linear import sliced_affine
from nets import make_program_net, program_inputs

# Structural zeros only reorder sums inside one layer: 1e-12 of the component scale.
# The summed trunk moves the operating point by rounding, and a secant slope O/A amplifies a
# rounding change of A by Σ|D_k| / |A| where the components cancel, so it gets 1e-9.
EXACT_TOL = 1e-12
SUMMED_TOL = 1e-9
# Inputs are O(1): a layer whose components are themselves rounding noise (a mean over an
# InstanceNorm output, mathematically 0) differs by noise; below this floor that is all it is.
NOISE_FLOOR = 1e-13


def close(a: torch.Tensor, b: torch.Tensor, scale: float, tol: float, what: str) -> None:
    error = (a - b).abs().max().item()
    assert error <= tol * scale + NOISE_FLOOR, f"{what}: differs by {error:.3e} (scale {scale:.3e})"


def compare(reference, result, tol: float) -> None:
    """Every component of ``result`` equals ``reference``'s; the components sum to the output."""
    ref_leaves = torch.utils._pytree.tree_leaves(reference.components)
    leaves = torch.utils._pytree.tree_leaves(result.components)
    outputs = torch.utils._pytree.tree_leaves(result.output)
    assert len(ref_leaves) == len(leaves) == len(outputs)
    for i, (ref, got, out) in enumerate(zip(ref_leaves, leaves, outputs)):
        scale = ref.abs().sum(0).max().item()
        close(got, ref, scale, tol, f"component stack {i}")
        close(got.sum(0), out, scale, EXACT_TOL, f"equality at output {i}")
    for name, stack in reference.layers.items():
        scale = stack.abs().sum(0).max().item()
        close(result.layers[name], stack, scale, tol, f"layer {name}")


def uses_sliced_affine(dec) -> bool:
    module = getattr(dec.module, "exact", dec.module)
    return any(n.target is sliced_affine for n in module.graph.nodes)


@pytest.fixture(scope="module")
def simplebev64():
    torch.manual_seed(0)
    model = SimpleBEV(SimpleBEVConfig.tiny()).double().eval()
    inputs = {k: v.double() for k, v in model.example_inputs(2, torch.Generator().manual_seed(1)).items()}
    return model, inputs


def test_simplebev_structural_zeros_unchanged(simplebev64):
    model, inputs = simplebev64
    reference = lmdfx.compile(model, model.modality_args, optimize=False, exact_output=True, record="all")(**inputs)
    dec = lmdfx.compile(model, model.modality_args, exact_output=True, record="all")
    assert uses_sliced_affine(dec), "the fusion conv over cat(camera, radar) should be sliced"
    result = dec(**inputs)
    expected = model(**inputs)
    for key in expected:
        assert torch.equal(result.output[key], expected[key])
    compare(reference, result, EXACT_TOL)
    assert dec.report().max_relative_residual <= 1e-12


def test_simplebev_summed_trunk_unchanged(simplebev64):
    model, inputs = simplebev64
    reference = lmdfx.compile(model, model.modality_args, optimize=False, exact_output=True, record="all")(**inputs)
    dec = lmdfx.compile(model, model.modality_args, exact_output=False, record="all")
    result = dec(**inputs)
    compare(reference, result, SUMMED_TOL)
    expected = model(**inputs)
    for key in expected:
        scale = reference.components[key].abs().sum(0).max().item()
        close(result.output[key], expected[key], scale, EXACT_TOL, f"output {key}")
    # Rules that read an operating point still check their own equality.
    assert dec.report().max_relative_residual <= 1e-12


def test_summed_trunk_frozen_point_uses_exact_trunk(simplebev64):
    model, inputs = simplebev64
    exact = lmdfx.compile(model, model.modality_args, exact_output=True)
    fast = lmdfx.compile(model, model.modality_args, exact_output=False)
    other = dict(inputs, radar_bev=inputs["radar_bev"].flip(0))
    op_exact = exact.operating_point(**inputs)
    op_fast = fast.operating_point(**inputs)
    frozen_exact = exact(**other, operating_point=op_exact)
    frozen_fast = fast(**other, operating_point=op_fast)
    expected = model(**other)
    for key in expected:
        # A frozen call's output is the model's on the new inputs, bitwise, in both modes.
        assert torch.equal(frozen_fast.output[key], expected[key])
        scale = frozen_exact.components[key].abs().sum(0).max().item()
        close(frozen_fast.components[key], frozen_exact.components[key], scale, SUMMED_TOL, key)


class CatFusion(nn.Module):
    """Fusion layers over concatenations: a conv with bias over (m0, context, m1), a linear
    layer over the last axis, a concatenation along a spatial axis (not sliceable: falls back),
    a grouped conv (falls back), a modality used twice in one concatenation, a linear layer
    over concatenated tokens and a conv over a batch concatenation (one pass per part)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2 + 1 + 3, 4, 3, padding=1, bias=True)
        self.grouped = nn.Conv2d(2 + 2, 4, 1, groups=2, bias=False)
        self.linear = nn.Linear(8 + 8 + 8, 4)
        self.spatial = nn.Conv2d(2, 4, 3, padding=1, bias=False)
        self.twice = nn.Conv2d(2 + 3 + 2, 4, 1, bias=False)
        self.tokens = nn.Linear(2, 4)
        self.batch = nn.Conv2d(2, 4, 3, padding=1, bias=True)

    def forward(self, x0, x1, ctx):
        a = torch.relu(self.conv(torch.cat([x0, ctx, x1], dim=1)))
        b = self.grouped(torch.cat([x0, x1[:, :2]], dim=1))
        c = self.linear(torch.cat([x0[:, 0], x1[:, 0], x1[:, 1]], dim=-1))
        d = self.spatial(torch.cat([x0, x1[:, 1:]], dim=2))
        e = self.twice(torch.cat([x0, x1, x0], dim=1))
        # Token and batch concatenations: the layer commutes with them (one pass per part).
        f = self.tokens(torch.cat([x0.flatten(2).transpose(1, 2), x1[:, :2].flatten(2).transpose(1, 2)], dim=1))
        g = self.batch(torch.cat([x0, x1[:, 1:]], dim=0))
        g = g.sum((2, 3)).view(2, -1, 4).sum(0)
        return a.sum((2, 3)) + b.sum((2, 3)) + c.sum(1) + d.sum((2, 3)) + e.mean((2, 3)) + f.mean(1) + g


@pytest.mark.parametrize("exact_output", [True, False])
def test_cat_fusion_variants(exact_output):
    torch.manual_seed(3)
    net = CatFusion().double().eval()
    g = torch.Generator().manual_seed(4)
    inputs = (torch.randn(2, 2, 8, 8, generator=g, dtype=torch.float64),
              torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64),
              torch.randn(2, 1, 8, 8, generator=g, dtype=torch.float64))
    modalities = {"a": "x0", "b": "x1"}
    reference = lmdfx.compile(net, modalities, optimize=False, exact_output=True)(*inputs)
    dec = lmdfx.compile(net, modalities, exact_output=exact_output)
    module = getattr(dec.module, "exact", dec.module)
    assert sum(n.target is sliced_affine for n in module.graph.nodes) == 7
    result = dec(*inputs)
    compare(reference, result, EXACT_TOL if exact_output else SUMMED_TOL)
    if exact_output:
        assert torch.equal(result.output, net(*inputs))


OPS = ["conv", "bn", "in", "gn", "ln", "act", "maxpool_up", "avgpool_up", "residual", "cat_skip", "gate",
       "scale", "pure_add", "channel_max", "mean_expand"]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(in_channels=st.lists(st.integers(1, 3), min_size=2, max_size=4),
       fusion=st.sampled_from(["cat", "sum"]),
       program=st.lists(st.tuples(st.sampled_from(OPS), st.integers(0, 20)), min_size=1, max_size=6),
       encoders=st.booleans(), seed=st.integers(0, 2**16),
       rules=st.builds(lmdfx.Rules, activation=st.sampled_from(["secant", "tangent"]),
                       bias_split=st.sampled_from(["none", "sum", "ratio"]),
                       norm=st.sampled_from(["ratio", "identity", "uniform"])))
def test_random_fusion_nets_unchanged(in_channels, fusion, program, encoders, seed, rules):
    net = make_program_net(in_channels, fusion, program, encoders, seed)
    inputs = program_inputs(net, seed)
    modalities = net.modality_args()
    reference = lmdfx.compile(net, modalities, rules=rules, optimize=False, exact_output=True, record="all")(*inputs)
    optimised = lmdfx.compile(net, modalities, rules=rules, exact_output=True, record="all")
    if fusion == "cat":
        assert uses_sliced_affine(optimised)
    result = optimised(*inputs)
    assert torch.equal(result.output, net(*inputs))
    compare(reference, result, EXACT_TOL)
    summed = lmdfx.compile(net, modalities, rules=rules, exact_output=False, record="all")(*inputs)
    compare(reference, summed, SUMMED_TOL)


class Checked(nn.Module):
    """conv → BatchNorm → ReLU after the fusion, with the shape assertion timm's BatchNormAct2d
    makes on the conv's output (x.ndim)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, cam, radar):
        x = self.conv(torch.cat([cam, radar], 1))
        torch._assert(x.ndim == 4, "expected a 4-d feature map")
        return self.head(F.relu(self.bn(x) * x.shape[1] / x.size(1)))


@pytest.mark.parametrize("record", [None, "conv"])
def test_summed_values_nothing_forms_are_neither_summed_nor_checked_unless_recorded(record):
    from lmdfx.passes.rewrite import component_sum

    torch.manual_seed(0)
    model = Checked().double().eval()
    model.bn.running_mean.normal_()
    model.bn.running_var.uniform_(0.5, 2.0)
    cam, radar = torch.randn(1, 2, 8, 8, dtype=torch.float64), torch.randn(1, 2, 8, 8, dtype=torch.float64)
    dec = lmdfx.compile(model, {"camera": "cam", "radar": "radar"}, record=record)
    res = dec(cam, radar)
    exact = lmdfx.compile(model, {"camera": "cam", "radar": "radar"}, exact_output=True, record=record)(cam, radar)
    torch.testing.assert_close(res.components, exact.components, rtol=0, atol=1e-12)
    torch.testing.assert_close(res.output, model(cam, radar), rtol=0, atol=1e-12)
    # x.ndim, x.shape and x.size() are read off the conv's stack: its value is never summed
    summed = [n.args[0].meta.get("lmd_branch_of") for n in dec.module.summed.graph.nodes if n.target is component_sum]
    assert "conv2d" not in summed
    conv = next(r for r in dec.report().rows if r.layer == "conv")
    # no value formed there, so no check of its own unless its components are shown
    assert (conv.spread is not None) == (record == "conv")
    if record:
        torch.testing.assert_close(res.layers["conv"], exact.layers["conv"], rtol=0, atol=1e-12)
