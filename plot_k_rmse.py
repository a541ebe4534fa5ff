"""Figure: rescaled MSE with weight alpha = k in {1, 5, 15, 20} on the true class and M = 1
(mini-ImageNet, --SOTA ResNet-18, SGD lr 0.01). The paper calls the --k weight alpha.

    python plot_k_rmse.py [--root model_weights] [--out_dir figures/plot_k_rmse]

The runs are trained and validated by the commands of `python experiments.py --figure k`.
"""
import plot_utils
from utils import run_main

RUN = "mini_imagenet_RMSE_SGD_bias_true_batchsize_128_ETFfc_false_fixdim_false_sota_true_M_{M}_k_{k}"
RUNS = {  # legend label -> run name under --root (RUNS.md)
    r"$\alpha=1$": RUN.format(M=1, k=1),
    r"$\alpha=5$": RUN.format(M=1, k=5),
    r"$\alpha=15$": RUN.format(M=1, k=15),
    r"$\alpha=20$": RUN.format(M=1, k=20),
}


def main(argv=None):
    return plot_utils.figure_main(__file__, RUNS, __doc__.split("\n\n")[0], argv, figure="k")


if __name__ == "__main__":
    run_main(main)
