"""Train with a first-order optimiser (SGD or Adam); NC is measured afterwards by validate_NC.py.

    python train_1st_order.py --uid <run name> --dataset cifar10 --optimizer SGD --lr 0.05
"""
import training
from args import train_parser
from optimizers import FIRST_ORDER
from utils import run_main


def first_order_step(optimizer, objective, x, y):
    loss, logits = objective(x, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()  # weight decay is the optimiser's (none with --sep_decay: the loss holds it)
    return loss.detach(), logits.detach()


def main(argv=None):
    parser = train_parser("SGD", __doc__.splitlines()[0])
    return training.run(parser, lambda args: first_order_step, FIRST_ORDER, argv)


if __name__ == "__main__":
    run_main(main)
