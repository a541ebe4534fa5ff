"""The NC metrics: exact cases, a direct float64 reference, streaming, edge cases and the theory."""
import math

import numpy as np
import pytest
import torch

import nc
from models import simplex_etf

torch.set_default_dtype(torch.float32)


def reference(H, y, W, b):
    """Every NC formula (see nc.py's docstring), written directly in float64 numpy."""
    H, W, b = (np.asarray(a, dtype=np.float64) for a in (H, W, b))
    y = np.asarray(y)
    K = W.shape[0]
    mu = np.stack([H[y == k].mean(0) for k in range(K)])  # (K, d)
    mu_G = H.mean(0)
    Sigma_W = sum(np.outer(h - mu[t], h - mu[t]) for h, t in zip(H, y)) / len(y)
    Sigma_B = sum(np.outer(m - mu_G, m - mu_G) for m in mu) / K
    P = (np.eye(K) - np.ones((K, K)) / K) / np.sqrt(K - 1)
    Wc = W - W.mean(0)
    Hbar = (mu - mu_G).T
    WW, WH = Wc @ Wc.T, Wc @ Hbar
    cos = (H @ W.T) / (np.linalg.norm(H - mu_G, axis=1, keepdims=True) * np.linalg.norm(Wc, axis=1))
    margin = np.array([c[t] - np.max(np.delete(c, t)) for c, t in zip(cos, y)])
    nuclear = np.mean([np.linalg.norm(H[y == k], "nuc") / np.linalg.norm(H[y == k]) for k in range(K)])
    return {"NC1": np.trace(Sigma_W @ np.linalg.pinv(Sigma_B)) / K,
            "NC2": np.linalg.norm(WW / np.linalg.norm(WW) - P),
            "NC3": np.linalg.norm(WH / np.linalg.norm(WH) - P),
            "NC4": np.linalg.norm(W @ mu_G + b), "margin": margin, "nuclear": nuclear}


