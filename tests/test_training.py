"""nclib/training.py and the two training scripts (train_1st_order.py, train_2nd_order.py) end to end:
short runs and their run directories, their refusals of bad input, and runs that survive being killed,
diverging and bad input (--resume, atomic writes, a clean stop on a non-finite loss)."""
import argparse
import json
import os
from pathlib import Path
import re
import shutil
import stat
import subprocess
import sys

import pytest
import torch

from args import train_parser
from conftest import tiny_run, TINY_RUN
import fake_data
import harness
from helpers import load_pickle, refused, REPO, same
import models
from nclib import rundir
import train_1st_order
import train_2nd_order
import validate_NC

pytestmark = pytest.mark.usefixtures("single_thread")

K = 3


# ---------------------------------------------------------------------------- optimisers


# ---------------------------------------------------------------------------- short runs

def read_run(run_dir):
    with open(os.path.join(run_dir, "args.json")) as f:
        recorded = json.load(f)
    with open(os.path.join(run_dir, "train_log.txt")) as f:
        log = f.read()
    return recorded, log


def check_checkpoints(run_dir, epochs, num_classes=10):
    """epoch_001.pth ... load, hold the state_dict of the network that args.json describes, and change."""
    recorded, _ = read_run(run_dir)
    model = models.build_model(argparse.Namespace(**recorded), num_classes)
    names = sorted(n for n in os.listdir(run_dir) if re.fullmatch(r"epoch_\d+\.pth", n))
    assert names == [f"epoch_{e:03d}.pth" for e in range(1, epochs + 1)]
    states = [torch.load(os.path.join(run_dir, n), map_location="cpu", weights_only=True) for n in names]
    for state in states:
        assert set(state) == set(model.state_dict())
        model.load_state_dict(state, strict=True)
    if epochs > 1:
        assert not torch.equal(states[0]["fc.bias" if "fc.bias" in states[0] else "fc.weight"],
                               states[-1]["fc.bias" if "fc.bias" in states[-1] else "fc.weight"])
    return recorded, states


def epoch_lines(log):
    return [line for line in log.splitlines() if re.match(r"\s*epoch\s+\d+", line)]


def logged_lrs(log):
    return [float(re.search(r"\blr[ =:]+([0-9.eE+-]+)", line).group(1)) for line in epoch_lines(log)]


@pytest.mark.parametrize("optimizer", ["SGD", "Adam"])
def test_first_order_run_writes_its_run_directory(tiny_argv, optimizer):
    run_dir = train_1st_order.main(tiny_argv("run1", "--optimizer", optimizer, "--lr", "0.01"))
    assert os.path.samefile(run_dir, tiny_argv.save_dir / "run1")
    recorded, log = read_run(run_dir)
    assert recorded["optimizer"] == optimizer and recorded["model"] == "MLP" and recorded["epochs"] == 2
    assert recorded["dataset"] == "mnist_sample" and recorded["sample_size"] == 10 and recorded["lr"] == 0.01
    assert len(epoch_lines(log)) == 2
    check_checkpoints(run_dir, 2)


def test_second_order_run_writes_its_run_directory(tiny_argv):
    # one LBFGS step per epoch: 5 images per class in one batch
    run_dir = train_2nd_order.main(tiny_argv("lbfgs", "--optimizer", "LBFGS", "--history_size", "5",
                                             "--sample_size", "5", "--batch_size", "50"))
    recorded, log = read_run(run_dir)
    assert recorded["optimizer"] == "LBFGS" and recorded["history_size"] == 5
    assert len(epoch_lines(log)) == 2
    check_checkpoints(run_dir, 2)


def test_second_order_script_defaults_to_lbfgs(tiny_argv):
    recorded, _ = read_run(train_2nd_order.main(tiny_argv("lbfgs_default", "--epochs", "1", "--sample_size", "2")))
    assert recorded["optimizer"] == "LBFGS"


def test_etf_alias_run_keeps_the_classifier_fixed(tiny_argv):
    argv = tiny_argv("etf", "--model", "resnet18", "--ETF", "--sample_size", "2", "--batch_size", "20", "--epochs", "1")
    run_dir = train_1st_order.main(argv)
    recorded, states = check_checkpoints(run_dir, 1)
    assert recorded["ETF_fc"] is True and recorded["model"] == "resnet18"
    torch.testing.assert_close(states[0]["fc.weight"], models.simplex_etf(10, 512))


def test_etf_fixdim_run(tiny_argv):
    argv = tiny_argv("etf10", "--model", "resnet18", "--ETF_fc", "--fixdim", "10", "--sample_size", "2",
                     "--batch_size", "20", "--epochs", "1")
    recorded, states = check_checkpoints(train_1st_order.main(argv), 1)
    assert recorded["fixdim"] == 10 and states[0]["fc.weight"].shape == (10, 10)
    torch.testing.assert_close(states[0]["fc.weight"], models.simplex_etf(10, 10))


