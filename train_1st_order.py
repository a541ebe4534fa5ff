"""Train with a first-order optimiser (SGD or Adam); NC is measured afterwards by validate_NC.py.

    python train_1st_order.py --uid <run name> --dataset cifar10 --optimizer SGD --lr 0.05
"""
from args import train_parser
from nclib import training
from nclib.cli import run_main
from nclib.optimizers import FIRST_ORDER
from nclib.steps import first_order_step


def main(argv=None):
    parser = train_parser("SGD", __doc__.splitlines()[0])
    return training.run(parser, lambda args: first_order_step, FIRST_ORDER, argv)


if __name__ == "__main__":
    run_main(main)