def random_problem(K=5, d=12, N=200, seed=0, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    y = torch.cat([torch.arange(K), torch.randint(0, K, (N - K,), generator=g)])  # every class present
    means = 3 * torch.randn(K, d, generator=g)
    H = means[y] + spread * torch.randn(N, d, generator=g)
    W, b = torch.randn(K, d, generator=g), torch.randn(K, generator=g)
    return H, y, W, b


def test_exact_simplex_etf_with_collapsed_features_gives_zero():
    K, d, n = 4, 6, 5
    W = 2.0 * simplex_etf(K, d).double()  # (K, d), rows sum to zero
    y = torch.arange(K).repeat_interleave(n)
    H = 0.7 * W[y]  # every feature equals its class mean, which is aligned with w_k; mu_G = 0
    b = torch.tensor([0.3, -0.1, 0.2, 0.5], dtype=torch.float64)
    out = nc.nc_metrics(H, y, W, b)
    assert abs(out["NC1"]) < 1e-8 and abs(out["NC2"]) < 1e-8 and abs(out["NC3"]) < 1e-8
    assert out["NC4"] == pytest.approx(torch.linalg.norm(b).item(), abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_metrics_match_direct_float64_computation(seed):
    H, y, W, b = random_problem(seed=seed)
    ref = reference(H, y, W, b)
    out = nc.nc_metrics(H, y, W, b)
    for key in ("NC1", "NC2", "NC3", "NC4"):
        assert out[key] == pytest.approx(ref[key], rel=1e-6), key
    stats = nc.NCStats(5, H.shape[1])
    stats.update(H, y)
    margins = nc.cos_margins(H, y, W.double(), b.double(), nc.mu_G(stats))
    np.testing.assert_allclose(margins.numpy(), ref["margin"], rtol=1e-6, atol=1e-9)
    assert nc.nuclear_ratio(H, y, 5) == pytest.approx(ref["nuclear"], rel=1e-6)


def test_nc1_keeps_its_precision_when_features_are_nearly_collapsed():
    # Large class means with a tiny spread: a one-pass E[hh^T] - mu mu^T would lose every digit.
    H, y, W, b = random_problem(K=4, d=8, N=400, seed=3, spread=1e-4)
    H = H.double() + 1e3
    ref = reference(H, y, W, b)
    streamed = nc.NCStats(4, 8)
    for chunk in torch.arange(len(y)).split(37):
        streamed.update(H[chunk], y[chunk])
    assert nc.paper_metrics(streamed, W, b)["NC1"] == pytest.approx(ref["NC1"], rel=1e-6)


def test_streaming_in_batches_equals_one_batch():
    H, y, W, b = random_problem(N=301, seed=4)
    whole = nc.nc_metrics(H, y, W, b)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    for batch in (1, 7, 64, 1000):
        stats = nc.NCStats(5, H.shape[1])
        for chunk in order.split(batch):
            stats.update(H[chunk], y[chunk])
        streamed = nc.paper_metrics(stats, W, b)
        for key in whole:
            assert streamed[key] == pytest.approx(whole[key], rel=1e-9, abs=1e-12), (batch, key)


def test_no_bias_means_nc4_is_the_norm_of_W_mu_G():
    H, y, W, _ = random_problem(seed=5)
    out = nc.nc_metrics(H, y, W, None)
    ref = reference(H, y, W, np.zeros(5))
    assert out["NC4"] == pytest.approx(ref["NC4"], rel=1e-6)


def test_feature_dimension_below_the_number_of_classes():
    # d < K - 1: Sigma_B has rank d, its pseudo-inverse keeps d directions; all metrics stay finite.
    H, y, W, b = random_problem(K=6, d=3, N=120, seed=6)
    out = nc.nc_metrics(H, y, W, b)
    ref = reference(H, y, W, b)
    assert all(math.isfinite(v) for v in out.values())
    assert out["NC1"] == pytest.approx(ref["NC1"], rel=1e-6)


def test_a_class_with_a_single_sample():
    H, y, W, b = random_problem(K=3, d=5, N=40, seed=7)
    y = torch.where(y == 2, torch.tensor(1), y)
    y[0] = 2  # class 2 has exactly one sample: it adds nothing to Sigma_W, its mean is that sample
    out = nc.nc_metrics(H, y, W, b)
    ref = reference(H, y, W, b)
    for key in ("NC1", "NC2", "NC3", "NC4"):
        assert out[key] == pytest.approx(ref[key], rel=1e-6), key


def test_a_class_without_samples_is_reported():
    H, y, W, b = random_problem(K=3, d=5, N=40, seed=8)
    y = torch.where(y == 2, torch.tensor(0), y)
    with pytest.raises(ValueError, match=r"classes \[2\] have no samples"):
        nc.nc_metrics(H, y, W, b)


def test_topk_hits():
    logits = torch.tensor([[3.0, 2, 1, 0, -1, -2], [0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0]])
    y = torch.tensor([0, 0, 4])  # top-1 hit, a miss, a top-5 hit
    assert nc.topk_hits(logits, y).tolist() == [1.0, 2.0]


# ---------------------------------------------------------------------------- the theory: the unconstrained feature model's global minimiser

def train_ufm(K, n, d, lam, bias=True, seed=0):
    """Minimise 1/(2N)||W H + b 1^T - Y||^2 + lam/2 ||W||^2 + lam/2 ||H||^2 by LBFGS in float64."""
    g = torch.Generator().manual_seed(seed)
    N = K * n
    Y = torch.eye(K, dtype=torch.float64).repeat_interleave(n, dim=1)  # (K, N) = I_K (x) 1_n^T
    W = (0.1 * torch.randn(K, d, generator=g, dtype=torch.float64)).requires_grad_()
    H = (0.1 * torch.randn(d, N, generator=g, dtype=torch.float64)).requires_grad_()
    b = torch.zeros(K, 1, dtype=torch.float64, requires_grad=bias)
    opt = torch.optim.LBFGS([W, H, b] if bias else [W, H], lr=1, max_iter=5000, history_size=50,
                            tolerance_grad=1e-13, tolerance_change=1e-16, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        f = ((W @ H + b - Y) ** 2).sum() / (2 * N) + lam / 2 * (W.pow(2).sum() + H.pow(2).sum())
        f.backward()
        return f
    for _ in range(5):
        opt.step(closure)
    return W.detach(), H.detach(), b.detach().squeeze(1)


def test_unconstrained_features_reach_the_simplex_etf_global_minimum():
    K, n, d, lam = 4, 5, 8, 0.01
    c = K * math.sqrt(n * lam * lam)
    assert c < 1
    W, H, b = train_ufm(K, n, d, lam)
    y = torch.arange(K).repeat_interleave(n)
    out = nc.nc_metrics(H.T, y, W, b)
    assert W.pow(2).sum().item() == pytest.approx((K - 1) * math.sqrt(n * lam / lam) * (1 - c), rel=1e-5)
    assert out["NC1"] < 1e-8 and out["NC2"] < 1e-5 and out["NC3"] < 1e-5
    torch.testing.assert_close(b, torch.full((K,), 1.0 / K, dtype=torch.float64), atol=1e-6, rtol=0)


def test_unconstrained_features_without_bias_reach_an_orthogonal_frame():
    K, n, d, lam = 4, 5, 8, 0.01
    c = K * math.sqrt(n * lam * lam)
    W, _, _ = train_ufm(K, n, d, lam, bias=False, seed=1)
    expected = math.sqrt(n * lam / lam) * (1 - c) * torch.eye(K, dtype=torch.float64)
    torch.testing.assert_close(W @ W.T, expected, atol=1e-5, rtol=0)


def test_unconstrained_features_collapse_to_zero_when_c_is_at_least_one():
    K, n, d, lam = 4, 5, 8, 0.3
    assert K * math.sqrt(n * lam * lam) >= 1
    W, H, _ = train_ufm(K, n, d, lam, seed=2)
    assert W.norm().item() < 1e-5 and H.norm().item() < 1e-5
