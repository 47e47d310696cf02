"""Where the time of a decomposition call goes: per rule and per runtime step.

    python -m benchmarks.rule_costs [--size tiny|base] [--models NAME ...] [--check raise|off]

Per zoo model (benchmarks/zoo_models.py): the median CPU time of the forward and of the default
decomposition call, and that call split into its parts, each as milliseconds per call and as a
multiple of the forward: the rule modules by class and op (the component stacks), the operating
points (slopes, statistics), the residual checks and the trunk sums (values of the summed trunk).
What no part covers is the trunk's own ops, views and Python between them. Rule modules are
timed by global module forward hooks, the three steps by timing wrappers around the functions of
``lmdfx.passes.rewrite`` that the generated code calls (installed before compiling); the timing
costs a few microseconds per node, so the timed call is a little slower than the untimed one.
"""

from __future__ import annotations

import contextlib
import importlib
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

from lmdfx.rules.base import Rule

from .common import Table, apply_threads, base_parser, emit, interleaved_medians
from .zoo_models import SIZES, cases, missing

REWRITE = importlib.import_module("lmdfx.passes.rewrite")  # the module, not the function it exports
STEPS = {"operating_point_entry": "operating points", "residual": "residual checks", "component_sum": "trunk sums"}


class Timer:
    """CPU time and calls per part, accumulated over calls."""

    def __init__(self) -> None:
        self.spent: Counter[str] = Counter()
        self.calls: Counter[str] = Counter()
        self._started: dict[int, float] = {}

    def add(self, part: str, start: float) -> None:
        self.spent[part] += time.process_time() - start
        self.calls[part] += 1

    def timed(self, part: str, fn: Callable) -> Callable:
        def run(*args: Any, **kwargs: Any) -> Any:
            start = time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(part, start)
        return run

    def before(self, module: torch.nn.Module, args: Any) -> None:
        if isinstance(module, Rule):
            self._started[id(module)] = time.process_time()

    def after(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        start = self._started.pop(id(module), None)
        if start is not None:
            self.add(f"rule {type(module).__name__} ({module.call.op})", start)


@contextlib.contextmanager
def steps_timed(timer: Timer) -> Iterator[None]:
    """While compiling inside this block, the generated code calls timed steps."""
    originals = {name: getattr(REWRITE, name) for name in STEPS}
    try:
        for name, fn in originals.items():
            setattr(REWRITE, name, timer.timed(STEPS[name], fn))
        yield
    finally:
        for name, fn in originals.items():
            setattr(REWRITE, name, fn)


def measure(name: str, size: str, repeats: int, check: str) -> dict[str, Any]:
    """One model: forward, untimed call and the parts of the timed call (CPU seconds per call)."""
    case = cases(SIZES[size])[name]()
    model = case.build(torch.float32)
    inputs = case.inputs(0, torch.float32)
    timer = Timer()
    with steps_timed(timer):
        timed = case.compile(model, inputs, check=check)
    plain = case.compile(model, inputs, check=check)
    cpu: dict[str, float] = {}
    interleaved_medians({"forward": lambda: model(**inputs), "call": lambda: plain(**inputs)},
                        torch.device("cpu"), repeats, cpu_times=cpu)
    with torch.no_grad():
        timed(**inputs)  # warm-up, not counted
        hooks = [register_module_forward_pre_hook(timer.before), register_module_forward_hook(timer.after)]
        timer.spent.clear()
        timer.calls.clear()
        try:
            start = time.process_time()
            for _ in range(repeats):
                timed(**inputs)
            timed_call = (time.process_time() - start) / repeats
        finally:
            for hook in hooks:
                hook.remove()
    parts = [{"part": part, "nodes": timer.calls[part] // repeats, "s": spent / repeats}
             for part, spent in timer.spent.most_common()]
    return {"model": name, "forward_s": cpu["forward"], "call_s": cpu["call"], "timed_call_s": timed_call,
            "parts": parts}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = base_parser(__doc__.splitlines()[0])
    parser.set_defaults(threads=1)
    parser.add_argument("--size", default="tiny", choices=tuple(SIZES))
    parser.add_argument("--models", nargs="+", default=["timm-efficientnet_b0"], metavar="NAME")
    parser.add_argument("--check", default="raise", choices=("raise", "off"), help="the decomposer's check")
    args = parser.parse_args(argv)
    apply_threads(args)
    result: dict[str, Any] = {"size": args.size, "check": args.check, "repeats": args.repeats, "models": [],
                              "skipped": []}
    tables = []
    for name in args.models:
        reason = missing(name)
        if reason:
            result["skipped"].append({"model": name, "reason": reason})
            continue
        row = measure(name, args.size, args.repeats, args.check)
        result["models"].append(row)
        forward = row["forward_s"]
        lines = [["forward", "", row["forward_s"] * 1e3, 1.0], ["decomposition call", "", row["call_s"] * 1e3,
                                                                 row["call_s"] / forward],
                 ["decomposition call, timed", "", row["timed_call_s"] * 1e3, row["timed_call_s"] / forward]]
        lines += [[p["part"], p["nodes"], p["s"] * 1e3, p["s"] / forward] for p in row["parts"]]
        tables.append(Table([f"{name}: part", "nodes", "ms per call", "× forward"], lines))
    notes = [f"size {args.size}, check={args.check!r}, {torch.get_num_threads()} torch thread(s), CPU time; "
             f"forward and call: medians of {args.repeats} interleaved rounds, parts: means over {args.repeats} timed calls"]
    notes += [f"skipped {s['model']}: {s['reason']}" for s in result["skipped"]]
    emit("Decomposition cost by rule and step", tables, result, args.json, notes)
    return result


if __name__ == "__main__":
    main()
