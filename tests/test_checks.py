"""nclib/checks.py and the refusals around it: what a start or a resume checks (the run directory, the
recorded arguments and data, the thread count, the network's size, the numbers), and the audits of hostile
use: concurrent processes, divergence, stale caches, resumes that drift, signals, a full disk, and the
inputs that used to end in a traceback. Each test of the audits reproduces one reported failure."""
import builtins
import contextlib
import errno
import inspect
import io
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from args import FLOAT32_MAX, train_parser
from conftest import tiny_run, TINY_RUN
import datasets
import fake_data
from helpers import load_pickle, refused, REPO, same
import models
from nclib import base, checks, cli, rundir, training, validation
import train_1st_order
import validate_NC

pytestmark = pytest.mark.usefixtures("single_thread")

# The audit's $B.
B = tiny_run(width=64, sample_size=20, epochs=None, nc_every=None)
WAIT = 120  # seconds before a wait for another process counts as hung (the machine may be slow)


def validate(run_dir, *flags):
    return validate_NC.main(["--load_path", str(run_dir), "--device", "cpu", *map(str, flags)])


def checkpoint_epochs(run_dir):
    return sorted(int(m.group(1)) for m in map(re.compile(r"epoch_(\d+)\.pth$").match, os.listdir(run_dir)) if m)


def nothing_under(folder):
    return not os.path.exists(folder) or not os.listdir(folder)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run of 2 epochs, trained once for the module: copy it (`run_copy`) before damaging it."""
    save_dir = tmp_path_factory.mktemp("trained")
    return train_1st_order.main(TINY_RUN + ["--save_dir", str(save_dir), "--uid", "tiny"])


@pytest.fixture
def run_copy(trained, tmp_path):
    return shutil.copytree(trained, tmp_path / "runs" / "tiny")


# ---------------------------------------------------------------------------- 1. one process per run

# `python -c RUNNER REPO FOLDER PLAN` is a process that runs scripts one after another, each as `python
# SCRIPT ARGS` would (runpy, as __main__), in the steps of PLAN (JSON): [{"go": FILE or null, "name": NAME,
# "argv": [SCRIPT, ARGS...], "holds": [[MODULE.FUNCTION, N, GATE], ...]}]. A step starts once its go
# file exists; its stderr goes to FOLDER/NAME.err and its exit status to NAME.code. A hold stops the step at
# the N-th call of that function: GATE.reached is created, and the call waits until GATE exists. The
# last step's exit status is the process's. So the slow imports are paid once, before the first step,
# and each step happens at a known instant, with no sleeps that a slow machine could outlast.
RUNNER = r"""
import importlib, json, os, runpy, sys, time
repo, folder, plan = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
sys.path.insert(0, repo)
import validate_NC
def wait(path):
    while not os.path.exists(path):
        time.sleep(0.02)
code, originals = 0, {}
for step in plan:
    for target, _, _ in step["holds"]:
        module, name = target.rsplit(".", 1)
        module = importlib.import_module(module)
        originals.setdefault(target, (module, name, getattr(module, name)))
    for target, (module, name, real) in originals.items():
        setattr(module, name, real)
    for target, n, gate in step["holds"]:
        module, name, real = originals[target]
        def held(*a, real=real, calls=[0], n=n, gate=gate, **k):
            calls[0] += 1
            if calls[0] == n:
                open(gate + ".reached", "w").close()
                wait(gate)
            return real(*a, **k)
        setattr(module, name, held)
    if step["go"]:
        wait(step["go"])
    err = os.path.join(folder, step["name"] + ".err")
    sys.stderr.flush()
    fd = os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 2)
    os.close(fd)
    sys.argv = step["argv"]
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    sys.stderr.flush()
    with open(err + ".tmp", "w") as f:
        f.write(str(code))
    os.replace(err + ".tmp", err[:-4] + ".code")  # whole when it appears
sys.exit(code)
"""


class Scenario:
    """Processes that run steps through RUNNER, with their files in one folder."""

    def __init__(self, folder):
        self.folder, self.procs = folder, {}

    def path(self, name):
        return str(self.folder / name)

    def start(self, process, *steps):
        """steps: (name, script, args, holds, wait for the go file?)"""
        plan = [{"name": name, "argv": [os.path.join(REPO, script), *map(str, args)],
                 "holds": [[target, n, self.path(gate)] for target, n, gate in holds],
                 "go": self.path("go_" + name) if go else None} for name, script, args, holds, go in steps]
        env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")  # no progress bars in stderr
        with open(self.path(process + ".err"), "w") as err:  # until the first step starts
            self.procs[process] = subprocess.Popen(
                [sys.executable, "-c", RUNNER, REPO, str(self.folder), json.dumps(plan)],
                stdout=subprocess.DEVNULL, stderr=err, env=env, cwd=self.folder)

    def go(self, name):
        open(self.path("go_" + name), "w").close()

    def wait_for(self, name, process):
        """Wait until the file `name` exists; fail at once if `process` has ended."""
        deadline = time.time() + WAIT
        while not os.path.exists(self.path(name)):
            proc = self.procs[process]
            if proc.poll() is not None:
                with open(self.path(process + ".err")) as f:
                    pytest.fail(f"{process} exited with {proc.returncode} before {name} appeared: {f.read()[-2000:]}")
            if time.time() > deadline:
                pytest.fail(f"{name} did not appear within {WAIT} s")
            time.sleep(0.02)

    def result(self, step, process):
        """(exit status, stderr) of a step, once it has ended."""
        self.wait_for(step + ".code", process)
        with open(self.path(step + ".code")) as code, open(self.path(step + ".err")) as err:
            return int(code.read()), err.read()

    def stop_all(self):
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def holder(lock):
    """The pid written in a lock file (None without one); the line after it says what the holder does."""
    return lock.read_text().splitlines()[0] if lock.exists() else None


def run_in_process(main, *args):
    """(exit status, stderr) of main(*args) run as its script runs it, in this process."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            cli.run_main(main, *args)
            code = 0
        except SystemExit as e:
            code = e.code
    return code, err.getvalue()


