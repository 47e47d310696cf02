"""What one decomposition costs against the plain forward of SimpleBEV (camera + radar).

    python -m benchmarks.overhead --config tiny|cpu|paper [--json PATH] [--no-compiled]

Times (median of ``--repeats`` after one warm-up, same process) and peak memory of:
the forward; the decomposition unoptimised, with the default optimisations (exact output),
and with ``exact_output=False`` (trunk of the post-fusion part = sum of components); the same
under ``torch.compile(backend="inductor")``; and the post-fusion part alone (fusion conv +
decoder, with camera BEV features and radar BEV as the modalities). Residual checks are off
(``Decomposer.check = "off"``) except in the row that says otherwise.
"""

from __future__ import annotations

import traceback
from typing import Any, Callable

import torch

import lmdfx

from .common import (apply_threads, PostFusion, Table, base_parser, device_of, emit, interleaved_medians, load_average,
                     median_time, peak_memory_mb,
                     post_fusion_inputs, simplebev, simplebev_config)

MODES = {  # name: compile options
    "unoptimised": dict(optimize=False, exact_output=True),
    "exact output": dict(optimize=True, exact_output=True),
    "fast (exact_output=False)": dict(optimize=True, exact_output=False),
}


def _decomposer(model: torch.nn.Module, modalities: dict[str, str], check: bool = False, **options: Any):
    dec = lmdfx.compile(model, modalities, **options)
    dec.check = "raise" if check else "off"
    return dec


