"""The paper's theory, runnable: the unconstrained feature model (UFM), its closed-form global
minimiser, its strict saddles, and the Hessian at the optimum under MSE and rescaled MSE.

    python ufm.py --K 4 --n 10 --d 8 --lambda_W 5e-3 --lambda_H 5e-3 --optimizer LBFGS --out model_weights/ufm
    python plot_runs.py model_weights/ufm
    python ufm.py --saddle --K 4 --n 5 --d 8          # strict saddles and the escape from one
    python ufm.py --spectrum --K 3 --n 3 --d 4         # Hessian at the optimum vs M, k (matched lambdas)

The model. N = nK samples, labels Y = I_K (x) 1_n^T (K x N), free variables W (K x d), H (d x N), b (K):

    f(W, H, b) = g(W H + b 1^T) + (lambda_W/2)||W||_F^2 + (lambda_H/2)||H||_F^2 + (lambda_b/2)||b||^2

with the data term g(Z) = (K/2) * losses.MSELoss = 1/(2N) ||Z - Y||_F^2 for MSE, and (K/2) *
losses.RescaledMSELoss = 1/(2N) sum_i [k (z_{y_i,i} - M)^2 + sum_{j != y_i} z_{j,i}^2] for rescaled
MSE (the two agree at M = k = 1); for cross-entropy g is the mean cross-entropy over the N samples.
Training a network with nn.MSELoss and optimiser weight decay wd minimises (2/K) f with
lambda_W = lambda_H = K wd / 2: the same minimisers.

Closed form (MSE, lambda_b = 0). With c = K sqrt(n lambda_W lambda_H), the class-mean logits
Zbar = W [h_1 .. h_K] solve min 1/(2K)||Zbar - T||^2 + sqrt(n lambda_W lambda_H) ||Zbar||_*, where
T = I_K - 11^T/K with a bias (b absorbs the mean; b = 1/K 1) and T = I_K without. T has m = K - 1
(resp. K) singular values, all 1, so each of the r = min(d, m) directions W can carry is shrunk to
1 - c (or to 0 if c >= 1), and each contributes c(2 - c)/(2K) to f instead of 1/(2K):

    f* = [r c (2 - c) + (m - r)] / (2K)        (c < 1; f* = m/(2K) if c >= 1, at W = H = 0)
    W W^T = sqrt(n lambda_H / lambda_W) (1 - c) T,   w_k = sqrt(n lambda_H / lambda_W) h_k,   h_{k,i} = h_k

Using only r' < r of the directions gives a critical point that is not a minimiser (a strict
saddle): `critical_point(ufm, r')`. The theorem needs d >= m (else the optimum is no simplex
ETF / orthogonal frame: a warning) and lambda_b = 0 (else no closed form here: a warning).

Rescaled MSE like with like (--spectrum). The data term with target M is M^2 times the one with
target 1 at logits Z / M, so substituting W = sqrt(M) W', H = sqrt(M) H', b = M b' gives

    f_{M,k}(W, H, b; lambda_W, lambda_H, lambda_b) = M^2 f_{1,k}(W', H', b'; lambda_W/M, lambda_H/M, lambda_b)

At equal lambdas, then, a larger M is a less regularised problem, not a different loss. At lambdas
times M the two are one problem with its variables rescaled: the Hessian in (W, H) is M times
the M = 1 one, the same condition number without a bias; the bias scales by M, not sqrt(M), so
with a bias (unregularised) its block is weighted against W and H and the condition number moves.
k weights the true class's entry of each sample; the mean weight of an entry is
w = (k + K - 1)/K, so g/w has MSE's mean weight (the same trace of its Hessian in the logits),
and f/w, which has f's condition number, is the objective with lambda_W, lambda_H and lambda_b
divided by w. --spectrum therefore compares at lambda_W, lambda_H times M w and lambda_b times w
(`matched_lambdas`); --equal_lambdas keeps them (unlike objectives, for comparison).
"""
import math
import sys
import os
import time

import torch
import torch.nn.functional as F

from nclib import nc, rundir
from nclib.base import UserError, allowed_bytes, save_json
from nclib.losses import get as get_loss
from nclib.measure import TrainingSetMetrics, parse_measures

OPTIMIZERS = ("GD", "SGD", "Adam", "LBFGS")
DTYPE = torch.float64
LBFGS_SCALE = 1e6  # see optimise()
# The Hessian modes hold about this many (#variables)^2 float64 matrices at once (spectrum: the
# Hessian, its symmetrised copy, eigvalsh's workspace, [T, I], its QR factors, C^T Hs C; its peak
# resident memory grew by 5.5 of them at 2,444 variables) ...
HESSIAN_COPIES = 6
HESSIAN_MAX_BYTES = 8 * 2**30  # ... and refuse beyond 8 GiB, or half the machine's memory if less


