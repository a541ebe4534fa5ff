"""Train with LBFGS (strong-Wolfe line search); NC is measured afterwards by validate_NC.py.

    python train_2nd_order.py --uid <run name> --dataset cifar10 --optimizer LBFGS --lr 0.1 --history_size 10 --batch_size 512
"""
import training
from args import train_parser
from losses import lbfgs_penalty
from optimizers import SECOND_ORDER
from utils import run_main


def make_lbfgs_step(args):
    """LBFGS re-evaluates the loss inside its line search, so the step is a closure. It has no
    weight decay of its own: the closure adds 0.5 * wd * ||p||^2 for every trainable parameter (the
    same minimiser that SGD's decay aims at), except with --sep_decay, whose penalty the objective
    already holds."""
    weight_decay = 0.0 if args.sep_decay else args.weight_decay

    def lbfgs_step(optimizer, objective, x, y):
        params = optimizer.param_groups[0]["params"]
        first = []  # the evaluation at the current parameters: its loss and logits are what we log

        def closure():
            optimizer.zero_grad(set_to_none=True)
            loss, logits = objective(x, y)
            if weight_decay:
                loss = lbfgs_penalty(loss, params, weight_decay)
            loss.backward()
            if not first:
                first.append((loss.detach(), logits.detach()))
            return loss

        optimizer.step(closure)
        return first[0]
    return lbfgs_step


def main(argv=None):
    parser = train_parser("LBFGS", __doc__.splitlines()[0])
    return training.run(parser, make_lbfgs_step, SECOND_ORDER, argv)


if __name__ == "__main__":
    run_main(main)
