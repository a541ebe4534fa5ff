"""nclib/measure.py and the NC measures of the literature (nc.py's MEASURES, validate_NC.py --measures and
--layers): direct float64 references, collapsed configurations, invariances, layer hooks, info.pkl, bad
input; a measure registered in one place; NC measured while training (--nc_every)."""
import itertools
import json
import math
import os
import pickle
import shutil
import subprocess

import numpy as np
import pytest
import torch

from conftest import tiny_run
import harness
from helpers import load_pickle, refused, REPO, same, train_tiny, unvalidated_copy
import models
from models import simplex_etf
from nclib import measure, nc, rundir
from nclib.base import UserError
import plot_runs
import train_1st_order
import validate_NC


# ---------------------------------------------------------------------------- references in numpy

def reference(H, y, W, pred):
    """Every extra measure written directly from its formula, in float64 numpy."""
    H, W = np.asarray(H, dtype=np.float64), np.asarray(W, dtype=np.float64)
    y, pred = np.asarray(y), np.asarray(pred)
    K = W.shape[0]
    mu = np.stack([H[y == k].mean(0) for k in range(K)])  # (K, d)
    mu_G = H.mean(0)
    Sigma_W = sum(np.outer(h - mu[t], h - mu[t]) for h, t in zip(H, y)) / len(y)
    Sigma_B = sum(np.outer(m - mu_G, m - mu_G) for m in mu) / K
    var = np.array([np.mean(np.sum((H[y == k] - mu[k]) ** 2, 1)) for k in range(K)])
    pairs = list(itertools.combinations(range(K), 2))
    cdnv = np.mean([(var[k] + var[l]) / (2 * np.sum((mu[k] - mu[l]) ** 2)) for k, l in pairs])
    Mc = (mu - mu_G).T  # (d, K)

    def cosines(X):  # rows
        return np.array([X[k] @ X[l] / (np.linalg.norm(X[k]) * np.linalg.norm(X[l])) for k, l in pairs])

    def norms_cv(X):
        n = np.linalg.norm(X, axis=1)
        return np.std(n) / np.mean(n)

    nearest = np.argmin(((H[:, None, :] - mu[None]) ** 2).sum(2), 1)
    return {"trace_ratio_metric": np.trace(Sigma_W) / np.trace(Sigma_B), "cdnv_metric": cdnv,
            "within_class_var": var,
            "equinorm_M": norms_cv(Mc.T), "equinorm_W": norms_cv(W),
            "equiangular_M": np.std(cosines(Mc.T)), "equiangular_W": np.std(cosines(W)),
            "max_angle_M": np.mean(np.abs(cosines(Mc.T) + 1 / (K - 1))),
            "max_angle_W": np.mean(np.abs(cosines(W) + 1 / (K - 1))),
            "self_duality": np.sum((W / np.linalg.norm(W) - Mc.T / np.linalg.norm(Mc)) ** 2),
            "ncc_train": np.mean(nearest == pred)}