def test_sep_decay_run(tiny_argv):
    run_dir = train_1st_order.main(tiny_argv("sep", "--sep_decay", "--feature_decay_rate", "1e-3"))
    recorded, log = read_run(run_dir)
    assert recorded["sep_decay"] is True and recorded["feature_decay_rate"] == 1e-3
    check_checkpoints(run_dir, 2)


def test_rescaled_mse_run(tiny_argv):
    run_dir = train_1st_order.main(tiny_argv("rmse", "--loss", "RescaledMSE", "--M", "3", "--k", "2"))
    recorded, log = read_run(run_dir)
    assert (recorded["loss"], recorded["M"], recorded["k"]) == ("RescaledMSE", 3.0, 2.0)
    check_checkpoints(run_dir, 2)


def test_multistep_decay_run(tiny_argv):
    run_dir = train_1st_order.main(tiny_argv("multistep", "--decay_type", "step_1_2", "--epochs", "3", "--lr", "0.1"))
    recorded, log = read_run(run_dir)
    assert recorded["decay_type"] == "step_1_2"
    assert logged_lrs(log) == pytest.approx([0.1, 0.01, 0.001])
    check_checkpoints(run_dir, 3)


def test_cosine_decay_run(tiny_argv):
    run_dir = train_1st_order.main(tiny_argv("cosine", "--decay_type", "cosine", "--epochs", "2", "--lr", "0.1"))
    assert logged_lrs(read_run(run_dir)[1]) == pytest.approx([0.1, 0.05])
    check_checkpoints(run_dir, 2)


def test_no_bias_run(tiny_argv):
    recorded, states = check_checkpoints(train_1st_order.main(tiny_argv("nobias", "--no-bias")), 2)
    assert recorded["bias"] is False
    assert "fc.bias" not in states[0] and "fc.weight" in states[0]


def test_run_without_uid_gets_a_fresh_name(tmp_path):
    argv = TINY_RUN + ["--save_dir", str(tmp_path), "--epochs", "1"]
    first, second = train_1st_order.main(list(argv)), train_1st_order.main(list(argv))
    assert first != second
    assert sorted(os.listdir(tmp_path)) == sorted([os.path.basename(first), os.path.basename(second)])
    for run_dir in (first, second):
        check_checkpoints(run_dir, 1)


def test_force_starts_over(tiny_argv):
    run_dir = train_1st_order.main(tiny_argv("again", "--epochs", "2"))
    train_1st_order.main(tiny_argv("again", "--epochs", "1", "--force"))
    recorded, log = read_run(run_dir)
    assert recorded["epochs"] == 1 and len(epoch_lines(log)) == 1
    check_checkpoints(run_dir, 1)  # epoch_002.pth of the old run is gone


def test_run_files_follow_the_umask(tiny_argv):
    old = os.umask(0o022)
    try:
        run_dir = train_1st_order.main(tiny_argv("perm", "--epochs", "1"))
    finally:
        os.umask(old)
    for name in ("args.json", "epoch_001.pth", "train_log.txt"):
        assert stat.S_IMODE(os.stat(os.path.join(run_dir, name)).st_mode) == 0o644, name


# ---------------------------------------------------------------------------- bad input


# Each subprocess pays the torch import (seconds on a small machine): two cases, one per kind of refusal
# (argparse's and the scripts' own UserError); the in-process tests below cover the rest.
SUBPROCESS_CASES = {
    "unknown_dataset": ("train_1st_order.py", ["--dataset", "imagenet21k"], "imagenet21k"),
    "sgd_in_second_order": ("train_2nd_order.py", ["--optimizer", "SGD"], "train_1st_order.py"),
}


@pytest.fixture(scope="module")
def subprocess_results(tmp_path_factory):
    """Run every SUBPROCESS_CASES command at once (each pays the torch import): name -> (rc, stderr, save_dir)."""
    root = tmp_path_factory.mktemp("cli")
    procs = {}
    for name, (script, flags, _) in SUBPROCESS_CASES.items():
        save_dir = root / name
        argv = [sys.executable, script] + TINY_RUN + ["--save_dir", str(save_dir), "--uid", "x"] + flags
        env = dict(os.environ, OMP_NUM_THREADS="1")
        procs[name] = (subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                        env=env), save_dir)
    results = {}
    for name, (proc, save_dir) in procs.items():
        _, err = proc.communicate(timeout=120)
        results[name] = (proc.returncode, err, save_dir)
    return results


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(SUBPROCESS_CASES))
def test_script_refuses_in_one_line(subprocess_results, case):
    rc, err, save_dir = subprocess_results[case]
    assert rc != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "error" in lines[0].lower() and "Traceback" not in err
    assert SUBPROCESS_CASES[case][2] in lines[0]
    assert not save_dir.exists()  # not even an empty folder


