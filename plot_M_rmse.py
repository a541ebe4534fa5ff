"""Figure: rescaled MSE with target value M in {1, 3, 5, 7, 10} and weight alpha = k = 1
(mini-ImageNet, --SOTA ResNet-18, SGD lr 0.01).

    python plot_M_rmse.py [--root model_weights] [--out_dir figures/plot_M_rmse]

The runs are trained and validated by the commands of `python experiments.py --figure M`.
"""
import plot_utils
from utils import run_main

RUN = "mini_imagenet_RMSE_SGD_bias_true_batchsize_128_ETFfc_false_fixdim_false_sota_true_M_{M}_k_{k}"
RUNS = {  # legend label -> run name under --root (RUNS.md)
    "$M=1$": RUN.format(M=1, k=1),
    "$M=3$": RUN.format(M=3, k=1),
    "$M=5$": RUN.format(M=5, k=1),
    "$M=7$": RUN.format(M=7, k=1),
    "$M=10$": RUN.format(M=10, k=1),
}


def main(argv=None):
    return plot_utils.figure_main(__file__, RUNS, __doc__.split("\n\n")[0], argv, figure="M")


if __name__ == "__main__":
    run_main(main)
