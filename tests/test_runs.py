"""nclib/runs.py: the paper's runs of each figure and the authors' run names."""
import dataclasses

from args import train_parser
from nclib import losses, runs


def test_a_registered_loss_names_runs_by_its_tag_with_M_and_k_only_when_it_uses_them(dummy_loss, monkeypatch):
    args = train_parser().parse_args(["--dataset", "cifar10", "--loss", "Dummy", "--M", "2", "--k", "3"])
    assert runs.run_name(args) == "cifar10_DUM_SGD_bias_true_batchsize_128_ETFfc_false_fixdim_false_sota_false"
    monkeypatch.setitem(losses.LOSSES, "Dummy", dataclasses.replace(dummy_loss, uses_M_k=True))
    assert runs.run_name(args) == \
        "cifar10_DUM_SGD_bias_true_batchsize_128_ETFfc_false_fixdim_false_sota_false_M_2_k_3"


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
