"""Optimisers, the two training scripts end to end, and their refusals of bad input."""
import argparse
import json
import os
import re
import shutil
import stat
import subprocess
import sys

import pytest
import torch

import fake_data
import models
from nclib import rundir
import train_1st_order
import train_2nd_order
from args import train_parser
from conftest import TINY_RUN
from helpers import REPO, refused

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
