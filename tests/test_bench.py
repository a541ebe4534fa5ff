"""The benchmark scripts run end to end on tiny settings and end with their ratio line."""
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # processes of their own; see pytest.ini

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("script, flags", [
    ("bench/validate.py", ["--width", "64", "--depth", "1", "--num_samples", "500", "--num_workers", "0",
                           "--device", "cpu"]),
    ("bench/train.py", ["--width", "64", "--depth", "1", "--num_samples", "512", "--num_workers", "0",
                        "--device", "cpu"]),
    ("bench/metrics.py", ["--num_samples", "300", "--classes", "3", "40", "--dim", "8", "--wide_dim", "16",
                          "--wide_samples", "100", "--batch_size", "16", "--rounds", "3", "--device", "cpu"]),
])
def test_bench_prints_its_ratio(script, flags):
    out = subprocess.run([sys.executable, script, *flags], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    last = out.stdout.strip().splitlines()[-1]
    assert last.startswith("ratio: ") and float(last.split()[1]) > 0
    if script == "bench/validate.py":
        assert "end_to_end_ratio: " in out.stdout


def test_train_bench_prints_the_nc_overhead():
    flags = ["--width", "64", "--depth", "1", "--num_samples", "512", "--num_workers", "0", "--device", "cpu",
             "--nc_every", "2"]
    out = subprocess.run([sys.executable, "bench/train.py", *flags], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert any(line.startswith("ratio: ") for line in lines) and lines[-1].startswith("nc_overhead: ")
    assert 0 < float(lines[-1].split()[1]) < 100


def test_jobs_bench_prints_its_ratio():
    flags = ["--width", "16", "--depth", "1", "--num_samples", "500", "--num_workers", "0", "--device", "cpu",
             "--jobs", "2", "--passes", "1"]
    out = subprocess.run([sys.executable, "bench/jobs.py", *flags], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith("1 run: ") and lines[1].startswith("2 runs: ")
    assert lines[-1].startswith("ratio: ") and float(lines[-1].split()[1]) > 0


def test_startup_bench_prints_its_ratio():
    out = subprocess.run([sys.executable, "bench/startup.py", "--rounds", "1", "--device", "cpu"], cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert any(line.startswith("startup_ratio: ") and float(line.split()[1]) > 0 for line in lines)
    assert "cold cache" in lines[0] and lines[-1].startswith("ratio: ") and float(lines[-1].split()[1]) > 0
