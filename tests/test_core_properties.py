"""Property-based tests of the equality property over random fusion architectures (float64),
and the tangent-map oracle for piecewise-linear networks."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lmdfx
from nets import PiecewiseLinearNet, make_program_net, program_inputs, randomize_batchnorm

OPS = ["conv", "bn", "in", "gn", "ln", "act", "maxpool_up", "avgpool_up", "residual", "cat_skip", "gate",
       "scale", "pure_add", "channel_max", "mean_expand"]

architectures = st.fixed_dictionaries({
    "in_channels": st.lists(st.integers(1, 3), min_size=1, max_size=4),
    "fusion": st.sampled_from(["cat", "sum"]),
    "program": st.lists(st.tuples(st.sampled_from(OPS), st.integers(0, 20)), min_size=1, max_size=7),
    "encoders": st.booleans(),
    "seed": st.integers(0, 2**16),
})
rule_sets = st.builds(
    lmdfx.Rules,
    activation=st.sampled_from(["secant", "tangent"]),
    bias_split=st.sampled_from(["none", "sum", "ratio"]),
    batchnorm=st.sampled_from(["identity", "uniform"]),
    norm=st.sampled_from(["ratio", "identity", "uniform"]),
    product=st.sampled_from(["shapley", "freeze"]),
)


def module_outputs(net, inputs):
    """The original model's value at every submodule output (independent of lmdfx)."""
    values, handles = {}, []

    def keep(name):
        def hook(module, args, out):  # returns None: the output is left unchanged
            values.setdefault(name, out)
        return hook

    for name, module in net.named_modules():
        if name:
            handles.append(module.register_forward_hook(keep(name)))
    try:
        out = net(*inputs)
    finally:
        for h in handles:
            h.remove()
    return out, values


def assert_sums_to(stack: torch.Tensor, value: torch.Tensor, what: str) -> None:
    scale = stack.abs().sum(0).max().item()
    error = (stack.sum(0) - value).abs().max().item()
    assert error <= 1e-9 * scale + 1e-12, f"{what}: residual {error:.3e} vs scale {scale:.3e}"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(arch=architectures, rules=rule_sets)
def test_equality_at_every_recorded_node(arch, rules):
    net = make_program_net(arch["in_channels"], arch["fusion"], arch["program"], arch["encoders"], arch["seed"])
    inputs = program_inputs(net, arch["seed"])
    dec = lmdfx.compile(net, net.modality_args(), rules=rules, record="all", exact_output=True)
    res = dec(*inputs)
    expected, by_module = module_outputs(net, inputs)
    assert torch.equal(res.output, expected)
    assert res.components.shape == (len(arch["in_channels"]) + 1, *expected.shape)
    assert_sums_to(res.components, expected, "output")
    for name, stack in res.layers.items():
        if name in by_module:  # module outputs: checked against the original model's hooks
            assert_sums_to(stack, by_module[name], name)
    # Functional nodes (adds, gates, pools) are checked against the trunk, which is the
    # original graph: every mixed node's residual is within the same tolerance.
    for row in dec.report().rows:
        if row.residual is not None:
            assert row.residual <= 1e-9 * row.scale + 1e-12, (row.node, row.residual, row.scale)


@settings(max_examples=20, deadline=None)
@given(in_channels=st.lists(st.integers(1, 3), min_size=2, max_size=4), seed=st.integers(0, 2**16),
       activation=st.sampled_from(["secant", "tangent"]))
def test_piecewise_linear_components_equal_tangent_map(in_channels, seed, activation):
    # Two or more modalities: with one, nothing mixes and the whole output is that modality's.
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = PiecewiseLinearNet(in_channels).double().eval()
    randomize_batchnorm(net.bn1, generator)
    randomize_batchnorm(net.bn2, generator)
    xs = [torch.randn(2, c, 8, 8, generator=generator, dtype=torch.float64) for c in in_channels]
    inputs = xs + [torch.zeros(1, dtype=torch.float64)] * (4 - len(xs))
    modalities = {f"m{i}": f"x{i}" for i in range(len(xs))}
    # eps far below any pre-activation: the secant slope of ReLU is then exactly its 0/1 derivative.
    res = lmdfx.compile(net, modalities, rules=lmdfx.Rules(activation=activation, eps=1e-300))(*inputs)
    output = net(*inputs)
    tangent_total = torch.zeros_like(output)
    for i, x in enumerate(xs):
        def of_modality(v, i=i):
            return net(*[v if j == i else inputs[j] for j in range(4)])
        _, tangent = torch.func.jvp(of_modality, (x,), (x,))
        torch.testing.assert_close(res.components[i], tangent, rtol=1e-10, atol=1e-10)
        tangent_total = tangent_total + tangent
    torch.testing.assert_close(res.components[-1], output - tangent_total, rtol=1e-10, atol=1e-10)
