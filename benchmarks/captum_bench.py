"""Per-pixel modality attribution of a 64x64 BEV output: Captum against one lmdfx call.

    python -m benchmarks.captum_bench [--chunk 256] [--pixels N] [--json PATH]

(Named ``captum_bench``, not ``captum``, so it does not shadow the ``captum`` package.)
Needs ``pip install captum``.

Captum's ``InputXGradient`` and ``DeepLift`` attribute one scalar per call target, so a map of
per-pixel, per-modality attributions takes one backward pass per output pixel; here each
chunk of ``--chunk`` pixels is one batched call (the input repeated, one target per row).
Summing an attribution over a modality's input elements gives that modality's share of the
pixel. lmdfx returns every pixel's M+1 components in one call. The model is SimpleBEV's
post-fusion part (fusion conv + decoder) on a 64x64 BEV grid with camera BEV features and
radar BEV as the modalities; ``--pixels N`` times N pixels and extrapolates to 4096.

On a bias-free ReLU network both Captum methods (zero baselines) and lmdfx give the same
per-modality numbers (``check_agreement``); the script checks that before timing.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

import lmdfx

from .common import apply_threads, PostFusion, Table, base_parser, device_of, emit, load_average, post_fusion_inputs, simplebev
from lmdfx.bev.models.simplebev import SimpleBEVConfig

GRID = (64, 4, 64)


class Segmentation(nn.Module):
    """A dict-returning model's ``segmentation`` head as a plain tensor (Captum wants one)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        out = self.model(*inputs)
        return out["segmentation"] if isinstance(out, dict) else out


class BiasFreeReLUNet(nn.Module):
    """Two BEV modalities -> cat -> conv/ReLU stack without biases -> one-channel map.
    Positively homogeneous and piecewise linear, so gradient×input, DeepLift with zero
    baselines and LMD all give the same per-modality split."""

    def __init__(self, c0: int = 3, c1: int = 2, width: int = 8):
        super().__init__()
        self.conv1 = nn.Conv2d(c0 + c1, width, 3, padding=1, bias=False)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.relu2 = nn.ReLU()
        self.head = nn.Conv2d(width, 1, 1, bias=False)

    def forward(self, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.conv1(torch.cat([x0, x1], dim=1)))
        return self.head(self.relu2(self.conv2(x)))


