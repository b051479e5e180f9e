"""Smoke check of the benchmark command (the timings themselves are reported, not tested)."""

import json
import subprocess
import sys

from conftest import REPO


def test_bench_tiny_json():
    out = subprocess.run(
        [sys.executable, "-m", "nxtp_minimal", "bench", "--preset", "tiny", "--top-k", "1", "5", "--steps", "2",
         "--batch", "1", "3", "--json"],
        capture_output=True, text=True, check=True, cwd=REPO,
    )
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [(r["preset"], r["batch"], r["k"], r["steps"]) for r in rows] == [
        ("tiny", 1, 1, 2), ("tiny", 1, 5, 2), ("tiny", 3, 1, 2), ("tiny", 3, 5, 2)]
    for r in rows:
        assert r["fast_s"] > 0 and r["reference_s"] > 0 and r["fast_peak_mb"] > 0
        assert r["ratio"] == r["reference_s"] / r["fast_s"]
        assert r["images_per_s"] == r["batch"] / r["fast_s"]


def test_bench_times_both_decodes_under_autocast():
    out = subprocess.run(
        [sys.executable, "-m", "nxtp_minimal", "bench", "--preset", "tiny", "--top-k", "3", "--steps", "2",
         "--decode", "dynamic", "static", "--autocast", "bfloat16", "--no-reference", "--json"],
        capture_output=True, text=True, check=True, cwd=REPO,
    )
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [(r["decode"], r["k"], r["autocast"]) for r in rows] == [("dynamic", 3, "bfloat16"), ("static", 3, "bfloat16")]
    assert all(r["fast_s"] > 0 and r["reference_s"] is None for r in rows)
