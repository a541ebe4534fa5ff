"""The plot scripts, plot_runs.py and the experiments.py runbook, on synthetic info.pkl files."""
import os
import pickle
import re
import shlex

import numpy as np
import pytest

import args as args_module
import experiments
import plot_dk_mse
import plot_etf_mse
import plot_k_rmse
import plot_M_rmse
import plot_optim_mse
import plot_runs
from nclib import plotting
from nclib import runs
from nclib.base import UserError
from nclib.cli import run_main
from nclib import runbook

FIGURE_SCRIPTS = {"optim": plot_optim_mse, "etf": plot_etf_mse, "dk": plot_dk_mse, "M": plot_M_rmse,
                  "k": plot_k_rmse}
PNG_MAGIC, PDF_MAGIC = b"\x89PNG\r\n\x1a\n", b"%PDF"


def fake_info(epochs=30, n_samples=2000, seed=0, speed=1.0):
    """An info.pkl dict shaped like validate_NC.py's: NC curves that decay with training (faster
    for larger `speed`, with drops at the learning-rate steps), rising accuracies and margins."""
    rng = np.random.default_rng(seed)
    e = np.arange(1, epochs + 1)
    steps = 1 + 3 * np.floor(e * 200 / epochs / 40)  # StepLR drops, on the 200-epoch clock
    decay = np.exp(-speed * e * 6 / epochs) / steps  # 1 -> ~0.001
    noise = lambda scale: 1 + scale * rng.standard_normal(epochs)
    margins = (0.9 - 0.1 * speed) * (1 - decay) - 0.1 * decay
    K, d = 10, 16
    info = {
        "epochs": e.tolist(),
        "collapse_metric": (3.0 * decay * noise(0.05) + 1e-3).tolist(),
        "ETF_metric": (0.9 * decay * noise(0.05) + 0.05).tolist(),
        "WH_relation_metric": (1.1 * decay * noise(0.05) + 0.08).tolist(),
        "Wh_b_relation_metric": (0.5 * decay * noise(0.1) + 0.01).tolist(),
        "train_acc1": (100 - 90 * decay).tolist(),
        "train_acc5": (100 - 50 * decay).tolist(),
        "test_acc1": (80 - 70 * decay - 2 * speed).tolist(),
        "test_acc5": (98 - 40 * decay).tolist(),
        "avg_cos_margin": margins.tolist(),
        "nuclear_metric": (1 + 2.5 * decay).tolist(),
        "all_cos_margin": [np.sort(rng.normal(m, 0.1 + 0.05 * speed + 0.3 * dk, n_samples)) for m, dk in zip(margins, decay)],
        "W": [rng.standard_normal((K, d)) for _ in e], "b": [rng.standard_normal(K) for _ in e],
        "H": [rng.standard_normal((d, K)) for _ in e], "mu_G_train": [rng.standard_normal(d) for _ in e],
        "mu_G_test": [rng.standard_normal(d) for _ in e],
    }
    return info


def write_run(root, name, epochs=30, **kwargs):
    run_dir = os.path.join(root, name)
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "info.pkl"), "wb") as f:
        pickle.dump(fake_info(epochs, **kwargs), f)
    return run_dir


def table(plot_module):
    """{legend label: run name} of a plot script's figure."""
    return runs.figure_runs(plot_module.FIGURE)


def write_runs(root, labelled):
    for i, name in enumerate(labelled.values()):
        write_run(root, name, seed=i, speed=1 + 0.4 * i)


def assert_figures(out_dir):
    for name in plotting.FIGURE_NAMES:
        for ext, magic in (("png", PNG_MAGIC), ("pdf", PDF_MAGIC)):
            path = os.path.join(out_dir, f"{name}.{ext}")
            assert os.path.isfile(path), f"{path} missing"
            with open(path, "rb") as f:
                head = f.read(8)
            assert os.path.getsize(path) > 1000 and head.startswith(magic), path


# ---------------------------------------------------------------------------- figure scripts

@pytest.mark.slow
@pytest.mark.parametrize("figure", list(FIGURE_SCRIPTS))
def test_figure_script_draws_every_panel(figure, tmp_path):
    module = FIGURE_SCRIPTS[figure]
    root, out = tmp_path / "runs", tmp_path / "out"
    write_runs(root, table(module))
    written = module.main(["--root", str(root), "--out_dir", str(out)])
    assert_figures(out)
    assert len(written) == 2 * len(plotting.FIGURE_NAMES)


