"""nclib/plotting.py and the plot scripts (plot_*.py, plot_runs.py), on synthetic info.pkl files."""
import os
import pickle
import re

import numpy as np
import pytest

from helpers import fake_info, refused, write_run
from nclib import nc, plotting, runs
from nclib.base import UserError
from nclib.cli import run_main
import plot_dk_mse
import plot_etf_mse
import plot_k_rmse
import plot_M_rmse
import plot_optim_mse
import plot_runs

FIGURE_SCRIPTS = {"optim": plot_optim_mse, "etf": plot_etf_mse, "dk": plot_dk_mse, "M": plot_M_rmse,
                  "k": plot_k_rmse}
PNG_MAGIC, PDF_MAGIC = b"\x89PNG\r\n\x1a\n", b"%PDF"


def pickled_info(run_dir, info):
    """A run directory whose info.pkl is the dict `info`."""
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "info.pkl"), "wb") as f:
        pickle.dump(info, f)


def nothing_under(folder):
    return not os.path.exists(folder) or not os.listdir(folder)


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


# ---------------------------------------------------------------------------- a loss and a measure registered in one place

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


def test_an_info_pkl_with_lists_of_different_lengths_is_refused_by_plot_runs(tmp_path, capsys):
    pickled_info(tmp_path / "run", {"epochs": [1, 2, 3], "collapse_metric": [1.0, 0.5], "ETF_metric": [1, 1, 1]})
    message = refused(capsys, plot_runs.main, [str(tmp_path / "run"), "--out_dir", str(tmp_path / "fig")])
    assert "info.pkl" in message and "length" in message
    assert nothing_under(tmp_path / "fig")


@pytest.mark.parametrize("where", ["parent_is_a_file", "proc"])
def test_an_unwritable_plot_out_dir_is_refused(tmp_path, capsys, where):
    pickled_info(tmp_path / "run", {"epochs": [1, 2], "collapse_metric": [1.0, 0.5]})
    (tmp_path / "afile").write_text("keep me")
    out_dir = tmp_path / "afile" / "fig" if where == "parent_is_a_file" else "/proc/sys/nc_test_figures"
    message = refused(capsys, plot_runs.main, [str(tmp_path / "run"), "--out_dir", str(out_dir)])
    assert "--out_dir" in message and str(out_dir) in message
    assert (tmp_path / "afile").read_text() == "keep me"


def write_info(run_dir, epochs=(1, 2, 5, 10), layers=True):
    os.makedirs(run_dir)
    n = len(epochs)
    info = {"epochs": list(epochs), "collapse_metric": [1.0 / e for e in epochs],
            "cdnv_metric": [None] + [0.5 / e for e in epochs[1:]],  # the first epoch measured without it
            "ncc_train": [0.5 + 0.04 * e for e in epochs], "W": [np.zeros((3, 4))] * n}
    if layers:
        names = ["hidden1", "hidden2", "h"]
        info["layer_names"] = [names] * n
        info["layers"] = [{name: {"NC1": (j + 1) / e, "trace_ratio": 0.1 * (j + 1) / e, "ncc": 0.9}
                           for j, name in enumerate(names)} for e in epochs]
    with open(os.path.join(run_dir, "info.pkl"), "wb") as f:
        pickle.dump(info, f)


@pytest.mark.slow
def test_plot_runs_draws_any_scalar_key_and_the_layers(tmp_path, capsys):
    import plot_runs
    write_info(str(tmp_path / "a"))
    write_info(str(tmp_path / "b"), layers=False)
    out = tmp_path / "fig"
    plot_runs.main([str(tmp_path / "a"), str(tmp_path / "b"), "--keys", "cdnv_metric", "ncc_train",
                    "--out_dir", str(out)])
    names = set(os.listdir(out))
    assert {"cdnv_metric.png", "ncc_train.pdf", "NC1.png"} <= names
    for q in nc.LAYER_MEASURES:
        assert f"a_layers_{q}_depth.png" in names and f"a_layers_{q}_epoch.png" in names
    assert not any(n.startswith("b_layers") for n in names)


def test_plot_runs_refuses_a_key_that_is_not_a_scalar_per_epoch(tmp_path, capsys):
    import plot_runs
    write_info(str(tmp_path / "a"))
    for key in ("W", "no_such_key"):
        line = refused(capsys, plot_runs.main, [str(tmp_path / "a"), "--keys", key, "--out_dir", str(tmp_path / "f")])
        assert f"--keys {key}: no run has it" in line and "cdnv_metric" in line
