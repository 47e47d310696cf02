"""Checks shared by the model-zoo tests: compile, exactness in float64, separation at a frozen
operating point, and a timing helper for the zoo table."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

import lmdfx

EXACT = 1e-9  # float64: components sum to the model's output within EXACT · max|output|


def leaves(value: Any) -> list[torch.Tensor]:
    return [leaf for leaf in pytree.tree_leaves(value) if isinstance(leaf, torch.Tensor)]


def scale_of(tensors: list[torch.Tensor]) -> float:
    return max([float(t.detach().abs().max()) for t in tensors if t.numel()] + [1e-300])


@dataclass
class Case:
    """One zoo model: ``build(dtype)`` returns the eval-mode model, ``inputs(seed, dtype)`` its
    keyword inputs (the forward's parameters)."""

    build: Callable[[torch.dtype], nn.Module]
    inputs: Callable[[int, torch.dtype], dict[str, Any]]
    modalities: Mapping[str, str]
    frontend: str = "auto"  # what compile is asked for
    expect_frontend: str = "fx"  # what dec.report().frontend must say
    export_inputs: bool = False  # pass example_inputs= (the forward's keyword inputs)
    compile_kwargs: dict | None = None
    moving: tuple[str, ...] | None = None  # modalities whose component moves with their input (default all)

    def compile(self, model: nn.Module, inputs: dict[str, Any], **kwargs: Any) -> lmdfx.Decomposer:
        extra = dict(self.compile_kwargs or {})
        if self.export_inputs:
            extra["example_inputs"] = dict(inputs)
        extra.update(kwargs)
        return lmdfx.compile(model, self.modalities, frontend=self.frontend, **extra)


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


def check_separation(case: Case) -> None:
    """float64, ``Rules(product="freeze")``: at the frozen operating point of the reference
    inputs, replacing one modality's input by another random one leaves the other modality's
    component where it was (both directions, M = 2). The swapped modality's own component
    must move for each modality in ``case.moving`` (so the check is not vacuous)."""
    model = case.build(torch.float64)
    inputs = case.inputs(0, torch.float64)
    dec = case.compile(model, inputs, rules=lmdfx.Rules(product="freeze"))
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


def timing(case: Case, repeats: int = 5) -> dict[str, Any]:
    """float32, batch as given, current thread count: forward (no_grad) and decomposition
    time (median of ``repeats`` after one warm-up), their ratio, and relative residuals
    (max |difference| / max |reference|) of the components' sum."""
    model = case.build(torch.float32)
    inputs = case.inputs(0, torch.float32)
    dec = case.compile(model, inputs)

    def median(fn: Callable[[], Any]) -> float:
        fn()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    with torch.no_grad():
        forward = median(lambda: model(**inputs))
        decomp = median(lambda: dec(**inputs))
        res = dec(**inputs)
        expected = model(**inputs)
    def worst(stacks: list[torch.Tensor], values: list[torch.Tensor]) -> float:
        return max(float((a - b).abs().max()) / scale_of([b]) for a, b in zip(stacks, values))

    sums = [stack.sum(0) for stack in leaves(res.components)]
    return {"forward_ms": forward * 1e3, "decompose_ms": decomp * 1e3, "ratio": decomp / forward,
            "sum_vs_model": worst(sums, leaves(expected)),  # Σ components vs model(...)
            "sum_vs_output": worst(sums, leaves(res.output)),  # Σ components vs res.output
            "output_vs_model": worst(leaves(res.output), leaves(expected)),  # the trunk's rounding
            "frontend": dec.report().frontend}
