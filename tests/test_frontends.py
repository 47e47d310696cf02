"""The capture frontends: fx tracing, torch.export, a pre-traced GraphModule and an
ExportedProgram all feed the same passes and give the same exact decomposition."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import lmdfx

MODALITIES = {"camera": "cam", "radar": "radar"}


class Normalised(nn.Module):
    """Driving-model style: the camera input is normalised in place per channel."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 3, 3, padding=1)
        self.norm = nn.BatchNorm2d(3)
        self.head = nn.Linear(3, 2)

    def forward(self, cam, radar):
        cam = cam.clone()
        cam[:, 0] = (cam[:, 0] - 0.5) / 0.25
        x = F.relu(self.norm(self.conv(torch.cat([cam, radar], 1))))
        return {"logits": self.head(x.mean((2, 3))), "map": x}


class Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 3, 3, padding=1)
        self.ln = nn.LayerNorm(3)

    def forward(self, cam, radar):
        x = F.gelu(self.conv(torch.cat([cam, radar], 1)))
        return self.ln(x.permute(0, 2, 3, 1))


def model(cls):
    torch.manual_seed(0)
    m = cls().double().eval()
    for bn in [m for m in m.modules() if isinstance(m, nn.BatchNorm2d)]:
        with torch.no_grad():
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
    return m


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 2, 6, 6, generator=g, dtype=torch.float64), torch.randn(2, 2, 6, 6, generator=g,
                                                                                  dtype=torch.float64)


def assert_exact(res, expected):
    for stack, value in zip(torch.utils._pytree.tree_leaves(res.components), torch.utils._pytree.tree_leaves(expected)):
        torch.testing.assert_close(stack.sum(0), value, rtol=0, atol=1e-12)


def test_item_assignment_fails_on_fx_with_a_pointer_to_export():
    with pytest.raises(lmdfx.TraceError, match="frontend='export'"):
        lmdfx.compile(model(Normalised), MODALITIES, frontend="fx")


@pytest.mark.parametrize("frontend", ["export", "auto"])
def test_export_frontend_decomposes_in_place_writes_exactly_and_separates(frontend):
    m = model(Normalised)
    cam, radar = inputs()
    dec = lmdfx.compile(m, MODALITIES, frontend=frontend, example_inputs=(cam, radar), record=["conv"])
    assert dec.report().frontend == "export"
    res = dec(cam, radar)
    expected = m(cam, radar)
    torch.testing.assert_close(res.output["logits"], expected["logits"])
    assert_exact(res, expected)
    assert res.layers["conv"].shape == (3, 2, 3, 6, 6)
    assert {row.layer for row in dec.report().rows} >= {"conv", "norm", "head"}
    moved = dec(cam, inputs(1)[1], operating_point=res.operating_point)
    torch.testing.assert_close(moved["camera"]["logits"], res["camera"]["logits"], rtol=0, atol=1e-12)


def test_export_and_fx_agree():
    m = model(Plain)
    cam, radar = inputs()
    by_fx = lmdfx.compile(m, MODALITIES)(cam, radar)
    by_export = lmdfx.compile(m, MODALITIES, frontend="export", example_inputs={"cam": cam, "radar": radar})(cam, radar)
    torch.testing.assert_close(by_export.components, by_fx.components, rtol=0, atol=1e-12)


def test_export_follows_the_users_parameters_and_refuses_other_shapes():
    m = model(Plain)
    cam, radar = inputs()
    dec = lmdfx.compile(m, MODALITIES, frontend="export", example_inputs=(cam, radar))
    with torch.no_grad():
        m.conv.weight.mul_(3.0)
    torch.testing.assert_close(dec(cam, radar).output, m(cam, radar))
    with pytest.raises(lmdfx.LMDError, match="specialised"):
        dec(cam[:1], radar[:1])


def test_pretraced_graph_module_and_exported_program_are_accepted():
    m = model(Plain)
    cam, radar = inputs()
    expected = m(cam, radar)
    traced = fx.symbolic_trace(m)
    dec = lmdfx.compile(traced, MODALITIES)
    assert dec.report().frontend == "graph module"
    assert_exact(dec(cam, radar), expected)
    program = torch.export.export(m, (cam, radar))
    dec = lmdfx.compile(program, MODALITIES)
    assert dec.report().frontend == "export"
    assert_exact(dec(cam, radar), expected)


def test_export_needs_example_inputs():
    with pytest.raises(lmdfx.LMDError, match="example_inputs"):
        lmdfx.compile(model(Plain), MODALITIES, frontend="export")