def _compiled(make: Callable[[], Callable[[], Any]], device: torch.device, repeats: int) -> tuple[float | None, str]:
    """Median time of an inductor-compiled callable, or None and why it failed."""
    try:
        fn = make()
        return median_time(fn, device, repeats=repeats, warmup=2), ""
    except Exception as exc:  # inductor needs a C++ toolchain; report, do not crash
        traceback.print_exc()
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def run(config_name: str, device: torch.device, repeats: int, compiled: bool, batch: int = 1) -> dict[str, Any]:
    config = simplebev_config(config_name)
    model, inputs = simplebev(config, device, batch)
    modalities = model.modality_args
    m = len(modalities)
    result: dict[str, Any] = {"config": config_name, "batch": batch, "device": str(device),
                              "image_size": config.image_size, "grid": config.grid, "encoder": config.encoder,
                              "modalities": list(modalities), "repeats": repeats, "residual_checks": False}

    def forward():
        return model(**inputs)

    result["load_average_start"] = load_average()
    decs = {name: _decomposer(model, modalities, **options) for name, options in MODES.items()}
    decs["exact output, residual checks on"] = _decomposer(model, modalities, check=True, exact_output=True)
    decs["default call (summed trunk, checks on)"] = _decomposer(model, modalities, check=True)
    fns = {"forward": forward, **{name: (lambda d: lambda: d(**inputs))(dec) for name, dec in decs.items()}}
    cpu: dict[str, float] = {}
    times = interleaved_medians(fns, device, repeats, cpu_times=cpu)
    result["forward_s"] = times["forward"]
    result["cpu_s"] = cpu
    result["peak_mem_forward_mb"], result["memory_method"] = peak_memory_mb(forward, device)
    mems = {name: peak_memory_mb(fns[name], device)[0] for name in MODES}
    rows = [["forward", result["forward_s"], 1.0, 1.0, result["peak_mem_forward_mb"], 1.0]]
    for name in decs:
        mem = mems.get(name)
        rows.append([f"decompose, {name}", times[name], times[name] / result["forward_s"],
                     cpu[name] / cpu["forward"],
                     "" if mem is None else mem, "" if mem is None else mem / result["peak_mem_forward_mb"]])
    del decs, fns
    result["decompose_s"] = times["exact output"]
    result["ratio"] = result["decompose_s"] / result["forward_s"]
    result["ratio_cpu_time"] = cpu["exact output"] / cpu["forward"]
    result["ratio_default"] = cpu["default call (summed trunk, checks on)"] / cpu["forward"]
    result["ratio_fast_cpu_time"] = cpu["fast (exact_output=False)"] / cpu["forward"]
    result["decompose_fast_s"] = times["fast (exact_output=False)"]
    result["ratio_fast"] = result["decompose_fast_s"] / result["forward_s"]
    result["decompose_unoptimised_s"] = times["unoptimised"]
    result["ratio_unoptimised"] = times["unoptimised"] / result["forward_s"]
    result["decompose_checked_s"] = times["exact output, residual checks on"]
    result["peak_mem_decompose_mb"] = mems["exact output"]
    result["peak_mem_decompose_fast_mb"] = mems["fast (exact_output=False)"]
    result["peak_mem_decompose_unoptimised_mb"] = mems["unoptimised"]
    result["mem_ratio"] = result["peak_mem_decompose_mb"] / result["peak_mem_forward_mb"]
    result["mem_ratio_fast"] = result["peak_mem_decompose_fast_mb"] / result["peak_mem_forward_mb"]

    # The post-fusion part alone: its inputs are the modalities, so every layer is mixed.
    post = PostFusion(model).eval()
    post_inputs = post_fusion_inputs(model, batch)
    post_modalities = {"camera": "feat_bev", "radar": "radar_bev"}
    post_decs = {name: _decomposer(post, post_modalities, **options) for name, options in MODES.items()}
    post_fns = {"forward": lambda: post(**post_inputs),
                **{name: (lambda d: lambda: d(**post_inputs))(dec) for name, dec in post_decs.items()}}
    post_cpu: dict[str, float] = {}
    post_times = interleaved_medians(post_fns, device, repeats, cpu_times=post_cpu)
    del post_decs, post_fns
    result["post_fusion_forward_s"] = post_times["forward"]
    result["post_fusion_cpu_s"] = post_cpu
    post_rows = [["post-fusion forward", result["post_fusion_forward_s"], 1.0, 1.0]]
    for name in MODES:
        t = post_times[name]
        post_rows.append([f"post-fusion decompose, {name}", t, t / result["post_fusion_forward_s"],
                          post_cpu[name] / post_cpu["forward"]])
        result[f"post_fusion_decompose_{name.split()[0]}_s"] = t
    result["post_fusion_decompose_s"] = result["post_fusion_decompose_exact_s"]
    result["ratio_post_fusion"] = result["post_fusion_decompose_s"] / result["post_fusion_forward_s"]
    result["ratio_post_fusion_fast"] = result["post_fusion_decompose_fast_s"] / result["post_fusion_forward_s"]
    result["ratio_post_fusion_cpu_time"] = post_cpu["exact output"] / post_cpu["forward"]
    result["ratio_post_fusion_fast_cpu_time"] = post_cpu["fast (exact_output=False)"] / post_cpu["forward"]
    result["target_ratio_post_fusion"] = (m + 1) + 0.5

    result["ratio_compiled"] = None
    compiled_rows = []
    if compiled:
        t_fwd, why = _compiled(lambda: (lambda f: (lambda: f(**inputs)))(torch.compile(model, backend="inductor")),
                               device, repeats)
        result["forward_compiled_s"] = t_fwd
        if t_fwd is None:
            result["compiled_note"] = f"inductor failed on this machine: {why}"
        else:
            compiled_rows.append(["forward (inductor)", t_fwd, t_fwd / result["forward_s"]])
            for name, key in (("exact output", "decompose_compiled_s"), ("fast (exact_output=False)", "decompose_fast_compiled_s")):
                t_dec, why = _compiled(
                    lambda: (lambda d: (lambda: d(**inputs)))(_decomposer(model, modalities, backend="inductor", **MODES[name])),
                    device, repeats)
                result[key] = t_dec
                if t_dec is None:
                    result["compiled_note"] = f"inductor failed on the decomposition: {why}"
                    continue
                compiled_rows.append([f"decompose, {name} (inductor)", t_dec, t_dec / t_fwd])
            if result.get("decompose_compiled_s"):
                result["ratio_compiled"] = result["decompose_compiled_s"] / t_fwd
            if result.get("decompose_fast_compiled_s"):
                result["ratio_fast_compiled"] = result["decompose_fast_compiled_s"] / t_fwd
    else:
        result["compiled_note"] = "skipped (--no-compiled)"
    result["load_average_end"] = load_average()
    result["_tables"] = (rows, post_rows, compiled_rows)
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--config", default="tiny", choices=("tiny", "cpu", "paper"))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--no-compiled", action="store_true", help="skip the inductor measurements")
    args = parser.parse_args(argv)
    apply_threads(args)
    device = device_of(args.device)
    result = run(args.config, device, args.repeats, not args.no_compiled, args.batch)
    rows, post_rows, compiled_rows = result.pop("_tables")
    tables = [Table(["measurement", "median wall s", "× forward (wall)", "× forward (CPU time)", "peak MiB",
                     "× forward peak"], rows),
              Table(["measurement", "median wall s", "× post-fusion forward (wall)", "× (CPU time)"], post_rows)]
    if compiled_rows:
        tables.append(Table(["measurement", "median s", "× compiled forward"], compiled_rows))
    notes = [f"memory: {result['memory_method']}; residual checks off unless stated; timings interleaved "
             f"round-robin, 1-min load average {result['load_average_start']:.1f} at start, "
             f"{result['load_average_end']:.1f} at end (2 cores shared with other processes)",
             f"targets: ratio <= 1.5 (got {result['ratio']:.2f}, fast {result['ratio_fast']:.2f}; CPU time "
             f"{result['ratio_cpu_time']:.2f}, fast {result['ratio_fast_cpu_time']:.2f}); "
             f"post-fusion <= {result['target_ratio_post_fusion']} (got {result['ratio_post_fusion']:.2f}, "
             f"fast {result['ratio_post_fusion_fast']:.2f}); memory <= 1.5x (got {result['mem_ratio']:.2f})"]
    if result.get("compiled_note"):
        notes.append(f"inductor: {result['compiled_note']}")
    emit(f"Decomposition overhead, SimpleBEV config {args.config!r}", tables, result, args.json, notes)
    return result


if __name__ == "__main__":
    main()
