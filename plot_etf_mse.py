"""Figure: learned vs fixed simplex-ETF classifier, feature dimension d = 512 vs d = K = 10
(CIFAR-10, --SOTA ResNet-18, MSE, SGD lr 0.05).

    python plot_etf_mse.py [--root model_weights] [--out_dir figures/plot_etf_mse]

The runs are trained and validated by the commands of `python experiments.py --figure etf`.
"""
from nclib import plotting
from nclib.cli import run_main

FIGURE = "etf"  # its runs are nclib.runs.FIGURES["etf"]


def main(argv=None):
    return plotting.figure_main(__file__, FIGURE, __doc__.split("\n\n")[0], argv)


if __name__ == "__main__":
    run_main(main)
