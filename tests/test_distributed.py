"""nclib/distributed.py: one run on several processes (torchrun, DistributedDataParallel), on the CPU
with gloo and 2 ranks.

The slow tests start torchrun as a subprocess, as a user would; the refusals are checked in-process
with a pretended world of 2 ranks (each torchrun start costs seconds of imports per rank)."""
import argparse
import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import tiny_run
from helpers import load_pickle, refused, REPO, TESTS
from nclib import base, cli, measure
import rounding

RUN = tiny_run(sample_size=20, batch_size=32, nc_every=None)
# Validation under torchrun measures one block of each split per rank. With --batch_size 50 every batch,
# a rank's or one process's, has 50 images (200 training images = 2 ranks x 2 x 50, 1000 test images =
# 2 x 10 x 50), so each rank computes its float32 features bit for bit as one process does (the same
# kernels on the same shapes, one thread, one machine), and the results differ by nothing but the
# float64 statistics merged across ranks (bounded by tests/rounding.py; the README promises 1e-10).
SAME_SHAPES = "50"
MERGE_RTOL = 1e-10
# Another --batch_size (64: blocks of 64 + 36 per rank, 64 x 3 + 8 in one process) sums each feature in
# another order; the results move within the float32 bound of tests/rounding.py, which the README
# promises is below 1e-3 of NC1-NC4 in this run.
OTHER_SHAPES = "64"
BATCH_RTOL = 1e-3
# Training: each step of the 2-rank run sums in another order than one process (forward and backward in
# per-rank blocks of 16 images, BatchNorm statistics from all-reduced sums, the gradient as the mean of
# the ranks' means). By tests/rounding.py each such sum differs by at most 2 lambda u sqrt(n + 1) ~ 5e-5
# of its magnitudes (n = 3072, the first layer's), up to 1e-3 of the first layer's pre-activations
# (whose magnitudes are up to 20 times their values here). The steps carry such perturbations along the
# trajectory as they would a perturbation of the parameters of that size, and ReLUs switching on or off
# make the trajectory move by more than their linear effect: perturbing this run's initial parameters by
# up to 1e-3 relative (uniformly, three seeds) moved its logged loss by up to 7e-4, NC1 by up to 1.3e-2
# and the accuracies by one training and up to six test images (0.5 and 0.6 points). Hence the
# tolerances below, with margins of 15, 4 and 3. (Without --sync_bn, epoch 2's loss differs by 6% and
# NC1 by 13%: the test still tells them apart.) On the CPUs tried the run differs by ~3e-8: there the
# kernels of either shape differ by a unit in the last place, far inside the bound.
CURVE_RTOL = {"loss": 1e-2, "NC1": 5e-2}
CURVE_ACC_POINTS = 2.0  # percentage points: four training images of 200, twenty test images of 1000


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script, *args, ranks=2):
    """Run `script args` under torchrun with `ranks` CPU processes; the CompletedProcess."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(script)] + [str(a) for a in args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    """An uninterrupted 2-rank run with --sync_bn, measured in-run."""
    save_dir = tmp_path_factory.mktemp("ddp")
    done = torchrun("train_1st_order.py", *RUN, "--sync_bn", "--nc_every", "1", "--save_dir", save_dir, "--uid", "ddp")
    assert done.returncode == 0, done.stderr[-3000:]
    return save_dir / "ddp"


@pytest.mark.slow
def test_two_ranks_follow_the_one_process_loss_curve(two_rank_run, tmp_path, single_thread):
    import train_1st_order
    one = train_1st_order.main(RUN + ["--nc_every", "1", "--save_dir", str(tmp_path), "--uid", "one"])
    ddp, ref = metrics(two_rank_run), metrics(one)
    assert [r["epoch"] for r in ddp] == [1, 2]
    for a, b in zip(ddp, ref):
        for key, rtol in CURVE_RTOL.items():
            assert a[key] == pytest.approx(b[key], rel=rtol), (key, a, b)
        for key in ("loop_acc1", "test_acc1"):  # the training loop's accuracy, and the measured one
            assert a[key] == pytest.approx(b[key], abs=CURVE_ACC_POINTS), (key, a, b)
    # the files are those of one process: one writer, the plain module's state_dict
    assert torch.load(two_rank_run / "epoch_002.pth").keys() == torch.load(os.path.join(one, "epoch_002.pth")).keys()
    assert "sync_bn" in json.loads((two_rank_run / "args.json").read_text())
    assert (two_rank_run / "train_log.txt").read_text().count("started") == 1


def checkpoint(run_dir, epoch):
    """(model, data) of a run's checkpoint, in one process."""
    import datasets
    import models
    args = argparse.Namespace(**json.loads((run_dir / "args.json").read_text()))
    data = datasets.load_data(args.dataset, args.data_dir, args.sample_size)
    model, _ = models.build_on_device(args, data.num_classes, torch.device("cpu"))
    assert measure.load_checkpoint(model, run_dir / f"epoch_{epoch:03d}.pth", torch.device("cpu")) is None
    return model, data


