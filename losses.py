"""The training losses and the explicit weight-decay penalties.

    MSE            nn.MSELoss against one-hot targets: the mean over all B*K entries
    RescaledMSE    Hui & Belkin (2020), per sample (1/K) [k (z_y - M)^2 + sum_{j != y} z_j^2],
                   averaged over the batch (the paper writes alpha for k)
    CrossEntropy   the usual one

Weight decay is the optimiser's, except in two cases, where it is a term of the loss:
--sep_decay (`sep_decay_penalty`) and LBFGS, which has none of its own (`lbfgs_penalty`).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from utils import UserError

LOSSES = ("MSE", "RescaledMSE", "CrossEntropy")


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


def make_criterion(args, num_classes=None):
    """The loss of args.loss. The number of classes defaults to args.num_classes, so that the
    authors' one-argument call make_criterion(args) works."""
    K = num_classes if num_classes is not None else getattr(args, "num_classes", None)
    if args.loss in ("MSE", "RescaledMSE") and K is None:
        raise UserError(f"--loss {args.loss} needs the number of classes: pass num_classes or set args.num_classes")
    if args.loss == "MSE":
        return MSELoss(K)
    if args.loss == "RescaledMSE":
        return RescaledMSELoss(K, M=args.M, k=args.k)
    if args.loss == "CrossEntropy":
        return nn.CrossEntropyLoss()
    raise UserError(f"unknown loss {args.loss!r}; choose one of {', '.join(LOSSES)}")


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
