"""The training losses and the explicit weight-decay penalties.

    MSE            nn.MSELoss against one-hot targets: the mean over all B*K entries
    RescaledMSE    Hui & Belkin (2020), per sample (1/K) [k (z_y - M)^2 + sum_{j != y} z_j^2],
                   averaged over the batch (the paper writes alpha for k)
    CrossEntropy   the usual one

Weight decay is the optimiser's, except in two cases, where it is a term of the loss:
--sep_decay (`sep_decay_penalty`) and LBFGS, which has none of its own (`lbfgs_penalty`).

LOSSES is the one table of losses: a loss registered there (`register`) is a choice of --loss in both
training scripts and ufm.py, gets its tag in the authors' run names (runs.py) and its title in the
plots. Its `per_sample` form is the unconstrained feature model's data term (ufm.py), and tests
check it against the module it makes.
"""
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from nclib.base import UserError


class MSELoss(nn.Module):
    """nn.MSELoss against one-hot targets: the mean over all B*K entries."""

    def __init__(self, num_classes):
        super().__init__()
        self.num_classes = num_classes

    def forward(self, logits, y):
        target = F.one_hot(y, self.num_classes).to(logits.dtype)  # (B, K), made on the device
        return F.mse_loss(logits, target)


class RescaledMSELoss(nn.Module):
    """Hui & Belkin (2020): per sample (1/K) [k (z_y - M)^2 + sum_{j != y} z_j^2], batch mean.

    Computed in the authors' order, the mean over the K outputs and then over the batch, so its backward
    scales each logit's gradient by fl(fl(1/B)/K) as theirs does; summing over K, averaging and then
    dividing by K rounds that scale differently at many batch sizes that are not powers of two."""

    def __init__(self, num_classes, M=1.0, k=1.0):
        super().__init__()
        self.num_classes, self.M, self.k = num_classes, M, k

    def forward(self, logits, y):
        true = F.one_hot(y, self.num_classes).bool()  # (B, K)
        per_output = torch.where(true, self.k * (logits - self.M) ** 2, logits ** 2)
        return per_output.mean(1).mean()


def mse_per_sample(z, y, M=1.0, k=1.0):
    """1/2 ||z - e_y||^2 of each sample (B,): K/2 x MSELoss per sample."""
    return 0.5 * (z - F.one_hot(y, z.shape[1]).to(z.dtype)).pow(2).sum(1)


def rescaled_mse_per_sample(z, y, M=1.0, k=1.0):
    """1/2 [k (z_y - M)^2 + sum_{j != y} z_j^2] of each sample (B,): K/2 x RescaledMSELoss per sample."""
    onehot = F.one_hot(y, z.shape[1]).to(z.dtype)
    return 0.5 * ((1 + (k - 1) * onehot) * (z - M * onehot).pow(2)).sum(1)


def cross_entropy_per_sample(z, y, M=1.0, k=1.0):
    return F.cross_entropy(z, y, reduction="none")


@dataclass(frozen=True)
class Loss:
    """One loss, as every script sees it."""
    name: str  # its --loss value
    tag: str  # its part of the authors' run names (runs.run_name)
    make: Callable  # make(num_classes, M, k) -> a module whose forward(logits (B, K), y (B,)) is the batch's loss
    per_sample: Callable  # per_sample(z (B, K), y (B,), M, k) -> (B,): the UFM's data term of each sample
    ufm_scale: Callable  # ufm_scale(K): the factor that turns make()'s batch loss into the mean of per_sample
    uses_M_k: bool = False  # --M and --k change it (and appear in its run names)
    title: Callable = None  # title(M, k) -> its name in figure titles; None: the name itself

    def describe(self, M=1.0, k=1.0):
        return self.title(M, k) if self.title is not None else self.name


LOSSES = {}


def register(loss):
    """Add a loss to the table (and so to every script); returns it."""
    LOSSES[loss.name] = loss
    return loss


def half_K(K):
    return K / 2


register(Loss("MSE", "MSE", lambda K, M, k: MSELoss(K), mse_per_sample, half_K))
register(Loss("RescaledMSE", "RMSE", lambda K, M, k: RescaledMSELoss(K, M=M, k=k), rescaled_mse_per_sample, half_K,
              uses_M_k=True, title=lambda M, k: f"rescaled MSE (M={M:g}, k={k:g})"))
register(Loss("CrossEntropy", "CE", lambda K, M, k: nn.CrossEntropyLoss(), cross_entropy_per_sample, lambda K: 1,
              title=lambda M, k: "cross-entropy"))


def get(name):
    """The registered loss of that name; an unknown one is a UserError that lists them."""
    if name not in LOSSES:
        raise UserError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")
    return LOSSES[name]


def make_criterion(args, num_classes=None):
    """The loss of args.loss. The number of classes defaults to args.num_classes, so that the
    authors' one-argument call make_criterion(args) works."""
    loss = get(args.loss)
    K = num_classes if num_classes is not None else getattr(args, "num_classes", None)
    if K is None and args.loss != "CrossEntropy":
        raise UserError(f"--loss {args.loss} needs the number of classes: pass num_classes or set args.num_classes")
    return loss.make(K, getattr(args, "M", 1.0), getattr(args, "k", 1.0))


def sep_decay_penalty(model, h, weight_decay, feature_decay_rate):
    """--sep_decay: (wd/2)(||W||^2 + ||b||^2) + (feature_decay_rate/2) sum_i ||h_i||^2 over the batch.

    h are the features themselves. (The original code penalised a normalised copy of h, whose
    squared norms sum to the batch size: a constant, so its "decay on H" had no effect.)"""
    penalty = sum(p.pow(2).sum() for p in model.fc.parameters())  # a frozen ETF adds a constant
    return 0.5 * weight_decay * penalty + 0.5 * feature_decay_rate * h.float().pow(2).sum()


def lbfgs_penalty(loss, params, weight_decay):
    """loss + 0.5 * wd * sum ||p||^2 over the trainable parameters p.

    In the authors' LBFGS closure's order: the penalty summed first, a term `0.5 * wd * torch.norm(p) ** 2`
    per parameter, and only then added to the loss. Adding each term to the loss in turn can round
    differently, and the strong-Wolfe line search turns a last-bit difference into another step."""
    penalty = 0
    for p in params:
        penalty += 0.5 * weight_decay * torch.norm(p) ** 2
    return loss + penalty
