"""The runbook running for real: several runs at once (--jobs), and SLURM submission through
submitit's local executor. The paper's runs of one figure are trained for one epoch on a tiny fake
CIFAR-10; the commands go through tests/harness.py, which accepts those files."""
import os
import pickle
import shutil

import pytest

import experiments
import fake_data
import harness
from nclib import rundir
from nclib import runs
from helpers import load_pickle, refused, same
from nclib import runbook

pytestmark = pytest.mark.slow  # trains real runs in processes of their own


@pytest.fixture
def tiny_runbook(tmp_path, monkeypatch):
    """argv prefix for experiments.main: the etf figure's four runs, one epoch on a fake CIFAR-10."""
    data = tmp_path / "cifar"
    fake_data.write_cifar10(str(data))  # 50 training and 20 test images
    monkeypatch.setattr(runbook, "command",
                        lambda script, arguments: harness.command(os.path.join(runbook.HERE, script), *arguments))
    monkeypatch.chdir(tmp_path)  # the plot scripts draw into ./figures/
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the same sums in every process, however many run at once
    return ["--figure", "etf", "--epochs", "1", "--data_dir", str(data), "--run"]


def write_done(run):
    """A run directory that the runbook takes as done: a complete info.pkl of one epoch."""
    os.makedirs(run)
    with open(run / rundir.INFO, "wb") as f:
        pickle.dump({"collapse_metric": [0.5], "epochs": [1]}, f)


def infos(root):
    return {uid: load_pickle(os.path.join(root, uid, rundir.INFO)) for uid in runs.figure_runs("etf").values()}


def test_two_runs_at_a_time_give_the_same_results_as_one(tiny_runbook, tmp_path, capsys):
    one, two = tmp_path / "one", tmp_path / "two"
    table = list(runs.figure_runs("etf").values())
    for uid in table[2:]:  # the one-at-a-time reference needs two runs only: the others count as done
        write_done(one / uid)
    write_done(two / table[3])  # three runs for two slots: the third waits for the first free one
    experiments.main(tiny_runbook + ["--root", str(one)])
    experiments.main(tiny_runbook + ["--root", str(two), "--jobs", "2"])
    out = capsys.readouterr().out
    assert same({uid: info for uid, info in infos(one).items() if uid in table[:2]},
                {uid: info for uid, info in infos(two).items() if uid in table[:2]})
    for uid in table[:3]:  # each run's output in its own log
        assert "trained epochs 1-1" in (two / uid / rundir.RUNBOOK_LOG).read_text()
        assert not (one / uid / rundir.RUNBOOK_LOG).exists()
    assert out.count("finished: python") == 2 + 3 and os.path.isfile(tmp_path / "figures" / "plot_etf_mse" / "NC1.png")
    # a rerun finds every run done: nothing is trained again
    experiments.main(tiny_runbook + ["--root", str(two), "--jobs", "2"])
    out = capsys.readouterr().out
    assert out.count("skipped, its info.pkl covers epochs 1-1") == 4 and "finished: python" not in out


def test_slurm_submission_through_submitits_local_executor(tiny_runbook, tmp_path, capsys):
    """The --slurm path with submitit's local executor: the two runs not done yet are submitted as
    two jobs, which train on this machine; their ids are written down."""
    root = tmp_path / "runs"
    table = list(runs.figure_runs("etf").values())
    for uid in table[:2]:  # two runs done already
        write_done(root / uid)
    argv = [a for a in tiny_runbook if a != "--run"] + ["--root", str(root), "--slurm", "--cluster", "local"]
    experiments.main(argv)
    out = capsys.readouterr().out
    ids = (root / "slurm_jobs.txt").read_text().splitlines()
    assert [line.split()[1] for line in ids] == [str(root / uid) for uid in table[2:]]
    for uid in table[2:]:
        assert load_pickle(root / uid / rundir.INFO)["epochs"] == [1]
    assert "submitted 2 jobs" in out and out.count(" done ") == 2


def test_slurm_dry_run_and_refusals(tmp_path, capsys, monkeypatch):
    experiments.main(["--figure", "optim", "--root", str(tmp_path), "--slurm", "--dry_run", "--partition", "gpu"])
    out = capsys.readouterr().out
    assert out.count("would submit cifar10_") == 3 and "slurm_partition gpu" in out and not os.listdir(tmp_path)
    monkeypatch.setattr(shutil, "which", lambda name: None)  # no scheduler on this machine
    assert "sbatch" in refused(capsys, experiments.main, ["--figure", "optim", "--root", str(tmp_path), "--slurm"])
    assert "one of them" in refused(capsys, experiments.main, ["--figure", "optim", "--slurm", "--run"])