def random_problem(K=5, d=12, N=200, seed=0, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    y = torch.cat([torch.arange(K), torch.arange(K), torch.randint(0, K, (N - 2 * K,), generator=g)])
    means = 3 * torch.randn(K, d, generator=g, dtype=torch.float64)
    H = means[y] + spread * torch.randn(N, d, generator=g, dtype=torch.float64)
    W = torch.randn(K, d, generator=g, dtype=torch.float64)
    pred = torch.randint(0, K, (N,), generator=g)
    pred[: N // 2] = y[: N // 2]  # agreement neither 0 nor 1
    return H, y, W, pred


def measures_of(H, y, W, pred, batch=None):
    """nc's measures of the features, streamed in batches of `batch` rows."""
    stats = nc.NCStats(W.shape[0], H.shape[1])
    for start in range(0, len(y), batch or len(y)):
        stats.update(H[start:start + (batch or len(y))], y[start:start + (batch or len(y))])
    out = nc.more_metrics(stats, W, tuple(nc.MEASURES))
    out["ncc_train"] = nc.ncc_agreement(H, pred, nc.mu_c(stats), chunk=7)
    return out


def assert_close(out, ref, rel=1e-9, abs=1e-12):
    # float64 on both sides, sums of <= 200 terms in other orders: ~200 u = 4e-14 of the terms, times the
    # measures' conditioning (ratios of norms of class means, ~10 here): far inside 1e-9
    assert set(out) == set(ref)
    for key in ref:
        np.testing.assert_allclose(out[key], ref[key], rtol=rel, atol=abs, err_msg=key)


@pytest.mark.parametrize("seed, batch", [(0, None), (1, 17)])
def test_each_measure_matches_its_formula_in_numpy(seed, batch):
    H, y, W, pred = random_problem(seed=seed)
    assert_close(measures_of(H, y, W, pred, batch), reference(H, y, W, pred))


def test_every_measure_has_its_documented_info_keys():
    H, y, W, pred = random_problem()
    assert set(measures_of(H, y, W, pred)) == {k for m in nc.MEASURES.values() for k in m.keys} - {"ncc_test"}


def test_streamed_within_class_variance_keeps_precision_on_collapsed_features():
    # tiny spread around large means: a sum of squares minus a squared mean would lose it all
    H, y, W, pred = random_problem(spread=1e-6)
    H = H + 1e4
    ref = reference(H, y, W, pred)
    out = measures_of(H, y, W, pred, batch=13)
    # deviations of 1e-6 from means of 1e4 in float64: subtracting nearly equal numbers is exact (Sterbenz),
    # and a class mean off by its rounding (1e4 u = 2e-12) moves the sum of squares by n (2e-12)^2 only,
    # 4e-12 relative: 1e-6 is where a one-pass formula (error 1e8 u = 2e-8 absolute, 2e4 relative) fails
    np.testing.assert_allclose(out["within_class_var"], ref["within_class_var"], rtol=1e-6)


def collapsed(K=4, d=6, n=3, scale=0.7):
    """Features equal to a simplex ETF's columns (per class), W their transpose: exact collapse."""
    E = simplex_etf(K, d).double()  # (K, d), rows sum to zero: mu_G = 0
    y = torch.arange(K).repeat_interleave(n)
    return scale * E[y], y, E.clone(), y.clone()


def test_every_measure_vanishes_on_an_exact_collapse():
    H, y, W, pred = collapsed()
    out = measures_of(H, y, W, pred)
    for key, value in out.items():  # float64 of an exact simplex ETF (entries ~1): rounding ~1e-16
        target = 1.0 if key == "ncc_train" else 0.0
        np.testing.assert_allclose(value, target, atol=1e-12, err_msg=key)


@pytest.mark.parametrize("scale", [1e-3, 250.0])
def test_scale_free_measures_ignore_the_scale_of_features(scale):
    H, y, W, pred = random_problem(seed=2)
    a, b = measures_of(H, y, W, pred), measures_of(scale * H, y, W, pred)
    for key in ("trace_ratio_metric", "cdnv_metric", "equinorm_M", "equiangular_M", "max_angle_M",
                "self_duality", "ncc_train"):  # float64: the scaling's rounding, u per entry, 1e-9 far above
        assert b[key] == pytest.approx(a[key], rel=1e-9), key
    np.testing.assert_allclose(b["within_class_var"], scale ** 2 * a["within_class_var"], rtol=1e-9)


def test_measures_ignore_a_rotation_of_feature_space():
    H, y, W, pred = random_problem(seed=3)
    Q, _ = torch.linalg.qr(torch.randn(12, 12, generator=torch.Generator().manual_seed(9), dtype=torch.float64))
    a, b = measures_of(H, y, W, pred), measures_of(H @ Q, y, W @ Q, pred)  # rotate h and the rows of W alike
    assert_close(b, a, rel=1e-8, abs=1e-12)  # float64: the rotation's 12-term sums round at ~12 u = 3e-15


def test_a_class_with_a_single_sample_gives_nan_and_a_warning_naming_it():
    H, y, W, pred = random_problem(K=3, N=30)
    y = y.clone()
    y[y == 2] = 1
    y[0] = 2  # class 2 has one sample
    stats = nc.NCStats(3, H.shape[1])
    stats.update(H, y)
    with pytest.warns(UserWarning, match=r"classes \[2\] have a single sample"):
        out = nc.more_metrics(stats, W, tuple(nc.MEASURES))
    assert np.isnan(out["within_class_var"][2]) and np.isfinite(out["within_class_var"][:2]).all()
    assert np.isnan(out["cdnv_metric"])
    assert np.isfinite(out["trace_ratio_metric"]) and np.isfinite(out["self_duality"])


def test_a_single_sample_class_does_not_crash_the_validation_of_a_training_set():
    H, y, W, _ = random_problem(K=3, N=30)
    y = y.clone()
    y[y == 2] = 1
    y[0] = 2
    logits = H @ W.T
    train = measure.TrainingSetMetrics(3, H.shape[1], len(y), torch.device("cpu"), keep_pred=True, layers=("h",))
    train.add(logits.float(), H.float(), y, {})
    with pytest.warns(UserWarning, match=r"classes \[2\]"):
        out = {**train.result(W, torch.zeros(3)), **train.more_result(W, tuple(nc.MEASURES))}
    assert np.isnan(out["cdnv_metric"]) and np.isfinite(out["collapse_metric"]) and 0 <= out["ncc_train"] <= 1
    assert np.isfinite(out["layers"]["h"]["NC1"])


def test_many_classes_run_without_anything_quadratic_in_N():
    # K = 1,000: the pairwise measures are K x K (8 MB); nothing is N x N.
    K, d, N = 1000, 64, 3000
    g = torch.Generator().manual_seed(0)
    y = torch.arange(N) % K
    H = torch.randn(K, d, generator=g, dtype=torch.float64)[y] + 0.1 * torch.randn(N, d, generator=g, dtype=torch.float64)
    W = torch.randn(K, d, generator=g, dtype=torch.float64)
    out = measures_of(H, y, W, torch.randint(0, K, (N,), generator=g))
    assert all(np.all(np.isfinite(v)) for v in out.values())
    assert out["within_class_var"].shape == (K,)


# ---------------------------------------------------------------------------- layers

@pytest.mark.parametrize("spread, offset", [(1.0, 0.0), (1e-6, 1e4)])
def test_layer_measures_from_kept_features_match_the_formulas(spread, offset):
    H, y, W, pred = random_problem(seed=4, spread=spread)
    H = H + offset
    ref = reference(H, y, W, pred)
    nc1_ref = nc.nc_metrics(H, y, W)["NC1"]  # tested against numpy's pinv in test_nc.py
    out = nc.layer_measures(H.float() if offset == 0 else H, y, 5, pred, chunk=31)
    # float32 features (offset 0): each rounded once, u = 6e-8 relative, moves NC1 and the trace ratio by
    # ~u times their conditioning (norms of the features over the smallest spread of the class means, ~10 to
    # 100 here): 1e-5; float64 (offset 1e4, spread 1e-6): deviations exact as above, 1e-6 generous
    assert out["NC1"] == pytest.approx(nc1_ref, rel=1e-5 if offset == 0 else 1e-6)
    assert out["trace_ratio"] == pytest.approx(ref["trace_ratio_metric"], rel=1e-5 if offset == 0 else 1e-6)
    assert out["ncc"] == pytest.approx(ref["ncc_train"])
    exact = nc.layer_measures(H, y, 5, chunk=31)  # float64 both: 1e-6 is generous
    assert exact["NC1"] == pytest.approx(nc1_ref, rel=1e-6) and "ncc" not in exact


def test_layer_measures_vanish_on_an_exact_collapse():
    H, y, _, pred = collapsed()
    out = nc.layer_measures(H, y, 4, pred)
    assert abs(out["NC1"]) < 1e-12 and abs(out["trace_ratio"]) < 1e-12 and out["ncc"] == 1.0


@pytest.mark.parametrize("model", [models.MLP(hidden=16, depth=3, num_classes=4),
                                   models.ResNet18_adapt(width=4, num_classes=4)])
def test_layer_hooks_give_the_models_h_at_the_penultimate_layer(model):
    model.eval()
    names = measure.select_layers(model, [])
    assert names[-1] == "h"
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad(), measure.LayerHooks(model, names) as hooks:
        _, h = model(x)
    assert torch.equal(hooks.features["h"], h)
    assert all(f.shape[0] == 5 and f.dim() == 2 for f in hooks.features.values())
    assert not model._forward_hooks and not any(m._forward_hooks for m in model.modules())  # removed on exit


def test_layer_names_by_model():
    assert measure.select_layers(models.MLP(hidden=8, depth=3), []) == ("hidden1", "hidden2", "h")
    assert measure.select_layers(models.resnet18(), ["h", "layer2"]) == ("layer2", "h")


def test_an_unknown_layer_or_model_is_a_user_error_listing_the_valid_ones():
    with pytest.raises(UserError, match="unknown layer9; this model's layers are hidden1, hidden2, h"):
        measure.select_layers(models.MLP(hidden=8, depth=3), ["layer9"])
    with pytest.raises(UserError, match="layers of Linear are not known"):
        measure.select_layers(torch.nn.Linear(3, 3), [])


def test_an_unknown_measure_is_a_user_error_listing_the_valid_ones():
    assert measure.parse_measures(["paper"]) == ()
    assert measure.parse_measures(["all"]) == tuple(nc.MEASURES)
    assert measure.parse_measures(["ncc,cdnv", "trace_ratio"]) == ("trace_ratio", "cdnv", "ncc")
    with pytest.raises(UserError, match="unknown NC5; choose all, paper, or any of trace_ratio, cdnv"):
        measure.parse_measures(["cdnv", "NC5"])


# ---------------------------------------------------------------------------- validate_NC.py end to end

TINY = tiny_run(width=16, depth=2, sample_size=20, lr=0.05, batch_size=64, epochs=None)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    return train_tiny(tmp_path_factory.mktemp("runs"), TINY + ["--epochs", "2"])


@pytest.fixture
def run_copy(trained_run, tmp_path):
    return unvalidated_copy(trained_run, tmp_path / "run")


def info_bytes(run_dir):
    with open(os.path.join(run_dir, "info.pkl"), "rb") as f:
        return f.read()


def test_measures_paper_writes_the_same_info_pkl_bit_for_bit(run_copy, tmp_path):
    other = shutil.copytree(run_copy, tmp_path / "other")
    validate_NC.main(["--load_path", run_copy, "--device", "cpu"])
    validate_NC.main(["--load_path", str(other), "--device", "cpu", "--measures", "paper"])
    assert info_bytes(run_copy) == info_bytes(other)
    assert set(pickle.loads(info_bytes(run_copy))) == set(measure.INFO_KEYS) | {"epochs"}


def test_measures_all_and_layers_add_their_keys_and_are_not_served_a_paper_result(run_copy, capsys):
    validate_NC.main(["--load_path", run_copy, "--device", "cpu"])
    paper = pickle.loads(info_bytes(run_copy))
    validate_NC.main(["--load_path", run_copy, "--device", "cpu", "--measures", "all", "--layers"])
    assert "(2 computed, 0 reused" in capsys.readouterr().out  # a paper result lacks the extras
    info = pickle.loads(info_bytes(run_copy))
    extra = {k for m in nc.MEASURES.values() for k in m.keys} | {"layers", "layer_names"}
    assert set(info) == set(paper) | extra
    for key in measure.INFO_KEYS:  # the paper's entries are unchanged
        for a, b in zip(paper[key], info[key]):
            np.testing.assert_array_equal(a, b)
    assert info["layer_names"][-1] == ["hidden1", "h"]
    last = info["layers"][-1]  # the same features (one pass, hooks), float64 sums in other orders: 1e-9
    assert last["h"]["NC1"] == pytest.approx(info["collapse_metric"][-1], rel=1e-9)
    assert last["h"]["trace_ratio"] == pytest.approx(info["trace_ratio_metric"][-1], rel=1e-9)
    assert last["h"]["ncc"] == pytest.approx(info["ncc_train"][-1], rel=1e-12)
    assert all(0 <= info[k][-1] <= 1 for k in ("ncc_train", "ncc_test"))
    assert info["within_class_var"][-1].shape == (10,)
    validate_NC.main(["--load_path", run_copy, "--device", "cpu", "--measures", "all", "--layers"])
    assert "(0 computed, 2 reused" in capsys.readouterr().out


def test_bad_measures_and_layers_on_the_command_line_are_one_line_errors(run_copy, capsys):
    line = refused(capsys, validate_NC.main, ["--load_path", run_copy, "--device", "cpu", "--measures", "NC9"])
    assert "unknown NC9" in line and "self_duality" in line
    line = refused(capsys, validate_NC.main, ["--load_path", run_copy, "--device", "cpu", "--layers", "layer4"])
    assert "unknown layer4" in line and "hidden1, h" in line
    assert not os.path.exists(os.path.join(run_copy, "info.pkl"))


def test_equinorm_is_the_population_std_over_the_mean():
    # row norms 1 and 3: mean 2, population std (ddof 0) 1, so 0.5 (every step exact in float64, in
    # any order); the sample std (ddof 1) would give 1/sqrt(2)
    X = torch.tensor([[1.0, 0.0], [0.0, 3.0]], dtype=torch.float64)
    assert nc.equinorm(X).item() == 0.5
    # at K = 10 the sample std's version (rhubarbwu/neural-collapse's) is 5.4% more (README)
    g = torch.Generator().manual_seed(0)
    norms = torch.linalg.norm(torch.randn(10, 6, generator=g, dtype=torch.float64), dim=1)
    sample = norms.std(correction=1) / norms.mean()
    ratio = (sample / nc.equinorm(torch.diag(norms))).item()
    assert ratio == pytest.approx(math.sqrt(10 / 9), rel=1e-14) and round(100 * (ratio - 1), 1) == 5.4


# ---------------------------------------------------------------------------- a measure registered in one place

def test_all_measures_include_a_registered_one(dummy_measure):
    assert measure.parse_measures(["all"]) == tuple(nc.MEASURES) and measure.parse_measures(["all"])[-1] == "dummy"
    assert measure.parse_measures(["dummy"]) == ("dummy",)
    assert "dummy_metric" in measure.extra_keys()


def test_a_registered_measure_is_measured_by_validate_NC_and_at_every_layer(dummy_measure, run_copy):
    validate_NC.main(["--load_path", run_copy, "--device", "cpu", "--measures", "dummy"])
    info = pickle.loads(info_bytes(run_copy))
    assert info["epochs"] == [1, 2] and info["dummy_metric"] == [2.5, 2.5]  # K / 4
    validate_NC.main(["--load_path", run_copy, "--device", "cpu", "--measures", "dummy", "--layers"])
    info = pickle.loads(info_bytes(run_copy))
    assert info["dummy_metric"] == [2.5, 2.5]
    for layers in info["layers"]:
        assert list(layers) == ["hidden1", "h"] and all(entry["dummy_metric"] == 2.5 for entry in layers.values())


def test_a_registered_measure_is_measured_in_run(dummy_measure, tiny_argv):
    import train_1st_order
    train_1st_order.main(tiny_argv("measured", "--measures", "dummy", "--nc_every", "1"))
    with open(tiny_argv.save_dir / "measured" / "info.pkl", "rb") as f:
        info = pickle.load(f)
    assert info["epochs"] == [1, 2] and info["dummy_metric"] == [2.5, 2.5]


# ---------------------------------------------------------------------------- NC measured while training
# --nc_every with thinned checkpoints (--save_every): the in-run results equal validate_NC.py's bit for
# bit, validation reuses them and keeps the epochs whose checkpoints were not kept, and a run killed
# anywhere resumes to the same info.pkl.

EPOCHS = 5


# Checkpoints of epochs 2, 4 and 5 (the last); NC measured after every epoch.
RUN = tiny_run(sample_size=20, batch_size=32, lr=0.05, epochs=EPOCHS, nc_every=1, save_every=2)


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