@pytest.fixture(scope="module")
def busy(tmp_path_factory):
    """A run that another process is training, and what happened to each process that came near it.
    Two processes: `first`, and `other`, whose steps (after `first` has stopped in epoch 2, holding
    the run's lock) are:

    second       train the same --uid with --force: should be refused
    (this process: --resume of the run: should be refused)
    validation   validate the run while `first` still trains, stopping before info.pkl is written
    (this process: a second validation of the run: should be refused)
    (`first` is killed with SIGKILL, holding the lock)
    resumed      --resume the run (it must get the lock), stopping inside epoch 2, to be sent SIGINT
    (this process: --resume trains the run to its end)
    """
    folder = tmp_path_factory.mktemp("busy")
    run_dir = folder / "runs" / "busy"
    train = TINY_RUN + ["--save_dir", str(folder / "runs"), "--uid", "busy", "--epochs", "3"]
    validation = ["--load_path", str(run_dir), "--device", "cpu"]
    s = Scenario(folder)
    seen = {"run_dir": run_dir}
    try:
        s.start("first", ("first", "train_1st_order.py", train, [("nclib.training.train_one_epoch", 2, "first_gate")], False))
        s.start("other", ("second", "train_1st_order.py", train + ["--force"], [], True),
                ("validation", "validate_NC.py", validation, [("nclib.rundir.write_info", 1, "validation_gate")], True),
                ("resumed", "train_1st_order.py", train + ["--resume"],
                 [("nclib.training.train_one_epoch", 1, "resumed_gate")], True))
        seen["pids"] = {name: proc.pid for name, proc in s.procs.items()}

        s.wait_for("first_gate.reached", "first")  # epoch 1 is saved; epoch 2 is under way
        seen["lock"] = holder(run_dir / ".lock")
        before = fake_data.snapshot_tree(run_dir)
        s.go("second")
        seen["second"] = s.result("second", "other")
        seen["resume"] = run_in_process(train_1st_order.main, train + ["--resume"])
        seen["untouched"] = fake_data.snapshot_tree(run_dir) == before

        s.go("validation")
        s.wait_for("validation_gate.reached", "other")
        seen["validation_lock"] = holder(run_dir / ".validate.lock")
        seen["second_validation"] = run_in_process(validate_NC.main, validation)
        open(s.path("validation_gate"), "w").close()
        seen["validation"] = s.result("validation", "other")
        seen["first_trains_on"] = s.procs["first"].poll() is None
        seen["info"] = load_pickle(run_dir / "info.pkl")

        s.procs["first"].send_signal(signal.SIGKILL)
        seen["first"] = s.procs["first"].wait(timeout=WAIT)
        s.go("resumed")
        s.wait_for("resumed_gate.reached", "other")  # it holds the lock that the killed process held
        seen["lock_after_kill"] = holder(run_dir / ".lock")
        s.procs["other"].send_signal(signal.SIGINT)
        seen["resumed"] = s.result("resumed", "other")
        seen["after_interrupt"] = sorted(os.listdir(run_dir))
        seen["loads"] = {name: torch.load(run_dir / name, map_location="cpu", weights_only=False) is not None
                         for name in seen["after_interrupt"] if name.endswith(".pth")}
        seen["args_after_interrupt"] = json.loads((run_dir / "args.json").read_text())
        seen["finished"] = run_in_process(train_1st_order.main, train + ["--resume"])
        seen["other"] = s.procs["other"].wait(timeout=WAIT)  # its exit status: the interrupted step's
        return seen
    finally:
        s.stop_all()


def one_line(stderr):
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


@pytest.mark.slow
def test_a_second_training_of_a_run_being_trained_is_refused_naming_the_first(busy):
    code, err = busy["second"]
    assert busy["lock"] == str(busy["pids"]["first"])
    assert code == 2
    line = one_line(err)
    assert line.startswith("error: ") and f"pid {busy['pids']['first']}" in line and "busy" in line


@pytest.mark.slow
def test_resume_of_a_run_being_trained_is_refused(busy):
    code, err = busy["resume"]
    assert code == 2
    assert f"pid {busy['pids']['first']}" in one_line(err)


@pytest.mark.slow
def test_the_refused_processes_leave_the_first_ones_files_as_they_were(busy):
    assert busy["untouched"]


@pytest.mark.slow
def test_validation_while_training_runs_is_allowed(busy):
    code, err = busy["validation"]
    assert code == 0, err
    assert busy["first_trains_on"]
    assert busy["info"]["epochs"] == [1]


@pytest.mark.slow
def test_a_second_validation_of_a_run_at_once_is_refused(busy):
    code, err = busy["second_validation"]
    assert busy["validation_lock"] == str(busy["pids"]["other"])
    assert code == 2
    line = one_line(err)
    assert f"pid {busy['pids']['other']}" in line and "validated" in line


@pytest.mark.slow
def test_a_killed_training_leaves_no_stuck_lock(busy):
    assert busy["first"] == -signal.SIGKILL
    assert busy["lock_after_kill"] == str(busy["pids"]["other"])  # --resume got the lock at once
    code, err = busy["finished"]
    assert code == 0, err
    assert checkpoint_epochs(busy["run_dir"]) == [1, 2, 3]


@pytest.mark.slow
def test_sigint_to_a_training_exits_130_in_one_line_with_its_files_complete(busy):
    """Case 9: a real Ctrl-C (SIGINT) of a training process in the middle of an epoch."""
    code, err = busy["resumed"]
    assert code == 130 and busy["other"] == 130
    assert one_line(err).startswith("interrupted")
    names = busy["after_interrupt"]
    assert not [n for n in names if n.startswith(".tmp_")]
    assert {"args.json", "epoch_001.pth", "last.pth", "train_log.txt"} <= set(names)
    assert all(busy["loads"].values()) and busy["args_after_interrupt"]["epochs"] == 3


# ---------------------------------------------------------------------------- 2. non-finite weights