@pytest.mark.parametrize("main, flags, needle", [
    (train_1st_order.main, ["--model", "vgg11"], "vgg11"),
    (train_1st_order.main, ["--optimizer", "RMSprop"], "RMSprop"),
    (train_1st_order.main, ["--loss", "Hinge"], "Hinge"),
    (train_1st_order.main, ["--dataset", "svhn"], "svhn"),
    (train_2nd_order.main, ["--optimizer", "Adam"], "train_1st_order.py"),
    (train_2nd_order.main, ["--optimizer", "SGD"], "train_1st_order.py"),
    (train_1st_order.main, ["--optimizer", "LBFGS"], "train_2nd_order.py"),
    (train_1st_order.main, ["--batch_size", "0"], "--batch_size"),
    (train_1st_order.main, ["--lr", "-1"], "--lr"),
    (train_1st_order.main, ["--epochs", "0"], "--epochs"),
    (train_1st_order.main, ["--decay_type", "linear"], "linear"),
    (train_1st_order.main, ["--model", "resnet18", "--ETF_fc", "--fixdim", "5"], "fixdim"),
    (train_1st_order.main, ["--model", "resnet18", "--ETF", "--fixdim", "9"], "fixdim"),
    (train_1st_order.main, ["--model", "MLP", "--ETF"], "ETF"),
])
def test_bad_input_is_refused_before_anything_is_written(capsys, tiny_argv, main, flags, needle):
    message = refused(capsys, main, tiny_argv("bad", *flags))
    assert message.startswith("error") and needle in message
    assert not tiny_argv.save_dir.exists()


@pytest.mark.parametrize("flags, needle", [
    (["--model", "resnet18", "--fixdim", "-1"], "fixdim"),
    (["--seed", "-1"], "seed"),
    (["--seed", str(2 ** 32)], "seed"),
    (["--loader", "torch", "--num_workers", "-1"], "num_workers"),
    (["--loss", "RescaledMSE", "--k", "-1"], "--k"),
])
def test_bad_numbers_are_refused_in_one_line(capsys, tiny_argv, flags, needle):
    message = refused(capsys, train_1st_order.main, tiny_argv("bad", *flags))
    assert needle in message
    assert not tiny_argv.save_dir.exists()


def test_a_last_batch_of_one_image_does_not_crash(capsys, tiny_argv):
    """BatchNorm cannot normalise a batch of one image: a last batch of one is dropped (it is a
    different image every epoch, as the order is shuffled), and the run trains."""
    argv = tiny_argv("batch1", "--batch_size", "33", "--epochs", "2")  # 10 classes x 10 images = 3 x 33 + 1
    run_dir = train_1st_order.main(argv)
    check_checkpoints(run_dir, 2)


@pytest.mark.parametrize("main, flags", [(train_1st_order.main, []), (train_1st_order.main, ["--optimizer", "Adam"]),
                                         (train_2nd_order.main, [])])
def test_existing_uid_without_force_is_refused_and_left_alone(capsys, tiny_argv, main, flags):
    run_dir = train_1st_order.main(tiny_argv("taken", "--epochs", "1"))
    before = fake_data.snapshot_tree(run_dir)
    message = refused(capsys, main, tiny_argv("taken", *flags))
    assert "taken" in message and "--force" in message
    assert fake_data.snapshot_tree(run_dir) == before
    assert os.listdir(tiny_argv.save_dir) == ["taken"]


def test_missing_data_is_refused_naming_files_and_folder(capsys, tiny_argv, tmp_path):
    data_dir = tmp_path / "data"
    fake_data.write_mnist(str(data_dir))
    os.remove(data_dir / "MNIST" / "raw" / "train-labels-idx1-ubyte")
    before = fake_data.snapshot_tree(data_dir)
    message = refused(capsys, train_1st_order.main, tiny_argv("nodata", "--dataset", "mnist", "--data_dir", str(data_dir)))
    assert "train-labels-idx1-ubyte" in message and str(data_dir) in message
    files, dirs = fake_data.snapshot_tree(data_dir)
    assert files == before[0]
    assert not tiny_argv.save_dir.exists()


def test_empty_data_folder_is_refused(capsys, tiny_argv, tmp_path):
    message = refused(capsys, train_2nd_order.main,
                      tiny_argv("nodata", "--dataset", "mini_imagenet", "--data_dir", str(tmp_path / "empty")))
    assert "mini-imagenet-cache-train.pkl" in message and str(tmp_path / "empty") in message
    assert not tiny_argv.save_dir.exists()


