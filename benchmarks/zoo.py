"""What the default decomposition costs on the model zoo, against ``model(...)``.

    python -m benchmarks.zoo [--size tiny|base] [--models NAME ...] [--inductor] [--autocast bf16] [--json PATH]

Per model (benchmarks/zoo_models.py: timm early fusion, camera 3 + LiDAR 2 channels, and the
transformers multimodal models; M = 2, batch 1, random init): the forward under
``torch.no_grad()`` and the default call (``lmdfx.compile(model, modalities)``, then
``dec(...)`` with its default residual check), timed round-robin in the same process (median
wall and CPU time), their peak activation memory (also of a decomposer compiled with
``keep_operating_point=False``), and the relative residual
max |Σ components − model(...)| / max |model(...)|. ``--inductor`` adds the
``backend="inductor"`` decomposition against ``torch.compile(model, backend="inductor")`` and
both first-call (compile) times; ``--profile N`` the N ops with the most self CPU time in one
decomposition call beside the forward's. A model whose library does not import is listed as skipped.
"""

from __future__ import annotations

import contextlib
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from .common import Table, apply_threads, base_parser, device_of, emit, interleaved_medians, load_average, synchronize
from .zoo_models import SIZES, Case, cases, leaves, missing, scale_of

# The models of the early-fusion target (timm) and the transformers multimodal models.
MODELS = ("timm-resnet18", "timm-convnext_atto", "timm-efficientnet_b0", "timm-mobilenetv3_small_100",
          "timm-vit_tiny-fused_attn", "transformers-clip", "transformers-vilt-image_embeds",
          "transformers-visualbert", "transformers-lxmert", "transformers-flava", "transformers-blip-itm",
          "transformers-bridgetower")
TARGETS = {"timm": 3.3, "transformers-vilt-image_embeds": 5.0, "transformers-visualbert": 5.0}  # issue 10


def target_of(name: str) -> float | None:
    """The issue's cost target for ``name`` (≤ 3.3× early fusion, ≤ 5× ViLT and VisualBERT), if any."""
    return TARGETS.get(name, TARGETS.get(name.split("-")[0]))


def to_device(value: Any, device: torch.device) -> Any:
    """``value`` (a tensor or a dict of them) on ``device``."""
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value.to(device) if isinstance(value, torch.Tensor) else value


def autocast(device: torch.device, name: str | None) -> contextlib.AbstractContextManager:
    """``torch.autocast(device, bfloat16)`` for ``name == "bf16"``, else no context."""
    if name == "bf16":
        return torch.autocast(device.type, torch.bfloat16)
    return contextlib.nullcontext()


def peak_bytes(fn: Callable[[], Any], device: torch.device) -> int:
    """Peak of the memory that one call of ``fn()`` allocates above what was allocated before.

    CUDA: ``torch.cuda.max_memory_allocated``. CPU: the allocation and free events that
    ``torch.profiler`` records with ``profile_memory=True`` (every tensor allocation of torch's
    CPU allocator, with its size), replayed in time order; the peak of their running sum is the
    call's peak of live tensor memory, independent of the heap's page reuse (which makes the
    resident set size too coarse for millisecond-sized models).
    """
    with torch.no_grad():
        if device.type == "cuda":
            synchronize(device)
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            fn()
            synchronize(device)
            return torch.cuda.max_memory_allocated(device) - before
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def op_profile(fns: dict[str, Callable[[], Any]], top: int) -> list[dict[str, Any]]:
    """The ``top`` ops by self CPU time in one call of ``fns["decompose"]``: calls and self CPU
    ms there and in one call of ``fns["forward"]`` (``torch.profiler``, after the timed calls)."""
    ops: dict[str, dict[str, tuple[int, float]]] = {}
    with torch.no_grad():
        for key, fn in fns.items():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                fn()
            ops[key] = {e.key: (e.count, e.self_cpu_time_total / 1e3) for e in prof.key_averages()}
    ranked = sorted(ops["decompose"].items(), key=lambda item: -item[1][1])[:top]
    return [{"op": op, "calls": calls, "self_ms": ms, "forward_calls": ops["forward"].get(op, (0, 0.0))[0],
             "forward_self_ms": ops["forward"].get(op, (0, 0.0))[1]} for op, (calls, ms) in ranked]