def captum_per_pixel(method: str, model: nn.Module, inputs: tuple[torch.Tensor, ...], chunk: int,
                     pixels: int | None = None) -> torch.Tensor:
    """[M, H, W] (or [M, pixels] for the first ``pixels``): per-modality attribution sums of
    each pixel of the model's [1, 1, H, W] output, one target per batch row."""
    from captum.attr import DeepLift, InputXGradient

    explainer = DeepLift(model) if method == "DeepLift" else InputXGradient(model)
    with torch.no_grad():
        _, _, h, w = model(*inputs).shape
    total = h * w if pixels is None else pixels
    sums = torch.zeros(len(inputs), total, dtype=inputs[0].dtype)
    for start in range(0, total, chunk):
        n = min(chunk, total - start)
        batch = tuple(x.expand(n, *x.shape[1:]).clone().requires_grad_(True) for x in inputs)
        targets = [(0, (start + i) // w, (start + i) % w) for i in range(n)]
        kwargs = {"baselines": tuple(torch.zeros_like(x) for x in batch)} if method == "DeepLift" else {}
        attributions = explainer.attribute(batch, target=targets, **kwargs)
        for m, a in enumerate(attributions):
            sums[m, start:start + n] = a.detach().flatten(1).sum(1)
    return sums.view(len(inputs), h, w) if pixels is None else sums


def lmdfx_per_pixel(dec: Any, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """[M+1, H, W]: lmdfx's components of the [1, 1, H, W] output."""
    res = dec(*inputs)
    components = res.components["segmentation"] if isinstance(res.components, dict) else res.components
    return components[:, 0, 0]


def check_agreement(dtype: torch.dtype = torch.float64, size: int = 16, seed: int = 0) -> dict[str, float]:
    """Max |Captum − lmdfx| / max |lmdfx| of the per-modality maps on a bias-free ReLU network
    (InputXGradient and DeepLift); the bias component there is zero."""
    torch.manual_seed(seed)
    net = BiasFreeReLUNet().to(dtype).eval()
    g = torch.Generator().manual_seed(seed)
    inputs = (torch.randn(1, 3, size, size, generator=g, dtype=dtype),
              torch.randn(1, 2, size, size, generator=g, dtype=dtype))
    # eps below any pre-activation: the secant slope of ReLU is then exactly its 0/1 derivative.
    dec = lmdfx.compile(net, {"a": "x0", "b": "x1"}, rules=lmdfx.Rules(eps=1e-300))
    with torch.no_grad():
        ours = lmdfx_per_pixel(dec, inputs)
    scale = ours.abs().max().item()
    out = {"bias_component": ours[-1].abs().max().item() / scale}
    for method in ("InputXGradient", "DeepLift"):
        theirs = captum_per_pixel(method, net, inputs, chunk=size * size)
        out[method] = (theirs - ours[:-1]).abs().max().item() / scale
    return out


def run(device: torch.device, chunk: int, pixels: int | None, repeats: int) -> dict[str, Any]:
    agreement = check_agreement()
    assert all(v <= 1e-10 for v in agreement.values()), f"Captum and lmdfx disagree: {agreement}"
    model, _ = simplebev(SimpleBEVConfig.tiny(grid=GRID), device)
    post = Segmentation(PostFusion(model)).eval()
    named = post_fusion_inputs(model)
    inputs = (named["feat_bev"], named["radar_bev"])
    h, w = GRID[0], GRID[2]
    dec = lmdfx.compile(PostFusion(model).eval(), {"camera": "feat_bev", "radar": "radar_bev"})
    dec.check = "off"
    with torch.no_grad():
        lmdfx_per_pixel(dec, inputs)  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            lmdfx_per_pixel(dec, inputs)
            times.append(time.perf_counter() - start)
    lmdfx_s = sorted(times)[len(times) // 2]
    result: dict[str, Any] = {"grid": GRID, "output_pixels": h * w, "chunk": chunk, "timed_pixels": pixels or h * w,
                              "agreement_bias_free_relu": agreement, "lmdfx_s": lmdfx_s,
                              "load_average": load_average(), "device": str(device)}
    rows = [["lmdfx (one call, all pixels, M+1 components)", lmdfx_s, 1.0]]
    captum_per_pixel("InputXGradient", post, inputs, chunk, pixels=min(chunk, pixels or chunk))  # warm-up
    for method in ("InputXGradient", "DeepLift"):
        start = time.perf_counter()
        captum_per_pixel(method, post, inputs, chunk, pixels)
        elapsed = time.perf_counter() - start
        full = elapsed * (h * w) / (pixels or h * w)
        result[f"{method}_s"] = full
        result[f"speedup_vs_{method}"] = full / lmdfx_s
        label = f"Captum {method}, {h * w} pixels" + ("" if pixels is None else f" (extrapolated from {pixels})")
        rows.append([label, full, full / lmdfx_s])
    result["speedup"] = min(result["speedup_vs_InputXGradient"], result["speedup_vs_DeepLift"])
    result["_rows"] = rows
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--chunk", type=int, default=256, help="pixels per batched Captum call")
    parser.add_argument("--pixels", type=int, default=None, help="time only this many pixels and extrapolate")
    args = parser.parse_args(argv)
    apply_threads(args)
    result = run(device_of(args.device), args.chunk, args.pixels, args.repeats)
    rows = result.pop("_rows")
    notes = [f"agreement on a bias-free ReLU network (max |difference| / max |value|): {result['agreement_bias_free_relu']}",
             f"target: lmdfx >= 100x faster (got {result['speedup']:.0f}x against the faster Captum method)"]
    emit("Per-pixel modality attribution of a 64x64 BEV map: Captum vs lmdfx",
         [Table(["method", "seconds", "× lmdfx"], rows)], result, args.json, notes)
    return result


if __name__ == "__main__":
    main()
