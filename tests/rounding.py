"""Rounding-error bounds: where the tests' tolerances come from when two computations round differently.

The same number computed twice differs in its last bits when the two computations round differently:
a float32 dot product summed in another order (BLAS picks its kernel by the matrix shapes, so another
batch size, or a rank's block of a batch, sums each feature in another order; AVX-512 and AVX2 kernels
differ too), or a float64 sum in another order (statistics merged across ranks). A tolerance measured
on one machine fails on another; the bounds below hold on every CPU.

float32. A feature h = relu(z), z = sum_k w_k x_k + b, of a one-hidden-layer MLP is summed in some
order; each rounding adds an error of at most u = 2^-24 times the partial result, at most
S = sum_k |w_k x_k| + |b|, so the errors of z, over its n + 1 additions and n products, have a sum of
squares at most (n + 1) u^2 S^2 (and h moves by no more than z: ReLU is 1-Lipschitz). A quantity q
computed from the features moves, to first order, by sum_ij g_ij dh_ij, g = dq/dH (second-order terms are
smaller by the features' relative change, below 1e-3 in the tests). Modelling rounding errors as
independent and of mean zero (the model of Higham and Mary, "A new approach to probabilistic rounding
error analysis", SIAM J. Sci. Comput. 41, 2019, whose bound for one dot product is the case g = 1),
Hoeffding's inequality bounds that sum by lambda u sqrt(n + 1) ||g * S||_F except with probability
2 exp(-lambda^2 / 2) = 3e-14 (lambda = 8): a test bounding 10^4 quantities fails by chance once in
10^9 runs. Two computations, each that close to the exact value, are apart by at most twice that.
(Worst-case signs would give up to sqrt(n N d) / lambda times more, met only by adversarial data. On
the CPUs tried, two batch shapes give features a unit or two in the last place apart, far inside.)

float64. The metrics' own arithmetic, in two orders (sums of N terms and products of length d, each
within gamma = (N + d) u of the exact value relative to the terms' magnitudes; the SVD and eigenvalue
solvers backward stable with errors p u ||A||, p taken as d^2, generous for LAPACK), is covered by
perturbing every feature by 2 (gamma + d^2 u) relative to its own size (|mu_k - mu_G| <= the mean of |h|
covers H_bar's share). Worst-case signs here: the first-order bound sum_ij |g_ij| E_ij.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from nclib import nc

U32, U64 = 2.0 ** -24, 2.0 ** -53  # unit roundoffs
LAMBDA = 8.0  # standard deviations of the Hoeffding bound; see the module docstring


class Float32Sums:
    """Two float32 evaluations of features (N, d), each a sum of n + 1 terms of magnitudes S (N, d),
    in any two orders. The bound on a linear functional g (.., N, d) of the features; `extra` roundings
    per term are those of another formula for the same function (an unfolded BatchNorm, the folded
    weights' own rounding)."""

    def __init__(self, S, n, extra=0):
        self.c, self.S2 = 2 * LAMBDA * U32 * math.sqrt(n + 1 + extra), S.detach().to(torch.float64) ** 2

    def functional(self, g):
        return self.c * (g * g * self.S2).sum((-2, -1)).sqrt()

    def columns(self, w):  # the functionals sum_i w_mi h_ij, each column j: (M, d)
        return self.c * ((w * w) @ self.S2).sqrt()

    def per_sample(self, g, v):  # functionals g_i . h_i + v_i . sum_l h_l, each sample i: (N,)
        return self.c * ((g * g * self.S2).sum(1).sqrt() + ((v * v) @ self.S2.sum(0)).sqrt())


class Float64Sums:
    """The float64 arithmetic of the metrics, on two sides, as an elementwise perturbation of H (N, d)."""

    def __init__(self, H):
        N, d = H.shape
        self.E = 2 * (N + d + d * d) * U64 * H.detach().abs().to(torch.float64)

    def functional(self, g):
        return (g.abs() * self.E).sum((-2, -1))

    def columns(self, w):
        return w.abs() @ self.E

    def per_sample(self, g, v):
        return (g.abs() * self.E).sum(1) + v.abs() @ self.E.sum(0)


@torch.no_grad()
def one_hidden_layer_terms(model, x):
    """(S (N, d), n) of an MLP with one hidden layer on inputs x: the magnitudes each feature's sum adds
    up, and the length n of its dot products. BatchNorm folded: sum_k |w_jk x_ik| + |b_j|. Unfolded (a
    BatchNorm of scale s and shift beta after the layer, running mean m): |s| (that + |m|) + |beta|,
    which bounds the terms of either form, folded or not."""
    layers = [m for m in model.features if isinstance(m, nn.Linear)]
    assert len(layers) == 1, "the bound is derived for one hidden layer"
    W, b = layers[0].weight.to(torch.float64), layers[0].bias.to(torch.float64)
    S = x.flatten(1).to(torch.float64).abs() @ W.abs().T + b.abs()
    for bn in (m for m in model.features if isinstance(m, nn.BatchNorm1d)):
        scale = bn.weight.to(torch.float64) / torch.sqrt(bn.running_var.to(torch.float64) + bn.eps)
        S = scale.abs() * (S + bn.running_mean.to(torch.float64).abs()) + bn.bias.to(torch.float64).abs()
    return S, W.shape[1]


def nuclear_ratio(H, y, K):
    """nc.nuclear_ratio's quantity, differentiably: mean over classes of ||H_k||_* / ||H_k||_F."""
    return torch.stack([torch.linalg.svdvals(H[y == k]).sum() / H[y == k].norm() for k in range(K)]).mean()


def nc_bounds(H, y, K, W, b, *errors):
    """{info.pkl key: bound} on how far each training-set entry of info.pkl moves between two
    computations of the features H (N, d) (labels y, last layer W (K, d), b (K,) the same on both
    sides), whose rounding `errors` describe (Float32Sums, Float64Sums): arrays bound each entry."""
    H = H.detach().to(torch.float64).requires_grad_(True)
    W, b = W.detach().to(torch.float64), b.detach().to(torch.float64)
    N = len(y)
    stats = nc.NCStats(K, H.shape[1])
    one_hot = F.one_hot(y, K).to(torch.float64)  # (N, K)
    stats.n, stats.sum = one_hot.sum(0), one_hot.T @ H  # differentiable statistics
    mu_c, mu_G = nc.mu_c(stats), nc.mu_G(stats)
    C = H - mu_c[y]
    # nc.cos_margins: m_i = (s_y - s_r) / rho_i, s = W~ h_i (W's rows over their centred norms), r the
    # runner-up, rho_i = ||h_i - mu_G||; written out here, without its in-place ops, to be differentiated
    W_scaled = W / nc.centred_rows(W).norm(dim=1, keepdim=True)
    scores = H @ W_scaled.T  # (N, K)
    runner_up = scores.detach().scatter(1, y[:, None], -math.inf).argmax(1)
    centred = H - mu_G
    rho = centred.norm(dim=1)
    margins = (scores.gather(1, y[:, None])[:, 0] - scores.gather(1, runner_up[:, None])[:, 0]) / rho
    scalars = {"collapse_metric": nc.NC1(C.T @ C / N, mu_c, mu_G), "WH_relation_metric": nc.NC3(W, mu_c, mu_G),
               "Wh_b_relation_metric": nc.NC4(W, b, mu_G), "avg_cos_margin": margins.mean(),
               "nuclear_metric": nuclear_ratio(H, y, K)}
    grads = {k: torch.autograd.grad(v, H, retain_graph=True)[0] for k, v in scalars.items()}
    # each margin's gradient: in h_i, and in every h_l through mu_G (v_i / N)
    centred, rho = centred.detach(), rho.detach()[:, None]
    v = margins.detach()[:, None] * centred / rho ** 2
    own = (W_scaled[y] - W_scaled[runner_up]) / rho - v
    class_weights = one_hot.T / one_hot.sum(0)[:, None] - 1.0 / N  # (K, N): H_bar = (class_weights @ H)^T
    out = {"W": 0.0, "b": 0.0, "ETF_metric": 0.0}  # W and b are the checkpoint's; NC2 depends on them alone
    for e in errors:
        add = {"H": e.columns(class_weights).T, "mu_G_train": mean_bound(N, e),
               "all_cos_margin": e.per_sample(own, v / N).max(),  # sorting is 1-Lipschitz in the max norm
               **{k: e.functional(g) for k, g in grads.items()}}
        out = {k: out.get(k, 0.0) + add.get(k, 0.0) for k in out.keys() | add.keys()}
    return {k: float(v) if torch.is_tensor(v) and v.dim() == 0 else v for k, v in out.items()}


def mean_bound(N, *errors):
    """The bound on each entry of the mean of N features (d,), e.g. mu_G_test."""
    return sum(e.columns(torch.full((1, N), 1.0 / N, dtype=torch.float64))[0] for e in errors)


@torch.no_grad()
def logit_bound(fc, H, S, n):
    """(N, K) elementwise bound on how far two float32 evaluations of the logits fc(h) are apart, h
    features of a one-hidden-layer MLP with magnitudes S (N, d) of length-n dot products: each logit a
    functional of the features (its row of W) plus its own sum of d + 1 terms."""
    W = fc.weight.to(torch.float64)
    terms = H.to(torch.float64).abs() @ W.abs().T + (fc.bias.abs().to(torch.float64) if fc.bias is not None else 0)
    own = 2 * LAMBDA * U32 * math.sqrt(W.shape[1] + 1) * terms
    return 2 * LAMBDA * U32 * math.sqrt(n + 1) * (S.to(torch.float64) ** 2 @ (W * W).T).sqrt() + own


@torch.no_grad()
def fragile(logits, y, E_z):
    """How many samples' top-1 or top-5 hit may differ between two computations of the logits (N, K)
    apart by at most E_z elementwise: those whose true logit is within E_z[y] + E_z[j] of another's."""
    z, E_z = logits.to(torch.float64), E_z.to(torch.float64)
    gap = (z - z.gather(1, y[:, None])).abs() - E_z - E_z.gather(1, y[:, None])
    gap = gap.masked_fill(F.one_hot(y, z.shape[1]).bool(), math.inf)
    return int((gap <= 0).any(1).sum())