class TokenFusion(nn.Module):
    """Text as token ids: its embedding output is the text modality's value; a padding mask
    made from the ids is a constant of the mixed computation, frozen with the operating point."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.proj = nn.Conv2d(2, 4, 1)

    def forward(self, ids, image):
        text = self.embed(ids)  # [B, T, 4]
        pixels = self.proj(image).flatten(2).transpose(1, 2)  # [B, P, 4]
        scores = torch.softmax(pixels @ text.transpose(1, 2), -1)  # [B, P, T]
        scores = torch.where((ids == 0).unsqueeze(1), torch.zeros_like(scores), scores)
        return scores @ text


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_token_ids_are_decomposed_from_their_embedding(frontend):
    torch.manual_seed(0)
    m = TokenFusion().double().eval()
    ids = torch.tensor([[3, 1, 0, 5]])
    image = torch.randn(1, 2, 3, 3, dtype=torch.float64)
    dec = lmdfx.compile(m, {"text": "ids", "image": "image"}, frontend=frontend, example_inputs=(ids, image),
                        rules=lmdfx.Rules(product="freeze"))
    res = dec(ids, image)
    torch.testing.assert_close(res.components.sum(0), m(ids, image), rtol=0, atol=1e-12)
    assert res["text"].abs().max() > 0 and res["image"].abs().max() == 0  # P frozen: text carries the value
    other = dec(torch.tensor([[4, 0, 2, 2]]), image, operating_point=res.operating_point)
    torch.testing.assert_close(other["image"], res["image"], rtol=0, atol=0)


@torch.fx.wrap
def scaled_tanh(x, scale):
    """A library helper its author wrapped for fx (its body is plain tensor code)."""
    return torch.tanh(x) * scale if scale is not None else torch.tanh(x)


@torch.fx.wrap
def untraceable(x):
    if x.sum() > 0:  # data-dependent: fx cannot trace the body
        return x * 2
    return x


class Wrapped(nn.Module):
    def forward(self, cam, radar):
        return scaled_tanh(cam + radar, 0.5) + untraceable(cam)


def test_fx_wrapped_functions_are_traced_into_where_their_bodies_trace():
    cam, radar = inputs()
    dec = lmdfx.compile(Wrapped().eval(), MODALITIES)
    ops = {row.op for row in dec.report().rows}
    assert "tanh" in ops and "scaled_tanh" not in ops  # traced into
    assert "untraceable" in ops  # kept as a call: pure camera, so it needs no rule
    torch.testing.assert_close(dec(cam, radar).components.sum(0), Wrapped()(cam, radar))


def helper_leaf(x):
    return torch.sin(x) * 2


class UsesHelper(nn.Module):
    def forward(self, cam, radar):
        return helper_leaf(cam + radar)


def test_free_functions_can_be_leaves_with_taylor():
    cam, radar = inputs()
    dec = lmdfx.compile(UsesHelper().eval(), MODALITIES, leaf_modules=[helper_leaf],
                        rules=lmdfx.Rules(overrides={"helper_leaf": "taylor"}))
    assert [row.rule for row in dec.report().rows if row.op == "helper_leaf"] == ["taylor"]
    torch.testing.assert_close(dec(cam, radar).components.sum(0), UsesHelper()(cam, radar))


class ExportOnly(nn.Module):
    def forward(self, cam, radar):
        return helper_leaf(cam + radar)


def test_auto_falls_back_to_export_for_ops_no_rule_knows():
    cam, radar = inputs()
    with pytest.raises(lmdfx.UnsupportedOpError):
        lmdfx.compile(ExportOnly().eval(), MODALITIES, leaf_modules=[helper_leaf])
    dec = lmdfx.compile(ExportOnly().eval(), MODALITIES, leaf_modules=[helper_leaf], example_inputs=(cam, radar))
    assert dec.report().frontend == "export"
    torch.testing.assert_close(dec(cam, radar).components.sum(0), ExportOnly()(cam, radar))


class ContiguousView(nn.Module):
    def forward(self, cam, radar):
        x = torch.cat([cam, radar], 1)
        return x.transpose(1, 2).contiguous().view(x.shape[0], -1)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_transpose_contiguous_view(frontend):
    cam, radar = inputs()
    dec = lmdfx.compile(ContiguousView().eval(), MODALITIES, frontend=frontend, example_inputs=(cam, radar))
    torch.testing.assert_close(dec(cam, radar).components.sum(0), ContiguousView()(cam, radar))