# ---------------------------------------------------------------------------- the model

class UFM:
    """The objective f(W, H, b) above, for given sizes, lambdas and loss; parameters as one flat
    float64 vector theta = [W.flatten(), H.flatten(), b] (b only with a bias)."""

    def __init__(self, K, n, d, lambda_W, lambda_H, lambda_b=0.0, bias=True, loss="MSE", M=1.0, k=1.0):
        if int(K) != K or K < 2:
            raise UserError(f"K = {K}: the model needs at least 2 classes")
        if int(n) != n or n < 1 or int(d) != d or d < 1:
            raise UserError(f"n = {n}, d = {d}: both must be positive integers")
        if not (lambda_W > 0 and lambda_H > 0 and lambda_b >= 0):
            raise UserError(f"lambda_W = {lambda_W}, lambda_H = {lambda_H} must be > 0 and lambda_b = {lambda_b} >= 0")
        self.loss_spec = get_loss(loss)
        if not (M > 0 and k > 0):
            raise UserError(f"M = {M}, k = {k}: both must be > 0")
        self.K, self.n, self.d, self.N = int(K), int(n), int(d), int(K * n)
        self.lambda_W, self.lambda_H, self.lambda_b, self.bias = lambda_W, lambda_H, lambda_b, bias
        self.loss, self.M, self.k = loss, M, k
        self.y = torch.arange(self.K).repeat_interleave(self.n)  # (N,): n samples per class
        self.Y = F.one_hot(self.y, self.K).T.to(DTYPE)  # (K, N) = I_K (x) 1_n^T
        self.criterion = self.loss_spec.make(self.K, M, k)

    @property
    def c(self):
        return self.K * math.sqrt(self.n * self.lambda_W * self.lambda_H)

    @property
    def size(self):
        return variables(self.K, self.n, self.d, self.bias)

    def split(self, theta):
        """(W (K, d), H (d, N), b (K,)); b is zeros without a bias."""
        KD, DN = self.K * self.d, self.d * self.N
        W, H = theta[:KD].reshape(self.K, self.d), theta[KD:KD + DN].reshape(self.d, self.N)
        b = theta[KD + DN:] if self.bias else torch.zeros(self.K, dtype=theta.dtype)
        return W, H, b

    def join(self, W, H, b=None):
        parts = [W.reshape(-1), H.reshape(-1)] + ([b.reshape(-1)] if self.bias else [])
        return torch.cat(parts).to(DTYPE)

    def data_term(self, W, H, b, cols=None):
        """g(W H + b 1^T) over all samples, or its mean over the samples `cols` (a minibatch)."""
        Hs, y = (H, self.y) if cols is None else (H[:, cols], self.y[cols])
        logits = (W @ Hs + b[:, None]).T  # (B, K)
        scale = self.loss_spec.ufm_scale(self.K)  # MSE: (K/2) x the mean over B*K entries, 1/(2B) ||.||^2
        return self.criterion(logits, y) if scale == 1 else scale * self.criterion(logits, y)

    def objective(self, W, H, b):
        return (self.data_term(W, H, b) + self.lambda_W / 2 * W.pow(2).sum() + self.lambda_H / 2 * H.pow(2).sum()
                + self.lambda_b / 2 * b.pow(2).sum())

    def f(self, theta):
        return self.objective(*self.split(theta))

    def grad(self, theta):
        theta = theta.detach().clone().requires_grad_()
        return torch.autograd.grad(self.f(theta), theta)[0]

    def hessian(self, theta):
        return torch.autograd.functional.hessian(self.f, theta.detach())

    def metrics(self, theta):
        """NC1-NC4 of the features H^T with their labels, and the accuracy of argmax(W H + b)."""
        W, H, b = (t.detach() for t in self.split(theta))
        out = nc.nc_metrics(H.T, self.y, W, b if self.bias else None)
        out["train_acc1"] = 100.0 * ((W @ H + b[:, None]).argmax(0) == self.y).to(DTYPE).mean().item()
        return out

    def random_point(self, scale=0.1, seed=0):
        g = torch.Generator().manual_seed(seed)
        return scale * torch.randn(self.size, generator=g, dtype=DTYPE)

    def assumption_warnings(self):
        """One line per assumption of the closed form that fails (empty when none does)."""
        out, m = [], self.K - 1 if self.bias else self.K
        if self.d < m:
            out.append(f"d = {self.d} < {'K - 1' if self.bias else 'K'} = {m}: the theorem assumes d >= {m}; "
                       f"the optimum uses only {self.d} of {m} directions and is no "
                       f"{'simplex ETF' if self.bias else 'orthogonal frame'}")
        if self.lambda_b > 0 and self.bias:
            out.append(f"lambda_b = {self.lambda_b} > 0: the closed form assumes an unregularised bias; "
                       "no closed-form comparison")
        return out


