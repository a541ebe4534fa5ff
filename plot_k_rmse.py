"""Figure: rescaled MSE with weight alpha = k in {1, 5, 15, 20} on the true class and M = 1
(mini-ImageNet, --SOTA ResNet-18, SGD lr 0.01). The paper calls the --k weight alpha.

    python plot_k_rmse.py [--root model_weights] [--out_dir figures/plot_k_rmse]

The runs are trained and validated by the commands of `python experiments.py --figure k`.
"""
from nclib import plotting
from nclib.cli import run_main

FIGURE = "k"  # its runs are nclib.runs.FIGURES["k"]


def main(argv=None):
    return plotting.figure_main(__file__, FIGURE, __doc__.split("\n\n")[0], argv)


if __name__ == "__main__":
    run_main(main)
