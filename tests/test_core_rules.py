"""Rules against hand computations, and op spellings that must land on one canonical op."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lmdfx
from lmdfx.rules.activations import bias_shares

D = torch.float64


class Pair(nn.Module):
    """out = f(a + b), the smallest mixed computation, for a given function f."""

    def __init__(self, f):
        super().__init__()
        self.f = f

    def forward(self, a, b):
        return self.f(a + b)


def decompose(f, a, b, **rules):
    return lmdfx.compile(Pair(f).eval(), {"a": "a", "b": "b"}, rules=lmdfx.Rules(**rules))(a, b)


class Spellings(nn.Module):
    def __init__(self):
        super().__init__()
        self.relu_inplace = nn.ReLU(inplace=True)
        self.relu = nn.ReLU()

    def forward(self, a, b):
        x = a + b
        outs = [self.relu_inplace(x * 1.0), F.relu(x), torch.relu(x), x.relu(), (x * 1.0).relu_(),
                F.relu(x * 1.0, inplace=True), self.relu(x)]
        y = x * 1.0
        y += b
        return torch.add(outs[0], outs[1]) + outs[2].add(outs[3]) + sum(outs[4:]) + y


def test_op_spellings_are_one_canonical_op_and_in_place_forms_become_out_of_place():
    dec = lmdfx.compile(Spellings().eval(), {"a": "a", "b": "b"})
    ops = {row.node: row.op for row in dec.report().rows}
    relus = [n for n, op in ops.items() if "relu" in n]
    assert len(relus) == 7 and all(ops[n] == "relu" for n in relus)
    assert not any(op.endswith("_") for op in ops.values())
    adds = [op for n, op in ops.items() if n.startswith(("add", "iadd"))]
    assert adds and set(adds) == {"add"}
    a, b = torch.randn(2, 3, dtype=D), torch.randn(2, 3, dtype=D)
    res = dec(a, b)
    torch.testing.assert_close(res.output, Spellings()(a, b))
    torch.testing.assert_close(res.components.sum(0), res.output, rtol=0, atol=1e-12)


@pytest.mark.parametrize("activation", ["secant", "tangent"])
def test_activation_slopes_by_hand(activation):
    a = torch.tensor([1.0, -2.0, 0.5], dtype=D)
    b = torch.tensor([0.5, 1.0, -1.5], dtype=D)
    res = decompose(torch.tanh, a, b, activation=activation)
    total = a + b
    if activation == "secant":
        slope = torch.tanh(total) / total
        remainder = torch.zeros(3, dtype=D)
    else:
        slope = 1 - torch.tanh(total) ** 2
        remainder = torch.tanh(total) - slope * total
    torch.testing.assert_close(res.components[0], slope * a)
    torch.testing.assert_close(res.components[1], slope * b)
    torch.testing.assert_close(res.components[2], remainder, atol=1e-15, rtol=0)


def test_secant_of_a_function_off_the_origin_starts_at_f0():
    a = torch.tensor([1.0, -2.0, 3.0], dtype=D)
    b = torch.tensor([0.5, 1.0, -2.5], dtype=D)
    res = decompose(torch.sigmoid, a, b)
    slope = (torch.sigmoid(a + b) - 0.5) / (a + b)
    torch.testing.assert_close(res.components[0], slope * a)
    torch.testing.assert_close(res.components[1], slope * b)
    torch.testing.assert_close(res.components[2], torch.full((3,), 0.5, dtype=D))
    assert (slope.abs() <= 0.25).all()  # bounded by the sigmoid's largest slope


def test_secant_guard_sends_the_output_to_bias_where_the_input_is_tiny():
    a = torch.tensor([1e-9, 1.0], dtype=D)
    b = torch.tensor([-1e-9 + 1e-12, 1.0], dtype=D)
    res = decompose(torch.sigmoid, a, b, eps=1e-6)
    assert res.components[0, 0] == 0 and res.components[1, 0] == 0
    torch.testing.assert_close(res.components[2, 0], torch.sigmoid(a + b)[0])


def _split_by_hand(components: list[float], bias: float, mode: str) -> list[float]:
    """Bias splitting (paper appendix C) for one element, written out directly."""
    signs = [torch.sign(torch.tensor(c)).item() for c in components]
    s_b = torch.sign(torch.tensor(bias)).item()
    m = len(components)
    moved = [0.0] * m
    if mode == "sum" and s_b != 0:
        agree = [s == s_b for s in signs]
        oppose = [s == -s_b for s in signs]
        if sum(agree) == 1 and sum(oppose) == m - 1:
            moved = [bias if g else 0.0 for g in agree]
    if mode == "ratio" and s_b != 0:
        total = sum(abs(c) for c in components)
        if all(s == s_b for s in signs):
            moved = [bias * abs(c) / total for c in components]
        elif all(s == -s_b for s in signs):
            moved = [bias * (total - abs(c)) / ((m - 1) * total) if m > 1 else bias for c in components]
    return [c + d for c, d in zip(components, moved)] + [bias - sum(moved)]


@pytest.mark.parametrize("mode", ["sum", "ratio"])
def test_bias_split_is_per_element(mode):
    values = [-2.0, -0.5, 0.0, 0.7, 3.0]
    cases = [c for c in itertools.product(values, repeat=4)]
    stack = torch.tensor(cases, dtype=D).T  # [4 components (3 modalities + bias), N elements]
    split = stack + bias_shares(stack, mode) * stack[-1]
    for n, case in enumerate(cases):
        expected = _split_by_hand(list(case[:3]), case[3], mode)
        torch.testing.assert_close(split[:, n], torch.tensor(expected, dtype=D), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(split.sum(0), stack.sum(0), rtol=0, atol=1e-12)


def test_bias_split_in_a_model_moves_bias_before_the_activation():
    # relu(a + b + 1): bias 1 > 0, a > 0, b < 0 -> under "sum" the bias joins a.
    class WithBias(nn.Module):
        def forward(self, a, b):
            return torch.relu(a + b + 1.0)

    a, b = torch.tensor([2.0], dtype=D), torch.tensor([-0.5], dtype=D)
    res = lmdfx.compile(WithBias().eval(), {"a": "a", "b": "b"}, rules=lmdfx.Rules(bias_split="sum"))(a, b)
    torch.testing.assert_close(res.components[:, 0], torch.tensor([3.0, -0.5, 0.0], dtype=D))


@pytest.mark.parametrize("batchnorm", ["identity", "uniform"])
def test_batchnorm_rules_by_hand(batchnorm):
    bn = nn.BatchNorm1d(3).double().eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
        bn.running_var.copy_(torch.tensor([4.0, 1.0, 0.25]))
        bn.weight.copy_(torch.tensor([2.0, 1.0, -1.0]))
        bn.bias.copy_(torch.tensor([0.1, 0.2, 0.3]))
    a, b = torch.randn(2, 3, dtype=D), torch.randn(2, 3, dtype=D)
    res = decompose(bn, a, b, batchnorm=batchnorm)
    s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    t = bn.bias - s * bn.running_mean
    if batchnorm == "identity":
        expected = [s * a, s * b, t.expand(2, 3)]
    else:
        expected = [s * a + t / 3, s * b + t / 3, t.expand(2, 3) / 3]
    for got, want in zip(res.components, expected):
        torch.testing.assert_close(got, want.detach())


@pytest.mark.parametrize("norm", ["ratio", "identity", "uniform"])
def test_instance_norm_rules_by_hand(norm):
    a, b = torch.randn(1, 2, 4, 4, dtype=D), torch.randn(1, 2, 4, 4, dtype=D)
    res = decompose(nn.InstanceNorm2d(2), a, b, norm=norm)
    total = a + b
    mu = total.mean((2, 3), keepdim=True)
    sigma = torch.sqrt(total.var((2, 3), unbiased=False, keepdim=True) + 1e-5)
    if norm == "ratio":
        expected = [(a - a.mean((2, 3), keepdim=True)) / sigma, (b - b.mean((2, 3), keepdim=True)) / sigma,
                    torch.zeros_like(a)]
    elif norm == "identity":
        expected = [a / sigma, b / sigma, (-mu / sigma).expand_as(a)]
    else:
        expected = [(a - mu / 3) / sigma, (b - mu / 3) / sigma, (-mu / 3 / sigma).expand_as(a)]
    for got, want in zip(res.components, expected):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("module", [nn.GroupNorm(2, 4), nn.LayerNorm([4, 3]), nn.RMSNorm([3])])
def test_other_per_sample_norms_are_exact_with_frozen_statistics(module):
    module = module.double().eval()
    with torch.no_grad():
        for p in module.parameters():
            p.normal_()
    a, b = torch.randn(2, 4, 3, dtype=D), torch.randn(2, 4, 3, dtype=D)
    dec = lmdfx.compile(Pair(module).eval(), {"a": "a", "b": "b"})
    res = dec(a, b)
    torch.testing.assert_close(res.components.sum(0), module(a + b), rtol=0, atol=1e-12)
    # Frozen statistics: the a-component does not move when b changes.
    moved = dec(a, torch.randn_like(b), operating_point=res.operating_point)
    torch.testing.assert_close(moved.components[0], res.components[0], rtol=0, atol=1e-14)


def test_max_pool_gathers_components_at_the_reference_argmax():
    a, b = torch.randn(1, 1, 4, 4, dtype=D), torch.randn(1, 1, 4, 4, dtype=D)
    res = decompose(lambda x: F.max_pool2d(x, 2), a, b)
    _, indices = F.max_pool2d(a + b, 2, return_indices=True)
    torch.testing.assert_close(res.components[0], a.flatten(2).gather(2, indices.flatten(2)).view_as(indices).to(D))
    torch.testing.assert_close(res.components[1], b.flatten(2).gather(2, indices.flatten(2)).view_as(indices).to(D))


@pytest.mark.parametrize("f", [
    lambda x: x.max(dim=1)[0], lambda x: torch.max(x, 1, keepdim=True).values, lambda x: x.amax(-1),
    lambda x: x.min(), lambda x: torch.topk(x, 2, dim=1)[0], lambda x: torch.sort(x, dim=0, descending=True)[0],
    lambda x: torch.maximum(x, torch.zeros_like(x) + 0.1),
])
def test_selection_ops_are_exact(f):
    a, b = torch.randn(3, 4, dtype=D), torch.randn(3, 4, dtype=D)
    res = decompose(f, a, b)
    torch.testing.assert_close(res.components.sum(0), f(a + b), rtol=0, atol=1e-12)


def test_shapley_product_by_hand():
    class Gate(nn.Module):
        def forward(self, a, b):
            x = a + 2.0 * b + 1.0   # components (a, 2b, 1)
            y = 3.0 * a - b + 0.5   # components (3a, -b, 0.5)
            return x * y

    a, b = torch.randn(5, dtype=D), torch.randn(5, dtype=D)
    res = lmdfx.compile(Gate().eval(), {"a": "a", "b": "b"})(a, b)
    x = (a, 2 * b, torch.ones(5, dtype=D))
    y = (3 * a, -b, 0.5 * torch.ones(5, dtype=D))
    cross = x[0] * y[1] + x[1] * y[0]
    expected_a = x[0] * y[0] + x[0] * y[2] + x[2] * y[0] + cross / 2
    expected_b = x[1] * y[1] + x[1] * y[2] + x[2] * y[1] + cross / 2
    torch.testing.assert_close(res.components[0], expected_a)
    torch.testing.assert_close(res.components[1], expected_b)
    torch.testing.assert_close(res.components[2], x[2] * y[2])


def test_overrides_by_module_name_type_and_op():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.first = nn.Tanh()
            self.second = nn.Tanh()

        def forward(self, a, b):
            return self.second(self.first(a + b)) + torch.sigmoid(a - b)

    a, b = torch.randn(4, dtype=D), torch.randn(4, dtype=D)
    for overrides, expected in [
        ({"first": "tangent"}, {"first": "tangent", "second": "secant", "sigmoid": "secant"}),
        ({nn.Tanh: "tangent"}, {"first": "tangent", "second": "tangent", "sigmoid": "secant"}),
        ({"sigmoid": "taylor"}, {"first": "secant", "second": "secant", "sigmoid": "taylor"}),
    ]:
        dec = lmdfx.compile(Two().eval(), {"a": "a", "b": "b"}, rules=lmdfx.Rules(overrides=overrides))
        rules = {row.layer or row.node: row.rule for row in dec.report().rows if row.kind == "mixed"}
        assert {k: rules[k] for k in expected} == expected
        torch.testing.assert_close(dec(a, b).components.sum(0), Two()(a, b), rtol=0, atol=1e-12)


def test_structural_ops_on_mixed_values_act_on_the_original_axes():
    class Shapes(nn.Module):
        def forward(self, a, b):
            x = a + b                                 # [2, 3, 4]
            n = x.shape[0]
            y = x[:, 0] + x.flatten(1)[:, :4] + x.reshape(n, -1)[:, -4:] + x.permute(0, 2, 1).sum(-1)
            parts = x.chunk(2, dim=2)
            z = torch.cat([parts[1], parts[0]], dim=2).mean(1) + x.transpose(1, 2)[..., 1]
            return y + z + x.view(n, 3, 4).unsqueeze(1).squeeze(1).sum(1) * x.size(1)

    a, b = torch.randn(2, 3, 4, dtype=D), torch.randn(2, 3, 4, dtype=D)
    res = lmdfx.compile(Shapes().eval(), {"a": "a", "b": "b"})(a, b)
    torch.testing.assert_close(res.output, Shapes()(a, b))
    torch.testing.assert_close(res.components.sum(0), res.output, rtol=0, atol=1e-12)
    # Every op here is linear: each component is the function applied to that input alone.
    torch.testing.assert_close(res.components[0], Shapes()(a, torch.zeros_like(b)))
    torch.testing.assert_close(res.components[2], torch.zeros_like(res.output))


def test_frozen_masks_come_from_the_operating_point():
    class Masked(nn.Module):
        def forward(self, a, b):
            x = a + b
            return torch.where(x > 0, x, 0.1 * x) + (x.argmax(dim=1, keepdim=True) == 1).float()

    a, b = torch.randn(3, 4, dtype=D), torch.randn(3, 4, dtype=D)
    dec = lmdfx.compile(Masked().eval(), {"a": "a", "b": "b"})
    res = dec(a, b)
    torch.testing.assert_close(res.components.sum(0), Masked()(a, b), rtol=0, atol=1e-12)
    rows = {row.node: row.kind for row in dec.report().rows}
    assert rows["gt"] == "frozen" and rows["argmax"] == "frozen"
    moved = dec(a, torch.randn_like(b), operating_point=res.operating_point)
    torch.testing.assert_close(moved.components[0], res.components[0], rtol=0, atol=0)


def test_softmax_secant_with_an_infinite_mask_stays_finite_and_exact():
    class Masked(nn.Module):
        def forward(self, a, b):
            mask = torch.tensor([0.0, float("-inf"), 0.0, 0.0], dtype=D)
            return torch.softmax(a + b + mask, dim=-1)

    a, b = torch.randn(2, 4, dtype=D), torch.randn(2, 4, dtype=D)
    res = lmdfx.compile(Masked().eval(), {"a": "a", "b": "b"}, rules=lmdfx.Rules(softmax="secant"))(a, b)
    assert torch.isfinite(res.components).all()
    torch.testing.assert_close(res.components.sum(0), Masked()(a, b), rtol=0, atol=1e-12)
    assert (res.components[:2, :, 1] == 0).all()
