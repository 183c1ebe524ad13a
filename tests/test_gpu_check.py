"""benchmarks/gpu_check.py in its CPU smoke mode: the GPU check runs its every step here, so it cannot rot."""

import pytest
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow  # subprocesses and servers: seconds each


def test_gpu_check_smoke_mode_runs_every_step_and_writes_its_table(tmp_path):
    out = tmp_path / "gpu_check.md"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--smoke", "--out", str(out)],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    table = out.read_text()
    assert "| check | result |" in table and "FAILED" not in table and "torch " in table
    for step in ("weights from a file", "cpu fp32 vs cpu fp32", "cpu bf16 vs cpu fp32", "MuSc on 8 normal parts",
                 "cpu fp32 query latency", "cpu bf16 query latency", "batch inspection, 8 images", "MuSc, 8 images"):
        assert step in table, step
    assert "62 of 62 tensors on cpu" in table
    assert "max score diff 0.00000" in table  # fp32 against fp32 with the same weights: equal