def test_truncated_data_is_refused(capsys, tiny_argv, tmp_path):
    data_dir = tmp_path / "data"
    fake_data.write_mnist(str(data_dir))
    path = data_dir / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    with open(path, "r+b") as f:
        f.truncate(50)
    before = fake_data.snapshot_tree(data_dir)
    message = refused(capsys, train_1st_order.main, tiny_argv("trunc", "--dataset", "mnist", "--data_dir", str(data_dir)))
    assert "truncated" in message and str(data_dir) in message
    assert fake_data.snapshot_tree(data_dir) == before
    assert not tiny_argv.save_dir.exists()


def test_fake_mnist_trains_through_the_script(tiny_argv, fake_mnist):
    """The whole pipeline on the real MNIST file format (the offline copy of torchvision's raw files)."""
    data_dir, _ = fake_mnist
    run_dir = train_1st_order.main(tiny_argv("mnist", "--dataset", "mnist", "--data_dir", data_dir,
                                             "--sample_size", "3", "--batch_size", "10"))
    check_checkpoints(run_dir, 2)


# ---------------------------------------------------------------------------- options

def test_explicit_args_are_exactly_the_typed_options():
    import args as args_module
    parser = train_parser()
    typed = args_module.explicit_args(parser, ["--ETF", "--no-bias", "--lr", "0.1", "--uid", "x", "--seed", "6"])
    # an alias counts under its destination, store_false flags and values equal to the default count too
    assert typed == {"ETF_fc": True, "bias": False, "lr": 0.1, "uid": "x", "seed": 6}
    assert args_module.explicit_args(parser, []) == {}
    assert parser.parse_args([]).lr == 0.1 and parser.get_default("lr") == 0.1  # the parser itself is unchanged


def test_deterministic_changes_nothing_on_the_cpu_and_may_change_on_resume(tiny_argv):
    plain = train_1st_order.main(tiny_argv("plain", "--epochs", "1"))
    det = train_1st_order.main(tiny_argv("det", "--epochs", "1", "--deterministic"))
    assert read_run(det)[0]["deterministic"] is True
    a, b = (torch.load(os.path.join(d, "epoch_001.pth"), weights_only=True) for d in (plain, det))
    assert all(torch.equal(a[k], b[k]) for k in a)
    train_1st_order.main(tiny_argv("det", "--resume", "--epochs", "2", "--no-deterministic"))  # allowed on resume
    assert read_run(det)[0]["deterministic"] is False and os.path.isfile(os.path.join(det, "epoch_002.pth"))


def test_a_resume_whose_data_order_was_drawn_elsewhere_goes_on_reseeded_with_a_note(tiny_argv, capsys):
    """A device loader's generator saved on a GPU (16 bytes: seed and offset) cannot be loaded into
    the CPU's: the resumed run is reseeded, the same way each time, and says so."""
    run = train_1st_order.main(tiny_argv("moved", "--epochs", "1"))
    last = os.path.join(run, rundir.LAST)
    state = torch.load(last, weights_only=False)
    state["loader_rng"] = torch.zeros(16, dtype=torch.uint8)  # as a CUDA generator's state
    torch.save(state, last)
    shutil.copytree(run, os.path.join(os.path.dirname(run), "twin"))
    capsys.readouterr()
    train_1st_order.main(tiny_argv("moved", "--resume", "--epochs", "2"))
    note = "note: the saved data order was drawn on another device or by the other loader and cannot go on here"
    assert note in capsys.readouterr().out and note in open(os.path.join(run, rundir.TRAIN_LOG)).read()
    twin = train_1st_order.main(tiny_argv("twin", "--resume", "--epochs", "2"))
    a, b = (torch.load(os.path.join(d, "epoch_002.pth"), weights_only=True) for d in (run, twin))
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------- runs that survive being killed, diverging and bad input
# Atomic writes, --resume from the last complete epoch, a clean stop on a non-finite loss and a resumable
# validate_NC.py. Killed runs are subprocesses started through tests/harness.py, which SIGKILLs them at a
# chosen instant; they are all started at once by one module fixture, because each pays the torch import.
# Uninterrupted references and the resumes run in this process. "Bitwise" means torch.equal on every
# tensor of every epoch_NNN.pth (and of last.pth). Processes of their own: slow (see pytest.ini).

EPOCHS = 4


BATCHES = 7  # 200 training images (20 per class) in batches of 32, the last one of 8


RUN = tiny_run(sample_size=20, batch_size=32, epochs=None)


# Fake CIFAR-10 (20 images per class) with --SOTA crop/flip augmentation, which draws random numbers
# every batch: from the global torch generator in the DataLoader path (--loader torch, no workers),
# from the loader's own generator in the device path. CIFAR10_DIR is filled in by the `runs` fixture.
CIFAR10_DIR = "<cifar10 data>"


AUGMENTED = ["--lr", "0.05", "--dataset", "cifar10", "--data_dir", CIFAR10_DIR, "--SOTA"]


