"""The benchmark scripts (bench/): the checks a bench makes on the way (both sides' NC metrics agree,
both sides' metrics agree, loaders give the same batches), its refusal of bad input, and how it orders
its rounds. Timings are the machine's, so no test asserts them; a test that only found a printed ratio
positive proved nothing a benchmark run does not, and is gone. The scripts run in this process, but for
the processes bench/startup.py starts itself (its cold and warm starts)."""
import os
import re
import sys

import pytest

from nclib.base import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUMBER = r"-?[\d,]*\.?\d+(?:e[-+]?\d+)?"


def bench_module(name):
    """bench/<name>.py imported as a module (bench/ is not a package)."""
    sys.path.insert(0, os.path.join(REPO, "bench"))
    try:
        return __import__(name)
    finally:
        sys.path.pop(0)


def run_bench(capsys, name, *flags):
    """bench/<name>.py's main on these flags, in this process: the lines it printed."""
    capsys.readouterr()
    bench_module(name).main([str(f) for f in flags])
    return capsys.readouterr().out.strip().splitlines()


def line(lines, prefix):
    return next(text for text in lines if text.startswith(prefix))


def figures(text, pattern):
    """The numbers (as printed) that `pattern`'s groups match in `text`."""
    found = re.search(pattern.replace("#", f"({NUMBER})"), text)
    assert found, (pattern, text)
    return found.groups()


def value(printed):
    return float(printed.replace(",", ""))


def half_unit(printed):
    """Half a unit in the last printed digit: how far the printed number may be from the one it rounds."""
    mantissa = printed.replace(",", "").split("e")[0]
    decimals = len(mantissa.split(".")[1]) if "." in mantissa else 0
    exponent = int(printed.split("e")[1]) if "e" in printed else 0
    return 0.5 * 10.0 ** (exponent - decimals)


def interval(printed, times=1.0):
    """(centre, radius) of the numbers a printed figure, times a factor, may stand for."""
    return value(printed) * times, half_unit(printed) * abs(times)


def quotient_of(ratio, numerator, denominator):
    """Whether the printed ratio can be numerator / denominator, each a printed figure or an interval."""
    (n, dn), (d, dd) = (x if isinstance(x, tuple) else interval(x) for x in (numerator, denominator))
    low, high = (n - dn) / (d + dd), (n + dn) / (d - dd)
    return low - half_unit(ratio) <= value(ratio) <= high + half_unit(ratio)


def test_quotient_of_allows_the_rounding_of_each_figure_and_no_more():
    assert quotient_of("0.75", "3.40", "4.51") and quotient_of("11.07", "67,485", "6,096")
    assert not quotient_of("0.77", "3.40", "4.51") and not quotient_of("11.10", "67,485", "6,096")
    assert half_unit("0.00647") == pytest.approx(5e-6) and half_unit("2,635") == 0.5 and half_unit("1e-3") == 5e-4


# ---------------------------------------------------------------------------- bench/train.py


def test_train_bench_refuses_a_32x32_model_on_mini_imagenet_shaped_images():
    train = bench_module("train")
    with pytest.raises(UserError) as e:
        train.main(["--dataset", "synthetic_mini", "--model", "MLP"])
    assert str(e.value) == ("--model MLP takes 3x32x32 images, not synthetic_mini's 84x84: use --model resnet18 "
                            "(the ResNets take any size)")


# ---------------------------------------------------------------------------- bench/validate.py

def check_validate_bench(lines):
    """The NC table's rows agree to the bench's 1e-3 (it says so), and the last two lines repeat the
    medians of the two timing lines."""
    for key in ("NC1", "NC2", "NC3", "NC4"):
        ours, reference, diff = figures(line(lines, key + " "), rf"{key}\s+#\s+#\s+#")
        assert value(diff) <= 1e-3, key  # the printed difference is that of the printed values, up to their rounding:
        assert abs(value(ours) - value(reference)) <= \
            (value(diff) + half_unit(diff)) * abs(value(reference)) + half_unit(ours) + half_unit(reference), key
    assert any(text.startswith("NC1-NC4 agree to 1e-3 relative after the forward pass") for text in lines)
    headline = figures(line(lines, "end to end (headline):"), r"ratio # \(")[0]
    after = figures(line(lines, "after the forward pass:"), r"ratio # \(")[0]
    assert lines[-2:] == [f"end_to_end_ratio: {headline}", f"ratio: {after}"]


@pytest.mark.slow
def test_validate_bench_checks_nc_and_ends_with_both_ratios(capsys, single_thread):
    lines = run_bench(capsys, "validate", "--width", 16, "--depth", 1, "--num_samples", 200, "--num_workers", 0,
                      "--device", "cpu", "--rounds", 1)
    assert lines[0].startswith("MLP on 200 mnist_sample images, d = 16, K = 10")
    check_validate_bench(lines)


# ---------------------------------------------------------------------------- bench/metrics.py, common.py

@pytest.mark.slow
def test_metrics_bench_times_every_case_after_checking_both_sides_agree(capsys, single_thread):
    lines = run_bench(capsys, "metrics", "--num_samples", 60, "--classes", 3, 7, "--dim", 8, "--wide_dim", 16,
                      "--wide_samples", 30, "--batch_size", 16, "--rounds", 1, "--device", "cpu")
    # main() compares both sides' results in the first round and raises on a difference: reaching the table is the check
    names = [text.split(" baseline ")[0].strip() for text in lines[1:-1]]
    assert names == [f"{what} K={K} d={d}" for K in (3, 7) for what, d in
                     (("NCStats.update", 8), ("cos_margins", 8), ("nuclear_ratio", "8 N=60"), ("nuclear_ratio", "16 N=30"))] \
        + ["total"]
    assert re.fullmatch(r"ratio: \d+\.\d{3}", lines[-1])


def test_rounds_alternate_their_order_after_one_warm_up_of_each_side():
    import torch
    common = bench_module("common")
    calls = []
    seconds, last = common.interleaved({"a": lambda: calls.append("a") or 1, "b": lambda: calls.append("b") or 2},
                                       3, torch.device("cpu"))
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]
    assert [len(seconds["a"]), len(seconds["b"])] == [3, 3] and last == {"a": 1, "b": 2}
    assert common.spread([1.0, 2.0, 4.0]).startswith("2 (1-4, +-75%)")


# ---------------------------------------------------------------------------- bench/startup.py


@pytest.mark.slow
def test_startup_bench_ratios_are_their_figures_and_the_loaders_agree(capsys, single_thread):
    lines = run_bench(capsys, "startup", "--rounds", 1, "--device", "cpu")
    # the bench asserts that only the cold start imports torchvision, and that every loader gives the
    # former's batches bit for bit: reaching its ratios is those checks passing
    cold, warm = figures(lines[0], r"cold cache # s, warm # s \(torchvision imported only when cold\)")
    assert quotient_of(lines[1].split("startup_ratio: ")[1], cold, warm)
    former, current = figures(lines[2], r": former # ms, current # ms,")
    assert quotient_of(lines[-1].split("ratio: ")[1], former, current) and lines[-1].startswith("ratio: ")
    loader_former, loader_current, training = figures(lines[3], r"former loader # ms, current # ms; training_ratio: #")
    assert quotient_of(training, loader_former, loader_current)
