"""Figure: feature dimension d in {5, 8, 9, 10, 512} against K = 10 classes
(CIFAR-10, --SOTA ResNet-18, MSE, SGD lr 0.05, learned classifier).

    python plot_dk_mse.py [--root model_weights] [--out_dir figures/plot_dk_mse]

The runs are trained and validated by the commands of `python experiments.py --figure dk`.
"""
import plot_utils
from utils import run_main

RUNS = {  # legend label -> run name under --root (RUNS.md)
    "$d=5$": "cifar10_MSE_SGD_bias_true_batchsize_128_ETFfc_false_fixdim_5_sota_true",
    "$d=8$": "cifar10_MSE_SGD_bias_true_batchsize_128_ETFfc_false_fixdim_8_sota_true",
    "$d=9$": "cifar10_MSE_SGD_bias_true_batchsize_128_ETFfc_false_fixdim_9_sota_true",
    "$d=10$": "cifar10_MSE_SGD_bias_true_batchsize_128_ETFfc_false_fixdim_10_sota_true",
    "$d=512$": "cifar10_MSE_SGD_bias_true_batchsize_128_ETFfc_false_fixdim_512_sota_true",
}


def main(argv=None):
    return plot_utils.figure_main(__file__, RUNS, __doc__.split("\n\n")[0], argv, figure="dk")


if __name__ == "__main__":
    run_main(main)
