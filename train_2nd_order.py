"""Train with LBFGS (strong-Wolfe line search); NC is measured afterwards by validate_NC.py.

    python train_2nd_order.py --uid <run name> --dataset cifar10 --optimizer LBFGS --lr 0.1 --history_size 10 --batch_size 512
"""
import training
from args import train_parser
from losses import lbfgs_penalty
from optimizers import SECOND_ORDER
from utils import run_main


class LBFGSStep:
    """LBFGS re-evaluates the loss inside its line search, so the step is a closure. It has no
    weight decay of its own: the closure adds 0.5 * wd * ||p||^2 for every trainable parameter (the
    same minimiser that SGD's decay aims at), except with --sep_decay, whose penalty the objective
    already holds. The logged loss and logits are those of the first evaluation, at the parameters
    the step starts from."""

    def __init__(self, weight_decay):
        self.weight_decay = weight_decay

    def evaluate(self, optimizer, objective, x, y):
        """The closure's body: (penalised loss, logits) at the current parameters, gradients in p.grad."""
        params = optimizer.param_groups[0]["params"]
        optimizer.zero_grad(set_to_none=True)
        loss, logits = objective(x, y)
        if self.weight_decay:
            loss = lbfgs_penalty(loss, params, self.weight_decay)
        loss.backward()
        for p in params:
            # LBFGS flattens gradients with p.grad.view(-1), which a channels_last gradient (a ResNet
            # on a GPU) cannot give; a contiguous copy holds the same numbers. No copy on the CPU.
            if p.grad is not None and not p.grad.is_contiguous():
                p.grad = p.grad.contiguous()
        return loss.detach(), logits.detach()

    def __call__(self, optimizer, objective, x, y):
        first = []

        def closure():
            loss, logits = self.evaluate(optimizer, objective, x, y)
            if not first:
                first.append((loss, logits))
            return loss
        optimizer.step(closure)
        return first[0]

    def graphed(self):
        return LBFGSGraphStep(self)


class LBFGSGraphStep(training.CUDAGraphStep):
    """The LBFGS step with its closure's evaluation (zero gradients, forward, penalty, backward)
    replayed as a CUDA graph; the line search stays on the host and replays it as often as it needs.
    LBFGS moves the parameters in place, so the graph sees them where they were captured. Its
    gradients live in the graph's memory, and p.grad points at them for LBFGS to read. The batch
    is loaded once per step (CUDAGraphStep); a last batch of another size runs eagerly."""

    def baked_in(self, optimizer):
        return None  # the learning rate stays on the host, in the line search

    def capture(self, optimizer, objective, x, y):
        self.params = optimizer.param_groups[0]["params"]
        # With no gradients at capture, backward writes them into the graph's memory instead of adding.
        optimizer.zero_grad(set_to_none=True)
        captured = training.Captured(lambda x, y: self.step.evaluate(optimizer, objective, x, y), (x, y))
        self.grads = [p.grad for p in self.params]
        return captured

    def run(self, optimizer):
        for p, grad in zip(self.params, self.grads):
            p.grad = grad  # an eager step (a last batch) may have replaced them
        first = []

        def closure():
            loss, logits = self.captured.replay()
            if not first:  # copied on the device before the next evaluation overwrites them
                first.append((loss.clone(), logits.clone()))
            return loss
        optimizer.step(closure)
        return first[0]


def make_lbfgs_step(args):
    """The LBFGS step of these arguments (see LBFGSStep)."""
    return LBFGSStep(0.0 if args.sep_decay else args.weight_decay)


def main(argv=None):
    parser = train_parser("LBFGS", __doc__.splitlines()[0])
    return training.run(parser, make_lbfgs_step, SECOND_ORDER, argv)


if __name__ == "__main__":
    run_main(main)
