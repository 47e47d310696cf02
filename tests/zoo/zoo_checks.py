"""Checks shared by the model-zoo tests: compile, exactness in float64, separation at a frozen
operating point, inductor against eager. The models are in benchmarks/zoo_models.py (shared
with the zoo benchmark, benchmarks/zoo.py)."""

from __future__ import annotations

import torch

import lmdfx
from benchmarks.zoo_models import Case, leaves, scale_of

EXACT = 1e-9  # float64: components sum to the model's output within EXACT · max|output|


def check_exact(case: Case) -> lmdfx.Decomposer:
    """float64: the components of every output leaf sum to the original model's output."""
    model = case.build(torch.float64)
    inputs = case.inputs(0, torch.float64)
    dec = case.compile(model, inputs)
    assert dec.report().frontend == case.expect_frontend
    res = dec(**inputs)
    with torch.no_grad():
        expected = model(**inputs)
    stacks, values = leaves(res.components), leaves(expected)
    assert len(stacks) == len(values)
    for stack, value in zip(stacks, values):
        assert stack.shape == (len(case.modalities) + 1, *value.shape)
        torch.testing.assert_close(stack.sum(0), value, rtol=0, atol=EXACT * scale_of([value]))
    return dec


def check_separation(case: Case, rules: lmdfx.Rules = lmdfx.Rules(product="freeze")) -> lmdfx.Decomposition:
    """float64, under ``rules``: at the frozen operating point of the reference inputs,
    replacing one modality's input by another random one leaves the other modality's
    component where it was (both directions, M = 2). The swapped modality's own component
    must move for each modality in ``case.moving`` (so the check is not vacuous). Returns the
    reference call's result."""
    model = case.build(torch.float64)
    inputs = case.inputs(0, torch.float64)
    dec = case.compile(model, inputs, rules=rules)
    res = dec(**inputs)
    tol = EXACT * scale_of(leaves(res.components))
    names = list(case.modalities)
    for swap in names:
        keep = next(n for n in names if n != swap)
        other = dict(inputs)
        param = case.modalities[swap]
        other[param] = case.inputs(1, torch.float64)[param]
        moved = dec(**other, operating_point=res.operating_point)
        for a, b in zip(leaves(res[keep]), leaves(moved[keep])):
            torch.testing.assert_close(b, a, rtol=0, atol=tol, msg=f"{keep}'s component moved when {swap}'s input was replaced")
        if swap in (case.moving if case.moving is not None else names):
            assert any(not torch.allclose(a, b) for a, b in zip(leaves(res[swap]), leaves(moved[swap]))), \
                f"replacing {swap} did not move its own component"
    return res


def check_inductor(case: Case) -> None:
    """float32: the inductor-compiled decomposer equals the eager one (rtol 1e-4). Dynamo's
    state is reset first: a decomposer compiled earlier in the process would make this one a
    recompile with dynamic shapes (test_a_second_decomposer_is_compiled_for_static_shapes)."""
    torch._dynamo.reset()
    model = case.build(torch.float32)
    inputs = case.inputs(0, torch.float32)
    eager = case.compile(model, inputs)(**inputs)
    compiled = case.compile(model, inputs, backend="inductor")(**inputs)
    for a, b in zip(leaves(compiled.components), leaves(eager.components)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * scale_of([b]))
