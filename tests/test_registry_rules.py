"""Registry-driven rule tests: every registered op × each variant its families offer × each
example (argument positions that carry a decomposed value, ``rule_examples.py``) is checked in
float64 for

- exactness: the components sum to the original model's output (and every node passes the
  decomposer's own check);
- the tangent map, where the rule declares ``tangent``: each modality component equals
  ``torch.func.jvp`` of the op in that modality's direction;
- separation, where the rule declares ``separates``: at a frozen operating point the camera
  component does not move when the radar input is replaced;
- bit-exact sums, where the rule declares ``moves_values``;
- sums within the rounding their size allows, where the rule declares ``closes_with_remainder``.

A rule registered without an example fails ``test_every_registered_op_has_an_example``.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils import _pytree as pytree

import lmdfx
from lmdfx.rules.registry import CHOICES, FAMILIES, OPS
from rule_examples import EXAMPLES, Example

MODALITIES = {"camera": "cam", "radar": "radar"}


class OpModel(nn.Module):
    """forward(cam, radar): operand i = cam[slice i] + radar[slice i], then the example's op."""

    def __init__(self, example: Example):
        super().__init__()
        self.example = example
        self.shapes = example.shapes
        self.module = example.module.double().eval() if example.module is not None else None

    def forward(self, cam, radar):
        operands, offset = [], 0
        for shape in self.shapes:
            n = math.prod(shape)
            operands.append((cam[offset:offset + n] + radar[offset:offset + n]).view(shape))
            offset += n
        if self.module is not None:
            return self.example.fn(self.module, *operands)
        return self.example.fn(*operands)


def settings(op: str) -> list[tuple[str, lmdfx.Rules]]:
    """One ``Rules`` per variant of each family that can take ``op`` (and each bias split for
    activations)."""
    out = []
    for family in OPS[op]:
        field = CHOICES.get(family)
        if field is None:
            out.append((family, lmdfx.Rules()))
            continue
        for variant in FAMILIES[family]:
            out.append((f"{family}={variant}", lmdfx.Rules(**{field: variant})))
            if family == "activation":
                out += [(f"{family}={variant},split={split}", lmdfx.Rules(**{field: variant}, bias_split=split))
                        for split in ("sum", "ratio")]
    return out


CASES = [pytest.param(op, example, rules, id=f"{op}-{i}{example.name}-{label}")
         for op in sorted(OPS) if op in EXAMPLES
         for i, example in enumerate(EXAMPLES[op])
         for label, rules in settings(op)]


def test_every_registered_op_has_an_example():
    assert sorted(set(OPS) - set(EXAMPLES)) == []
    assert sorted(set(EXAMPLES) - set(OPS)) == []


def draw(example: Example, seed: int) -> torch.Tensor:
    n = sum(math.prod(s) for s in example.shapes)
    g = torch.Generator().manual_seed(seed)
    if example.low is not None:
        return example.low + torch.rand(n, generator=g, dtype=torch.float64) / 2
    return torch.randn(n, generator=g, dtype=torch.float64)


def floating(tree) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(tree) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def rule_of(dec: lmdfx.Decomposer, op: str) -> lmdfx.rules.Rule:
    rules = [r for r in dec.module.lmd_rules.children() if r.call.op == op]
    assert rules, f"the example never reaches op {op!r} as a mixed node"
    return rules[-1]


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("op, example, rules", CASES)
def test_rule(op: str, example: Example, rules: lmdfx.Rules):
    model = OpModel(example).eval()
    cam, radar = draw(example, 0), draw(example, 1)
    dec = lmdfx.compile(model, MODALITIES, rules=rules)  # check="raise": every node exact
    rule = rule_of(dec, op)
    res = dec(cam, radar)
    expected = model(cam, radar)
    outputs, stacks = floating(expected), floating(res.components)
    assert len(outputs) == len(stacks) > 0
    for value, stack in zip(outputs, stacks):
        tol = 1e-9 if value.dtype == torch.float64 else (1e-5 if value.dtype == torch.float32 else 5e-2)
        torch.testing.assert_close(stack.sum(0), value, rtol=tol, atol=tol * (1 + float(value.abs().max())))

    only_op = all(r is rule or r.call.op in ("add", "getitem", "view") for r in dec.module.lmd_rules.children())
    if rule.moves_values and only_op:
        # The op moves elements: with the model's own trunk, the components sum to its output
        # bit for bit (which is why such nodes carry no equality check of their own).
        exact = lmdfx.compile(model, MODALITIES, rules=rules, exact_output=True)(cam, radar)
        for value, stack in zip(outputs, floating(exact.components)):
            assert torch.equal(stack.sum(0), value)
    if rule.closes_with_remainder and only_op:
        # What a "built" node's check relies on: compared with the model's value, the components
        # miss it by no more than the rounding their size allows (eps · (Σ_k max|c_k| + max|value|)).
        exact = lmdfx.compile(model, MODALITIES, rules=rules, exact_output=True)
        exact(cam, radar)
        for row in exact.report().rows:
            if row.rule == rule.name and row.op == op and row.residual is not None:
                assert row.residual <= 16 * row.eps * (row.spread + row.scale), row
    if rule.tangent and rules.bias_split == "none" and only_op and outputs[0].dtype == torch.float64:
        # The operands' camera components are the camera input: the op's tangent map J·camera, with J
        # by reverse mode (an oracle independent of the rules' forward-mode jvp).
        try:
            jacobians = torch.autograd.functional.jacobian(lambda c: tuple(floating(model(c, radar))), cam)
        except RuntimeError as exc:  # torch cannot differentiate a few ops (aten.copy): no oracle
            assert "not implemented" in str(exc)
            jacobians = ()
        for stack, jacobian in zip(stacks, jacobians):
            tangent = (jacobian.reshape(-1, cam.numel()) @ cam).reshape(stack.shape[1:])
            torch.testing.assert_close(stack[0], tangent, rtol=1e-9, atol=1e-9)

    if rule.separates and all(r.separates for r in dec.module.lmd_rules.children()):
        op_point = res.operating_point
        moved = dec(cam, draw(example, 2), operating_point=op_point)
        for before, after in zip(stacks, floating(moved.components)):
            torch.testing.assert_close(after[0], before[0], rtol=1e-9, atol=1e-9)
