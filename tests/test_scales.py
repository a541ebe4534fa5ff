"""nclib/scales.py through experiments.py --scale: the laptop plan's flags and the one line per
figure on what differs, the paper plan unchanged, a laptop rerun that skips finished runs, and
two scales refused one folder."""
import os

import experiments
from helpers import LAPTOP, flags_of, refused, write_laptop_run
from nclib import runs, scales


def test_laptop_plan_flags_and_differences(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default root, model_weights/laptop, empty whatever was run in the checkout
    experiments.main(["--scale", "laptop", "--figure", "all"])
    out = capsys.readouterr().out.splitlines()
    commands = [line for line in out if line.startswith("python train_")]
    assert len(commands) == 3 + 5 + 4 + 5 + 3  # runs shared between figures (no --SOTA) are trained once
    for line in commands:
        assert "--dataset mnist_sample" in line and "--SOTA" not in line and "--save_dir model_weights/laptop" in line
        assert line.endswith("--nc_every 3 --save_every 60")
    lbfgs = next(line for line in commands if "LBFGS" in line)
    assert "--sample_size 20 --epochs 10 --patience 2" in lbfgs and "train_2nd_order.py" in lbfgs
    assert sum("--seed 7" in line for line in commands) == 2
    assert all("--lr 0.002" in line for line in commands if "RescaledMSE" in line)
    differences = [line for line in out if line.startswith("# laptop scale, figure")]
    assert len(differences) == 5
    assert "--SOTA dropped" in differences[1] and "--SOTA dropped" not in differences[0]
    assert "--lr 0.002 for RescaledMSE" in differences[3] and "K = 100 becomes K = 10" in differences[3]
    plot = next(line for line in out if line.startswith("python plot_M_rmse.py"))
    assert "--root model_weights/laptop --out_dir figures/laptop/plot_M_rmse --runs" in plot
    assert "leave --epochs out" in refused(
        capsys, experiments.main, ["--scale", "laptop", "--epochs", "2"])


def test_paper_plan_unchanged(capsys):
    experiments.main(["--figure", "optim"])
    assert capsys.readouterr().out.splitlines() == [
        "# figure optim (plot_optim_mse.py): 3 runs",
        "python train_1st_order.py --uid cifar10_MSE_SGD_bias_true_batchsize_128_ETFfc_false_fixdim_false_sota_false "
        "--dataset cifar10 --loss MSE --optimizer SGD --lr 0.05 --nc_every 1 --save_every 50",
        "python train_1st_order.py --uid cifar10_MSE_Adam_bias_true_batchsize_128_ETFfc_false_fixdim_false_sota_false "
        "--dataset cifar10 --loss MSE --optimizer Adam --lr 0.001 --nc_every 1 --save_every 50",
        "python train_2nd_order.py --uid cifar10_MSE_LBFGS_bias_true_batchsize_512_ETFfc_false_fixdim_false_sota_false "
        "--dataset cifar10 --loss MSE --optimizer LBFGS --lr 0.1 --history_size 10 --batch_size 512 --nc_every 1 "
        "--save_every 50",
        "python plot_optim_mse.py"]
    paper = scales.Scale("paper")
    for figure in runs.FIGURES:  # the paper scale's names are runs.py's
        assert paper.figure_runs(figure) == runs.figure_runs(figure)


def test_a_laptop_rerun_skips_the_runs_measured_at_their_last_epoch(tmp_path, capsys):
    root = str(tmp_path / "laptop")
    write_laptop_run(root, flags_of("optim", "SGD"))  # measured at epochs 3, 6, ..., 60
    write_laptop_run(root, flags_of("optim", "Adam"), last_epoch=30)  # stopped half-way
    experiments.main(["--scale", "laptop", "--figure", "optim", "--root", root])
    out = capsys.readouterr().out
    assert f"# {LAPTOP.run_name(flags_of('optim', 'SGD'))}: skipped, its info.pkl has its last epoch, 60" in out
    assert f"python train_1st_order.py --uid {LAPTOP.run_name(flags_of('optim', 'Adam'))}" in out


def test_two_scales_never_share_a_root(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = refused(capsys, experiments.main, ["--scale", "laptop", "--root", "model_weights"])
    assert "the paper scale's folder" in line, line
    assert "the laptop scale's folder" in refused(capsys, experiments.main, ["--root", "model_weights/laptop/"])
    mixed = str(tmp_path / "mixed")
    write_laptop_run(mixed, flags_of("optim", "SGD"))
    line = refused(capsys, experiments.main, ["--figure", "optim", "--root", mixed])
    assert f"holds laptop-scale runs ({LAPTOP.run_name(flags_of('optim', 'SGD'))})" in line, line
    paper = scales.Scale("paper")
    os.makedirs(os.path.join(tmp_path, "other", paper.run_name(paper.table("dk")[1]["$d=5$"])))
    assert "holds paper-scale runs" in refused(capsys, experiments.main, ["--scale", "laptop", "--root", "other"])
    experiments.main(["--scale", "laptop", "--figure", "optim", "--root", mixed])  # its own scale's runs: fine
    assert not os.path.exists("model_weights")  # nothing was written by the refusals