# The kinds of run: (script, its main, the flags added to RUN).
KINDS = {
    "sgd": ("train_1st_order.py", train_1st_order.main, ["--lr", "0.05"]),
    "lbfgs": ("train_2nd_order.py", train_2nd_order.main, ["--history_size", "5"]),
    "torch": ("train_1st_order.py", train_1st_order.main, AUGMENTED + ["--loader", "torch"]),
    "augmented": ("train_1st_order.py", train_1st_order.main, AUGMENTED + ["--loader", "device"]),
}


data_dirs = {}  # CIFAR10_DIR -> the folder the fixture wrote


# Renames of a fresh run (the before_rename@n count of tests/harness.py): 1 args.json, then per epoch e
# 2e epoch_00e.pth and 2e+1 last.pth. A resumed run starts counting at its first checkpoint.
KILLS = {
    # name: (kind, the fault of each killed process in turn (the 2nd and later run with --resume),
    #        the epochs whose checkpoints are complete after the kills, where each later resume starts)
    "first_batch": ("sgd", ["batch:1:1"], 0, [0]),
    "mid_epoch": ("sgd", ["batch:3:2"], 2, [2]),
    "last_batch": ("sgd", [f"batch:{EPOCHS}:{BATCHES}"], 3, [3]),
    "saving_checkpoint": ("sgd", ["before_rename@6"], 2, [2]),  # epoch_003.pth
    "saving_state": ("sgd", ["before_rename@7"], 3, [2]),  # last.pth after epoch_003.pth landed
    "saving_final_state": ("sgd", [f"before_rename@{2 * EPOCHS + 1}"], 4, [3]),
    "killed_twice": ("sgd", ["before_rename@4", "batch:3:3"], 2, [1, 2]),  # mid-save, then mid-epoch on resume
    "lbfgs_mid_epoch": ("lbfgs", ["batch:2:4"], 1, [1]),
    "torch_loader_mid_epoch": ("torch", ["batch:3:5"], 2, [2]),
    "augmented_mid_epoch": ("augmented", ["batch:2:6"], 1, [1]),
}


# A learning rate that becomes 0.05 * 1e30 after epoch 2: the first step of epoch 3 throws the
# weights to ~1e25, so the loss of its second batch overflows, whatever the data and the numerics.
DIVERGING = ["--lr", "0.05", "--decay_type", "step_2", "--gamma", "1e30"]


def argv(kind, save_dir, uid, *extra):
    """The command line of a run; a resume names no --epochs unless `extra` does (it continues as recorded)."""
    extra = [str(e) for e in extra]
    epochs = [] if "--resume" in extra else ["--epochs", str(EPOCHS)]
    flags = [data_dirs.get(f, f) for f in KINDS[kind][2]]
    return RUN + flags + epochs + ["--save_dir", str(save_dir), "--uid", uid] + extra