@pytest.mark.parametrize("loss, hint", [("MSE", "lower --lr"), ("RescaledMSE", "--M/--k")])
def test_a_step_to_non_finite_weights_is_never_saved(capsys, tmp_path, loss, hint):
    argv = B + ["--uid", "lr30", "--epochs", "6", "--lr", "30", "--batch_size", "200", "--loss", loss,
                "--save_dir", str(tmp_path)]
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.run_main(train_1st_order.main, argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    line = err.strip().splitlines()[-1]  # after the progress bar
    assert line.startswith("error: the ") and "non-finite" in line and hint in line, err
    run_dir = tmp_path / "lr30"
    epochs = checkpoint_epochs(run_dir)
    assert 1 <= len(epochs) < 6
    for e in epochs:
        assert base.all_finite(torch.load(run_dir / f"epoch_{e:03d}.pth", weights_only=True)), e
    assert base.all_finite(torch.load(run_dir / "last.pth", weights_only=False)["model"])


def test_the_divergence_hint_names_m_and_k_only_for_rescaled_mse():
    parse = train_parser()
    assert training.divergence_hint(parse.parse_args(["--loss", "MSE"])) == "lower --lr"
    rescaled = training.divergence_hint(parse.parse_args(["--loss", "RescaledMSE"]))
    assert "--lr" in rescaled and "--M" in rescaled and "--k" in rescaled


def scaled_checkpoint(run_dir, epoch, factor):
    path = os.path.join(run_dir, f"epoch_{epoch:03d}.pth")
    state = torch.load(path, weights_only=True)
    torch.save({k: v * factor if k.endswith("weight") else v for k, v in state.items()}, path)


@pytest.mark.parametrize("factor, reason", [(float("nan"), "not finite"), (1e20, "cannot be computed")])
def test_validation_skips_a_checkpoint_that_cannot_be_measured(run_copy, capsys, factor, reason):
    """Non-finite weights; or finite ones so large that the features overflow and the SVD fails."""
    scaled_checkpoint(run_copy, 1, factor)
    with pytest.warns(UserWarning, match=f"skipping .*epoch_001.pth: .*{reason}"):
        validate(run_copy)
    assert load_pickle(run_copy / "info.pkl")["epochs"] == [2]
    assert "(1 computed, 0 reused, 1 skipped)" in capsys.readouterr().out


@pytest.mark.parametrize("flag", ["--lr", "--gamma", "--weight_decay", "--feature_decay_rate", "--M", "--k"])
@pytest.mark.parametrize("value", ["inf", "nan", "-inf"])
def test_non_finite_numbers_are_refused_by_the_parser(capsys, tiny_argv, flag, value):
    message = refused(capsys, train_1st_order.main, tiny_argv("bad", f"{flag}={value}"))
    assert flag in message and value in message
    assert nothing_under(tiny_argv.save_dir)


# ---------------------------------------------------------------------------- 3. the validation cache

def summary(out):
    return re.search(r"\((-?\d+) computed, (-?\d+) reused, (-?\d+) skipped\)", out).groups()


def test_validation_results_are_keyed_to_the_data(tiny_argv, tmp_path, capsys):
    d1, d2 = str(tmp_path / "d1"), str(tmp_path / "d2")
    fake_data.write_mnist(d1, seed=0)
    fake_data.write_mnist(d2, seed=1)
    run_dir = train_1st_order.main(tiny_argv("data", "--dataset", "mnist", "--data_dir", d1, "--sample_size", 3,
                                             "--batch_size", 10, "--epochs", 1))
    runs = []  # (computed, reused, skipped), NC1 of each validation
    for data_dir in (d1, d2, d1):
        capsys.readouterr()
        validate(run_dir, "--data_dir", data_dir)
        info = load_pickle(os.path.join(run_dir, "info.pkl"))
        runs.append((summary(capsys.readouterr().out), info["collapse_metric"]))
    (first, nc1_d1), (second, nc1_d2), (third, nc1_d1_again) = runs
    assert first == ("1", "0", "0")
    assert second == ("1", "0", "0") and nc1_d2 != nc1_d1  # D2: computed anew, and other numbers
    assert third == ("0", "1", "0") and nc1_d1_again == nc1_d1  # D1 again: its own results reused


# ---------------------------------------------------------------------------- 4. a plain --resume

def test_a_plain_resume_keeps_the_recorded_device_and_loader_settings(tiny_argv, monkeypatch):
    run_dir = train_1st_order.main(tiny_argv("plain", "--loader", "torch", "--num_workers", 0, "--gpu_id", 3,
                                             "--epochs", 1))
    asked = {}
    real_loaders, real_device = training.datasets.make_loaders, training.get_device

    def make_loaders(*args, **kwargs):
        given = inspect.signature(real_loaders).bind(*args, **kwargs).arguments
        asked["loader"], asked["num_workers"] = given["loader"], given["num_workers"]
        return real_loaders(*args, **kwargs)

    def get_device(gpu_id=0, device=None):
        asked["gpu_id"], asked["device"] = gpu_id, device
        return real_device(gpu_id, device)
    monkeypatch.setattr(training.datasets, "make_loaders", make_loaders)
    monkeypatch.setattr(training, "get_device", get_device)
    # only what --resume needs: none of the data and device flags
    train_1st_order.main(["--save_dir", str(tiny_argv.save_dir), "--uid", "plain", "--resume", "--epochs", "2"])
    assert asked == {"loader": "torch", "num_workers": 0, "gpu_id": 3, "device": "cpu"}
    recorded = json.loads(open(os.path.join(run_dir, "args.json")).read())
    assert (recorded["num_workers"], recorded["gpu_id"], recorded["device"]) == (0, 3, "cpu")


# ---------------------------------------------------------------------------- 5. --resume, new values

def test_resume_with_fewer_epochs_than_finished_is_refused_and_changes_nothing(run_copy, capsys):
    before = fake_data.snapshot_tree(run_copy)
    message = refused(capsys, train_1st_order.main,
                      TINY_RUN + ["--save_dir", str(run_copy.parent), "--uid", "tiny", "--resume", "--epochs", "1"])
    assert "--epochs 1" in message and "2" in message
    assert fake_data.snapshot_tree(run_copy) == before


def test_resume_with_fewer_epochs_than_the_resume_state_holds_is_refused(tiny_argv, capsys, monkeypatch):
    """--save_every 3, stopped after epoch 7 of 9: checkpoints 3 and 6, and last.pth of epoch 7."""
    class Stop(Exception):
        pass
    real = training.train_one_epoch

    def train_one_epoch(model, loader, step, optimizer, objective, epoch, *args, **kwargs):
        if epoch == 8:
            raise Stop
        return real(model, loader, step, optimizer, objective, epoch, *args, **kwargs)
    monkeypatch.setattr(training, "train_one_epoch", train_one_epoch)
    with pytest.raises(Stop):
        train_1st_order.main(tiny_argv("seven", "--epochs", 9, "--save_every", 3))
    run_dir = tiny_argv.save_dir / "seven"
    assert checkpoint_epochs(run_dir) == [3, 6]
    before = fake_data.snapshot_tree(run_dir)
    message = refused(capsys, train_1st_order.main, tiny_argv("seven", "--save_every", 3, "--resume", "--epochs", 6))
    assert "--epochs 6" in message and "finished 7 epochs" in message
    assert fake_data.snapshot_tree(run_dir) == before


def test_resume_after_the_data_moved_records_the_new_data_dir(tiny_argv, tmp_path):
    old, new = tmp_path / "data", tmp_path / "moved"
    fake_data.write_mnist(str(old))
    flags = ["--dataset", "mnist", "--sample_size", 3, "--batch_size", 10]
    run_dir = train_1st_order.main(tiny_argv("moved", *flags, "--data_dir", old, "--epochs", 1))
    os.rename(old, new)
    train_1st_order.main(tiny_argv("moved", *flags, "--data_dir", new, "--resume"))
    assert checkpoint_epochs(run_dir) == [1, 2]
    assert json.loads(open(os.path.join(run_dir, "args.json")).read())["data_dir"] == str(new)


# ---------------------------------------------------------------------------- 6. --batch_size 1

def test_batch_size_one_is_refused_before_the_run_directory_exists(tiny_argv, capsys):
    message = refused(capsys, train_1st_order.main, tiny_argv("one", "--batch_size", 1))
    assert "--batch_size" in message
    assert not (tiny_argv.save_dir / "one").exists()
    run_dir = train_1st_order.main(tiny_argv("one", "--batch_size", 2, "--epochs", 1))  # no --force needed
    assert checkpoint_epochs(run_dir) == [1]


# ---------------------------------------------------------------------------- 8. signals to the runbook


# ---------------------------------------------------------------------------- 9. one line instead of a traceback

def test_save_dir_naming_a_file_is_refused(tiny_argv, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    message = refused(capsys, train_1st_order.main, tiny_argv("x", "--save_dir", afile))
    assert "--save_dir" in message and str(afile) in message
    assert afile.read_text() == "keep me"


def test_uid_naming_a_file_is_refused(tiny_argv, capsys):
    tiny_argv.save_dir.mkdir()
    (tiny_argv.save_dir / "x").write_text("keep me")
    message = refused(capsys, train_1st_order.main, tiny_argv("x"))
    assert "--uid" in message
    assert (tiny_argv.save_dir / "x").read_text() == "keep me"


@pytest.mark.parametrize("uid", ["u" * 300, "a/b", "..", ""])
def test_a_uid_that_is_not_a_folder_name_is_refused(tiny_argv, capsys, uid):
    assert "--uid" in refused(capsys, train_1st_order.main, tiny_argv(uid))
    assert nothing_under(tiny_argv.save_dir)


@pytest.mark.parametrize("where", ["parent_is_a_file", "proc"])
def test_an_unwritable_save_dir_is_refused(tiny_argv, tmp_path, capsys, where):
    """As root, chmod stops no write: a folder that cannot be created (its parent is a file, or it
    lies in /proc/sys) stands for a save dir without write permission."""
    (tmp_path / "afile").write_text("keep me")
    save_dir = tmp_path / "afile" / "runs" if where == "parent_is_a_file" else "/proc/sys/nc_test_runs"
    message = refused(capsys, train_1st_order.main, tiny_argv("x", "--save_dir", save_dir))
    assert str(save_dir) in message
    assert (tmp_path / "afile").read_text() == "keep me" and not os.path.exists("/proc/sys/nc_test_runs")


def test_an_unwritable_run_directory_is_refused(tiny_argv, capsys):
    """A run directory that exists but where no file can be created (as root, only /proc has such
    folders): /proc/self/fdinfo, restarted with --force."""
    assert "/proc/self/fdinfo" in refused(capsys, train_1st_order.main,
                                          tiny_argv("fdinfo", "--save_dir", "/proc/self", "--force"))


def test_nc_results_being_a_file_is_refused(run_copy, capsys):
    (run_copy / "nc_results").write_text("keep me")
    before = fake_data.snapshot_tree(run_copy)
    message = refused(capsys, validate_NC.main, ["--load_path", str(run_copy), "--device", "cpu"])
    assert "nc_results" in message
    assert fake_data.snapshot_tree(run_copy) == before


# how args.json is damaged: its whole text, None (cut in half), or {key: new value} (None: the key removed)
BAD_ARGS = {"wrong_keys": '{"x": 1}', "a_list": "[1, 2]", "truncated": None, "width_a_string": {"width": "32"},
            "epochs_a_string": {"epochs": "2"}, "no_width": {"width": None}, "no_lr": {"lr": None},
            "SOTA_a_number": {"SOTA": 1}, "lr_not_finite": {"lr": float("nan")}}


def damage_args(run_dir, how):
    """The key named in the damage (None for a damage of the whole file)."""
    path, damage = run_dir / "args.json", BAD_ARGS[how]
    text = path.read_text()
    if isinstance(damage, dict):
        record = json.loads(text)
        for key, value in damage.items():
            record.pop(key) if value is None else record.update({key: value})
        path.write_text(json.dumps(record))
        return next(iter(damage))
    path.write_text(text[: len(text) // 2] if damage is None else damage)
    return None


@pytest.mark.parametrize("how", sorted(BAD_ARGS))
@pytest.mark.parametrize("script", ["validate", "resume"])
def test_a_damaged_args_json_is_refused_in_one_line(run_copy, capsys, script, how):
    """A value of the wrong type or a missing key too: named, with the file and the fix, before use."""
    key = damage_args(run_copy, how)
    before = fake_data.snapshot_tree(run_copy)
    if script == "validate":
        message = refused(capsys, validate_NC.main, ["--load_path", str(run_copy), "--device", "cpu"])
    else:
        message = refused(capsys, train_1st_order.main,
                          TINY_RUN + ["--save_dir", str(run_copy.parent), "--uid", "tiny", "--resume"])
    assert "args.json" in message and "--force" in message
    assert key is None or key in message
    assert fake_data.snapshot_tree(run_copy) == before


@pytest.mark.parametrize("device", ["meta", "mps", "nonsense"])
def test_a_device_this_repository_cannot_use_is_refused(tiny_argv, run_copy, capsys, device):
    assert device in refused(capsys, train_1st_order.main, tiny_argv("dev", "--device", device))
    assert nothing_under(tiny_argv.save_dir / "dev")
    before = fake_data.snapshot_tree(run_copy)
    assert device in refused(capsys, validate_NC.main, ["--load_path", str(run_copy), "--device", device])
    assert fake_data.snapshot_tree(run_copy) == before


def write_info(run_dir, info):
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "info.pkl"), "wb") as f:
        pickle.dump(info, f)


class InterruptsPickling:
    def __reduce__(self):
        raise KeyboardInterrupt


def test_ctrl_c_during_a_save_exits_130_in_one_line(tmp_path, capsys):
    target = tmp_path / "state.pth"
    try:
        cli.run_main(lambda: base.save_torch({"x": InterruptsPickling()}, str(target)))
        code = 0
    except SystemExit as e:
        code = e.code
    except KeyboardInterrupt:  # would end the whole test session
        pytest.fail("the Ctrl-C escaped run_main")
    assert code == 130
    assert one_line(capsys.readouterr().err).startswith("interrupted")
    assert os.listdir(tmp_path) == []  # neither the file nor its temporary


# ---------------------------------------------------------------------------- 10. smaller ones

def test_tilde_is_expanded_in_save_dir_and_load_path(tiny_argv, tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    run_dir = train_1st_order.main(tiny_argv("tilde", "--save_dir", "~/runs", "--epochs", 1))
    assert os.path.samefile(run_dir, home / "runs" / "tilde")
    info = validate("~/runs/tilde")
    assert info["epochs"] == [1] and (home / "runs" / "tilde" / "info.pkl").exists()
    assert not (tmp_path / "~").exists()


def test_a_checkpoint_name_without_zero_padding_is_not_a_second_epoch(run_copy, capsys):
    shutil.copy(run_copy / "epoch_001.pth", run_copy / "epoch_1.pth")
    capsys.readouterr()
    info = validate(run_copy)
    assert info["epochs"] == [1, 2]
    assert summary(capsys.readouterr().out) == ("2", "0", "0")


@pytest.mark.parametrize("blocked", ["info.pkl", "test_log.txt"])
def test_a_folder_where_a_result_file_goes_is_one_line(run_copy, capsys, blocked):
    """The file system refusing a write (here a folder in the way; a full disk alike) is one line and
    exit 1, and what was written before is complete."""
    os.makedirs(os.path.join(run_copy, blocked, "x"))
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.run_main(validate, run_copy)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line]  # (beside the progress bar's lines)
    assert e.value.code == 1 and "Traceback" not in err, err
    assert len(errors) == 1 and errors[0].startswith("error: ") and blocked in errors[0], err
    assert sorted(os.listdir(os.path.join(run_copy, "nc_results"))) == ["epoch_001.pkl", "epoch_002.pkl"]
    assert not [n for n in os.listdir(run_copy) if n.startswith(".tmp_")]


# ---------------------------------------------------------------------------- 11. results never lost

@pytest.fixture(scope="module")
def in_run(tmp_path_factory):
    """A tiny run of 3 epochs measured as it trained, keeping the checkpoint of epoch 3 alone."""
    save_dir = tmp_path_factory.mktemp("in_run")
    return train_1st_order.main(TINY_RUN + ["--save_dir", str(save_dir), "--uid", "in_run", "--epochs", "3",
                                            "--nc_every", "1", "--save_every", "3"])


@pytest.fixture
def in_run_copy(in_run, tmp_path):
    return shutil.copytree(in_run, tmp_path / "runs" / "in_run")  # (copytree keeps the checkpoint's mtime)


def entries(info, epochs):
    """info's entries of these epochs, as lists like info's."""
    index = [info["epochs"].index(e) for e in epochs]
    return {k: [v[i] for i in index] for k, v in info.items()}


def one_warning(caught, needle):
    lines = [str(w.message) for w in caught if needle in str(w.message)]
    assert len(lines) == 1 and "\n" not in lines[0], [str(w.message) for w in caught]
    return lines[0]


def test_validation_keeps_what_info_pkl_holds_of_epochs_it_cannot_measure(in_run_copy, capsys):
    """nc_results/ removed: the checkpoint of epoch 3 is measured again, and epochs 1-2, which have
    neither a checkpoint nor a stored result any more, keep their entries, said in one line."""
    before = load_pickle(in_run_copy / "info.pkl")
    shutil.rmtree(in_run_copy / "nc_results")
    with pytest.warns(UserWarning) as caught:
        validate(in_run_copy)
    after = load_pickle(in_run_copy / "info.pkl")
    assert after["epochs"] == [1, 2, 3] and same(entries(after, [1, 2]), entries(before, [1, 2]))
    assert "epochs 1-2" in one_warning(caught, "keeps its earlier results")
    assert summary(capsys.readouterr().out) == ("1", "0", "0")


def test_resume_keeps_what_info_pkl_holds_without_stored_results(in_run_copy, capsys):
    before = load_pickle(in_run_copy / "info.pkl")
    shutil.rmtree(in_run_copy / "nc_results")
    train_1st_order.main(["--save_dir", str(in_run_copy.parent), "--uid", "in_run", "--resume", "--epochs", "5"])
    after = load_pickle(in_run_copy / "info.pkl")
    assert after["epochs"] == [1, 2, 3, 4, 5] and same(entries(after, [1, 2, 3]), before)
    assert "info.pkl holds epochs 1-3 without a result in nc_results/" in capsys.readouterr().out


def test_a_damaged_stored_result_is_named_as_the_cause(in_run_copy):
    before = load_pickle(in_run_copy / "info.pkl")
    with open(in_run_copy / "nc_results" / "epoch_001.pkl", "r+b") as f:
        f.truncate(20)
    with pytest.warns(UserWarning) as caught:
        validate(in_run_copy)
    assert same(load_pickle(in_run_copy / "info.pkl"), before)  # epoch 1 kept, 2 and 3 reused
    assert "epoch 1 (their files in nc_results/ cannot be read" in one_warning(caught, "keeps its earlier")
    os.remove(in_run_copy / "info.pkl")  # now nothing holds epoch 1
    with pytest.warns(UserWarning) as caught:
        validate(in_run_copy)
    assert load_pickle(in_run_copy / "info.pkl")["epochs"] == [2, 3]
    assert "epoch 1: the files in nc_results/ cannot be read" in one_warning(caught, "leaves out")
    assert not [w for w in caught if "other data" in str(w.message)]


def test_the_result_of_a_checkpoint_removed_after_it_was_measured_stands(run_copy, capsys):
    validate(run_copy)
    os.remove(run_copy / "epoch_001.pth")
    capsys.readouterr()
    assert validate(run_copy)["epochs"] == [1, 2]
    assert summary(capsys.readouterr().out) == ("0", "2", "0")


# ---------------------------------------------------------------------------- 12. one writer of a run at a time

def without_locks(snapshot):
    files, dirs = snapshot
    return {k: v for k, v in files.items() if not k.endswith(".lock")}, dirs


def test_a_start_over_is_refused_while_the_run_is_validated(run_copy, capsys):
    """validate_NC.py holds the validation lock while it runs: a --force restart (here of another
    model) must not replace the run under it, which would end with the new run's args.json and
    checkpoints beside the old run's info.pkl."""
    validate(run_copy)
    before = without_locks(fake_data.snapshot_tree(run_copy))
    with rundir.locked(str(run_copy), rundir.VALIDATE_LOCK, "validated"):
        message = refused(capsys, train_1st_order.main,
                          TINY_RUN + ["--save_dir", str(run_copy.parent), "--uid", "tiny", "--force", "--width", "16"])
    assert f"being validated by another process (pid {os.getpid()})" in message
    assert without_locks(fake_data.snapshot_tree(run_copy)) == before


def test_a_start_over_between_reading_the_run_and_locking_it_is_refused(run_copy, capsys, monkeypatch):
    """Validation reads args.json before it holds its lock: a --force restart (another width) in
    between is found once the lock is held, and nothing is measured with the old model's flags."""
    real = validation.run_arguments

    def run_arguments(cli, given):
        merged = real(cli, given)
        record = json.loads((run_copy / "args.json").read_text())
        (run_copy / "args.json").write_text(json.dumps({**record, "width": 16}))
        return merged
    monkeypatch.setattr(validation, "run_arguments", run_arguments)
    message = refused(capsys, validate_NC.main, ["--load_path", str(run_copy), "--device", "cpu"])
    assert "started over" in message and not (run_copy / "info.pkl").exists()


def test_a_run_started_over_inherits_no_result_and_may_be_validated_as_it_trains(run_copy, monkeypatch):
    validate(run_copy)  # the old run's info.pkl, of epochs 1-2
    real, seen = training.train_one_epoch, {}

    def train_one_epoch(model, loader, step, optimizer, objective, epoch, *args, **kwargs):
        if epoch == 2:  # the start over is done: validation's lock is free again
            seen["while_training"] = validate(run_copy)["epochs"]
        return real(model, loader, step, optimizer, objective, epoch, *args, **kwargs)
    monkeypatch.setattr(training, "train_one_epoch", train_one_epoch)
    train_1st_order.main(TINY_RUN + ["--save_dir", str(run_copy.parent), "--uid", "tiny", "--force", "--width", "16"])
    assert seen["while_training"] == [1]
    info = validate(run_copy)
    assert info["epochs"] == [1, 2] and all(W.shape == (10, 16) for W in info["W"])


def test_a_validation_and_a_training_that_measures_keep_each_others_results(tiny_argv, monkeypatch):
    """Training measures epochs 2 and 3 (--nc_every 2, and the last); a validation during epoch 3
    measures the checkpoints of epochs 1 and 2. Training's next rewrite of info.pkl keeps the
    validation's epoch 1."""
    real, seen = training.train_one_epoch, {}

    def train_one_epoch(model, loader, step, optimizer, objective, epoch, *args, **kwargs):
        if epoch == 3:
            seen["validated"] = validate(tiny_argv.save_dir / "turns")["epochs"]
        return real(model, loader, step, optimizer, objective, epoch, *args, **kwargs)
    monkeypatch.setattr(training, "train_one_epoch", train_one_epoch)
    run_dir = train_1st_order.main(tiny_argv("turns", "--epochs", 3, "--nc_every", 2))
    assert seen["validated"] == [1, 2]
    assert load_pickle(os.path.join(run_dir, "info.pkl"))["epochs"] == [1, 2, 3]


def test_a_read_only_run_is_named_with_load_path(run_copy, capsys, monkeypatch):
    """A PermissionError stands for a folder without write permission (as root, chmod stops no write)."""
    real = os.open

    def refusing(path, flags, *args, **kwargs):
        if str(path).endswith(rundir.VALIDATE_LOCK):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path, flags, *args, **kwargs)
    monkeypatch.setattr(rundir.os, "open", refusing)
    message = refused(capsys, validate_NC.main, ["--load_path", str(run_copy), "--device", "cpu"])
    assert str(run_copy) in message and "--load_path" in message and "--save_dir" not in message


@pytest.mark.parametrize("lock", [rundir.TRAIN_LOCK, rundir.VALIDATE_LOCK])
def test_a_folder_where_a_lock_goes_is_named(run_copy, capsys, lock):
    if (run_copy / lock).exists():
        os.remove(run_copy / lock)
    (run_copy / lock).mkdir()
    if lock == rundir.VALIDATE_LOCK:
        message = refused(capsys, validate_NC.main, ["--load_path", str(run_copy), "--device", "cpu"])
    else:
        message = refused(capsys, train_1st_order.main, ["--save_dir", str(run_copy.parent), "--uid", "tiny", "--resume"])
    assert str(run_copy / lock) in message and "folder" in message


def test_temporaries_of_killed_writes_are_removed_by_the_next_writer_of_their_kind(run_copy):
    """What base.atomic_write leaves when its process is killed before the rename. Validation removes
    those of the results only (a training may be writing its own at this moment); --resume its own."""
    (run_copy / "nc_results").mkdir()
    results = ["nc_results/.tmp_epoch_001.pkl.x1", ".tmp_info.pkl.x2", ".tmp_test_log.txt.x3"]
    training_files = [".tmp_last.pth.x4", ".tmp_epoch_003.pth.x5", ".tmp_args.json.x6"]
    for name in results + training_files:
        (run_copy / name).write_bytes(b"half")
    validate(run_copy)
    assert [n for n in results + training_files if (run_copy / n).exists()] == training_files
    train_1st_order.main(["--save_dir", str(run_copy.parent), "--uid", "tiny", "--resume"])
    assert not [n for n in training_files if (run_copy / n).exists()]


# ---------------------------------------------------------------------------- the hostile trial
# A resume onto other data or with another thread count, the tracebacks where one line was promised
# (a full disk, a network too large for memory, a learning rate float32 cannot hold).

def stopped(capsys, argv, code):
    """Run a training as its script does; the one `error:` line it printed (after the progress bar,
    which may share its line) once it exited with `code`, without a traceback."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.run_main(train_1st_order.main, argv)
    err = capsys.readouterr().err
    errors = re.findall(r"error: [^\r\n]*", err)
    assert e.value.code == code and "Traceback" not in err and len(errors) == 1, err
    return errors[0]


@pytest.fixture
def two_data_sets(tmp_path):
    """Two MNIST folders of the same shape and other images."""
    d1, d2 = tmp_path / "d1", tmp_path / "d2"
    fake_data.write_mnist(str(d1), seed=0)
    fake_data.write_mnist(str(d2), seed=1)
    return d1, d2


def read_args(run_dir):
    return json.loads((run_dir / rundir.ARGS).read_text())


def write_args(run_dir, args):
    (run_dir / rundir.ARGS).write_text(json.dumps(args))


def run_files(run_dir):
    """The run's files as fake_data.snapshot_tree sees them, without the lock (whose holder writes its pid)."""
    files, folders = fake_data.snapshot_tree(run_dir)
    return {k: v for k, v in files.items() if k != rundir.TRAIN_LOCK}, folders


MNIST = ["--dataset", "mnist", "--sample_size", 3, "--batch_size", 10]


def test_a_resume_onto_other_data_is_refused_and_changes_nothing(tiny_argv, two_data_sets, capsys):
    d1, d2 = two_data_sets
    run_dir = tiny_argv.save_dir / "other"
    train_1st_order.main(tiny_argv("other", *MNIST, "--data_dir", d1, "--epochs", 1, "--nc_every", 1))
    before = run_files(run_dir)
    message = refused(capsys, train_1st_order.main, tiny_argv("other", *MNIST, "--data_dir", d2, "--resume"))
    assert "--data_dir" in message and str(d2) in message and "not those this run trained on" in message
    assert run_files(run_dir) == before  # info.pkl keeps epoch 1; nothing trained on d2


def test_a_run_that_recorded_no_data_digest_resumes_as_before(tiny_argv, two_data_sets):
    d1, d2 = two_data_sets
    run_dir = tiny_argv.save_dir / "old"
    train_1st_order.main(tiny_argv("old", *MNIST, "--data_dir", d1, "--epochs", 1))
    args = read_args(run_dir)
    write_args(run_dir, {k: v for k, v in args.items() if k not in (checks.DATA_KEY, checks.THREADS)})
    train_1st_order.main(tiny_argv("old", *MNIST, "--data_dir", d2, "--resume"))
    assert [e for e, _ in rundir.list_checkpoints(run_dir)] == [1, 2]
    assert checks.DATA_KEY not in read_args(run_dir)


@pytest.fixture
def threads_seen(monkeypatch):
    """The CPU thread count of each epoch trained from now on."""
    seen, real = [], training.train_one_epoch

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)
    monkeypatch.setattr(training, "train_one_epoch", spy)
    return seen


