"""The fixtures, defined once: the repository on sys.path, tiny fake data sets, the tiny training command
line (TINY_RUN, tiny_run), a dummy loss and a dummy measure, graphs replaced on the CPU. The helpers the
test modules share are in helpers.py."""
import os
import sys

import pytest
import torch

TESTS = os.path.dirname(os.path.abspath(__file__))
for path in (os.path.dirname(TESTS), TESTS):
    if path not in sys.path:
        sys.path.insert(0, path)

import fake_data  # noqa: E402
from helpers import Rerun  # noqa: E402
from nclib import steps

# The smallest training run that exercises a whole script: an MLP of width 32 on 10 images per class.
# NC is measured after training (validate_NC.py) unless a test asks for it in-run (--nc_every).
TINY_RUN = ["--model", "MLP", "--width", "32", "--depth", "1", "--dataset", "mnist_sample", "--device", "cpu",
            "--sample_size", "10", "--batch_size", "50", "--num_workers", "0", "--epochs", "2", "--nc_every", "0"]


def tiny_run(**flags):
    """TINY_RUN with some of its flags changed or added (tiny_run(sample_size=20, lr=0.05)), or left out
    (epochs=None: the script's default). The one definition of the tests' small training runs."""
    argv = list(TINY_RUN)
    for name, value in flags.items():
        flag = "--" + name
        if flag in argv:
            at = argv.index(flag)
            del argv[at:at + 2]
            if value is None:
                continue
            argv[at:at] = [flag, str(value)]
        elif value is not None:
            argv += [flag, str(value)]
    return argv


@pytest.fixture
def single_thread():
    """One intra-op thread for tiny models: on a small shared machine, two OpenMP threads contending
    with other processes made an LBFGS step on a 12-image MLP take 10 s instead of 0.05 s."""
    import torch
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def tiny_argv(tmp_path):
    """tiny_argv(uid, *extra) -> argv of a tiny run saved under tmp_path/runs (flags later in argv win)."""
    save_dir = tmp_path / "runs"

    def make(uid, *extra):
        return TINY_RUN + ["--save_dir", str(save_dir), "--uid", uid] + [str(e) for e in extra]
    make.save_dir = save_dir
    return make


@pytest.fixture
def fake_mnist(tmp_path):
    """(data_dir, arrays): 3 training and 2 test images per class in torchvision's raw MNIST files."""
    root = tmp_path / "mnist_data"
    return str(root), fake_data.write_mnist(str(root))


@pytest.fixture
def no_cifar10_checksums(monkeypatch):
    """torchvision accepts the tests' small CIFAR-10 files for this test (see fake_data.skip_cifar10_checksums)."""
    fake_data.skip_cifar10_checksums(monkeypatch.setattr)


@pytest.fixture
def fake_cifar10(tmp_path, no_cifar10_checksums):
    """(data_dir, arrays): 5 training (one per batch file) and 2 test images per class; torchvision's
    checksums are skipped for the test."""
    root = tmp_path / "cifar_data"
    return str(root), fake_data.write_cifar10(str(root))


@pytest.fixture(scope="session")
def fake_mini_imagenet(tmp_path_factory):
    """(data_dir, expected): 4 classes x 600 images in the cache pickles under <data_dir>/mini_imagenet/.
    Read-only: tests that damage files build their own."""
    root = tmp_path_factory.mktemp("mini_data")
    return str(root), fake_data.write_mini_imagenet(str(root / "mini_imagenet"))


# ---------------------------------------------------------------------------- a dummy loss and a dummy measure

class DummyL1Loss(torch.nn.Module):
    """The dummy loss's module: the mean absolute difference from one-hot targets over all B*K entries."""

    forwards = 0  # calls of forward, counted (from 0 in each test that registers the dummy loss)

    def __init__(self, num_classes):
        super().__init__()
        self.num_classes = num_classes

    def forward(self, logits, y):
        DummyL1Loss.forwards += 1
        return (logits - torch.nn.functional.one_hot(y, self.num_classes).to(logits.dtype)).abs().mean()


def dummy_l1_per_sample(z, y, M=1.0, k=1.0):
    """sum_j |z_j - e_y,j| of each sample: K x DummyL1Loss per sample."""
    return (z - torch.nn.functional.one_hot(y, z.shape[1]).to(z.dtype)).abs().sum(1)


@pytest.fixture
def dummy_loss(monkeypatch):
    """A loss "Dummy" (tag DUM) registered in one place, losses.register, for one test: the entry is
    removed afterwards (monkeypatch restores the table)."""
    from nclib import losses
    monkeypatch.setattr(DummyL1Loss, "forwards", 0)
    monkeypatch.setitem(losses.LOSSES, "Dummy", None)
    return losses.register(losses.Loss("Dummy", "DUM", lambda K, M, k: DummyL1Loss(K), dummy_l1_per_sample,
                                       lambda K: K, title=lambda M, k: f"dummy L1 (M={M:g})"))


@pytest.fixture
def dummy_measure(monkeypatch):
    """A per-layer measure "dummy" (key dummy_metric = K / 4) registered in one place, nc.register, for
    one test: the entry is removed afterwards."""
    from nclib import nc
    monkeypatch.setitem(nc.MEASURES, "dummy", None)
    return nc.register(nc.Measure("dummy", ("dummy_metric",), lambda q: {"dummy_metric": q.K / 4}, per_layer=True))


# ---------------------------------------------------------------------------- helpers the test modules share


@pytest.fixture
def rerun_graphs(monkeypatch):
    """The graphed training steps and validation's graphed forward pass on the CPU: no side stream,
    graphs replaced by Rerun. Returns the list of the Reruns made, in order."""
    import contextlib
    from nclib import measure
    made = []

    def rerun(fn, inputs):
        made.append(Rerun(fn, inputs))
        return made[-1]
    for module in (steps, measure):
        monkeypatch.setattr(module, "Captured", rerun)
        monkeypatch.setattr(module, "on_side_stream", lambda fn, *a: fn(*a))
    monkeypatch.setattr(steps, "make_capturable", lambda optimizer: None)  # CPU Adam has no capturable path
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    return made