def bounds(model, data, errors_of):
    """({info.pkl key: bound} between two validations of model whose features round as
    errors_of(h, S, n) says, [(h, logits, labels, input magnitudes S, n)] of each split, the last layer):
    the bounds are taken about features computed in one batch per split."""
    import datasets
    forward = measure.EvalForward(model)
    splits = []
    for loader in datasets.make_loaders(data, 10 ** 6, torch.device("cpu"), train=False, num_workers=0):
        (x, y), = list(loader)
        logits, h = forward(x)
        splits.append((h, logits, y) + rounding.one_hidden_layer_terms(forward.module, x))
    (h, _, y, S, n), (h_test, _, _, S_test, _) = splits
    bound = rounding.nc_bounds(h, y, data.num_classes, *measure.last_layer(model), *errors_of(h, S, n))
    bound["mu_G_test"] = rounding.mean_bound(len(h_test), *errors_of(h_test, S_test, n))
    return bound, splits, forward.module.fc


ACCURACIES = ("train_acc1", "train_acc5", "test_acc1", "test_acc5")
NC_KEYS = ("collapse_metric", "ETF_metric", "WH_relation_metric", "Wh_b_relation_metric")


def assert_within(a, b, bound, key, rtol=None):
    """|a - b| <= bound entry by entry; with rtol, the bound is at most rtol of b's largest entry."""
    a, b, bound = np.asarray(a, dtype=float), np.asarray(b, dtype=float), np.asarray(bound, dtype=float)
    assert np.all(np.abs(a - b) <= bound), (key, np.abs(a - b).max(), bound.max())
    assert rtol is None or bound.max() <= rtol * np.abs(b).max(), (key, bound.max(), np.abs(b).max())


@pytest.mark.slow
def test_nc_of_two_ranks_equals_one_process(two_rank_run, tmp_path, single_thread):
    import validate_NC
    one, two = tmp_path / "one", tmp_path / "two"
    for d in (one, two):
        shutil.copytree(two_rank_run, d, ignore=shutil.ignore_patterns("nc_results", "info.pkl", "test_log.txt"))
    flags = ["--device", "cpu", "--num_workers", "0", "--batch_size", SAME_SHAPES]
    validate_NC.main(["--load_path", str(one)] + flags)
    done = torchrun("validate_NC.py", "--load_path", two, *flags)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = load_pickle(two / "info.pkl"), load_pickle(one / "info.pkl")
    assert a["epochs"] == b["epochs"] == [1, 2]
    for e, epoch in enumerate(a["epochs"]):
        bound, _, _ = bounds(*checkpoint(two_rank_run, epoch), lambda h, S, n: [rounding.Float64Sums(h)])
        for key in measure.INFO_KEYS:
            if key in ACCURACIES:  # the same logits' hits, counted: whole numbers, exact in float64
                assert a[key][e] == b[key][e], key
            else:
                assert_within(a[key][e], b[key][e], bound[key], key, MERGE_RTOL)


@pytest.mark.slow
def test_another_batch_size_moves_nc_within_the_float32_bound(two_rank_run, single_thread):
    """What a 2-rank validation whose blocks have other shapes than one process's batches adds: the
    float32 features summed in another order (here in one process: batches of 64 against 50)."""
    import datasets
    for epoch in (1, 2):
        model, data = checkpoint(two_rank_run, epoch)
        results = [measure.evaluate(model, *datasets.make_loaders(data, int(size), torch.device("cpu"),
                                                                       train=False, num_workers=0), data.num_classes)
                   for size in (SAME_SHAPES, OTHER_SHAPES)]
        bound, splits, fc = bounds(model, data, lambda h, S, n: [rounding.Float32Sums(S, n), rounding.Float64Sums(h)])
        for key in measure.INFO_KEYS:
            if key in ACCURACIES:  # a hit changes only where another logit is within rounding of the true one
                h, logits, y, S, n = splits[key.startswith("test")]
                flips = rounding.fragile(logits, y, rounding.logit_bound(fc, h, S, n))
                assert abs(results[1][key] - results[0][key]) <= 100 * flips / len(y), key
            else:
                assert_within(results[1][key], results[0][key], bound[key], key, BATCH_RTOL if key in NC_KEYS else None)


