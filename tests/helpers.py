"""Test machinery the test modules share: where the repository is, running a script as its command line
does (refused), training a tiny run, copies and comparisons of run directories, the Rerun stand-in for
CUDA graphs on the CPU, and synthetic info.pkl files. Fixtures are in conftest.py; fake data sets in
fake_data.py, the kill harness in harness.py, rounding bounds in rounding.py."""
import os
import pickle
import shutil

import numpy as np
import pytest
import torch

from nclib import cli
from nclib import steps

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)


class Rerun(steps.Captured):
    """A stand-in for a CUDA graph on the CPU: each replay runs the captured function again on the
    static inputs and copies its outputs into the same tensors, as a replay overwrites them."""

    def __init__(self, fn, inputs):
        self.fn, self.inputs, self.outputs = fn, [t.clone() for t in inputs], None
        self.replays = 0

    def replay(self):
        self.replays += 1
        outputs = self.fn(*self.inputs)
        if self.outputs is None:
            self.outputs = tuple(o.clone() for o in outputs)
        else:
            for static, o in zip(self.outputs, outputs):
                static.copy_(o)
        return self.outputs


def refused(capsys, main, *args):
    """Run main(*args) as its script does (cli.run_main); the one line it printed. Fails unless the
    exit status is 2 (bad input) and stderr is a single `error: ...` line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.run_main(main, *args)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert e.value.code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def train_tiny(root, flags):
    """The directory of a run named "tiny" that train_1st_order.py trains with these flags under root."""
    import train_1st_order
    train_1st_order.main(list(flags) + ["--save_dir", str(root), "--uid", "tiny"])
    return os.path.join(str(root), "tiny")


def unvalidated_copy(run_dir, dest):
    """A private copy of a run directory (tests may damage it) without its NC results."""
    return str(shutil.copytree(run_dir, dest, ignore=shutil.ignore_patterns("nc_results", "info.pkl")))


def load_pickle(path):
    with open(path, "rb") as f:
        return pickle.load(f)


def same(a, b):
    """Bitwise equality (of info dicts, checkpoints, resume states) of nested containers of tensors, arrays and plain values (nan equals nan)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and a != a:
        return isinstance(b, float) and b != b
    return type(a) is type(b) and a == b
