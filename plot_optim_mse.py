"""Figure: NC under MSE with different optimisers (CIFAR-10, plain ResNet-18): SGD, Adam, LBFGS.

    python plot_optim_mse.py [--root model_weights] [--out_dir figures/plot_optim_mse]

The runs are trained and validated by the commands of `python experiments.py --figure optim`.
"""
from nclib import plotting
from nclib.cli import run_main

FIGURE = "optim"  # its runs are nclib.runs.FIGURES["optim"]


def main(argv=None):
    return plotting.figure_main(__file__, FIGURE, __doc__.split("\n\n")[0], argv)


if __name__ == "__main__":
    run_main(main)
