"""nclib/validation.py: validate_NC.py end to end on short mnist_sample runs."""
import os

import numpy as np
import pytest
import torch

from conftest import tiny_run
import datasets
from helpers import load_pickle, train_tiny, unvalidated_copy
import models
from nclib import measure, nc
import rounding
import validate_NC

TINY = tiny_run(sample_size=60, lr=0.05, batch_size=64, epochs=None, nc_every=None, num_workers=None)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    return train_tiny(tmp_path_factory.mktemp("runs"), TINY + ["--epochs", "3"])


@pytest.fixture
def run_copy(trained_run, tmp_path):
    """A private copy of the trained run, so that tests may damage it."""
    return unvalidated_copy(trained_run, tmp_path / "run")


def load_info(run_dir):
    return load_pickle(os.path.join(run_dir, "info.pkl"))


def test_info_pkl_has_every_key_and_one_entry_per_epoch(run_copy, capsys):
    validate_NC.main(["--load_path", str(run_copy), "--device", "cpu"])
    info = load_info(run_copy)
    assert set(info) == set(measure.INFO_KEYS) | {"epochs"}
    assert info["epochs"] == [1, 2, 3]
    assert all(len(info[k]) == 3 for k in measure.INFO_KEYS)
    assert info["W"][0].shape == (10, 32) and info["H"][0].shape == (32, 10)
    assert info["all_cos_margin"][0].shape == (600,)  # 60 per class
    assert np.all(np.diff(info["all_cos_margin"][-1]) >= 0)
    assert all(0 <= a <= 100 for a in info["train_acc1"] + info["test_acc5"])
    lines = open(os.path.join(run_copy, "test_log.txt")).read().splitlines()
    assert len(lines) == 3 and lines[-1].startswith("epoch 3: NC1")
    assert "last epoch 3: NC1" in capsys.readouterr().out


def test_validation_agrees_with_metrics_of_the_features_computed_directly(run_copy):
    validate_NC.main(["--load_path", str(run_copy), "--device", "cpu"])
    info = load_info(run_copy)
    data = datasets.load_data("mnist_sample", sample_size=60)
    model = models.MLP(hidden=32, depth=1, num_classes=10)
    model.load_state_dict(torch.load(os.path.join(run_copy, "epoch_003.pth")))
    model.eval()
    loader, _ = datasets.make_loaders(data, 1000, torch.device("cpu"), "device", train=False)
    x, y = next(iter(loader))
    # Validation runs the network with BatchNorm folded in: its metrics are exactly those of its features
    # (validation's one batch of 600, as here: the same kernels on the same shape give the same features;
    # 1e-9 leaves room for float64 sums only)...
    logits, h = measure.EvalForward(model)(x)
    direct = nc.nc_metrics(h, y, model.fc.weight, model.fc.bias)
    assert info["collapse_metric"][-1] == pytest.approx(direct["NC1"], rel=1e-9)
    assert info["ETF_metric"][-1] == pytest.approx(direct["NC2"], rel=1e-9)
    assert info["WH_relation_metric"][-1] == pytest.approx(direct["NC3"], rel=1e-9)
    assert info["Wh_b_relation_metric"][-1] == pytest.approx(direct["NC4"], rel=1e-9)
    # ...and within float32 rounding of the unfolded network's: the same function rounded otherwise (the
    # folded weights rounded once more, BatchNorm's scale, shift and their products ~5 roundings), so
    # within tests/rounding.py's bound with 6 roundings more per term
    with torch.no_grad():
        _, h_plain = model(x)
    plain = nc.nc_metrics(h_plain, y, model.fc.weight, model.fc.bias)
    S, n = rounding.one_hidden_layer_terms(model, x)
    bound = rounding.nc_bounds(h, y, 10, model.fc.weight, model.fc.bias, rounding.Float32Sums(S, n, extra=6),
                               rounding.Float64Sums(h))
    for key in ("NC1", "NC2", "NC3", "NC4"):
        assert abs(direct[key] - plain[key]) <= bound[nc.INFO_KEYS[key]], key
    assert info["train_acc1"][-1] == pytest.approx(100 * (logits.argmax(1) == y).float().mean().item())


def test_the_seed_command_with_trailing_slash_and_repeated_model_flags(run_copy):
    validate_NC.main(["--gpu_id", "0", "--dataset", "mnist_sample", "--batch_size", "1000",
                      "--load_path", str(run_copy) + "/", "--model", "MLP", "--width", "32", "--depth", "1",
                      "--device", "cpu"])
    assert load_info(run_copy)["epochs"] == [1, 2, 3]


def test_a_model_flag_that_disagrees_with_the_run_is_refused(run_copy, capsys):
    with pytest.raises(SystemExit) as e:
        validate_NC.run_main(validate_NC.main, ["--load_path", str(run_copy), "--width", "64", "--device", "cpu"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--width 64 (the run has 32)" in err and len(err.strip().splitlines()) == 1
    assert not os.path.exists(os.path.join(run_copy, "info.pkl"))


def test_no_checkpoints_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "model.pth").write_bytes(b"")
    with pytest.raises(SystemExit):
        validate_NC.run_main(validate_NC.main, ["--load_path", str(tmp_path / "empty"), "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no checkpoints named epoch_NNN.pth") and "\n" not in err


def test_truncated_and_foreign_checkpoints_are_skipped_with_a_warning(run_copy, capsys):
    path = os.path.join(run_copy, "epoch_002.pth")
    with open(path, "r+b") as f:
        f.truncate(100)
    torch.save({"something": torch.zeros(3)}, os.path.join(run_copy, "epoch_004.pth"))
    with pytest.warns(UserWarning, match="skipping .*epoch_002.pth"):
        validate_NC.main(["--load_path", str(run_copy), "--device", "cpu"])
    assert load_info(run_copy)["epochs"] == [1, 3]


def test_a_rerun_reuses_results_and_evaluates_only_new_checkpoints(run_copy, capsys):
    os.rename(os.path.join(run_copy, "epoch_003.pth"), os.path.join(run_copy, "later.pth"))
    validate_NC.main(["--load_path", str(run_copy), "--device", "cpu"])
    first = load_info(run_copy)
    assert first["epochs"] == [1, 2]
    os.rename(os.path.join(run_copy, "later.pth"), os.path.join(run_copy, "epoch_003.pth"))
    validate_NC.main(["--load_path", str(run_copy), "--device", "cpu"])
    assert "(1 computed, 2 reused, 0 skipped)" in capsys.readouterr().out
    second = load_info(run_copy)
    assert second["epochs"] == [1, 2, 3]
    assert second["collapse_metric"][:2] == first["collapse_metric"]


def test_epochs_limits_the_checkpoints(run_copy):
    validate_NC.main(["--load_path", str(run_copy), "--device", "cpu", "--epochs", "2"])
    assert load_info(run_copy)["epochs"] == [1, 2]
