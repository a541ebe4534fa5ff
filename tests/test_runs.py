"""nclib/runs.py: the paper's runs of each figure and the authors' run names."""
import dataclasses

from nclib import losses
from nclib import runs
from args import train_parser


def test_a_registered_loss_names_runs_by_its_tag_with_M_and_k_only_when_it_uses_them(dummy_loss, monkeypatch):
    args = train_parser().parse_args(["--dataset", "cifar10", "--loss", "Dummy", "--M", "2", "--k", "3"])
    assert runs.run_name(args) == "cifar10_DUM_SGD_bias_true_batchsize_128_ETFfc_false_fixdim_false_sota_false"
    monkeypatch.setitem(losses.LOSSES, "Dummy", dataclasses.replace(dummy_loss, uses_M_k=True))
    assert runs.run_name(args) == \
        "cifar10_DUM_SGD_bias_true_batchsize_128_ETFfc_false_fixdim_false_sota_false_M_2_k_3"
