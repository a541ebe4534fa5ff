"""Figure: feature dimension d in {5, 8, 9, 10, 512} against K = 10 classes
(CIFAR-10, --SOTA ResNet-18, MSE, SGD lr 0.05, learned classifier).

    python plot_dk_mse.py [--root model_weights] [--out_dir figures/plot_dk_mse]

The runs are trained and validated by the commands of `python experiments.py --figure dk`.
"""
from nclib import plotting
from nclib.cli import run_main

FIGURE = "dk"  # its runs are nclib.runs.FIGURES["dk"]


def main(argv=None):
    return plotting.figure_main(__file__, FIGURE, __doc__.split("\n\n")[0], argv)


if __name__ == "__main__":
    run_main(main)