def residual(components: Any, expected: Any) -> float:
    """Worst relative max |Σ components − expected| / max |expected| over the output leaves."""
    return max(float((stack.sum(0).float() - value.float()).abs().max()) / scale_of([value.float()])
               for stack, value in zip(leaves(components), leaves(expected)))


def first_call(fn: Callable[[], Any], device: torch.device) -> float:
    """Wall seconds of one call (the compile, for a ``torch.compile``'d callable)."""
    synchronize(device)
    start = time.perf_counter()
    with torch.no_grad():
        fn()
    synchronize(device)
    return time.perf_counter() - start


def inductor(case: Case, model: torch.nn.Module, inputs: dict[str, Any], device: torch.device,
             repeats: int, amp: str | None) -> dict[str, Any]:
    """The inductor-compiled forward and decomposition: first-call (compile) and median times."""
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="inductor")
    start = time.perf_counter()
    dec = case.compile(model, inputs, backend="inductor")
    build_s = time.perf_counter() - start
    fns = {"forward": lambda: compiled(**inputs), "decompose": lambda: dec(**inputs)}
    with autocast(device, amp):
        out = {"forward_compile_s": first_call(fns["forward"], device),
               "decompose_compile_s": build_s + first_call(fns["decompose"], device)}
        cpu: dict[str, float] = {}
        times = interleaved_medians(fns, device, repeats, cpu_times=cpu)
    out.update(forward_inductor_s=times["forward"], decompose_inductor_s=times["decompose"],
               ratio_inductor=times["decompose"] / times["forward"],
               ratio_inductor_cpu_time=cpu["decompose"] / cpu["forward"])
    return out


def measure(name: str, size: str, device: torch.device, repeats: int, amp: str | None = None,
            compiled: bool = False, top: int = 0) -> dict[str, Any]:
    """One zoo model: times, CPU times, peak memory and residual of forward and default decomposition."""
    case = cases(SIZES[size])[name]()
    model = case.build(torch.float32).to(device)
    inputs = to_device(case.inputs(0, torch.float32), device)
    start = time.perf_counter()
    dec = case.compile(model, inputs)
    row: dict[str, Any] = {"model": name, "params": sum(p.numel() for p in model.parameters()),
                           "frontend": dec.report().frontend, "lmdfx_compile_s": time.perf_counter() - start,
                           "torch": torch.__version__, "target": target_of(name)}
    fns = {"forward": lambda: model(**inputs), "decompose": lambda: dec(**inputs)}
    cpu: dict[str, float] = {}
    with autocast(device, amp):
        wall = interleaved_medians(fns, device, repeats, cpu_times=cpu)
        mem = {key: peak_bytes(fn, device) for key, fn in fns.items()}
        lean = case.compile(model, inputs, keep_operating_point=False)
        mem["lean"] = peak_bytes(lambda: lean(**inputs), device)
        with torch.no_grad():
            row["residual"] = residual(dec(**inputs).components, model(**inputs))
        if top:
            row["profile"] = op_profile(fns, top)
    row.update(forward_s=wall["forward"], decompose_s=wall["decompose"], ratio=wall["decompose"] / wall["forward"],
               forward_cpu_s=cpu["forward"], decompose_cpu_s=cpu["decompose"],
               ratio_cpu_time=cpu["decompose"] / cpu["forward"],
               peak_forward_mb=mem["forward"] / 2**20, peak_decompose_mb=mem["decompose"] / 2**20,
               mem_ratio=mem["decompose"] / max(mem["forward"], 1),
               mem_ratio_lean=mem["lean"] / max(mem["forward"], 1))
    if compiled:
        row.update(inductor(case, model, inputs, device, repeats, amp))
    return row


def run(names: list[str], size: str, device: torch.device, repeats: int, amp: str | None,
        compiled: bool, top: int = 0) -> dict[str, Any]:
    """Every model of ``names``: a row each, or a skip (library missing) or failure with the reason."""
    result: dict[str, Any] = {"size": size, "sizes": asdict(SIZES[size]), "device": str(device), "repeats": repeats,
                              "autocast": amp, "inductor": compiled, "batch": 1, "modalities": 2,
                              "load_average_start": load_average(), "models": [], "skipped": [], "failed": []}
    for name in names:
        why = missing(name)
        if why is not None:
            result["skipped"].append({"model": name, "reason": why})
            continue
        try:
            row = measure(name, size, device, repeats, amp, compiled, top)
        except Exception as exc:  # noqa: BLE001 (a row per model, whatever fails)
            traceback.print_exc()
            result["failed"].append({"model": name, "reason": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                                     if str(exc) else type(exc).__name__})
            continue
        result["models"].append(row)
        print(f"{name}: ratio {row['ratio_cpu_time']:.2f} (CPU time), {row['ratio']:.2f} (wall)", file=sys.stderr)
    result["load_average_end"] = load_average()
    return result