def variables(K, n, d, bias=True):
    """The number of variables of the UFM: W (K d), H (d n K) and b (K)."""
    return K * d + d * n * K + (K if bias else 0)


def check_hessian_fits(K, n, d, bias, mode):
    """Refuse, in one line and before anything is allocated, sizes whose Hessian would not fit."""
    size = variables(K, n, d, bias)
    need = HESSIAN_COPIES * 8 * size ** 2
    cap = allowed_bytes(HESSIAN_MAX_BYTES)
    if need > cap:
        most = math.isqrt(int(cap // (HESSIAN_COPIES * 8)))
        raise UserError(f"{mode} with K = {K}, n = {n}, d = {d}: {size:,} variables, whose Hessian needs "
                        f"{need / 2**30:,.1f} GiB ({HESSIAN_COPIES} matrices of {size:,}^2 float64), over the "
                        f"{cap / 2**30:.1f} GiB allowed: lower --K, --n or --d (at most {most:,} variables)")


def per_sample_loss(z, y, loss, M=1.0, k=1.0):
    """The data term of each sample (B,) for logits z (B, K): its mean over samples is g (see the
    module docstring; tests check it against the loss modules)."""
    return get_loss(loss).per_sample(z, y, M, k)


def _target_basis(K, bias):
    """Orthonormal basis (K, m) of the range of T: 1^perp (with a bias, m = K - 1) or R^K (m = K)."""
    if not bias:
        return torch.eye(K, dtype=DTYPE)
    Q, _ = torch.linalg.qr(torch.eye(K, dtype=DTYPE) - 1.0 / K)  # first K - 1 columns span 1^perp
    return Q[:, :K - 1]


def critical_point(ufm, r):
    """The critical point using r of the m directions of T (a global minimiser when r = min(d, m),
    a strict saddle when r is smaller and c < 1). Returns (theta, value)."""
    m = ufm.K - 1 if ufm.bias else ufm.K
    if not 0 <= r <= min(ufm.d, m):
        raise UserError(f"r = {r}: a critical point uses 0 to min(d, m) = {min(ufm.d, m)} directions")
    lW, lH, c = ufm.lambda_W, ufm.lambda_H, ufm.c
    s = math.sqrt(ufm.n * lH / lW) * max(1 - c, 0.0)  # W W^T = s E_r E_r^T
    W = torch.zeros(ufm.K, ufm.d, dtype=DTYPE)
    W[:, :r] = math.sqrt(s) * _target_basis(ufm.K, ufm.bias)[:, :r]
    H = math.sqrt(lW / (ufm.n * lH)) * W.T @ ufm.Y  # h_{k,i} = w_k / sqrt(n lambda_H / lambda_W)
    b = torch.full((ufm.K,), 1.0 / ufm.K, dtype=DTYPE)
    per_direction = c * (2 - c) if c < 1 else 1.0  # each direction's share of 2K f, active or not
    return ufm.join(W, H, b), (r * per_direction + (m - r)) / (2 * ufm.K)


def closed_form(ufm):
    """The global minimum of the MSE UFM with lambda_b = 0 (None otherwise): a dict with the value
    f*, ||W||_F^2, b, the ETF scale s (W W^T = s T), c, the rank r, the NC metrics the minimiser
    has, and a minimiser theta."""
    if ufm.loss != "MSE" or (ufm.bias and ufm.lambda_b > 0):
        return None
    m = ufm.K - 1 if ufm.bias else ufm.K
    r = min(ufm.d, m)
    theta, value = critical_point(ufm, r)
    s = math.sqrt(ufm.n * ufm.lambda_H / ufm.lambda_W) * max(1 - ufm.c, 0.0)
    b = torch.full((ufm.K,), 1.0 / ufm.K, dtype=DTYPE) if ufm.bias else torch.zeros(ufm.K, dtype=DTYPE)
    # NC4 = ||W mu_G + b|| is not 0 at the MSE optimum: with a bias mu_G = 0 and b* = 1/K 1, so it
    # is 1/sqrt(K); without, W mu_G = (1 - c)/K 1 (the logits' mean), so it is (1 - c)/sqrt(K).
    nc4 = 1 / math.sqrt(ufm.K) if ufm.bias else (1 - ufm.c) / math.sqrt(ufm.K)
    expected = {"NC1": 0.0, "NC2": 0.0, "NC3": 0.0, "NC4": nc4} if ufm.c < 1 and r == m else None
    return {"value": value, "W_sq_norm": r * s, "b": b, "scale": s, "c": ufm.c, "rank": r if ufm.c < 1 else 0,
            "expected_nc": expected, "theta": theta}


# ---------------------------------------------------------------------------- optimisation

def optimise(ufm, optimizer="LBFGS", iters=200, lr=None, theta0=None, init_scale=0.1, seed=0, batch_size=None,
             momentum=0.0, log_every=1, record=None, tol_grad=0.0):
    """Minimise f from theta0 (default: a random point of scale init_scale). GD and SGD are
    torch.optim.SGD on the whole objective and on minibatches of samples; LBFGS does one
    strong-Wolfe iteration per step. SGD's minibatch objective (1/(2B)) sum_B ||.||^2 +
    (N/B)(lambda_H/2) sum_B ||h_i||^2 + the W, b penalties is an unbiased estimate of f.
    record(iteration, theta, objective, grad_norm) is called every log_every iterations and at
    the end; returns the final theta. Stops early when the gradient norm is <= tol_grad."""
    if optimizer not in OPTIMIZERS:
        raise UserError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    lr = lr if lr is not None else {"GD": 0.5, "SGD": 0.1, "Adam": 1e-2, "LBFGS": 1.0}[optimizer]
    theta = (ufm.random_point(init_scale, seed) if theta0 is None else theta0.detach().clone()).requires_grad_()
    if optimizer in ("GD", "SGD"):
        opt = torch.optim.SGD([theta], lr=lr, momentum=momentum)
    elif optimizer == "Adam":
        opt = torch.optim.Adam([theta], lr=lr)
    else:  # max_eval: torch's default, 1.25 max_iter = 1, would leave the line search no evaluation
        opt = torch.optim.LBFGS([theta], lr=lr, max_iter=1, max_eval=25, history_size=50, line_search_fn="strong_wolfe",
                                tolerance_grad=0.0, tolerance_change=0.0)
    g = torch.Generator().manual_seed(seed + 1)
    B = min(batch_size or ufm.N, ufm.N)

    def closure():
        opt.zero_grad()
        if optimizer != "SGD":
            loss = ufm.f(theta)
        else:
            W, H, b = ufm.split(theta)
            cols = torch.randperm(ufm.N, generator=g)[:B]
            loss = (ufm.data_term(W, H, b, cols) + ufm.lambda_W / 2 * W.pow(2).sum()
                    + ufm.N / B * ufm.lambda_H / 2 * H[:, cols].pow(2).sum() + ufm.lambda_b / 2 * b.pow(2).sum())
        if optimizer == "LBFGS":
            # LBFGS is invariant to the scale of f except for torch's absolute threshold: it drops
            # curvature pairs with y^T s <= 1e-10, which near the optimum is all of them at this
            # scale (f ~ 0.01, steps ~ 1e-6), and it then crawls like gradient descent.
            loss = LBFGS_SCALE * loss
        loss.backward()
        return loss

    def log(it):
        value, grad = ufm.f(theta.detach()).item(), ufm.grad(theta).norm().item()
        if record is not None:
            record(it, theta.detach().clone(), value, grad)
        return grad

    it = 0
    while it < iters:
        if it % log_every == 0 and log(it) <= tol_grad:
            return theta.detach()
        before = theta.detach().clone()
        opt.step(closure)
        if optimizer == "LBFGS" and torch.equal(before, theta.detach()):
            # torch's LBFGS stops for good once its direction is not a descent direction (a stale
            # memory); restart it from -grad, and stop when even that cannot move: converged to rounding.
            opt.state.clear()
            opt.step(closure)
            if torch.equal(before, theta.detach()):
                break
        if not torch.isfinite(theta).all():
            raise UserError(f"{optimizer} diverged at iteration {it + 1} (lr {lr}): lower --lr")
        it += 1
    log(it)
    return theta.detach()


def minimise(ufm, theta0=None, seed=0, iters=3000):
    """A global minimiser to high precision: LBFGS until the gradient norm stops falling."""
    return optimise(ufm, "LBFGS", iters=iters, theta0=theta0, seed=seed, tol_grad=1e-13)


# ---------------------------------------------------------------------------- the Hessian: saddles and spectrum

def orbit_tangent(ufm, theta, rtol=1e-6):
    """Orthonormal basis (P, t) of the tangent space at theta of the orbit {(W Q^T, Q H, b): Q in O(d)}.

    f is invariant under these rotations, so the Hessian has a zero eigenvalue along each tangent
    direction (dW, dH) = (-W A, A H), A skew-symmetric. With r the rank of [W^T, H] there are
    t = d(d-1)/2 - (d-r)(d-r-1)/2 of them (rotations of the d - r unused directions move nothing).
    r is the number of singular values of [W^T, H] above rtol times the largest (an optimiser's end
    point carries ~1e-7 of rounding in the unused directions, which must not count), and the basis
    is the top t left singular vectors of the tangent vectors of all d(d-1)/2 basis rotations."""
    W, H, b = ufm.split(theta.detach())
    sv = torch.linalg.svdvals(torch.cat([W.T, H], 1))
    r = int((sv > rtol * max(sv.max().item(), 1e-300)).sum())
    t = ufm.d * (ufm.d - 1) // 2 - (ufm.d - r) * (ufm.d - r - 1) // 2
    if t == 0:
        return torch.zeros(ufm.size, 0, dtype=DTYPE)
    vectors = []
    for i in range(ufm.d):
        for j in range(i + 1, ufm.d):
            A = torch.zeros(ufm.d, ufm.d, dtype=DTYPE)
            A[i, j], A[j, i] = 1.0, -1.0
            vectors.append(ufm.join(-W @ A, A @ H, torch.zeros_like(b)))
    U, _, _ = torch.linalg.svd(torch.stack(vectors, 1), full_matrices=False)
    return U[:, :t]


def hessian_off_orbit(ufm, theta, rtol=1e-6):
    """The (symmetrised) Hessian at theta, an orthonormal basis T of the rotation orbit's tangent
    space and one, C, of its complement."""
    Hs = ufm.hessian(theta)
    Hs = (Hs + Hs.T) / 2
    T = orbit_tangent(ufm, theta, rtol)
    Q, _ = torch.linalg.qr(torch.cat([T, torch.eye(ufm.size, dtype=DTYPE)], 1))  # T's columns first
    return Hs, T, Q[:, T.shape[1]:ufm.size]


def newton_polish(ufm, theta, steps=2):
    """Newton steps off the rotation orbit from theta near a minimiser: LBFGS stops at gradients
    of ~1e-9, where the Hessian is known to ~1e-5 relative (cond_rtol); one step takes the gradient
    to rounding. The gradient is orthogonal to the orbit (f is invariant along it), and the Hessian,
    singular along it, is positive definite on the complement C: the step is C (C^T Hs C)^-1 C^T g."""
    theta = theta.detach()
    for _ in range(steps):
        Hs, _, C = hessian_off_orbit(ufm, theta)
        theta = theta - C @ torch.linalg.solve(C.T @ Hs @ C, C.T @ ufm.grad(theta))
    return theta


def spectrum(ufm, theta, rtol=1e-6):
    """The Hessian at theta, its eigenvalues, and the eigenvalues on the complement of the
    rotation orbit's tangent space (the symmetry's zero directions projected out). Returns a dict:
    eigenvalues (full), orbit_dim, restricted (eigenvalues of C^T Hess C, C an orthonormal basis
    of the complement), lambda_min_pos (the smallest restricted eigenvalue), lambda_max, cond."""
    Hs, T, C = hessian_off_orbit(ufm, theta, rtol)
    eig = torch.linalg.eigvalsh(Hs)
    restricted = torch.linalg.eigvalsh(C.T @ Hs @ C)
    lo, hi = restricted.min().item(), eig.max().item()
    cond = hi / lo if lo > 0 else math.inf
    return {"eigenvalues": eig, "orbit_dim": T.shape[1], "restricted": restricted,
            "lambda_min_pos": lo, "lambda_max": hi, "cond": cond,
            "cond_rtol": cond_rtol(ufm, theta, lo, hi) if lo > 0 and ufm.loss != "CrossEntropy" else math.inf,
            "near_zero": int((eig.abs() <= rtol * eig.abs().max()).sum())}


def cond_rtol(ufm, theta, lambda_min, lambda_max):
    """A first-order bound on the relative error of the condition number at theta, an end point
    with gradient g, against the minimiser's: 2 L3 ||g|| / lambda_min^2 + 2 P eps cond, lambda_min
    the smallest eigenvalue off the orbit, P the number of variables. Why: off the orbit f is
    lambda_min-strongly convex near its minimiser, so theta is within ||g|| / lambda_min of it; the
    Hessian moves by at most L3 times that (Weyl), L3 the norm of the third derivative; lambda_max /
    lambda_min then moves by at most L3 (||g|| / lambda_min) (1/lambda_min + 1/lambda_max). A
    symmetric eigensolver's eigenvalues are those of a matrix within about P eps ||Hess|| of it.
    L3 for the (rescaled) MSE data term, weights at most omega = max(k, 1): along a unit direction
    (dW, dH, db) the logits are Z + t A + t^2 B, A = dW H + W dH + db 1^T, B = dW dH, so the third
    derivative is (6/N) <A, B>_omega, at most (3 omega / N) sqrt(||W||_2^2 + ||H||_2^2 + N) (||B|| <= 1/2,
    Cauchy-Schwarz on A; N only with a bias); the penalties add nothing, and for a symmetric
    trilinear form the sup over u of |T(u, u, u)| is its norm."""
    W, H, _ = ufm.split(theta.detach())
    spectral = torch.linalg.matrix_norm(W, 2) ** 2 + torch.linalg.matrix_norm(H, 2) ** 2
    L3 = 3 * max(ufm.k, 1.0) / ufm.N * math.sqrt(spectral.item() + (ufm.N if ufm.bias else 0))
    rounding = 2 * ufm.size * torch.finfo(DTYPE).eps * lambda_max / lambda_min
    return 2 * L3 * ufm.grad(theta).norm().item() / lambda_min ** 2 + rounding


def saddle(ufm, r):
    """The critical point with r active directions: its gradient norm, value, and the Hessian's
    smallest eigenvalue with its eigenvector (an escape direction, as a theta)."""
    theta, value = critical_point(ufm, r)
    eig, vec = torch.linalg.eigh(ufm.hessian(theta))
    return {"theta": theta, "value": value, "grad_norm": ufm.grad(theta).norm().item(),
            "lambda_min": eig[0].item(), "direction": vec[:, 0],
            # the rotation orbit's zero eigenvalues come out as +-1e-17: not negative curvature
            "negative": int((eig < -1e-9 * eig.abs().max()).sum())}


def escape(ufm, point, eps=1e-3, optimizer="GD", iters=20000, lr=None, record=None):
    """Gradient descent from point['theta'] + eps * (escape direction) until the gradient norm is
    1e-12 or less (checked every iteration): returns the final theta. The step is 1 / (the
    Hessian's largest eigenvalue at the saddle) unless lr is given."""
    if lr is None:
        lr = 1.0 / torch.linalg.eigvalsh(ufm.hessian(point["theta"])).max().item()
    return optimise(ufm, optimizer, iters=iters, lr=lr, theta0=point["theta"] + eps * point["direction"],
                    tol_grad=1e-12, record=record)


def direction_summary(ufm, v):
    """How an eigenvector splits into its W, H and b parts, and the rank-1 structure of its W part."""
    dW, dH, db = ufm.split(v)
    sv = torch.linalg.svdvals(dW)
    return (f"||dW|| {dW.norm():.3f}, ||dH|| {dH.norm():.3f}, ||db|| {db.norm():.2e}; "
            f"singular values of dW {', '.join(f'{s:.3f}' for s in sv[:3].tolist())}")


# ---------------------------------------------------------------------------- the script

def info_result(ufm, theta, value, grad_norm, measures=()):
    """One iteration's entry of info.pkl, under the keys validate_NC.py writes (nc.INFO_KEYS) and those
    of `measures` (nc.MEASURES), plus objective and grad_norm; measured by nclib.measure as a network's
    training set is. No test set: test accuracies and mu_G_test are left out. At W = H = 0 (c >= 1)
    margins and the nuclear ratio are 0/0: NaN entries, not errors."""
    W, H, b = (t.detach() for t in ufm.split(theta))
    logits = (W @ H + b[:, None]).T  # (N, K)
    metrics = TrainingSetMetrics.of(logits, H.T, ufm.y, ufm.K, keep_pred="ncc" in measures)
    out = metrics.entries(W, b, measures)
    return {**{k: v for k, v in out.items() if k not in ("layers", "layer_names")}, "objective": value,
            "grad_norm": grad_norm}


INFO_KEYS = tuple(v for k, v in nc.INFO_KEYS.items() if k not in ("test_acc1", "test_acc5", "mu_G_test")) + (
    "objective", "grad_norm")


def format_line(it, r):
    return (f"iteration {it}: f {r['objective']:.12g} |grad| {r['grad_norm']:.3g} NC1 {r['collapse_metric']:.4g} "
            f"NC2 {r['ETF_metric']:.4g} NC3 {r['WH_relation_metric']:.4g} NC4 {r['Wh_b_relation_metric']:.4g} "
            f"train acc {r['train_acc1']:.2f}" + measures_text(r))


def measures_text(r):
    """' | name value' for each scalar of --measures in r (nothing without --measures)."""
    keys = [k for m in nc.MEASURES.values() for k in m.keys if isinstance(r.get(k), float)]
    return "".join(f" | {k} {r[k]:.4g}" for k in keys)


def compare(ufm, theta, form, log=print):
    """Print the end point against the closed form; returns the numbers."""
    value = ufm.f(theta).item()
    W, _, _ = ufm.split(theta)
    got = {"value": value, "gap": value - form["value"], "rel_gap": (value - form["value"]) / abs(form["value"]),
           "W_sq_norm": W.pow(2).sum().item(), **ufm.metrics(theta)}
    ref = form["W_sq_norm"]
    got["W_rel_gap"] = (got["W_sq_norm"] - ref) / ref if ref > 0 else got["W_sq_norm"]
    log(f"closed form: c = {form['c']:.4g}, f* = {form['value']:.12g}, ||W||^2 = {ref:.8g}, rank {form['rank']}")
    log(f"end point:   f - f* = {got['gap']:.3e} (relative {got['rel_gap']:.3e}), ||W||^2 {got['W_sq_norm']:.8g} "
        f"({'relative' if ref > 0 else 'absolute'} gap {got['W_rel_gap']:.3e})")
    expected = form["expected_nc"]
    log("             " + ", ".join(f"{k} {got[k]:.3e}" + (f" (expected {expected[k]:.3g})" if expected else "")
                                    for k in ("NC1", "NC2", "NC3", "NC4")))
    return got


def run(args, log=print):
    """The default mode: optimise, write the run directory, compare with the closed form."""
    ufm = make_ufm(args)
    results, measures = {}, parse_measures(getattr(args, "measures", None))

    def record(it, theta, value, grad_norm):
        results[it] = info_result(ufm, theta, value, grad_norm, measures)

    t0 = time.time()
    theta = optimise(ufm, args.optimizer, args.iters, args.lr, init_scale=args.init_scale, seed=args.seed,
                     batch_size=args.batch_size, momentum=args.momentum, log_every=args.log_every, record=record)
    last = max(results)
    log(f"{args.optimizer}, {args.loss}: {last} iterations in {time.time() - t0:.1f} s; " +
        format_line(last, results[last]))
    os.makedirs(args.out, exist_ok=True)
    record_args = {**vars(args), "model": "UFM", "dataset": f"UFM K={args.K} n={args.n}", "epochs": args.iters,
                   "num_classes": args.K}
    save_json(record_args, os.path.join(args.out, rundir.ARGS))
    # 'epochs' in info.pkl are iteration numbers: plot_runs.py draws them on its epoch axis.
    keys = INFO_KEYS + tuple(k for m in measures for k in nc.MEASURES[m].keys if k in results[last])
    rundir.write_info(args.out, results, keys, format_line)
    log(f"wrote {args.out}/{rundir.INFO} ({len(results)} points), {rundir.TEST_LOG}, {rundir.ARGS}")
    form = closed_form(ufm)
    if form is not None:
        compare(ufm, theta, form, log)
    elif args.loss != "MSE":
        log(f"closed form: only for MSE (this run: {args.loss})")
    return theta, results


def run_saddle(args, log=print):
    """The strict saddles of the MSE UFM: every critical point with r < min(d, m) active directions."""
    check_hessian_fits(args.K, args.n, args.d, args.bias, "--saddle")
    ufm = make_ufm(args)
    form = closed_form(ufm)
    if form is None or ufm.c >= 1:
        raise UserError("--saddle needs --loss MSE, lambda_b = 0 and c = K sqrt(n lambda_W lambda_H) < 1 "
                        f"(here c = {ufm.c:.3g}): otherwise the closed form, and its saddles, are not known here")
    log(f"K {ufm.K}, n {ufm.n}, d {ufm.d}, c = {ufm.c:.4g}: global minimum f* = {form['value']:.12g} "
        f"(rank {form['rank']}), {ufm.size} variables")
    points = {}
    for r in range(form["rank"]):
        p = saddle(ufm, r)
        points[r] = p
        log(f"  rank {r}: f = {p['value']:.10g}, |grad| = {p['grad_norm']:.1e}, smallest Hessian eigenvalue "
            f"{p['lambda_min']:.5g} ({p['negative']} negative); its eigenvector: {direction_summary(ufm, p['direction'])}")
    r = form["rank"] - 1  # one direction short of the optimum: one escape direction completes it
    t0, last = time.time(), [0]
    end = escape(ufm, points[r], eps=args.eps, iters=args.iters, record=lambda it, *_: last.__setitem__(0, it))
    value = ufm.f(end).item()
    log(f"escape from rank {r} along its eigenvector (eps {args.eps}), GD with step 1/lambda_max: "
        f"f = {value:.12g}, f - f* = {value - form['value']:.2e} after {last[0]} iterations ({time.time() - t0:.1f} s)")
    compare(ufm, end, form, log)
    return points, end


def matched_lambdas(K, M, k, lambda_W, lambda_H, lambda_b):
    """The lambdas at which rescaled MSE (M, k) is the M = k = 1 problem at (lambda_W, lambda_H,
    lambda_b) with its variables rescaled (M) and its data term normalised to MSE's mean weight (k):
    see the module docstring."""
    w = (k + K - 1) / K
    return M * w * lambda_W, M * w * lambda_H, w * lambda_b


def run_spectrum(args, log=print):
    """The Hessian at the global minimiser for MSE (M = k = 1) and rescaled MSE, M swept at k = 1 and
    k swept at M = 1, at matched lambdas (--equal_lambdas: at the same ones). Prints a table and
    draws spectrum_M / spectrum_k into --plot_dir."""
    check_hessian_fits(args.K, args.n, args.d, args.bias, "--spectrum")
    rows = []
    settings = [(M, 1.0) for M in args.Ms] + [(1.0, k) for k in args.ks if k != 1.0]
    scaling = "the same for every M, k" if args.equal_lambdas else "times M (k + K - 1)/K, lambda_b times (k + K - 1)/K"
    log(f"K {args.K}, n {args.n}, d {args.d}, lambda_W {args.lambda_W}, lambda_H {args.lambda_H}, "
        f"lambda_b {args.lambda_b} ({scaling}), bias {args.bias}")
    log(f"{'M':>5} {'k':>5} {'lambda_W':>9} {'f*':>12} {'|grad|':>8} {'orbit':>5} {'#~0':>4} {'min eig':>10} "
        f"{'min pos':>10} {'max':>10} {'cond':>10} {'err <=':>8}")
    for M, k in settings:
        lambdas = (args.lambda_W, args.lambda_H, args.lambda_b)
        if not args.equal_lambdas:
            lambdas = matched_lambdas(args.K, M, k, *lambdas)
        ufm = UFM(args.K, args.n, args.d, *lambdas, args.bias, "RescaledMSE", M, k)
        theta = newton_polish(ufm, minimise(ufm, seed=args.seed))
        sp = spectrum(ufm, theta)
        row = {"M": M, "k": k, "lambda_W": lambdas[0], "lambda_H": lambdas[1], "lambda_b": lambdas[2],
               "value": ufm.f(theta).item(), "grad_norm": ufm.grad(theta).norm().item(),
               **{key: sp[key] for key in ("orbit_dim", "near_zero", "lambda_min_pos", "lambda_max", "cond",
                                           "cond_rtol")},
               "min_eig": sp["eigenvalues"].min().item()}
        rows.append(row)
        log(f"{M:5g} {k:5g} {row['lambda_W']:9.4g} {row['value']:12.6g} {row['grad_norm']:8.1e} "
            f"{row['orbit_dim']:5d} {row['near_zero']:4d} {row['min_eig']:10.2e} {row['lambda_min_pos']:10.4g} "
            f"{row['lambda_max']:10.4g} {row['cond']:10.4g} {row['cond_rtol'] * row['cond']:8.1e}")
    if args.plot_dir:
        for p in plot_spectrum(rows, args.plot_dir, "equal lambdas" if args.equal_lambdas else "matched lambdas"):
            log(f"wrote {p}")
    return rows


def plot_spectrum(rows, out_dir, title):
    """spectrum_M and spectrum_k (png and pdf): smallest positive eigenvalue and condition number."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for name, key, other in (("M", "M", "k"), ("k", "k", "M")):
        sweep = sorted((r for r in rows if r[other] == 1.0), key=lambda r: r[key])
        if len(sweep) < 2:
            continue
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        x = [r[key] for r in sweep]
        for ax, q, label in zip(axes, ("lambda_min_pos", "cond"), ("smallest positive eigenvalue", "condition number")):
            ax.semilogy(x, [r[q] for r in sweep], "o-", linewidth=2)
            ax.set_xlabel(f"rescaled MSE {key} (MSE at {key} = 1)")
            ax.set_ylabel(label)
            ax.grid(True, alpha=0.4)
        fig.suptitle(f"Hessian at the optimum, {title}")
        fig.tight_layout()
        for ext in ("png", "pdf"):
            path_ = os.path.join(out_dir, f"spectrum_{name}.{ext}")
            fig.savefig(path_, dpi=100, metadata={"CreationDate": None} if ext == "pdf" else None)
            paths.append(path_)
        plt.close(fig)
    return paths


def make_ufm(args):
    ufm = UFM(args.K, args.n, args.d, args.lambda_W, args.lambda_H, args.lambda_b, args.bias, args.loss, args.M, args.k)
    for line in ufm.assumption_warnings():
        print(f"warning: {line}", file=sys.stderr)
    return ufm