KILL_RANK_1 = """import os, runpy, sys
sys.path[:0] = [{tests!r}, {repo!r}]
import harness
if os.environ["RANK"] == "1":
    harness.kill_at("batch:2:3")  # rank 1 dies before the 3rd batch of epoch 2; torchrun stops rank 0
sys.argv = [{script!r}] + sys.argv[1:]
runpy.run_path({script!r}, run_name="__main__")
"""


@pytest.mark.slow
def test_a_killed_rank_then_resume_completes_the_run(two_rank_run, tmp_path):
    wrapper = tmp_path / "kill_rank_1.py"
    wrapper.write_text(KILL_RANK_1.format(tests=TESTS, repo=REPO, script=os.path.join(REPO, "train_1st_order.py")))
    args = RUN + ["--sync_bn", "--nc_every", "1", "--save_dir", tmp_path, "--uid", "killed"]
    killed = torchrun(wrapper, *args)
    assert killed.returncode != 0
    run_dir = tmp_path / "killed"
    assert [r["epoch"] for r in metrics(run_dir)] == [1]
    assert not (run_dir / "epoch_002.pth").exists()
    resumed = torchrun("train_1st_order.py", "--save_dir", tmp_path, "--uid", "killed", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed after epoch 1" in (run_dir / "train_log.txt").read_text()
    # the same data order and states as the uninterrupted run: the same numbers
    for a, b in zip(metrics(run_dir), metrics(two_rank_run)):
        assert {k: v for k, v in a.items() if "seconds" not in k} == {k: v for k, v in b.items() if "seconds" not in k}
    assert load_pickle(run_dir / "info.pkl")["epochs"] == [1, 2]


@pytest.mark.slow
def test_torchrun_refuses_an_indivisible_batch_in_one_line(tmp_path):
    done = torchrun("train_1st_order.py", *RUN, "--batch_size", "33", "--save_dir", tmp_path, "--uid", "x")
    assert done.returncode != 0
    ours = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert ours == ["error: --batch_size 33 does not split over 2 ranks: under torchrun it is the global batch, "
                    "so give a multiple of 2"], done.stderr[-3000:]
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------- in-process: refusals

@pytest.fixture
def two_ranks(monkeypatch):
    """main() as rank 0 of a pretended 2-rank torchrun (no process group: the refusals come first)."""
    from nclib import distributed, training
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(distributed, "init_distributed", lambda: None)
    monkeypatch.setattr(distributed, "end_distributed", lambda: None)
    monkeypatch.setattr(distributed, "world", lambda: (0, 2))
    monkeypatch.setattr(training, "world", lambda: (0, 2))
    monkeypatch.setattr(distributed, "broadcast_from_rank_zero", lambda obj: obj)


@pytest.mark.parametrize("extra, says", [
    (["--batch_size", "31"], "does not split over 2 ranks"),
    (["--batch_size", "2"], "leaves each 1 image"),
    (["--loader", "torch"], "--loader torch does not run under torchrun"),
    (["--cuda_graph"], "--cuda_graph does not run under torchrun"),
])
def test_refusals_under_torchrun(two_ranks, capsys, tmp_path, extra, says):
    import train_1st_order
    line = refused(capsys, train_1st_order.main, RUN + ["--save_dir", str(tmp_path), "--uid", "r"] + extra)
    assert says in line
    assert not (tmp_path / "r").exists()


def test_lbfgs_refused_under_torchrun(two_ranks, capsys, tmp_path):
    import train_2nd_order
    line = refused(capsys, train_2nd_order.main, RUN + ["--save_dir", str(tmp_path), "--uid", "r", "--lr", "0.5"])
    assert "does not run under torchrun" in line


def test_other_ranks_stay_quiet_on_bad_input(monkeypatch, capsys):
    """Every rank meets the same bad input; only rank 0 prints it, and every rank exits with 2."""
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")

    def bad():
        raise base.UserError("no")
    with pytest.raises(SystemExit) as e:
        cli.run_main(bad)
    assert e.value.code == 2 and capsys.readouterr().err == ""


def test_merged_statistics_equal_streamed_ones():
    """NCStats.merge of blocks gives the statistics of all samples (what the ranks' merge relies on)."""
    from nclib import nc
    g = torch.Generator().manual_seed(0)
    H, y = 1e3 + torch.randn(300, 8, generator=g, dtype=torch.float64), torch.randint(0, 4, (300,), generator=g)
    whole = nc.NCStats(4, 8)
    whole.update(H, y)
    merged = None
    for block in torch.arange(300).tensor_split(3):
        part = nc.NCStats(4, 8)
        part.update(H[block], y[block])
        merged = part if merged is None else (merged.merge(part) or merged)
    # float64 sums of 300 terms in two orders: each within gamma = 300 u = 3.3e-14 of the sum of the
    # terms' magnitudes (~1e3 per sample: rtol 1e-12); the scatter's entries (~300) are sums of
    # squared deviations (~1) and merge terms n_a n_b / n (mean_b - mean_a)^2, whose means (~1e3) carry
    # errors of 1e3 gamma, squared against differences of ~0.1: below 1e-9 absolute
    for a, b in ((merged.n, whole.n), (merged.sum, whole.sum), (merged.scatter, whole.scatter)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-9)


def test_all_ranks_merges_every_ranks_statistics_in_rank_order(monkeypatch):
    """Given the same features, the statistics merged across 2 ranks give one process's metrics to float64
    rounding (the end-to-end test cannot show it for classes split across ranks: mnist_sample is sorted
    by class, so 2 ranks split it between classes 4 and 5)."""
    from nclib import distributed, nc
    g = torch.Generator().manual_seed(1)
    K, d = 4, 6
    H = (3 * torch.randn(K, d, generator=g))[torch.arange(90) % K] + torch.randn(90, d, generator=g)
    y, W, b = torch.arange(90) % K, torch.randn(K, d, generator=g), torch.randn(K, generator=g)
    ranks = [nc.NCStats(K, d), nc.NCStats(K, d)]
    for stats, block in zip(ranks, torch.arange(90).tensor_split(2)):  # every class on both ranks
        for batch in block.split(16):
            stats.update(H[batch], y[batch])
    fields = {id(t): (name, i) for i, stats in enumerate(ranks) for name, t in vars(stats).items() if torch.is_tensor(t)}

    def all_gather(t):  # what each rank receives: every rank's tensor of that name, in rank order
        name, _ = fields[id(t)]
        return [getattr(stats, name) for stats in ranks]
    monkeypatch.setattr(distributed, "all_gather", all_gather)
    merged = distributed.merged_stats(ranks[1])
    whole = nc.NCStats(K, d)
    for batch in torch.arange(90).split(16):
        whole.update(H[batch], y[batch])
    a, ref = nc.paper_metrics(merged, W, b), nc.paper_metrics(whole, W, b)
    bound = rounding.nc_bounds(H, y, K, W, b, rounding.Float64Sums(H))
    for key, info_key in (("NC1", "collapse_metric"), ("NC2", "ETF_metric"), ("NC3", "WH_relation_metric"),
                          ("NC4", "Wh_b_relation_metric"), ("H_bar", "H"), ("mu_G", "mu_G_train")):
        assert_within(a[key], ref[key], bound[info_key], key, MERGE_RTOL)
    assert torch.equal(merged.n, whole.n)


def test_each_rank_gets_its_block_of_the_global_batch():
    import torch
    import datasets
    images = np.arange(10 * 4 * 4 * 3, dtype=np.uint8).reshape(10, 4, 4, 3)
    labels = np.arange(10)

    def batches(share):
        loader = datasets.DeviceLoader(images, labels, 4, (0, 0, 0), (1, 1, 1), torch.device("cpu"), shuffle=True,
                                       generator=torch.Generator().manual_seed(3), share=share)
        return [y.tolist() for _, y in loader]
    one, r0, r1 = batches(None), batches((0, 2)), batches((1, 2))
    assert [a + b for a, b in zip(r0, r1)] == one


# ---------------------------------------------------------------------------- in one process

def test_decided_on_rank_zero_in_one_process_is_decides_value():
    from nclib import distributed
    assert distributed.decided_on_rank_zero(lambda: {"epoch": 3}) == {"epoch": 3}


def test_decided_on_rank_zero_in_one_process_raises_decides_user_error_as_it_is():
    from nclib import distributed
    from nclib.base import RefusedOnRankZero, UserError
    error = UserError("--resume: no run here")

    def decide():
        raise error
    with pytest.raises(UserError) as e:
        distributed.decided_on_rank_zero(decide)
    assert e.value is error and not isinstance(e.value, RefusedOnRankZero)


def test_measures_refused_under_torchrun(two_ranks, capsys, tmp_path):
    import train_1st_order
    line = refused(capsys, train_1st_order.main, RUN + ["--save_dir", str(tmp_path), "--uid", "r", "--measures", "cdnv"])
    assert line == ("error: --measures are measured by one process: run without torchrun, or validate afterwards "
                    "with validate_NC.py")
    assert not (tmp_path / "r").exists()
