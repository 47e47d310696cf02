"""torchrun -m lmdfx evaluate: two gloo processes give the single-process result."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")

ARGS = ["evaluate", "--model", "simplebev-tiny", "--world", "--limit", "5", "--shift", "2", "--repeats", "2",
        "--device", "cpu", "--no-progress"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    single = subprocess.run([sys.executable, "-m", "lmdfx", *ARGS, "--out", str(tmp_path / "one")],
                            capture_output=True, text=True, timeout=300, env=env)
    assert single.returncode == 0, single.stderr
    multi = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
         "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", "lmdfx", *ARGS,
         "--out", str(tmp_path / "two")],
        capture_output=True, text=True, timeout=300, env=env)
    assert multi.returncode == 0, multi.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "evaluation.json").read_text())
    two = json.loads((tmp_path / "two" / "evaluation.json").read_text())
    assert one["processes"] == 1 and two["processes"] == 2
    for key in ("pcc", "mse", "pcc_std", "mse_std"):
        torch.testing.assert_close(torch.tensor(two["separation"][key]), torch.tensor(one["separation"][key]),
                                   rtol=1e-9, atol=1e-12)
    assert two["separation"]["pairs"] == one["separation"]["pairs"] == 10
    assert two["component_iou"]["intersection"] == one["component_iou"]["intersection"]
    assert two["component_iou"]["union"] == one["component_iou"]["union"]
    # the rendered tables are identical
    table = lambda md: md[md.index("## Separation"):]  # noqa: E731
    one_md, two_md = ((tmp_path / d / "evaluation.md").read_text() for d in ("one", "two"))
    assert table(two_md) == table(one_md)
    assert "wrote" in multi.stdout and multi.stdout.count("wrote") == 1  # only rank 0 writes