@pytest.mark.parametrize("figure", list(FIGURE_SCRIPTS))
def test_missing_run_is_a_one_line_error(figure, tmp_path, capsys):
    module = FIGURE_SCRIPTS[figure]
    root, out = tmp_path / "runs", tmp_path / "out"
    write_runs(root, table(module))
    gone = list(table(module).values())[-1]
    os.remove(root / gone / "info.pkl")
    os.rmdir(root / gone)
    with pytest.raises(SystemExit) as e:
        run_main(module.main, ["--root", str(root), "--out_dir", str(out)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and gone in err
    assert f"experiments.py --figure {figure}" in err
    assert not out.exists()  # nothing written


def test_run_without_info_pkl_names_it(tmp_path):
    root = tmp_path / "runs"
    write_runs(root, table(plot_optim_mse))
    unvalidated = table(plot_optim_mse)["Adam"]
    os.remove(root / unvalidated / "info.pkl")
    with pytest.raises(UserError, match=re.escape(unvalidated) + ".*validate_NC.py"):
        plot_optim_mse.main(["--root", str(root), "--out_dir", str(tmp_path / "out")])


def test_unreadable_info_pkl(tmp_path):
    run_dir = write_run(tmp_path, "broken")
    with open(os.path.join(run_dir, "info.pkl"), "wb") as f:
        f.write(b"not a pickle")
    with pytest.raises(UserError, match="cannot read"):
        plotting.load_info(run_dir)


@pytest.mark.slow
def test_skip_missing_plots_the_rest(tmp_path, capsys):
    root, out = tmp_path / "runs", tmp_path / "out"
    write_runs(root, table(plot_k_rmse))
    os.remove(root / table(plot_k_rmse)[r"$\alpha=5$"] / "info.pkl")
    plot_k_rmse.main(["--root", str(root), "--out_dir", str(out), "--skip_missing"])
    assert_figures(out)
    assert "warning" in capsys.readouterr().err


@pytest.mark.slow
def test_runs_flag_replaces_the_table(tmp_path):
    root, out = tmp_path / "runs", tmp_path / "out"
    write_run(root, "mine")
    elsewhere = write_run(tmp_path / "elsewhere", "theirs", seed=3, speed=2)
    written = plot_etf_mse.main(["--root", str(root), "--out_dir", str(out),
                                 "--runs", "d=10=mine", f"other={elsewhere}"])  # labels may hold '='
    assert_figures(out)
    assert len(written) == 2 * len(plotting.FIGURE_NAMES)
    with pytest.raises(SystemExit) as e:
        plot_etf_mse.main(["--root", str(root), "--runs", "no_label_here"])
    assert e.value.code == 2


def test_default_out_dir_is_figures_script_name():
    p = plotting.figure_parser("plot_dk_mse.py", "x", table(plot_dk_mse))
    a = p.parse_args([])
    assert a.root == "model_weights" and os.path.normpath(a.out_dir) == os.path.join("figures", "plot_dk_mse")


@pytest.mark.slow
def test_info_without_epochs_key_and_short_margins(tmp_path):
    info = fake_info(epochs=5, n_samples=7)
    del info["epochs"]
    assert plotting.info_epochs(info) == [1, 2, 3, 4, 5]
    assert plotting.margin_head_size(7) == 7 and plotting.margin_head_size(50000) == 500
    written = plotting.plot_infos([("a", info)], str(tmp_path))
    assert len(written) == 2 * len(plotting.FIGURE_NAMES)


def test_runs_of_unequal_length_are_named_in_one_line(tmp_path, capsys, monkeypatch):
    cut = write_run(tmp_path, "cut", epochs=2)
    full = [write_run(tmp_path, f"full_{i}", epochs=6, seed=i) for i in (1, 2)]
    monkeypatch.setattr(plotting, "plot_infos", lambda *args, **kwargs: [])  # the warning, not the drawing
    plotting.plot_runs([("cut", cut), ("a", full[0]), ("b", full[1])], str(tmp_path / "out"))
    assert capsys.readouterr().err.splitlines() == [
        "warning: run 'cut' ends at epoch 2, the other 2 runs at epoch 6: the curves stop early and the "
        "last-epoch margin figures compare unequal training"]
    plotting.plot_runs([("a", full[0]), ("b", full[1])], str(tmp_path / "out"))
    assert capsys.readouterr().err == ""


def test_markers_every_25_epochs():
    assert plotting.marker_indices(list(range(1, 201))) == [24, 49, 74, 99, 124, 149, 174, 199]
    assert len(plotting.marker_indices(list(range(1, 31)))) >= 5


# ---------------------------------------------------------------------------- plot_runs.py

@pytest.mark.slow
def test_plot_runs_any_set(tmp_path, capsys):
    a, b = write_run(tmp_path, "run_a"), write_run(tmp_path, "run_b", seed=1, speed=2)
    out = tmp_path / "out"
    plot_runs.main([a, b, "--out_dir", str(out)])
    assert_figures(out)
    out2 = tmp_path / "out2"
    plot_runs.main([a, b, "--labels", "first", "second", "--out_dir", str(out2)])
    assert_figures(out2)
    with pytest.raises(SystemExit) as e:
        run_main(plot_runs.main, [a, b, "--labels", "only_one", "--out_dir", str(out2)])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        run_main(plot_runs.main, [a, str(tmp_path / "nowhere"), "--out_dir", str(out2)])
    err = capsys.readouterr().err.splitlines()
    assert e.value.code == 2 and err[-1].startswith("error: ") and "nowhere" in err[-1]


# ---------------------------------------------------------------------------- experiments.py

UID = re.compile(r"^(cifar10|mini_imagenet)_(MSE|RMSE)_(SGD|Adam|LBFGS)_bias_(true|false)_batchsize_(\d+)"
                 r"_ETFfc_(true|false)_fixdim_(false|\d+)_sota_(true|false)(?:_M_(\d+)_k_(\d+))?$")


def expected_from_uid(uid):
    """The settings a run name spells out, as the training parser's attributes."""
    m = UID.match(uid)
    assert m, uid
    dataset, loss, opt, bias, bs, etf, fixdim, sota, M, k = m.groups()
    return {"dataset": dataset, "loss": {"MSE": "MSE", "RMSE": "RescaledMSE"}[loss], "optimizer": opt,
            "bias": bias == "true", "batch_size": int(bs), "ETF_fc": etf == "true",
            "fixdim": 0 if fixdim == "false" else int(fixdim), "SOTA": sota == "true",
            "M": float(M or 1), "k": float(k or 1), "uid": uid}


LR = {("cifar10", "SGD"): 0.05, ("cifar10", "Adam"): 0.001, ("cifar10", "LBFGS"): 0.1, ("mini_imagenet", "SGD"): 0.01}


def commands(argv, capsys):
    experiments.main(argv)
    lines = capsys.readouterr().out.splitlines()
    return [shlex.split(line) for line in lines if not line.startswith("#")], lines


@pytest.mark.parametrize("figure", list(FIGURE_SCRIPTS))
@pytest.mark.parametrize("every_checkpoint", [False, True])
def test_runbook_commands_parse(figure, every_checkpoint, tmp_path, capsys):
    module = FIGURE_SCRIPTS[figure]
    for root in ("model_weights", str(tmp_path / "runs")):
        cmds, _ = commands(["--figure", figure, "--root", root] + ["--every_checkpoint"] * every_checkpoint, capsys)
        trained, validated = [], []
        for cmd in cmds[:-1]:
            assert cmd[0] == "python"
            if cmd[1] == "validate_NC.py":
                v = args_module.validate_parser().parse_args(cmd[2:])
                assert v.batch_size == 1024 and os.path.dirname(v.load_path) == root
                validated.append(os.path.basename(v.load_path))
                continue
            assert cmd[1] in ("train_1st_order.py", "train_2nd_order.py")
            a = args_module.train_parser("LBFGS" if cmd[1] == "train_2nd_order.py" else "SGD").parse_args(cmd[2:])
            assert (a.optimizer == "LBFGS") == (cmd[1] == "train_2nd_order.py")
            for key, value in expected_from_uid(a.uid).items():
                assert getattr(a, key) == value, (a.uid, key)
            assert a.lr == LR[a.dataset, a.optimizer]
            assert (a.epochs, a.weight_decay, a.seed, a.patience, a.gamma) == (200, 5e-4, 6, 40, 0.1)
            assert a.save_dir == root and not a.resume
            if a.optimizer == "LBFGS":
                assert a.history_size == 10 and a.batch_size == 512
            # by default a run measures itself and keeps every 50th checkpoint; else the authors' two steps
            assert (a.nc_every, a.save_every) == ((0, 1) if every_checkpoint else (1, 50))
            trained.append(a.uid)
        assert trained == list(table(module).values())
        assert validated == (trained if every_checkpoint else [])
        last = cmds[-1]
        assert last[:2] == ["python", f"{module.__name__}.py"]
        assert last[2:] == ([] if root == "model_weights" else ["--root", root])


def test_runbook_all_lists_each_run_once(capsys):
    cmds, lines = commands(["--figure", "all"], capsys)
    uids = [c[c.index("--uid") + 1] for c in cmds if "--uid" in c]
    every = {name for module in FIGURE_SCRIPTS.values() for name in table(module).values()}
    assert sorted(uids) == sorted(every)
    assert len(every) == 3 + 4 + 4 + 5 + 3  # etf's learned d=10 is dk's d=10; M=1,k=1 is in both rescaled figures
    assert [c[1] for c in cmds if c[1].startswith("plot_")] == [f"{m.__name__}.py" for m in FIGURE_SCRIPTS.values()]


def test_runbook_skips_complete_and_resumes_partial(tmp_path, capsys):
    root = tmp_path / "runs"
    sgd, adam, lbfgs = table(plot_optim_mse).values()
    write_run(root, sgd, epochs=200)  # complete
    write_run(root, adam, epochs=30)  # validated part-way, training stopped at 30
    (root / adam / "args.json").write_text("{}")
    os.makedirs(root / lbfgs)
    (root / lbfgs / "args.json").write_text("{}")
    (root / lbfgs / "epoch_200.pth").write_bytes(b"")  # trained, not validated
    cmds, lines = commands(["--figure", "optim", "--root", str(root), "--gpu_id", "1", "--every_checkpoint"], capsys)
    assert any(line.startswith("#") and sgd in line and "skipped" in line for line in lines)
    assert not any(sgd in " ".join(c) for c in cmds)
    adam_train = [c for c in cmds if c[1] == "train_1st_order.py"]
    assert len(adam_train) == 1 and adam_train[0][adam_train[0].index("--uid") + 1] == adam
    a = args_module.train_parser().parse_args(adam_train[0][2:])
    assert a.resume and a.gpu_id == 1
    assert not any(c[1] == "train_2nd_order.py" for c in cmds)
    validated = [os.path.basename(c[c.index("--load_path") + 1]) for c in cmds if c[1] == "validate_NC.py"]
    assert validated == [adam, lbfgs]
    # by default the resumed run measures itself: only the run trained without measuring is validated
    cmds, _ = commands(["--figure", "optim", "--root", str(root)], capsys)
    validated = [os.path.basename(c[c.index("--load_path") + 1]) for c in cmds if c[1] == "validate_NC.py"]
    assert validated == [lbfgs] and sum(c[1] == "train_1st_order.py" for c in cmds) == 1


def test_runbook_smoke_epochs(tmp_path, capsys):
    root = tmp_path / "runs"
    write_run(root, table(plot_k_rmse)[r"$\alpha=5$"], epochs=2)  # complete for a 2-epoch smoke test
    cmds, _ = commands(["--figure", "k", "--root", str(root), "--epochs", "2", "--every_checkpoint"], capsys)
    train = [args_module.train_parser().parse_args(c[2:]) for c in cmds if c[1] == "train_1st_order.py"]
    valid = [args_module.validate_parser().parse_args(c[2:]) for c in cmds if c[1] == "validate_NC.py"]
    assert len(train) == len(valid) == 3 and all(a.epochs == 2 for a in train + valid)
    # the same run is not complete for the full 200 epochs: it is listed again
    cmds, _ = commands(["--figure", "k", "--root", str(root)], capsys)
    assert sum(c[1] == "train_1st_order.py" for c in cmds) == 4


def test_a_failed_run_does_not_stop_the_others(tmp_path, monkeypatch, capsys):
    calls = []

    def fake_run(self, cmd, log=None, env=None):
        calls.append(cmd)
        return 1 if len(calls) == 3 else 0  # the second run's training fails

    monkeypatch.setattr(runbook.Children, "run", fake_run)
    with pytest.raises(SystemExit) as e:
        run_main(experiments.main, ["--figure", "etf", "--root", str(tmp_path), "--run", "--every_checkpoint"])
    scripts = [os.path.basename(c[1]) for c in calls]
    # each run trains then validates; the failed one is not validated; the figure is not drawn
    assert scripts == ["train_1st_order.py", "validate_NC.py", "train_1st_order.py"] + \
        ["train_1st_order.py", "validate_NC.py"] * 2
    assert e.value.code == 2
    out, err = capsys.readouterr()
    assert "FAILED (exit 1)" in out and out.count("finished:") == 6
    table = out[out.index("run "):].splitlines()
    assert len(table) == 5 and sum("failed" in line for line in table) == 1
    assert err.startswith("error: 1 of 4 steps failed") and err.count("\n") == 1


def test_run_names_are_the_authors():
    """The run directories the authors' plot scripts read, spelled out: runs.py derives them from the flags."""
    assert runs.figure_runs("optim") == {
        "SGD": "cifar10_MSE_SGD_bias_true_batchsize_128_ETFfc_false_fixdim_false_sota_false",
        "Adam": "cifar10_MSE_Adam_bias_true_batchsize_128_ETFfc_false_fixdim_false_sota_false",
        "LBFGS": "cifar10_MSE_LBFGS_bias_true_batchsize_512_ETFfc_false_fixdim_false_sota_false",
    }
    assert runs.figure_runs("etf")["fixed ETF, $d=10$"] == \
        "cifar10_MSE_SGD_bias_true_batchsize_128_ETFfc_true_fixdim_10_sota_true"
    assert runs.figure_runs("dk")["$d=512$"] == "cifar10_MSE_SGD_bias_true_batchsize_128_ETFfc_false_fixdim_512_sota_true"
    assert runs.figure_runs("k")[r"$\alpha=15$"] == \
        "mini_imagenet_RMSE_SGD_bias_true_batchsize_128_ETFfc_false_fixdim_false_sota_true_M_1_k_15"
    assert list(runs.figure_runs("M").values())[-1] == \
        "mini_imagenet_RMSE_SGD_bias_true_batchsize_128_ETFfc_false_fixdim_false_sota_true_M_10_k_1"


# ---------------------------------------------------------------------------- a loss and a measure registered in one place

def test_the_landscape_title_is_the_registered_loss_description(dummy_loss):
    import matplotlib.pyplot as plt
    import plot_landscape
    args = plot_landscape.parser().parse_args(["--M", "2", "--points", "11"])
    for loss, title in (("Dummy", "dummy L1 (M=2), K=4"), ("RescaledMSE", "rescaled MSE (M=2, k=5), K=4"),
                        ("CrossEntropy", "cross-entropy, K=4"), ("MSE", "MSE, K=4")):
        panel = plot_landscape.landscape(loss, args.K, args.M, args.k, points=args.points)
        fig = plot_landscape.figure(loss, panel, args, plot_landscape.color_limits({loss: panel}))
        assert fig.axes[0].get_title() == title
        plt.close(fig)


def test_a_registered_per_layer_measure_gets_its_layer_figures(dummy_measure):
    import matplotlib.pyplot as plt
    names = ["hidden1", "h"]
    info = {"epochs": [1, 2], "layer_names": [names] * 2,
            "layers": [{n: {"NC1": 1.0 / e, "trace_ratio": 0.1 / e, "ncc": 0.9, "dummy_metric": 2.5} for n in names}
                       for e in (1, 2)]}
    figures = dict(plotting.layer_figures([("run a", info)]))
    for view in ("depth", "epoch"):
        assert figures[f"run_a_layers_dummy_metric_{view}"] is not None
    for fig in figures.values():
        plt.close(fig)
