"""Figure: learned vs fixed simplex-ETF classifier, feature dimension d = 512 vs d = K = 10
(CIFAR-10, --SOTA ResNet-18, MSE, SGD lr 0.05).

    python plot_etf_mse.py [--root model_weights] [--out_dir figures/plot_etf_mse]

The runs are trained and validated by the commands of `python experiments.py --figure etf`.
"""
import plot_utils
from utils import run_main

RUNS = {  # legend label -> run name under --root (RUNS.md)
    "learned, $d=512$": "cifar10_MSE_SGD_bias_true_batchsize_128_ETFfc_false_fixdim_false_sota_true",
    "fixed ETF, $d=512$": "cifar10_MSE_SGD_bias_true_batchsize_128_ETFfc_true_fixdim_false_sota_true",
    "learned, $d=10$": "cifar10_MSE_SGD_bias_true_batchsize_128_ETFfc_false_fixdim_10_sota_true",
    "fixed ETF, $d=10$": "cifar10_MSE_SGD_bias_true_batchsize_128_ETFfc_true_fixdim_10_sota_true",
}


def main(argv=None):
    return plot_utils.figure_main(__file__, RUNS, __doc__.split("\n\n")[0], argv, figure="etf")


if __name__ == "__main__":
    run_main(main)