def tables(result: dict[str, Any]) -> list[Table]:
    """The markdown tables of ``run``'s result."""
    rows = [[r["model"], f"{r['params'] / 1e6:.2f} M", r["frontend"], r["forward_s"], r["decompose_s"], r["ratio"],
             r["ratio_cpu_time"], "" if r["target"] is None else f"≤ {r['target']}",
             "" if r["target"] is None else r["ratio_cpu_time"] / r["target"], r["mem_ratio"],
             r["mem_ratio_lean"], f"{r['residual']:.1e}"] for r in result["models"]]
    blank = [""] * 10
    rows += [[s["model"], *blank, f"skipped: {s['reason']}"] for s in result["skipped"]]
    rows += [[s["model"], *blank, f"failed: {s['reason']}"] for s in result["failed"]]
    out = [Table(["model", "params", "frontend", "forward s", "decomposition s", "ratio (wall)", "ratio (CPU time)",
                  "target", "÷ target", "peak memory ratio", "without operating point", "exact residual"], rows)]
    if result["inductor"]:
        out.append(Table(["model", "inductor forward s", "inductor decomposition s", "ratio (wall)",
                          "ratio (CPU time)", "forward compile s", "decomposition compile s"],
                         [[r["model"], r["forward_inductor_s"], r["decompose_inductor_s"], r["ratio_inductor"],
                           r["ratio_inductor_cpu_time"], r["forward_compile_s"], r["decompose_compile_s"]]
                          for r in result["models"]]))
    for r in result["models"]:
        if "profile" in r:
            out.append(Table([f"{r['model']}: op", "calls", "self CPU ms", "forward calls", "forward self CPU ms"],
                             [[p["op"], p["calls"], p["self_ms"], p["forward_calls"], p["forward_self_ms"]]
                              for p in r["profile"]]))
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = base_parser(__doc__.splitlines()[0])
    parser.set_defaults(threads=1)
    parser.add_argument("--size", default="tiny", choices=tuple(SIZES),
                        help="tiny: the tests' sizes; base: 224 px inputs, hidden-512 transformers (zoo_models.SIZES)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), metavar="NAME",
                        help=f"zoo models (default: {' '.join(MODELS)}; any name of benchmarks/zoo_models.py)")
    parser.add_argument("--inductor", action="store_true", help="also time backend='inductor' and its compile")
    parser.add_argument("--autocast", choices=("bf16",), default=None,
                        help="run forward and decomposition under torch.autocast(device, bfloat16)")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="also list the N ops with the most self CPU time in one decomposition call")
    args = parser.parse_args(argv)
    apply_threads(args)
    unknown = sorted(set(args.models) - set(cases()))
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {', '.join(cases())}")
    device = device_of(args.device)
    result = run(args.models, args.size, device, args.repeats, args.autocast, args.inductor, args.profile)
    notes = [(f"size {args.size} ({result['sizes']}), batch 1, M = 2, {torch.get_num_threads()} torch thread(s), "
              f"median of {args.repeats} interleaved rounds after one warm-up; ratio = decomposition / forward; "
              f"1-min load average {result['load_average_start']:.1f} at start, {result['load_average_end']:.1f} at end"),
             ("peak memory ratio: peak live tensor memory of one decomposition call / of one forward ("
              + ("torch.cuda.max_memory_allocated" if device.type == "cuda" else
                 "torch.profiler allocation events replayed") + "); without operating point: the same with "
              "lmdfx.compile(..., keep_operating_point=False)"),
             "exact residual: max |Σ components − model(...)| / max |model(...)|, worst output leaf"]
    title = f"Zoo: default decomposition vs forward, size {args.size!r}" + (f", autocast {args.autocast}"
                                                                             if args.autocast else "")
    emit(title, tables(result), result, args.json, notes)
    return result


if __name__ == "__main__":
    main()
