"""Test machinery the test modules share: where the repository is, running a script as its command line
does (refused), training a tiny run, copies and comparisons of run directories, the Rerun stand-in for
CUDA graphs on the CPU, synthetic info.pkl files and laptop-scale runs (claims.py's input). Fixtures are in conftest.py; fake data sets in
fake_data.py, the kill harness in harness.py, rounding bounds in rounding.py."""
import os
import pickle
import shutil

import numpy as np
import pytest
import torch

from nclib import cli, rundir, scales, steps

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


def fake_info(epochs=30, n_samples=2000, seed=0, speed=1.0):
    """An info.pkl dict shaped like validate_NC.py's: NC curves that decay with training (faster
    for larger `speed`, with drops at the learning-rate steps), rising accuracies and margins."""
    rng = np.random.default_rng(seed)
    e = np.arange(1, epochs + 1)
    steps = 1 + 3 * np.floor(e * 200 / epochs / 40)  # StepLR drops, on the 200-epoch clock
    decay = np.exp(-speed * e * 6 / epochs) / steps  # 1 -> ~0.001
    noise = lambda scale: 1 + scale * rng.standard_normal(epochs)
    margins = (0.9 - 0.1 * speed) * (1 - decay) - 0.1 * decay
    K, d = 10, 16
    info = {
        "epochs": e.tolist(),
        "collapse_metric": (3.0 * decay * noise(0.05) + 1e-3).tolist(),
        "ETF_metric": (0.9 * decay * noise(0.05) + 0.05).tolist(),
        "WH_relation_metric": (1.1 * decay * noise(0.05) + 0.08).tolist(),
        "Wh_b_relation_metric": (0.5 * decay * noise(0.1) + 0.01).tolist(),
        "train_acc1": (100 - 90 * decay).tolist(),
        "train_acc5": (100 - 50 * decay).tolist(),
        "test_acc1": (80 - 70 * decay - 2 * speed).tolist(),
        "test_acc5": (98 - 40 * decay).tolist(),
        "avg_cos_margin": margins.tolist(),
        "nuclear_metric": (1 + 2.5 * decay).tolist(),
        "all_cos_margin": [np.sort(rng.normal(m, 0.1 + 0.05 * speed + 0.3 * dk, n_samples)) for m, dk in zip(margins, decay)],
        "W": [rng.standard_normal((K, d)) for _ in e], "b": [rng.standard_normal(K) for _ in e],
        "H": [rng.standard_normal((d, K)) for _ in e], "mu_G_train": [rng.standard_normal(d) for _ in e],
        "mu_G_test": [rng.standard_normal(d) for _ in e],
    }
    return info


def write_run(root, name, epochs=30, **kwargs):
    run_dir = os.path.join(root, name)
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "info.pkl"), "wb") as f:
        pickle.dump(fake_info(epochs, **kwargs), f)
    return run_dir


# ---------------------------------------------------------------------------- synthetic laptop-scale runs

LAPTOP = scales.Scale("laptop")
START = {"collapse_metric": 1.0, "ETF_metric": 0.8, "WH_relation_metric": 0.8, "Wh_b_relation_metric": 1.0,
         "train_acc1": 40.0, "test_acc1": 40.0}
END = {"collapse_metric": 0.01, "ETF_metric": 0.05, "WH_relation_metric": 0.05,
       "Wh_b_relation_metric": 10 ** -0.5, "train_acc1": 100.0, "test_acc1": 95.0}


def write_laptop_run(root, flags, end=None, last_epoch=None):
    """A laptop-scale run directory under root as training writes it with --nc_every 3: info.pkl
    with entries at epochs 3, 6, ... and the last, moving linearly from START to `end` (END updated)."""
    E = LAPTOP.epochs(flags)
    last_epoch = last_epoch or E
    end = {**END, **(end or {})}
    epochs = sorted(set(range(3, last_epoch + 1, 3)) | {last_epoch})
    results = {e: {k: START[k] + (end[k] - START[k]) * e / E for k in START} for e in epochs}
    run_dir = os.path.join(root, LAPTOP.run_name(flags))
    os.makedirs(run_dir, exist_ok=True)
    rundir.write_info(run_dir, results, list(START), lambda e, r: f"epoch {e}")
    return run_dir


def flags_of(figure, label):
    return LAPTOP.table(figure)[1][label]


# ---------------------------------------------------------------------------- one step on a tiny MLP

def tiny_setup(*flags, default="SGD", K=3):
    """An MLP on 12 fixed random images of K classes: (args, model, optimizer, objective, x, y)."""
    import models
    import utils
    from args import train_parser
    torch.manual_seed(0)
    args = train_parser(default).parse_args(["--model", "MLP", "--width", "16", "--depth", "1", *flags])
    model = models.build_model(args, K)
    optimizer = utils.make_optimizer(args, model)
    objective = steps.make_objective(args, model, utils.make_criterion(args, K))
    x, y = torch.randn(12, 3, 32, 32), torch.arange(12) % K
    return args, model, optimizer, objective, x, y