def test_a_resume_on_the_cpu_keeps_the_thread_count_the_run_started_with(tiny_argv, monkeypatch, threads_seen):
    """A run started under `experiments.py --jobs 2` (one thread) and resumed under --jobs 1 (the
    machine's default, here two) went on with two threads and other numbers."""
    for name in checks.THREAD_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    run_dir = train_1st_order.main(tiny_argv("pinned", "--epochs", 1))  # under single_thread: one thread
    torch.set_num_threads(2)  # a new process whose default is two
    train_1st_order.main(tiny_argv("pinned", "--resume"))
    assert threads_seen == [1, 1]
    assert torch.get_num_threads() == 2  # given back afterwards
    assert json.loads(open(os.path.join(run_dir, rundir.ARGS)).read())[checks.THREADS] == 1


def test_a_thread_count_asked_for_on_resume_is_used_and_said_in_one_line(tiny_argv, monkeypatch, capsys, threads_seen):
    run_dir = train_1st_order.main(tiny_argv("asked", "--epochs", 1))
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    torch.set_num_threads(2)  # as a process started under OMP_NUM_THREADS=2 has
    capsys.readouterr()
    train_1st_order.main(tiny_argv("asked", "--resume"))
    assert threads_seen == [1, 2]
    notes = [line for line in capsys.readouterr().out.splitlines() if "OMP_NUM_THREADS" in line]
    assert len(notes) == 1 and "started with 1" in notes[0] and "may differ" in notes[0]
    assert notes[0] in open(os.path.join(run_dir, rundir.TRAIN_LOG)).read()


