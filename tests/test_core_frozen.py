"""Frozen operating point: separation and linearity (the operating point of one reference pass)."""

from __future__ import annotations

import pytest
import torch

import lmdfx
from nets import make_program_net, program_inputs

# Architectures without products of two decomposed values (shapley cross terms would mix).
PROGRAMS = [
    [("in", 1), ("act", 2), ("bn", 0), ("act", 0), ("residual", 0), ("maxpool_up", 0), ("conv", 1)],
    [("gn", 0), ("act", 4), ("cat_skip", 1), ("ln", 0), ("act", 3), ("avgpool_up", 0), ("pure_add", 1)],
    [("bn", 0), ("act", 0), ("channel_max", 0), ("mean_expand", 0), ("scale", 0), ("act", 5), ("conv", 1)],
]


@pytest.mark.parametrize("bias_split", ["none", "sum", "ratio"])
@pytest.mark.parametrize("program", PROGRAMS)
def test_replacing_one_modality_leaves_the_others_unchanged(program, bias_split):
    net = make_program_net([2, 1, 3], "cat", program, encoders=True, seed=3)
    dec = lmdfx.compile(net, net.modality_args(), rules=lmdfx.Rules(bias_split=bias_split), record="all")
    inputs = program_inputs(net, seed=1)
    others = program_inputs(net, seed=2)
    reference = dec(*inputs)
    op = reference.operating_point
    for i in range(3):
        swapped = [others[j] if j == i else inputs[j] for j in range(4)]
        res = dec(*swapped, operating_point=op)
        for j in range(3):
            if j == i:
                assert not torch.allclose(res.components[j], reference.components[j])
            else:
                torch.testing.assert_close(res.components[j], reference.components[j], rtol=1e-12, atol=1e-12)
        # The bias component depends on constants only.
        torch.testing.assert_close(res.components[-1], reference.components[-1], rtol=1e-12, atol=1e-12)
        for name, stack in res.layers.items():
            for j in range(3):
                if j != i:
                    torch.testing.assert_close(stack[j], reference.layers[name][j], rtol=1e-12, atol=1e-12)


def test_frozen_point_without_change_reproduces_the_reference():
    net = make_program_net([2, 2], "cat", PROGRAMS[0], encoders=True, seed=5)
    dec = lmdfx.compile(net, net.modality_args())
    inputs = program_inputs(net, seed=4)
    reference = dec(*inputs)
    again = dec(*inputs, operating_point=dec.operating_point(*inputs))
    torch.testing.assert_close(again.components, reference.components, rtol=0, atol=1e-13)


@pytest.mark.parametrize("bias_split", ["none", "sum", "ratio"])
def test_component_is_linear_in_its_own_fusion_input(bias_split):
    """With encoders that are 1x1 convs feeding the fusion directly, a modality component at a
    frozen operating point is affine in its input; without bias splitting, linear in its
    encoder's output (the encoder bias then belongs to the modality, so test differences)."""
    net = make_program_net([2, 3], "cat", PROGRAMS[0], encoders=False, seed=7)
    dec = lmdfx.compile(net, net.modality_args(), rules=lmdfx.Rules(bias_split=bias_split))
    x = program_inputs(net, seed=1)
    y = program_inputs(net, seed=2)
    op = dec.operating_point(*x)
    a, b = 0.3, -1.7

    def camera_component(first):
        return dec(first, *x[1:], operating_point=op).components[0]

    mix = a * x[0] + (1 - a) * y[0]
    torch.testing.assert_close(camera_component(mix), a * camera_component(x[0]) + (1 - a) * camera_component(y[0]),
                               rtol=1e-10, atol=1e-10)
    # Differences are linear: f(x + b·d) − f(x) = b·(f(x + d) − f(x)).
    d = y[0] - x[0]
    base = camera_component(x[0])
    torch.testing.assert_close(camera_component(x[0] + b * d) - base, b * (camera_component(x[0] + d) - base),
                               rtol=1e-9, atol=1e-9)
