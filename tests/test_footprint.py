"""nclib/footprint.py: dK-memory's parameter counts, exact for K = 10 and 100 on CIFAR-shaped inputs
and on MNIST digits as the loaders give them, and its measurement of optimiser state and peak step
memory on the CPU."""
import os

import pytest
import torch

import datasets
from helpers import REPO
from nclib import footprint


def mnist_shape():
    """One MNIST image as the loaders hand it to the network (read from the sample in data/)."""
    data = datasets.load_data("mnist_sample", os.path.join(REPO, "data"), 2)
    loader = datasets.make_loaders(data, 4, torch.device("cpu"), train=False, num_workers=0)[0]
    x, _ = next(iter(loader))
    return tuple(x.shape[1:])


@pytest.mark.parametrize("shape", ["CIFAR", "MNIST"])
def test_dk_memory_parameter_counts(shape):
    shape = footprint.CIFAR if shape == "CIFAR" else mnist_shape()
    expected = {10: {"learned, d=512": (11_181_642, 11_181_642, 512), "fixed ETF, d=K": (8_867_542, 8_867_442, 10)},
                100: {"learned, d=512": (11_227_812, 11_227_812, 512), "fixed ETF, d=K": (9_338_692, 9_328_692, 100)}}
    for K, table in expected.items():
        for config, (params, trainable, d) in table.items():
            assert footprint.counts(K, config, shape) == {"params": params, "trainable": trainable, "d": d}
    assert round(footprint.cut(11_181_642, 8_867_542), 1) == -20.7
    assert round(footprint.cut(11_227_812, 9_338_692), 1) == -16.8
    learned, etf = footprint.build(10, False, 0), footprint.build(10, True, 0)  # the ETF alone at d = 512
    assert sum(p.numel() for p in learned.parameters()) - sum(p.numel() for p in etf.parameters() if p.requires_grad) == 5120


@pytest.mark.slow
def test_dk_memory_measured_on_the_cpu():
    rows, cuts = footprint.compare(10, device="cpu")
    a, b = rows["learned, d=512"], rows["fixed ETF, d=K"]
    assert a["device"] == b["device"] == "cpu"
    assert a["optimizer_state_bytes"] == 4 * a["trainable"] and b["optimizer_state_bytes"] == 4 * b["trainable"]
    # the peak holds at least the weights, gradients and momentum of the trainable parameters
    assert a["peak_step_bytes"] >= 4 * (a["params"] + 2 * a["trainable"])
    assert footprint.compare(10, device="cpu")[1]["peak_step_bytes"] == cuts["peak_step_bytes"]  # the same every time
