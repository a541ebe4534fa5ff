"""Figure: NC under MSE with different optimisers (CIFAR-10, plain ResNet-18): SGD, Adam, LBFGS.

    python plot_optim_mse.py [--root model_weights] [--out_dir figures/plot_optim_mse]

The runs are trained and validated by the commands of `python experiments.py --figure optim`.
"""
import plot_utils
from utils import run_main

RUNS = {  # legend label -> run name under --root (RUNS.md)
    "SGD": "cifar10_MSE_SGD_bias_true_batchsize_128_ETFfc_false_fixdim_false_sota_false",
    "Adam": "cifar10_MSE_Adam_bias_true_batchsize_128_ETFfc_false_fixdim_false_sota_false",
    "LBFGS": "cifar10_MSE_LBFGS_bias_true_batchsize_512_ETFfc_false_fixdim_false_sota_false",
}


def main(argv=None):
    return plot_utils.figure_main(__file__, RUNS, __doc__.split("\n\n")[0], argv, figure="optim")


if __name__ == "__main__":
    run_main(main)
