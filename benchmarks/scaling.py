"""How the cost of a decomposition scales with the number of modalities, batch size and BEV
resolution.

    python -m benchmarks.scaling [--quick] [--json PATH] [--plot PATH.png]

The model is SimpleBEV's post-fusion part generalised to M modalities: M BEV inputs of
``--channels`` channels each -> cat -> fusion conv (3x3, no bias) -> InstanceNorm -> GELU ->
SimpleBEV's decoder. Every layer after the fusion conv carries M+1 components, so the
decomposition should cost about (M+1)x the post-fusion forward (exact output: one more for
the trunk), and the fusion conv about 1x thanks to structural zeros.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import lmdfx
from lmdfx.bev.models.simplebev import Decoder

from .common import apply_threads, Table, base_parser, device_of, emit, interleaved_medians, load_average


class MultiModalBEV(nn.Module):
    """M BEV modalities fused by concatenation and SimpleBEV's compressor and decoder."""

    def __init__(self, modalities: int, channels: int, latent: int):
        super().__init__()
        self.modalities = modalities
        self.bev_compressor = nn.Sequential(
            nn.Conv2d(modalities * channels, latent, 3, padding=1, bias=False),
            nn.InstanceNorm2d(latent),
            nn.GELU(),
        )
        self.decoder = Decoder(latent)

    def forward(self, x0, x1=None, x2=None, x3=None, x4=None, x5=None) -> dict[str, torch.Tensor]:
        xs = [x0, x1, x2, x3, x4, x5][: self.modalities]
        return self.decoder(self.bev_compressor(torch.cat(xs, dim=1)))


def measure(modalities: int, batch: int, grid: int, channels: int, latent: int, device: torch.device,
            repeats: int) -> dict[str, Any]:
    """Median forward and decomposition times of one setting."""
    torch.manual_seed(0)
    model = MultiModalBEV(modalities, channels, latent).eval().to(device)
    g = torch.Generator().manual_seed(0)
    inputs = {f"x{i}": torch.randn(batch, channels, grid, grid, generator=g).to(device) for i in range(modalities)}
    names = {f"m{i}": f"x{i}" for i in range(modalities)}
    exact = lmdfx.compile(model, names)
    fast = lmdfx.compile(model, names, exact_output=False)
    for dec in (exact, fast):
        dec.check = "off"
    cpu: dict[str, float] = {}
    times = interleaved_medians({"forward": lambda: model(**inputs), "exact": lambda: exact(**inputs),
                                 "fast": lambda: fast(**inputs)}, device, repeats, cpu_times=cpu)
    return {"modalities": modalities, "batch": batch, "grid": grid, "forward_s": times["forward"],
            "decompose_s": times["exact"], "decompose_fast_s": times["fast"],
            "ratio": times["exact"] / times["forward"], "ratio_fast": times["fast"] / times["forward"],
            "components": modalities + 1, "ratio_cpu_time": cpu["exact"] / cpu["forward"],
            "ratio_fast_cpu_time": cpu["fast"] / cpu["forward"]}


def plot(results: dict[str, list[dict[str, Any]]], path: str) -> None:
    """One panel per swept variable: decomposition time / forward time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (key, label) in zip(axes, (("modalities", "modalities M"), ("batch", "batch size"),
                                       ("grid", "BEV resolution (Z = X)"))):
        rows = results[key]
        xs = [r[key] for r in rows]
        ax.plot(xs, [r["ratio"] for r in rows], "o-", label="lmdfx, exact output")
        ax.plot(xs, [r["ratio_fast"] for r in rows], "s-", label="lmdfx, exact_output=False")
        if key == "modalities":
            ax.plot(xs, [x + 1 for x in xs], "k--", label="M + 1")
        ax.set_xlabel(label)
        ax.set_ylabel("decompose / forward")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("lmdfx cost relative to the forward pass (post-fusion BEV network)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test)")
    parser.add_argument("--plot", metavar="PATH", default=None, help="write the PNG plot here")
    parser.add_argument("--channels", type=int, default=16, help="channels of each modality input")
    parser.add_argument("--latent", type=int, default=32, help="channels after the fusion conv")
    args = parser.parse_args(argv)
    apply_threads(args)
    device = device_of(args.device)
    if args.quick:
        sweeps = {"modalities": [1, 2, 3], "batch": [1, 2], "grid": [16, 32]}
        base = dict(modalities=2, batch=1, grid=16)
    else:
        sweeps = {"modalities": [1, 2, 3, 4, 5, 6], "batch": [1, 2, 4, 8], "grid": [32, 64, 96, 128]}
        base = dict(modalities=2, batch=1, grid=64)
    results: dict[str, Any] = {"channels": args.channels, "latent": args.latent, "repeats": args.repeats,
                               "device": str(device), "load_average_start": load_average()}
    tables = []
    for key, values in sweeps.items():
        rows = []
        for value in values:
            setting = {**base, key: value}
            rows.append(measure(setting["modalities"], setting["batch"], setting["grid"], args.channels,
                                args.latent, device, args.repeats))
        results[key] = rows
        tables.append(Table([key, "forward s", "decompose s (exact)", "ratio", "ratio (CPU time)",
                             "decompose s (fast)", "ratio fast", "ratio fast (CPU time)", "M+1"],
                            [[r[key], r["forward_s"], r["decompose_s"], r["ratio"], r["ratio_cpu_time"],
                              r["decompose_fast_s"], r["ratio_fast"], r["ratio_fast_cpu_time"], r["components"]]
                             for r in rows]))
    results["load_average_end"] = load_average()
    if args.plot:
        plot(results, args.plot)
        results["plot"] = args.plot
    notes = [f"fixed unless swept: {base}, {args.channels} channels per modality, latent {args.latent}",
             f"1-min load average {results['load_average_start']:.1f} at start, {results['load_average_end']:.1f} at end"]
    emit("Scaling of the decomposition cost", tables, results, args.json, notes)
    return results


if __name__ == "__main__":
    main()
