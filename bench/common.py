"""What the benchmark scripts share: interleaved timing rounds, and synthetic data of a data set's shape.

On a shared machine one timing of each side, one after the other, measures the machine's load as
much as the code (the same command gave training ratios from 0.86 to 2.70). So every side is run
once untimed, then timed in rounds that alternate the order (a b, b a, a b, ...), and the figures
reported are medians over rounds, with their spread; a ratio is the median of per-round ratios,
each taken between timings made moments apart.
"""
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import datasets  # noqa: E402
from nclib.base import UserError  # noqa: E402

ROUNDS = 3  # the scripts' default --rounds: the fewest that give a median beside a min and a max


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, clock=time.perf_counter):
    """(fn's result, seconds it took), the device's queue drained on both sides."""
    sync(device)
    t = clock()
    out = fn()
    sync(device)
    return out, clock() - t


def interleaved(sides, rounds, device, warmup=True, clock=time.perf_counter):
    """Run each of `sides` ({name: fn}) once untimed, then `rounds` rounds in which each runs once:
    in the dict's order in even rounds, reversed in odd ones. Returns ({name: [seconds per round]},
    {name: the result of its last run})."""
    names = list(sides)
    last = {}
    if warmup:
        for name in names:
            last[name] = sides[name]()
    seconds = {name: [] for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            last[name], t = timed(sides[name], device, clock)
            seconds[name].append(t)
    return seconds, last


def spread(values, fmt="{:.3g}"):
    """'median (min-max, +-P% of the median)' of a list of numbers; fmt: a format string or a function."""
    fmt = fmt.format if isinstance(fmt, str) else fmt
    m = statistics.median(values)
    half = 50 * (max(values) - min(values)) / abs(m) if m else float("nan")
    return f"{fmt(m)} ({fmt(min(values))}-{fmt(max(values))}, +-{half:.0f}%)"


def rate(value):
    """images/s, to the unit, or to 3 figures below 100."""
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def median(values):
    return statistics.median(values)


# ---------------------------------------------------------------------------- synthetic data

# name: (image shape (H, W, 3), classes, Normalize's (mean, std)) of the data set it stands in for
SYNTHETIC = {
    "synthetic": ((32, 32, 3), 10, datasets.CIFAR10_STATS),  # CIFAR-10
    "synthetic_mini": ((84, 84, 3), 100, datasets.IMAGENET_STATS),  # mini-ImageNet
}
FLAT_32x32_MODELS = ("MLP", "ResNet18_adapt")  # MLP flattens 3x32x32; ResNet18_adapt pools a 4x4 map


def synthetic(name, n, seed=0):
    """(uint8 images (n, H, W, 3), int64 labels (n,), every class equally often, (mean, std), K)."""
    shape, K, stats = SYNTHETIC[name]
    images = np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)
    return images, np.arange(n, dtype=np.int64) % K, stats, K


def check_model_fits(model, dataset):
    """A one-line refusal of a model that takes 32x32 images only, on larger synthetic ones."""
    shape = SYNTHETIC.get(dataset, ((32, 32, 3),))[0]
    if model in FLAT_32x32_MODELS and shape[:2] != (32, 32):
        raise UserError(f"--model {model} takes 3x32x32 images, not {dataset}'s {shape[0]}x{shape[1]}: "
                        "use --model resnet18 (the ResNets take any size)")
