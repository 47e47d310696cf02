"""The zoo table: per model, float32, batch 1, one thread: forward time (``torch.no_grad()``),
decomposition time (median of 5 after one warm-up), their ratio, and relative residuals in
float32: Σ components vs ``res.output`` (the decomposition's own exactness) and ``res.output``
vs ``model(...)`` (with the default ``exact_output=False`` the trunk of linear layers is the sum
of the components, which equals the model's value to float32 rounding accumulated over the
network). Exactness proper is the float64 test (test_zoo_models.py).

    OMP_NUM_THREADS=1 python tests/zoo/zoo_table.py [NAME ...]
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch
from zoo_checks import timing
from zoo_models import CASES


def main(names: list[str]) -> None:
    torch.set_num_threads(1)
    print("| model | frontend | forward (ms) | decomposition (ms) | ratio | Σ vs output (f32) | output vs model (f32) |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name in names or list(CASES):
        try:
            t = timing(CASES[name]())
        except Exception as exc:  # noqa: BLE001 (a row per model, whatever fails)
            print(f"| {name} | - | - | - | - | fails: {type(exc).__name__}: {str(exc).splitlines()[0][:90]} | |",
                  flush=True)
            continue
        print(f"| {name} | {t['frontend']} | {t['forward_ms']:.2f} | {t['decompose_ms']:.2f} | {t['ratio']:.1f}x "
              f"| {t['sum_vs_output']:.1e} | {t['output_vs_model']:.1e} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
