"""NC measured while training (--nc_every) with thinned checkpoints (--save_every): the in-run
results equal validate_NC.py's bit for bit, validation reuses them and keeps the epochs whose
checkpoints were not kept, and a run killed anywhere resumes to the same info.pkl."""
import json
import os
import shutil
import subprocess

import pytest
import torch

import harness
import plot_runs
from nclib import rundir
import train_1st_order
import validate_NC
from helpers import REPO, load_pickle, refused, same
from nclib import measure

EPOCHS = 5
# Checkpoints of epochs 2, 4 and 5 (the last); NC measured after every epoch.
RUN = ["--dataset", "mnist_sample", "--model", "MLP", "--width", "32", "--depth", "1", "--sample_size", "20",
       "--batch_size", "32", "--device", "cpu", "--num_workers", "0", "--lr", "0.05", "--epochs", str(EPOCHS),
       "--nc_every", "1", "--save_every", "2"]
# Renames of a fresh run (tests/harness.py's before_rename@N): 1 args.json; then per epoch its
# checkpoint (even epochs and the last), its NC result, info.pkl, test_log.txt, last.pth.
KILLS = {
    "mid_epoch_3": "batch:3:2",
    "nc_result_of_epoch_3": "before_rename@11",  # evaluated, not yet stored
    "info_of_epoch_3": "before_rename@12",  # stored, info.pkl not yet rewritten
    "state_of_epoch_3": "before_rename@14",  # all of epoch 3 written but its resume state
    "checkpoint_of_epoch_4": "before_rename@15",
}
TIMES = ("seconds", "nc_seconds")  # what differs between two runs of the same numbers


def argv(save_dir, uid, *extra):
    return RUN + ["--save_dir", str(save_dir), "--uid", uid] + [str(e) for e in extra]




def metrics_without_times(run_dir):
    return [{k: v for k, v in r.items() if k not in TIMES} for r in rundir.read_metrics(run_dir)]


def checkpoints(run_dir):
    return [e for e, _ in rundir.list_checkpoints(str(run_dir))]


