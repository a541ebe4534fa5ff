"""The hostile trial on main (issue "What a referee would find", section 4): a resume onto other data or
with another thread count, the local cluster's time limit, and the tracebacks where one line was
promised (a full disk, a network too large for memory, a learning rate float32 cannot hold). Each test
reproduces one reported failure."""
import builtins
import errno
import json
import os
import re

import pytest
import torch

import datasets
import experiments
import fake_data
import models
from nclib import rundir
import train_1st_order
from nclib import training
from args import FLOAT32_MAX, train_parser
from conftest import TINY_RUN
from helpers import refused, same
from nclib import base
from nclib import checks
from nclib import cli
from nclib import runbook

pytestmark = pytest.mark.usefixtures("single_thread")


def nothing_under(folder):
    return not os.path.exists(folder) or not os.listdir(folder)


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


# ---------------------------------------------------------------------------- resume onto other data

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


# ---------------------------------------------------------------------------- resume with other threads

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


def test_the_runbook_leaves_its_thread_share_out_of_a_resumed_run(tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    envs = {}

    def run(self, command, log=None, env=None):
        envs[command[command.index("--uid") + 1]] = env
        return 0
    monkeypatch.setattr(runbook.Children, "run", run)
    items = [("run", str(tmp_path / uid), [("train_1st_order.py", ["--uid", uid, *flags])])
             for uid, flags in (("new", []), ("half_done", ["--resume"]))]
    runbook.execute(items, jobs=2)
    assert "OMP_NUM_THREADS" in envs["new"] and envs["half_done"] is None  # None: the runbook's own environment


# ---------------------------------------------------------------------------- the local cluster's time limit

def test_the_local_cluster_gets_the_time_limit_and_gpus(tmp_path, monkeypatch, capsys):
    """`--slurm --cluster local --time 600` stopped every job after about 90 s (submitit's local default)."""
    submitit = pytest.importorskip("submitit")
    seen = []

    class Job:
        job_id = "1"

        def result(self):
            return None

    def submit(executor, fn):
        seen.append(dict(executor._executor.parameters))
        return Job()
    monkeypatch.setattr(submitit.AutoExecutor, "submit", submit)
    experiments.main(["--figure", "optim", "--root", str(tmp_path), "--slurm", "--cluster", "local",
                      "--time", "600", "--gpus_per_job", "1"])
    assert len(seen) == 3 and all(p["timeout_min"] == 600 and p["gpus_per_node"] == 1 for p in seen)


# ---------------------------------------------------------------------------- a full disk

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


# ---------------------------------------------------------------------------- sizes and numbers

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