def spawn(script, args, log, fault=None):
    """Start a script through tests/harness.py, killed at `fault` if given; its output goes to the
    file `log` (a pipe nobody reads could fill and stall it)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")  # the same sums as this process (one thread, below)
    with open(log, "w") as out:
        proc = subprocess.Popen(harness.command(script, *args, kill=fault), cwd=REPO, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    proc.log = log
    return proc


def finish(proc):
    """(exit status, output) of a process; a run killed at its fault has status -9 (SIGKILL)."""
    proc.wait(timeout=300)
    with open(proc.log) as f:
        return proc.returncode, f.read()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread, as the subprocesses have (OMP_NUM_THREADS=1): the same sums, bit for bit."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        fake_data.skip_cifar10_checksums(mp.setattr)  # the fake CIFAR-10 files, read in this process
        yield make_runs(tmp_path_factory)


def make_runs(tmp_path_factory):
    """Start every killed run, make the uninterrupted references meanwhile, and wait.

    Returns a dict: 'ref' {kind: run dir} (plus 'sgd6': 6 epochs), 'ref_info' (info.pkl and
    test_log.txt of an uninterrupted validation of ref['sgd']), 'killed' {name: (save_dir, [(rc, output)])},
    'saving_args', 'diverging' and 'validation': (directory, rc, output).
    """
    root = tmp_path_factory.mktemp("resume")
    fake_data.write_cifar10(str(root / "cifar10"), per_class_per_batch=4)
    data_dirs[CIFAR10_DIR] = str(root / "cifar10")
    killed, procs, logs = {}, {}, root / "logs"
    logs.mkdir()
    for name, (kind, faults, _, _) in KILLS.items():
        killed[name] = (root / "killed", [])
        procs[name] = spawn(KINDS[kind][0], argv(kind, root / "killed", name), logs / f"{name}.0", faults[0])
    procs["saving_args"] = spawn("train_1st_order.py", argv("sgd", root / "killed", "saving_args"),
                                 logs / "saving_args", "before_rename@1")
    procs["diverging"] = spawn("train_1st_order.py", argv("sgd", root / "killed", "diverging", *DIVERGING),
                               logs / "diverging")

    ref = {kind: Path(KINDS[kind][1](argv(kind, root / "ref", kind))) for kind in KINDS}
    validation = shutil.copytree(ref["sgd"], root / "validation")
    procs["validation"] = spawn("validate_NC.py", ["--load_path", str(validation), "--device", "cpu"],
                                logs / "validation", "before_rename@3")  # at nc_results/epoch_003.pkl
    ref["sgd6"] = Path(train_1st_order.main(argv("sgd", root / "ref", "sgd6", "--epochs", 6)))
    validated = shutil.copytree(ref["sgd"], root / "validated")
    validate_NC.main(["--load_path", str(validated), "--device", "cpu"])
    ref_info = (load_pickle(validated / "info.pkl"), (validated / "test_log.txt").read_text())

    pending = dict(procs)
    while pending:  # a killed run with more faults is resumed (and killed again) as soon as it dies
        for name, proc in list(pending.items()):
            if proc.poll() is None:
                continue
            del pending[name]
            if name not in KILLS:
                continue
            kind, faults, _, _ = KILLS[name]
            save_dir, results = killed[name]
            results.append(finish(proc))
            if len(results) < len(faults):
                pending[name] = spawn(KINDS[kind][0], argv(kind, save_dir, name, "--resume"),
                                      logs / f"{name}.{len(results)}", faults[len(results)])
        if pending:
            next(iter(pending.values())).wait(timeout=300)
    return {"ref": ref, "ref_info": ref_info, "killed": killed,
            "saving_args": (root / "killed" / "saving_args",) + finish(procs["saving_args"]),
            "diverging": (root / "killed" / "diverging",) + finish(procs["diverging"]),
            "validation": (Path(validation),) + finish(procs["validation"])}


def checkpoint_names(run_dir):
    return sorted(n for n in os.listdir(run_dir) if rundir.CHECKPOINT.match(n))


def temporary_files(run_dir):
    return sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob(".tmp_*"))


def assert_bitwise_equal_runs(run_dir, reference, epochs=EPOCHS):
    """Every tensor of every epoch_NNN.pth is equal, and so is all of last.pth but its arguments."""
    names = checkpoint_names(run_dir)
    assert names == checkpoint_names(reference) == [f"epoch_{e:03d}.pth" for e in range(1, epochs + 1)]
    for name in names:
        ours = torch.load(os.path.join(run_dir, name), weights_only=True)
        theirs = torch.load(os.path.join(reference, name), weights_only=True)
        assert ours.keys() == theirs.keys()
        for key in ours:
            assert torch.equal(ours[key], theirs[key]), f"{name}: {key} differs from the uninterrupted run"
    ours, theirs = (torch.load(os.path.join(d, rundir.LAST), weights_only=False) for d in (run_dir, reference))
    assert ours["epoch"] == theirs["epoch"] == epochs
    for key in ("model", "optimizer", "scheduler", "rng", "loader_rng"):
        assert same(ours[key], theirs[key]), f"last.pth: {key} differs from the uninterrupted run"


def assert_complete_files(run_dir):
    """Every file of the run but the temporary ones reads back whole."""
    for path in run_dir.rglob("*"):
        if path.is_dir() or path.name.startswith(".tmp_"):
            continue
        if path.suffix == ".pth":
            torch.load(path, weights_only=False)
        elif path.suffix == ".pkl":
            load_pickle(path)
        elif path.suffix == ".json":
            json.loads(path.read_text())


def resumed_after(run_dir):
    """The epoch each start of the run resumed after, from train_log.txt."""
    return [int(e) for e in re.findall(r"^resumed after epoch (\d+)", (run_dir / rundir.TRAIN_LOG).read_text(), re.M)]


def copy_run(reference, tmp_path, uid="copy"):
    """A private copy of a finished run, under another --save_dir (a run may be moved and resumed there)."""
    return Path(shutil.copytree(reference, tmp_path / "moved" / uid))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(KILLS))
def test_a_killed_run_resumes_to_the_same_checkpoints(runs, name):
    kind, faults, complete, starts = KILLS[name]
    save_dir, results = runs["killed"][name]
    run_dir = save_dir / name
    assert [rc for rc, _ in results] == [-9] * len(faults), [out[-2000:] for _, out in results]
    # what the kills left: the complete epochs, whole files, and only the one write cut short
    assert checkpoint_names(run_dir) == [f"epoch_{e:03d}.pth" for e in range(1, complete + 1)]
    assert_complete_files(run_dir)
    assert len(temporary_files(run_dir)) == (1 if faults[-1].startswith("before_rename") else 0)

    KINDS[kind][1](argv(kind, save_dir, name, "--resume"))
    # nothing was lost but the epoch in progress (or the one whose state was being saved)
    assert resumed_after(run_dir) == starts
    assert_bitwise_equal_runs(run_dir, runs["ref"][kind])
    assert temporary_files(run_dir) == []
    assert json.loads((run_dir / rundir.ARGS).read_text()) == \
        json.loads((runs["ref"][kind] / rundir.ARGS).read_text()) | {"save_dir": str(save_dir), "uid": name}


@pytest.mark.slow
def test_a_run_killed_while_writing_its_arguments_can_be_started_again(runs, capsys):
    run_dir, rc, out = runs["saving_args"]
    assert rc == -9, out[-2000:]
    assert sorted(p.name for p in run_dir.iterdir() if p.name != rundir.TRAIN_LOCK) == temporary_files(run_dir)
    assert len(temporary_files(run_dir)) == 1
    message = refused(capsys, train_1st_order.main, argv("sgd", run_dir.parent, "saving_args", "--resume"))
    assert "no run" in message and str(run_dir) in message
    train_1st_order.main(argv("sgd", run_dir.parent, "saving_args"))  # no --force needed: there was no run
    assert_bitwise_equal_runs(run_dir, runs["ref"]["sgd"])
    assert temporary_files(run_dir) == []


@pytest.mark.slow
@pytest.mark.parametrize("victim", ["epoch_004.pth", "last.pth"])
def test_a_truncated_newest_file_is_detected_and_its_epoch_redone(runs, tmp_path, capsys, victim):
    run_dir = copy_run(runs["ref"]["sgd"], tmp_path)
    with open(run_dir / victim, "r+b") as f:
        f.truncate(os.path.getsize(run_dir / victim) // 2)
    train_1st_order.main(argv("sgd", run_dir.parent, "copy", "--resume"))
    assert resumed_after(run_dir) == [EPOCHS - 1]
    assert_bitwise_equal_runs(run_dir, runs["ref"]["sgd"])
    # both states are usable again: killed now, the run would still resume
    assert torch.load(run_dir / rundir.PREVIOUS, weights_only=False)["epoch"] == EPOCHS - 1
    assert "cannot resume from" in capsys.readouterr().out  # and it said why it went back an epoch


@pytest.mark.slow
def test_resuming_a_finished_run_changes_nothing(runs, tmp_path, capsys):
    run_dir = copy_run(runs["ref"]["sgd"], tmp_path)
    files, dirs = fake_data.snapshot_tree(run_dir)
    capsys.readouterr()
    train_1st_order.main(argv("sgd", run_dir.parent, "copy", "--resume"))
    assert "nothing to do" in capsys.readouterr().out
    after, after_dirs = fake_data.snapshot_tree(run_dir)
    assert after_dirs == dirs and after.keys() == files.keys()
    bookkeeping = (rundir.TRAIN_LOG, rundir.TRAIN_LOCK)  # the lock holds the pid of its last owner
    assert {k: v for k, v in after.items() if k not in bookkeeping} == \
        {k: v for k, v in files.items() if k not in bookkeeping}
    assert after[rundir.TRAIN_LOG][0].startswith(files[rundir.TRAIN_LOG][0])  # one line added to the log


@pytest.mark.slow
def test_resume_with_more_epochs_continues_as_if_planned_from_the_start(runs, tmp_path):
    run_dir = copy_run(runs["ref"]["sgd"], tmp_path)
    train_1st_order.main(argv("sgd", run_dir.parent, "copy", "--resume", "--epochs", 6))
    assert resumed_after(run_dir) == [EPOCHS]
    assert_bitwise_equal_runs(run_dir, runs["ref"]["sgd6"], epochs=6)
    # the new end is recorded: a plain --resume after this goes no further than 6, and no less
    assert json.loads((run_dir / rundir.ARGS).read_text())["epochs"] == 6


@pytest.mark.slow
def test_resume_with_more_epochs_survives_a_kill_of_the_extension(runs, tmp_path):
    """Extending a run records the new end first, so that a plain --resume after a crash reaches it."""
    run_dir = copy_run(runs["ref"]["sgd"], tmp_path)
    args = argv("sgd", run_dir.parent, "copy", "--resume")
    train_1st_order.main(args + ["--epochs", "5"])
    os.remove(run_dir / "epoch_005.pth")  # as if epoch 5 had been cut short: its last.pth is unusable now
    train_1st_order.main(args)
    assert resumed_after(run_dir) == [EPOCHS, EPOCHS]
    assert checkpoint_names(run_dir)[-1] == "epoch_005.pth"
    ref5 = torch.load(runs["ref"]["sgd6"] / "epoch_005.pth", weights_only=True)
    assert same(torch.load(run_dir / "epoch_005.pth", weights_only=True), ref5)


@pytest.mark.slow
@pytest.mark.parametrize("flags, named", [
    (["--lr", "0.1"], ["--lr 0.1 (recorded: 0.05)"]),
    (["--width", "64", "--seed", "7"], ["--width 64 (recorded: 32)", "--seed 7 (recorded: 6)"]),
    (["--optimizer", "Adam"], ["--optimizer Adam (recorded: SGD)"]),
    (["--loader", "device"], ["--loader device (recorded: torch)"]),
])
def test_resume_with_differing_arguments_is_refused_naming_them(runs, tmp_path, capsys, flags, named):
    kind = "torch" if "--loader" in flags else "sgd"
    run_dir = copy_run(runs["ref"][kind], tmp_path)
    before = fake_data.snapshot_tree(tmp_path)
    message = refused(capsys, train_1st_order.main, argv(kind, run_dir.parent, "copy", "--resume") + flags)
    assert all(n in message for n in named), message
    assert fake_data.snapshot_tree(tmp_path) == before


@pytest.mark.slow
def test_resume_of_a_missing_run_says_so(tmp_path, capsys):
    message = refused(capsys, train_1st_order.main, argv("sgd", tmp_path / "runs", "nobody", "--resume"))
    assert "no run" in message and str(tmp_path / "runs" / "nobody") in message
    message = refused(capsys, train_1st_order.main, RUN + ["--save_dir", str(tmp_path / "runs"), "--resume"])
    assert "--uid" in message
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_resume_with_other_epochs_is_refused_under_a_cosine_schedule(tmp_path, capsys):
    args = argv("sgd", tmp_path, "cos", "--decay_type", "cosine", "--epochs", 2)
    run_dir = train_1st_order.main(args)
    before = fake_data.snapshot_tree(run_dir)
    message = refused(capsys, train_1st_order.main, args + ["--resume", "--epochs", "3"])
    assert "--epochs 3" in message and "cosine" in message
    assert fake_data.snapshot_tree(run_dir) == before


@pytest.mark.slow
def test_a_non_finite_loss_stops_the_run_naming_epoch_and_batch(runs):
    run_dir, rc, out = runs["diverging"]
    assert rc not in (0, -9) and "Traceback" not in out, out[-2000:]
    errors = re.findall(r"error: [^\r\n]*", out)  # (the progress bar may share its line)
    assert len(errors) == 1 and "non-finite" in errors[0], out[-2000:]
    assert "epoch 3, batch 2" in errors[0]
    # every checkpoint before it is kept, whole, and the same as in a run that did not diverge
    assert checkpoint_names(run_dir) == ["epoch_001.pth", "epoch_002.pth"]
    assert torch.load(run_dir / rundir.LAST, weights_only=False)["epoch"] == 2
    for name in checkpoint_names(run_dir):
        assert same(torch.load(run_dir / name, weights_only=True),
                    torch.load(runs["ref"]["sgd"] / name, weights_only=True))
    assert "stopped:" in (run_dir / rundir.TRAIN_LOG).read_text()
    assert temporary_files(run_dir) == []


@pytest.mark.slow
def test_killed_validation_reruns_to_the_same_info(runs, capsys):
    run_dir, rc, out = runs["validation"]
    assert rc == -9, out[-2000:]
    results = run_dir / rundir.RESULTS
    assert sorted(os.listdir(results)) == temporary_files(results) + ["epoch_001.pkl", "epoch_002.pkl"]
    assert len(temporary_files(results)) == 1 and not (run_dir / "info.pkl").exists()
    assert_complete_files(run_dir)
    capsys.readouterr()
    validate_NC.main(["--load_path", str(run_dir), "--device", "cpu"])
    assert "(2 computed, 2 reused, 0 skipped)" in capsys.readouterr().out
    info, log = runs["ref_info"]
    assert same(load_pickle(run_dir / "info.pkl"), info)
    assert (run_dir / "test_log.txt").read_text() == log


@pytest.mark.slow
def test_validation_follows_a_run_that_is_still_training(runs, tmp_path, capsys):
    """Validate after 2 epochs, train on to 4, validate again: only the new checkpoints are computed."""
    save_dir = tmp_path / "runs"
    run_dir = train_1st_order.main(argv("sgd", save_dir, "growing", "--epochs", 2))
    validate = ["--load_path", str(run_dir), "--device", "cpu"]
    validate_NC.main(validate)
    train_1st_order.main(argv("sgd", save_dir, "growing", "--resume", "--epochs", EPOCHS))
    capsys.readouterr()
    validate_NC.main(validate)
    assert "(2 computed, 2 reused, 0 skipped)" in capsys.readouterr().out
    info, log = runs["ref_info"]
    assert same(load_pickle(os.path.join(run_dir, "info.pkl")), info)
    # a checkpoint written again (a redone epoch) is not mistaken for the old one
    os.utime(os.path.join(run_dir, "epoch_004.pth"), ns=(0, 0))
    validate_NC.main(validate)
    assert "(1 computed, 3 reused, 0 skipped)" in capsys.readouterr().out
    assert same(load_pickle(os.path.join(run_dir, "info.pkl")), info)
