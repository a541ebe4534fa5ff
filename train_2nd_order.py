"""Train with LBFGS (strong-Wolfe line search); NC is measured afterwards by validate_NC.py.

    python train_2nd_order.py --uid <run name> --dataset cifar10 --optimizer LBFGS --lr 0.1 --history_size 10 --batch_size 512
"""
from args import train_parser
from nclib import training
from nclib.cli import run_main
from nclib.optimizers import SECOND_ORDER
from nclib.steps import make_lbfgs_step


def main(argv=None):
    parser = train_parser("LBFGS", __doc__.splitlines()[0])
    return training.run(parser, make_lbfgs_step, SECOND_ORDER, argv)


if __name__ == "__main__":
    run_main(main)
