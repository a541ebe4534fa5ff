"""The benchmark scripts run end to end on tiny settings and end with their ratio line."""
import os
import subprocess
import sys

import pytest

from utils import UserError

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
    if script == "bench/validate.py":  # the NC checks ran, and the headline ratio comes before the last line
        assert "NC1-NC4 agree to 1e-3 relative" in out.stdout
        assert out.stdout.strip().splitlines()[-2].startswith("end_to_end_ratio: ")


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


# ---------------------------------------------------------------------------- interleaved rounds, LBFGS, mini-ImageNet

def bench_module(name):
    """bench/<name>.py imported as a module (bench/ is not a package)."""
    sys.path.insert(0, os.path.join(REPO, "bench"))
    try:
        return __import__(name)
    finally:
        sys.path.pop(0)


def run_bench(script, *flags):
    # one intra-op thread, as conftest.single_thread gives tiny models: two contending OpenMP threads
    # on a loaded 2-core machine turn each small op into a wait for both
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, script, *flags], cwd=REPO, capture_output=True, text=True, timeout=600,
                         env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()


def test_rounds_alternate_their_order_after_one_warm_up_of_each_side():
    import torch
    common = bench_module("common")
    calls = []
    seconds, last = common.interleaved({"a": lambda: calls.append("a") or 1, "b": lambda: calls.append("b") or 2},
                                       3, torch.device("cpu"))
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]
    assert [len(seconds["a"]), len(seconds["b"])] == [3, 3] and last == {"a": 1, "b": 2}
    assert common.spread([1.0, 2.0, 4.0]).startswith("2 (1-4, +-75%)")


def test_train_bench_refuses_a_32x32_model_on_mini_imagenet_shaped_images():
    train = bench_module("train")
    with pytest.raises(UserError) as e:
        train.main(["--dataset", "synthetic_mini", "--model", "MLP"])
    assert str(e.value) == ("--model MLP takes 3x32x32 images, not synthetic_mini's 84x84: use --model resnet18 "
                            "(the ResNets take any size)")


def test_train_bench_times_lbfgs_and_the_nc_pass():
    lines = run_bench("bench/train.py", "--width", "16", "--depth", "1", "--optimizer", "LBFGS", "--num_samples",
                      "64", "--batch_size", "32", "--num_workers", "0", "--device", "cpu", "--rounds", "2",
                      "--nc_every", "1")
    assert "LBFGS, batch 32," in lines[0]
    evaluations = next(line for line in lines if line.startswith("closure evaluations per step: "))
    assert float(evaluations.split("(a) ")[1].split(",")[0]) >= 1  # the authors' closure ran, line search included
    split = next(line for line in lines if line.startswith("per pass: "))  # each pass: evaluating + besides
    for side in ("(a)", "(b)"):
        part = split.split(side)[1].split(";")[0]  # " T s = E s evaluating (M ms each) + R s besides"
        total, evaluating = float(part.split()[0]), float(part.split("= ")[1].split()[0])
        assert evaluating > 0 and total > 0 and "besides" in part  # (timed apart: no order between them)
    assert float(next(line for line in lines if line.startswith("ratio: ")).split()[1]) > 0
    assert lines[-1].startswith("nc_overhead: ") and float(lines[-1].split()[1]) > 0  # the NC pass ran


def test_train_bench_on_mini_imagenet_shaped_images():
    # the ImageNet stem (no --SOTA) keeps 84x84 images cheap enough for a CPU test
    # (8 images leave most of the 100 classes empty, so no NC pass here: the validation test has it)
    lines = run_bench("bench/train.py", "--model", "resnet18", "--dataset", "synthetic_mini", "--num_samples", "8",
                      "--batch_size", "4", "--num_workers", "0", "--device", "cpu", "--rounds", "1")
    assert "8 synthetic_mini images per pass, 100 classes" in lines[0]
    assert lines[-1].startswith("ratio: ") and float(lines[-1].split()[1]) > 0


def test_validate_bench_on_mini_imagenet_shaped_images_checks_nc_and_ends_with_both_ratios():
    # 84x84 images; 10 classes of 4 (the 100-class default is the training test's), so that NC1 is not trivial
    lines = run_bench("bench/validate.py", "--model", "resnet18", "--dataset", "synthetic_mini", "--num_samples",
                      "40", "--num_classes", "10", "--batch_size", "20", "--num_workers", "0", "--device", "cpu",
                      "--rounds", "1")
    assert "40 synthetic_mini images, d = 512, K = 10" in lines[0]
    assert any(line.startswith("NC1-NC4 agree to 1e-3 relative") for line in lines)
    ceiling = next(line for line in lines if line.startswith("our forward pass alone"))
    assert float(ceiling.split("reference / that = ")[1].split()[0]) > 0
    assert lines[-2].startswith("end_to_end_ratio: ") and float(lines[-2].split()[1]) > 0
    assert lines[-1].startswith("ratio: ") and float(lines[-1].split()[1]) > 0
