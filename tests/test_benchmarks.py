"""Smoke tests of the benchmark scripts at CI size: they run, and they refuse non-loopback targets."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parent.parent / "benchmarks"


def test_gpu_script_runs_on_cpu_at_tiny_size(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    run = subprocess.run(
        [sys.executable, str(BENCH / "gpu.py"), "--tiny", "--batches", "1", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["tiny"] and report["device"] == "cpu"
    row = report["rows"][0]
    assert row["direct"]["images_per_s"] > 0 and row["served"]["images_per_s"] > 0 and row["ratio"] > 0


def test_load_generator_only_targets_loopback() -> None:
    sys.path.insert(0, str(BENCH))
    try:
        from load import check_loopback

        check_loopback("http://127.0.0.1:8000")
        check_loopback("http://localhost:8000")
        with pytest.raises(SystemExit):
            check_loopback("http://10.0.0.5:8000")
    finally:
        sys.path.remove(str(BENCH))
