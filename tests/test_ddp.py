"""One run on several processes (torchrun, DistributedDataParallel), on the CPU with gloo and 2 ranks.

The slow tests start torchrun as a subprocess, as a user would; the refusals are checked in-process
with a pretended world of 2 ranks (each torchrun start costs seconds of imports per rank)."""
import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, TESTS, load_pickle, refused

RUN = ["--model", "MLP", "--width", "32", "--depth", "1", "--dataset", "mnist_sample", "--sample_size", "20",
       "--batch_size", "32", "--epochs", "2", "--device", "cpu", "--num_workers", "0"]
# The 2-rank run sums in another order than one process (per-rank means, then an all-reduce; the
# global BatchNorm from sums and sums of squares): float32 rounding, measured at ~3e-8 relative.
LOSS_RTOL = 1e-5
NC_RTOL = 1e-9  # float64 statistics merged across ranks vs streamed in one process


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
        for key in ("loss", "loop_acc1", "NC1", "test_acc1"):
            assert a[key] == pytest.approx(b[key], rel=LOSS_RTOL), (key, a, b)
    # the files are those of one process: one writer, the plain module's state_dict
    import torch
    assert torch.load(two_rank_run / "epoch_002.pth").keys() == torch.load(os.path.join(one, "epoch_002.pth")).keys()
    assert "sync_bn" in json.loads((two_rank_run / "args.json").read_text())
    assert (two_rank_run / "train_log.txt").read_text().count("started") == 1


@pytest.mark.slow
def test_nc_of_two_ranks_equals_one_process(two_rank_run, tmp_path, single_thread):
    import validate_NC
    one, two = tmp_path / "one", tmp_path / "two"
    for d in (one, two):
        shutil.copytree(two_rank_run, d, ignore=shutil.ignore_patterns("nc_results", "info.pkl", "test_log.txt"))
    validate_NC.main(["--load_path", str(one), "--device", "cpu", "--num_workers", "0", "--batch_size", "64"])
    done = torchrun("validate_NC.py", "--load_path", two, "--device", "cpu", "--num_workers", "0", "--batch_size", "64")
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = load_pickle(two / "info.pkl"), load_pickle(one / "info.pkl")
    assert a["epochs"] == b["epochs"] == [1, 2]
    for key in validate_NC.INFO_KEYS:
        for x, y in zip(a[key], b[key]):
            np.testing.assert_allclose(x, y, rtol=NC_RTOL, atol=0, err_msg=key)


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
    import training
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(training, "init_distributed", lambda: None)
    monkeypatch.setattr(training, "end_distributed", lambda: None)
    monkeypatch.setattr(training, "world", lambda: (0, 2))
    monkeypatch.setattr(training, "broadcast_from_rank_zero", lambda obj: obj)


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
    import utils
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")

    def bad():
        raise utils.UserError("no")
    with pytest.raises(SystemExit) as e:
        utils.run_main(bad)
    assert e.value.code == 2 and capsys.readouterr().err == ""


def test_merged_statistics_equal_streamed_ones():
    """NCStats.merge of blocks gives the statistics of all samples (what the ranks' merge relies on)."""
    import torch
    import nc
    g = torch.Generator().manual_seed(0)
    H, y = 1e3 + torch.randn(300, 8, generator=g, dtype=torch.float64), torch.randint(0, 4, (300,), generator=g)
    whole = nc.NCStats(4, 8)
    whole.update(H, y)
    merged = None
    for block in torch.arange(300).tensor_split(3):
        part = nc.NCStats(4, 8)
        part.update(H[block], y[block])
        merged = part if merged is None else (merged.merge(part) or merged)
    for a, b in ((merged.n, whole.n), (merged.sum, whole.sum), (merged.scatter, whole.scatter)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-9)


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