class Disk:
    """A disk for everything a training writes (base.atomic_write through os.fdopen, base.Log and
    rundir.append_metrics through open) that fills `after` bytes into the file numbered `full_in`
    (from 0, in the order they are written): a write that does not fit writes what fits and raises
    OSError(ENOSPC), as a full disk does, and torch.save wraps that in its own error. `sizes` are the
    bytes written to each file."""

    def __init__(self, full_in=None, after=0):
        self.full_in, self.after, self.free, self.sizes = full_in, after, float("inf"), []

    def filling(self, f):
        if len(self.sizes) == self.full_in:
            self.free = self.after
        self.sizes.append(0)
        return Filling(self, f, len(self.sizes) - 1)

    def install(self, monkeypatch):
        real_fdopen = os.fdopen

        def fdopen(fd, mode="r", *args, **kwargs):
            f = real_fdopen(fd, mode, *args, **kwargs)
            return self.filling(f) if "w" in mode else f

        def open_(path, mode="r", *args, **kwargs):
            f = builtins.open(path, mode, *args, **kwargs)
            return self.filling(f) if "a" in mode or "w" in mode else f
        monkeypatch.setattr(os, "fdopen", fdopen)
        for module in (base, rundir):
            monkeypatch.setattr(module, "open", open_, raising=False)