@pytest.fixture(scope="module")
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocesses (OMP_NUM_THREADS=1): the same sums
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def ref(tmp_path_factory, one_thread):
    """The uninterrupted run, trained in this process."""
    return train_1st_order.main(argv(tmp_path_factory.mktemp("in_run_ref"), "ref"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, ref):
    """The killed runs (subprocesses, all started at once), and the reference."""
    root = tmp_path_factory.mktemp("in_run")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = {}
    for name, fault in KILLS.items():
        log = open(root / f"{name}.log", "w")
        procs[name] = subprocess.Popen(harness.command("train_1st_order.py", *argv(root / "killed", name), kill=fault),
                                       cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    for name, proc in procs.items():
        assert proc.wait(timeout=300) == -9, (root / f"{name}.log").read_text()[-2000:]
    # a copy of a killed run as it was left, before a test resumes it
    in_progress = shutil.copytree(root / "killed" / "mid_epoch_3", root / "in_progress")
    return {"ref": ref, "killed": root / "killed", "in_progress": in_progress}


def test_a_run_records_every_epoch_and_keeps_the_thinned_checkpoints(ref):
    ref = ref
    info = load_pickle(os.path.join(ref, rundir.INFO))
    assert info["epochs"] == [1, 2, 3, 4, 5] and set(info) == set(measure.INFO_KEYS) | {"epochs"}
    assert checkpoints(ref) == [2, 4, 5]
    records = rundir.read_metrics(ref)
    assert [r["epoch"] for r in records] == [1, 2, 3, 4, 5]
    assert [r["NC1"] for r in records] == info["collapse_metric"]
    assert [r["test_acc1"] for r in records] == info["test_acc1"]
    # train_acc1/5 are the measured accuracies, as in info.pkl; the training loop's are loop_acc1/5
    assert [(r["train_acc1"], r["train_acc5"]) for r in records] == list(zip(info["train_acc1"], info["train_acc5"]))
    assert all(0 <= r["loop_acc1"] <= r["loop_acc5"] <= 100 for r in records)
    assert len(open(os.path.join(ref, rundir.TEST_LOG)).read().splitlines()) == 5


def test_in_run_results_equal_validation_of_the_checkpoints_bitwise(ref, tmp_path, capsys):
    ref, info = ref, load_pickle(os.path.join(ref, rundir.INFO))
    fresh = shutil.copytree(ref, tmp_path / "fresh")
    shutil.rmtree(fresh / rundir.RESULTS)
    os.remove(fresh / rundir.INFO)
    validate_NC.main(["--load_path", str(fresh), "--device", "cpu"])
    measured = load_pickle(fresh / rundir.INFO)
    assert measured["epochs"] == [2, 4, 5]  # only what the checkpoints hold
    for key in measure.INFO_KEYS:
        for e in (2, 4, 5):
            assert same(measured[key][measured["epochs"].index(e)], info[key][e - 1]), (key, e)


def test_validation_reuses_in_run_results_and_keeps_epochs_without_checkpoints(ref, tmp_path, capsys):
    run = shutil.copytree(ref, tmp_path / "run")
    info = load_pickle(run / rundir.INFO)
    capsys.readouterr()
    validate_NC.main(["--load_path", str(run), "--device", "cpu"])
    assert "validated 5 epochs (0 computed, 5 reused, 0 skipped)" in capsys.readouterr().out
    assert same(load_pickle(run / rundir.INFO), info)
    # a checkpoint replaced by hand is measured again, never mixed up with the recorded result
    state = torch.load(run / "epoch_004.pth", weights_only=True)
    state["fc.bias"] += 1
    torch.save(state, run / "epoch_004.pth")
    validate_NC.main(["--load_path", str(run), "--device", "cpu"])
    assert "(1 computed, 4 reused, 0 skipped)" in capsys.readouterr().out
    after = load_pickle(run / rundir.INFO)
    assert after["epochs"] == [1, 2, 3, 4, 5] and after["Wh_b_relation_metric"][3] != info["Wh_b_relation_metric"][3]
    assert same(after["collapse_metric"][:3], info["collapse_metric"][:3])


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(KILLS))
def test_a_run_killed_anywhere_resumes_to_the_same_record(runs, name):
    run_dir = runs["killed"] / name
    train_1st_order.main(argv(runs["killed"], name, "--resume"))
    ref = runs["ref"]
    assert same(load_pickle(run_dir / rundir.INFO), load_pickle(os.path.join(ref, rundir.INFO)))
    assert (run_dir / rundir.TEST_LOG).read_text() == open(os.path.join(ref, rundir.TEST_LOG)).read()
    assert metrics_without_times(run_dir) == metrics_without_times(ref)  # each epoch once
    lines = (run_dir / rundir.METRICS).read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3, 4, 5]
    assert checkpoints(run_dir) == [2, 4, 5]
    for e in (2, 4, 5):
        ours, theirs = (torch.load(os.path.join(d, f"epoch_{e:03d}.pth"), weights_only=True) for d in (run_dir, ref))
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.slow
def test_a_run_still_training_can_be_plotted(runs, tmp_path):
    """A run killed in epoch 3 looks like a run in progress: its info.pkl covers epochs 1-2."""
    run = runs["in_progress"]
    info = load_pickle(run / rundir.INFO)
    assert info["epochs"] == [1, 2]
    written = plot_runs.main([str(run), "--out_dir", str(tmp_path / "figures")])
    assert written and all(os.path.getsize(p) > 1000 for p in written)


def test_resume_may_change_nc_every_and_save_every(tmp_path):
    run = train_1st_order.main(argv(tmp_path, "r", "--epochs", 2))
    train_1st_order.main(argv(tmp_path, "r", "--resume", "--epochs", 4, "--nc_every", 2, "--save_every", 1))
    log = open(os.path.join(run, rundir.TRAIN_LOG)).read()
    assert "--nc_every 2 (was 1)" in log and "--save_every 1 (was 2)" in log
    assert load_pickle(os.path.join(run, rundir.INFO))["epochs"] == [1, 2, 4]
    assert checkpoints(run) == [2, 3, 4]
    assert ["NC1" in r for r in rundir.read_metrics(run)] == [True, True, False, True]


@pytest.mark.parametrize("flags, needle", [(["--nc_every", "-1"], "--nc_every"), (["--save_every", "0"], "--save_every"),
                                           (["--save_every", "1.5"], "--save_every"), (["--nc_every", "x"], "--nc_every")])
def test_bad_nc_every_and_save_every_are_refused(tmp_path, capsys, flags, needle):
    assert needle in refused(capsys, train_1st_order.main, argv(tmp_path, "bad", *flags))
    assert not os.path.exists(tmp_path / "bad")


def test_validation_with_another_batch_size_keeps_every_epoch(ref, tmp_path, capsys):
    """The batch size changes how sums round, not what is measured: the recorded results stand."""
    run = shutil.copytree(ref, tmp_path / "run")
    capsys.readouterr()
    validate_NC.main(["--load_path", str(run), "--device", "cpu", "--batch_size", "64"])
    assert "validated 5 epochs (0 computed, 5 reused, 0 skipped)" in capsys.readouterr().out
