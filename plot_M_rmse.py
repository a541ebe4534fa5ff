"""Figure: rescaled MSE with target value M in {1, 3, 5, 7, 10} and weight alpha = k = 1
(mini-ImageNet, --SOTA ResNet-18, SGD lr 0.01).

    python plot_M_rmse.py [--root model_weights] [--out_dir figures/plot_M_rmse]

The runs are trained and validated by the commands of `python experiments.py --figure M`.
"""
from nclib import plotting
from nclib.cli import run_main

FIGURE = "M"  # its runs are nclib.runs.FIGURES["M"]


def main(argv=None):
    return plotting.figure_main(__file__, FIGURE, __doc__.split("\n\n")[0], argv)


if __name__ == "__main__":
    run_main(main)