class Filling:
    def __init__(self, disk, f, number):
        self.disk, self.f, self.number = disk, f, number

    def write(self, data):
        n = int(min(len(data), self.disk.free))
        self.f.write(data[:n])
        self.disk.free -= n
        self.disk.sizes[self.number] += n
        if n < len(data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return n

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


DISK_RUN = TINY_RUN + ["--nc_every", "1"]  # every kind of file a run writes: results and info.pkl too


@pytest.fixture(scope="module")
def disk_reference(tmp_path_factory):
    """(run directory, the size of each file written, in order) of the uninterrupted run."""
    datasets.load_data("mnist_sample", sample_size=10)  # its cache is not the run's to write
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    disk = Disk()
    with pytest.MonkeyPatch.context() as monkeypatch:
        disk.install(monkeypatch)
        run_dir = train_1st_order.main(DISK_RUN + ["--save_dir", str(tmp_path_factory.mktemp("disk")), "--uid", "ref"])
    torch.set_num_threads(old)
    return run_dir, disk.sizes


FILES_WRITTEN = 16  # by DISK_RUN: args.json; per epoch a checkpoint, result, info.pkl, test_log, metrics, last.pth; 3 log lines


def test_the_disk_run_writes_what_the_fill_levels_assume(disk_reference):
    assert len(disk_reference[1]) == FILES_WRITTEN and min(disk_reference[1]) > 1


@pytest.mark.parametrize("level", range(FILES_WRITTEN))
def test_a_full_disk_is_one_line_naming_the_file_and_the_next_command(disk_reference, tmp_path, monkeypatch,
                                                                        capsys, level):
    """The disk fills in the middle of the level-th file a run writes (the trial: a traceback at each
    of 15 fill levels). Afterwards every file kept is whole, and the command the line names finishes
    the run as if the disk had never been full."""
    reference, sizes = disk_reference
    Disk(full_in=level, after=sizes[level] // 2).install(monkeypatch)
    argv = DISK_RUN + ["--save_dir", str(tmp_path), "--uid", "full"]
    try:
        line = stopped(capsys, argv, base.EXIT_FAILED)
    finally:
        monkeypatch.undo()
    run_dir = tmp_path / "full"
    assert re.match(rf"error: {re.escape(str(run_dir))}/\S+: {os.strerror(errno.ENOSPC)};", line), line
    if run_dir.exists():
        assert not [name for name in os.listdir(run_dir) if name.startswith(".tmp_")]
        for epoch, path in rundir.list_checkpoints(run_dir):  # whole, and the uninterrupted run's
            assert same(torch.load(path, weights_only=True), torch.load(rundir.checkpoint_path(reference, epoch),
                                                                        weights_only=True)), path
        assert rundir.load_state(run_dir) is not None or not os.path.exists(run_dir / rundir.LAST)
    # --resume where the same command would be refused, as a run already there; else the same command
    resume = "--resume" in line
    assert resume == rundir.has_run(run_dir)
    train_1st_order.main(argv + ["--resume"] * resume)
    for name in ("epoch_001.pth", "epoch_002.pth"):
        assert same(torch.load(run_dir / name, weights_only=True), torch.load(os.path.join(reference, name),
                                                                             weights_only=True)), name
    assert [r["epoch"] for r in rundir.read_metrics(run_dir)] == [1, 2]
    assert rundir.validated_epochs(run_dir) == {1, 2}


@pytest.mark.parametrize("flags", [["--width", "10000000000"], ["--depth", "1000000000000"],
                                   ["--model", "ResNet18_adapt", "--width", "1000000"],
                                   ["--model", "resnet18", "--fixdim", "1000000000000"]])
def test_a_network_larger_than_memory_is_refused_before_anything_is_written(tiny_argv, capsys, flags):
    """--width 1000000000 ended in the allocator's traceback, and left a run directory behind."""
    message = refused(capsys, train_1st_order.main, tiny_argv("huge", *flags))
    assert "GiB" in message and flags[-2] in message and "choose a smaller" in message
    assert nothing_under(tiny_argv.save_dir)


@pytest.mark.parametrize("flags", [["--model", "MLP", "--width", "7", "--depth", "3"],
                                   ["--model", "ResNet18_adapt", "--width", "2"],
                                   ["--model", "resnet50", "--fixdim", "20", "--ETF_fc"]])
def test_the_size_check_counts_no_more_parameters_than_the_network_has(flags):
    args = train_parser().parse_args(flags)
    network = models.build_model(args, 10)
    assert 0 < checks.least_parameters(args) <= sum(p.numel() for p in network.parameters())


@pytest.mark.parametrize("flag", ["--lr", "--gamma", "--weight_decay", "--feature_decay_rate", "--M", "--k"])
def test_a_number_beyond_float32_is_refused_by_the_parser(capsys, tiny_argv, flag):
    """--lr 1e308 ended in a traceback from the optimiser (it cannot be converted to float32)."""
    message = refused(capsys, train_1st_order.main, tiny_argv("big", flag, "1e308"))
    assert flag in message and "1e308" in message and f"{FLOAT32_MAX:.4g}" in message
    assert nothing_under(tiny_argv.save_dir)


def test_the_largest_float32_is_accepted():
    assert train_parser().parse_args(["--lr", repr(FLOAT32_MAX)]).lr == FLOAT32_MAX


def test_a_new_run_that_diverges_in_its_first_epoch_leaves_nothing_and_the_corrected_command_runs(tiny_argv, capsys):
    """--lr 1e308 (now refused by the parser; 1e30 diverges in its first epoch) left a half-made run
    that refused the corrected command without --force."""
    assert "non-finite" in stopped(capsys, tiny_argv("lr", "--lr", "1e30"), base.EXIT_BAD_INPUT)
    assert nothing_under(tiny_argv.save_dir)
    run_dir = train_1st_order.main(tiny_argv("lr", "--lr", "0.05"))
    assert [e for e, _ in rundir.list_checkpoints(run_dir)] == [1, 2]


def test_a_step_that_overflows_float32_stops_the_run_in_one_line(tiny_argv, capsys):
    """Adam's first step divides --lr by 1 - beta1 = 0.1: 1e38 / 0.1 is beyond float32."""
    message = stopped(capsys, tiny_argv("adam", "--optimizer", "Adam", "--lr", "1e38"), base.EXIT_BAD_INPUT)
    assert "overflowed float32 at epoch 1, batch 1" in message and "lower --lr" in message
