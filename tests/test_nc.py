"""The NC metrics: exact cases, a direct float64 reference, streaming, edge cases and the theory."""
import math

import numpy as np
import pytest
import torch

from models import simplex_etf
from nclib import nc

torch.set_default_dtype(torch.float32)


# Tolerances against the reference: both sides float64 from the same inputs. The reference's pinv of the
# d x d Sigma_B (rank K - 1, cut at 1e-15 of its largest singular value) loses ~u = 1.1e-16 times Sigma_B's
# condition on its range ((3 / 1)^2 ~ 10 to 1e3 for class means of spread 3 here): ~1e-13; rel 1e-6 is
# generous and holds on every CPU. Margins, nuclear ratio: sums of <= 200 terms, ~1e-14.
FLOAT64_RTOL = 1e-6


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
    # float64 of entries ~1: zeros come out at ~1e-16 (NC1 a ratio of rounding-level spreads to ~1: 1e-8)
    assert abs(out["NC1"]) < 1e-8 and abs(out["NC2"]) < 1e-8 and abs(out["NC3"]) < 1e-8
    assert out["NC4"] == pytest.approx(torch.linalg.norm(b).item(), abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_metrics_match_direct_float64_computation(seed):
    H, y, W, b = random_problem(seed=seed)
    ref = reference(H, y, W, b)
    out = nc.nc_metrics(H, y, W, b)
    for key in ("NC1", "NC2", "NC3", "NC4"):
        assert out[key] == pytest.approx(ref[key], rel=FLOAT64_RTOL), key
    stats = nc.NCStats(5, H.shape[1])
    stats.update(H, y)
    margins = nc.cos_margins(H, y, W.double(), b.double(), nc.mu_G(stats))
    np.testing.assert_allclose(margins.numpy(), ref["margin"], rtol=FLOAT64_RTOL, atol=1e-9)  # atol: margins near 0
    assert nc.nuclear_ratio(H, y, 5) == pytest.approx(ref["nuclear"], rel=FLOAT64_RTOL)


def test_nc1_keeps_its_precision_when_features_are_nearly_collapsed():
    # Large class means with a tiny spread: a one-pass E[hh^T] - mu mu^T would lose every digit.
    H, y, W, b = random_problem(K=4, d=8, N=400, seed=3, spread=1e-4)
    H = H.double() + 1e3
    ref = reference(H, y, W, b)
    streamed = nc.NCStats(4, 8)
    for chunk in torch.arange(len(y)).split(37):
        streamed.update(H[chunk], y[chunk])
    # spreads of 1e-4 around 1e3: the reference's deviations are exact (Sterbenz) and so are ours; a
    # one-pass E[hh^T] - mu mu^T would be off by 1e6 u / 1e-8 ~ 1e-2 relative
    assert nc.paper_metrics(streamed, W, b)["NC1"] == pytest.approx(ref["NC1"], rel=FLOAT64_RTOL)


def test_streaming_in_batches_equals_one_batch():
    H, y, W, b = random_problem(N=301, seed=4)
    whole = nc.nc_metrics(H, y, W, b)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    for batch in (1, 7, 64, 1000):
        stats = nc.NCStats(5, H.shape[1])
        for chunk in order.split(batch):
            stats.update(H[chunk], y[chunk])
        streamed = nc.paper_metrics(stats, W, b)
        for key in whole:  # float64 sums of 301 terms in other orders: ~1e-14 times the conditioning
            assert streamed[key] == pytest.approx(whole[key], rel=1e-9, abs=1e-12), (batch, key)


def test_no_bias_means_nc4_is_the_norm_of_W_mu_G():
    H, y, W, _ = random_problem(seed=5)
    out = nc.nc_metrics(H, y, W, None)
    ref = reference(H, y, W, np.zeros(5))
    assert out["NC4"] == pytest.approx(ref["NC4"], rel=FLOAT64_RTOL)


def test_feature_dimension_below_the_number_of_classes():
    # d < K - 1: Sigma_B has rank d, its pseudo-inverse keeps d directions; all metrics stay finite.
    H, y, W, b = random_problem(K=6, d=3, N=120, seed=6)
    out = nc.nc_metrics(H, y, W, b)
    ref = reference(H, y, W, b)
    assert all(math.isfinite(v) for v in out.values())
    assert out["NC1"] == pytest.approx(ref["NC1"], rel=FLOAT64_RTOL)


def test_a_class_with_a_single_sample():
    H, y, W, b = random_problem(K=3, d=5, N=40, seed=7)
    y = torch.where(y == 2, torch.tensor(1), y)
    y[0] = 2  # class 2 has exactly one sample: it adds nothing to Sigma_W, its mean is that sample
    out = nc.nc_metrics(H, y, W, b)
    ref = reference(H, y, W, b)
    for key in ("NC1", "NC2", "NC3", "NC4"):
        assert out[key] == pytest.approx(ref[key], rel=FLOAT64_RTOL), key


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
    # float64 LBFGS stopped at a gradient of 1e-13 (or a change of 1e-16): near the minimiser (isolated up
    # to rotations, curvature >= lam) that is ~1e-11 from it; 1e-5 and 1e-6 are the theorem's claims
    # tested with room for an early stop of the line search, not rounding
    assert W.pow(2).sum().item() == pytest.approx((K - 1) * math.sqrt(n * lam / lam) * (1 - c), rel=1e-5)
    assert out["NC1"] < 1e-8 and out["NC2"] < 1e-5 and out["NC3"] < 1e-5
    torch.testing.assert_close(b, torch.full((K,), 1.0 / K, dtype=torch.float64), atol=1e-6, rtol=0)


def test_unconstrained_features_without_bias_reach_an_orthogonal_frame():
    K, n, d, lam = 4, 5, 8, 0.01
    c = K * math.sqrt(n * lam * lam)
    W, _, _ = train_ufm(K, n, d, lam, bias=False, seed=1)
    expected = math.sqrt(n * lam / lam) * (1 - c) * torch.eye(K, dtype=torch.float64)
    torch.testing.assert_close(W @ W.T, expected, atol=1e-5, rtol=0)  # as above: LBFGS's stop, not rounding


def test_unconstrained_features_collapse_to_zero_when_c_is_at_least_one():
    K, n, d, lam = 4, 5, 8, 0.3
    assert K * math.sqrt(n * lam * lam) >= 1
    W, H, _ = train_ufm(K, n, d, lam, seed=2)
    assert W.norm().item() < 1e-5 and H.norm().item() < 1e-5


# ---------------------------------------------------------------------------- the batched and sparse code paths

def direct_statistics(H, y, K):
    """n (K,), class sums (K, d), the within-class scatter (d, d) and per-class sums of squares (K,), in float64 numpy."""
    H, y = np.asarray(H, dtype=np.float64), np.asarray(y)
    n = np.bincount(y, minlength=K).astype(np.float64)
    sums = np.stack([H[y == k].sum(0) for k in range(K)])
    centred = H - (sums / np.maximum(n, 1)[:, None])[y]
    sq = np.array([(centred[y == k] ** 2).sum() for k in range(K)])
    return n, sums, centred.T @ centred, sq


def sparse_labels(N=400, K=50, seed=0):
    """Labels of K classes, most absent from a batch of 8: classes 40-49 appear only in the last quarter
    (their first batch comes late, after many merges of the others), class 0 only in the very last sample."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(1, 40, (N,), generator=g)
    late = torch.arange(3 * N // 4, N)
    y[late] = torch.randint(1, K, (len(late),), generator=g)
    y[-11:-1] = torch.arange(40, 50)  # each late class at least once
    y[-1] = 0
    return y


@pytest.mark.parametrize("offset, spread", [(0.0, 1.0), (1e3, 1e-3)])
def test_streamed_statistics_with_more_classes_than_the_batch(offset, spread):
    K, d = 50, 6
    y = sparse_labels(K=K)
    g = torch.Generator().manual_seed(1)
    H = offset + 3 * torch.randn(K, d, generator=g, dtype=torch.float64)[y] + spread * torch.randn(len(y), d, generator=g, dtype=torch.float64)
    stats = nc.NCStats(K, d)
    for chunk in torch.arange(len(y)).split(8):
        assert len(torch.unique(y[chunk])) < K
        stats.update(H[chunk], y[chunk])
    n, sums, scatter, sq = direct_statistics(H, y, K)
    np.testing.assert_array_equal(stats.n.numpy(), n)  # counts: whole numbers, exact in float64
    # float64 sums of <= 400 terms of one sign-ish in other orders: <= 400 u = 9e-14 relative
    np.testing.assert_allclose(stats.sum.numpy(), sums, rtol=1e-12)
    # Relative to the scatter's own size: the pairwise update keeps the digits a large offset would take.
    # Offset 1e3, spread 1e-3: a batch mean carries ~8 u 1e3 = 2e-12, a difference of means (~5e-4) ~4e-9
    # of itself, squared into merge terms that make a small share of the scatter: ~1e-10 of it (seen
    # 2e-11, on AVX-512, AVX2 and the default kernels alike); a one-pass formula would be off by 1e6 u / 1e-6.
    np.testing.assert_allclose(stats.scatter.numpy(), scatter, rtol=0, atol=1e-9 * np.abs(scatter).max())
    np.testing.assert_allclose(stats.sq.numpy(), sq, rtol=1e-9, atol=1e-9 * sq.max())  # as the scatter's


def test_merged_statistics_carry_the_per_class_sums_of_squares():
    K, d = 50, 5
    y = sparse_labels(N=300, K=K, seed=2)
    H = torch.randn(len(y), d, generator=torch.Generator().manual_seed(3), dtype=torch.float64) + y[:, None]
    merged = None
    for block in torch.arange(len(y)).tensor_split(3):
        part = nc.NCStats(K, d)
        part.update(H[block], y[block])
        merged = part if merged is None else (merged.merge(part) or merged)
    n, sums, scatter, sq = direct_statistics(H, y, K)
    # float64, three blocks merged: ~300 u = 7e-14 of the scatter's size (no offset here to lose digits to)
    np.testing.assert_allclose(merged.scatter.numpy(), scatter, rtol=0, atol=1e-10 * np.abs(scatter).max())
    np.testing.assert_allclose(merged.sq.numpy(), sq, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("batch_elements", [nc.NUCLEAR_BATCH_ELEMENTS, 40])
def test_nuclear_ratio_equals_numpy_for_any_class_sizes(monkeypatch, batch_elements):
    # d = 6: classes with n_k < d (Grams n_k x n_k, grouped by n_k), n_k = d and n_k > d (Grams d x d, padded
    # rows); a tiny batch budget splits the groups and leaves one class per batch.
    monkeypatch.setattr(nc, "NUCLEAR_BATCH_ELEMENTS", batch_elements)
    sizes = [2, 3, 3, 1, 6, 9, 14, 9, 2]
    K, d = len(sizes), 6
    y = torch.arange(K).repeat_interleave(torch.tensor(sizes))
    y = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))]
    H = 2 + torch.randn(len(y), d, generator=torch.Generator().manual_seed(1))  # float32, as validate_NC.py keeps it
    Hn, yn = H.double().numpy(), y.numpy()
    expected = np.mean([np.linalg.norm(Hn[yn == k], "nuc") / np.linalg.norm(Hn[yn == k]) for k in range(K)])
    # float64 eigenvalues of the Grams against an SVD, classes of <= 14 x 6 well-conditioned features: ~1e-14
    assert nc.nuclear_ratio(H, y, K) == pytest.approx(expected, rel=1e-10)


def test_nuclear_ratio_of_a_class_without_samples_is_nan():
    y = torch.tensor([0, 0, 2, 2, 2])
    assert math.isnan(nc.nuclear_ratio(torch.randn(5, 3), y, 3))


def test_cos_margins_equal_the_direct_float64_formula():
    K, d, N = 30, 16, 500
    H, y, W, b = random_problem(K=K, d=d, N=N, seed=9)
    H = H.relu()  # non-negative features, a large global mean, as after a ReLU
    Hn, Wn = H.double().numpy(), W.double().numpy()
    mu_G = Hn.mean(0)
    cos = (Hn @ Wn.T) / (np.linalg.norm(Hn - mu_G, axis=1, keepdims=True) * np.linalg.norm(Wn - Wn.mean(0), axis=1))
    expected = np.array([c[t] - np.max(np.delete(c, t)) for c, t in zip(cos, y.numpy())])
    margins = nc.cos_margins(H, y, W.double(), b.double(), torch.from_numpy(mu_G), chunk=64)
    assert margins.dtype == torch.float64
    # float64 16-term dot products in other orders and the divisions regrouped: ~16 u = 4e-15 of the terms
    np.testing.assert_allclose(margins.numpy(), expected, rtol=1e-10, atol=1e-13)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_update_does_not_sync_the_gpu():
    K, d = 50, 8
    y = sparse_labels(K=K).cuda()
    H = torch.randn(len(y), d, device="cuda")
    stats = nc.NCStats(K, d, "cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        for chunk in torch.arange(len(y), device="cuda").split(8):
            stats.update(H[chunk], y[chunk])
    finally:
        torch.cuda.set_sync_debug_mode(0)
    n, sums, scatter, sq = direct_statistics(H.cpu(), y.cpu(), K)
    np.testing.assert_allclose(stats.scatter.cpu().numpy(), scatter, rtol=0, atol=1e-9 * np.abs(scatter).max())
