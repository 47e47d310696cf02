"""Shared benchmark helpers: model presets, timing, peak memory, machine description, output."""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from lmdfx.bev.models.simplebev import SimpleBEV, SimpleBEVConfig

# The "cpu" preset: the paper's camera+radar SimpleBEV (ResNet-101, metaradar) at half the
# paper's resolution. Half of 224x400 is 112x200 and half of the 200x8x200 grid is 100x8x100,
# but SimpleBEV needs images divisible by 16 and a grid divisible by 8, so the nearest valid
# sizes are used.
CPU_CONFIG = SimpleBEVConfig(image_size=(112, 208), grid=(104, 8, 104))


def simplebev_config(name: str) -> SimpleBEVConfig:
    """``tiny`` (test size), ``cpu`` (paper architecture at half resolution), ``paper``."""
    if name == "tiny":
        return SimpleBEVConfig.tiny()
    if name == "cpu":
        return CPU_CONFIG
    if name == "paper":
        return SimpleBEVConfig.lmd_paper()
    raise SystemExit(f"unknown config {name!r}; use tiny, cpu or paper")


def device_of(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def simplebev(config: SimpleBEVConfig, device: torch.device, batch: int = 1, seed: int = 0,
              dtype: torch.dtype = torch.float32) -> tuple[SimpleBEV, dict[str, torch.Tensor]]:
    """A randomly initialised SimpleBEV in eval mode and valid example inputs."""
    torch.manual_seed(seed)
    model = SimpleBEV(config).eval().to(device=device, dtype=dtype)
    inputs = model.example_inputs(batch, torch.Generator().manual_seed(seed))
    return model, {k: v.to(device=device, dtype=dtype) for k, v in inputs.items()}


class PostFusion(nn.Module):
    """The part of SimpleBEV after the camera lifting: cat -> bev_compressor -> decoder, with
    the camera BEV features and the radar BEV as inputs (the modalities)."""

    def __init__(self, model: SimpleBEV):
        super().__init__()
        self.bev_compressor = model.bev_compressor
        self.decoder = model.decoder

    def forward(self, feat_bev: torch.Tensor, radar_bev: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.decoder(self.bev_compressor(torch.cat([feat_bev, radar_bev], dim=1)))


def post_fusion_inputs(model: SimpleBEV, batch: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random camera BEV features and sparse radar BEV of the model's sizes."""
    cfg = model.config
    z, y, x = cfg.grid
    g = torch.Generator().manual_seed(seed)
    dtype, device = model.mean.dtype, model.mean.device
    feat = torch.randn(batch, cfg.latent_dim * y, z, x, generator=g, dtype=dtype)
    radar = model.example_inputs(batch, g)["radar_bev"].to(dtype)
    return {"feat_bev": feat.to(device), "radar_bev": radar.to(device)}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn: Callable[[], Any], device: torch.device, repeats: int = 3, warmup: int = 1) -> float:
    """Median wall time in seconds of ``fn()`` over ``repeats`` calls after ``warmup`` calls."""
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        synchronize(device)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            synchronize(device)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_medians(fns: dict[str, Callable[[], Any]], device: torch.device, repeats: int = 3,
                        warmup: int = 1, cpu_times: dict[str, float] | None = None) -> dict[str, float]:
    """Median wall time in seconds of each callable, measured round-robin (one call of each per
    round) so that load from other processes on a shared machine hits all of them alike.

    If ``cpu_times`` is given it receives the median CPU time of this process per call
    (``time.process_time``: all threads, only while scheduled), which other processes on a
    shared machine disturb far less than wall time.
    """
    times: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    with torch.no_grad():
        for _ in range(warmup):
            for fn in fns.values():
                fn()
        for _ in range(repeats):
            for name, fn in fns.items():
                synchronize(device)
                start, start_cpu = time.perf_counter(), time.process_time()
                fn()
                synchronize(device)
                times[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
    if cpu_times is not None:
        cpu_times.update({name: statistics.median(values) for name, values in cpu.items()})
    return {name: statistics.median(values) for name, values in times.items()}


def load_average() -> float:
    """The 1-minute load average (other processes share the cores on a shared machine)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _trim_heap() -> None:
    gc.collect()
    try:  # hand freed heap pages back to the OS so the next peak is measured from a low floor
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def peak_memory_mb(fn: Callable[[], Any], device: torch.device) -> tuple[float, str]:
    """Peak memory that one call of ``fn()`` adds, in MiB, and how it was measured.

    CUDA: ``torch.cuda.max_memory_allocated`` above the allocation before the call. CPU: the
    growth of the peak resident set size (VmHWM, reset through /proc/self/clear_refs after a
    garbage collection and ``malloc_trim``) over the resident size before the call — this sees
    every allocation, torch's included (tracemalloc does not).
    """
    with torch.no_grad():
        if device.type == "cuda":
            synchronize(device)
            torch.cuda.empty_cache()
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            out = fn()
            synchronize(device)
            peak = torch.cuda.max_memory_allocated(device) - before
            del out
            return peak / 2**20, "cuda max_memory_allocated"
        _trim_heap()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            return float("nan"), "unavailable (/proc/self/clear_refs not writable)"
        before = _status_kb("VmRSS")
        out = fn()
        peak = _status_kb("VmHWM") - before
        del out
        _trim_heap()
        return peak / 1024, "peak RSS growth (VmHWM)"


def machine() -> dict[str, Any]:
    """CPU model, cores, torch version and GPU (if any) of this machine."""
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per measurement (median)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's); 1 avoids oversubscription on a busy machine")
    return parser


def apply_threads(args: argparse.Namespace) -> None:
    """Set torch's intra-op thread count from ``--threads`` when given."""
    if args.threads:
        torch.set_num_threads(args.threads)


@dataclass
class Table:
    """A markdown table."""

    headers: Sequence[str]
    rows: list[Sequence[Any]]

    def render(self) -> str:
        def cell(v: Any) -> str:
            if isinstance(v, float):
                return f"{v:.4g}"
            return str(v)

        lines = ["| " + " | ".join(self.headers) + " |", "|" + "---|" * len(self.headers)]
        lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in self.rows]
        return "\n".join(lines)


def emit(title: str, tables: Sequence[Table], result: dict[str, Any], json_path: str | None,
         notes: Sequence[str] = ()) -> None:
    """Print the tables as markdown and write ``result`` (plus the machine) as JSON."""
    result = {**result, "machine": machine()}
    print(f"## {title}\n")
    m = result["machine"]
    print(f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}" + (f", GPU {m['gpu']}" if "gpu" in m else ""))
    print()
    for table in tables:
        print(table.render())
        print()
    for note in notes:
        print(f"- {note}")
    if json_path:
        os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
        with open(json_path, "w") as f:
            json.dump(result, f, indent=2, default=str)
