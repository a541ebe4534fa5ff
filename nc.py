"""Neural Collapse metrics (Papyan et al. 2020; Zhou et al. 2022), in float64.

Notation: h_i the input of the last layer (d-dimensional), y_i its label, K classes, N samples,
mu_k class means, mu_G the global mean, W (K x d) and b the last layer.

    Sigma_W = (1/N) sum_i (h_i - mu_{y_i})(h_i - mu_{y_i})^T
    Sigma_B = (1/K) sum_k (mu_k - mu_G)(mu_k - mu_G)^T
    NC1 = (1/K) trace(Sigma_W Sigma_B^+)                      within-class variability collapse
    NC2 = || Wc Wc^T / ||Wc Wc^T||_F - P ||_F                  classifier -> simplex ETF
    NC3 = || Wc Hbar / ||Wc Hbar||_F - P ||_F                  classifier and class means align
    NC4 = || W mu_G + b ||_2                                   bias cancels the global mean
with Wc = W minus its mean row, Hbar = [mu_1 - mu_G, ..., mu_K - mu_G] (d x K) and
P = (I_K - 11^T/K) / sqrt(K - 1), the simplex ETF Gram matrix scaled to unit Frobenius norm.

`NCStats` accumulates the sufficient statistics (per-class counts and sums, one pooled d x d
scatter) batch by batch on any device; `paper_metrics(stats, W, b)` gives every quantity the paper
records from them; `nc_metrics(H, y, W, b)` does it all for one feature matrix.

Numerics. Everything is float64. Sigma_B has rank at most K - 1 (its columns are centred), so its
pseudo-inverse keeps at most K - 1 directions and none at the level of rounding noise: inverting
noise is what made the original code's NC1 depend on the SciPy version (its float32 pinv gave
values like -21 or 9,740 where the true value is 0.5).
"""
import math

import torch
import torch.nn.functional as F

# Each quantity of the paper and its key in info.pkl (the original code's names, kept so that
# existing info.pkl files and scripts keep working). The one place that maps the two.
INFO_KEYS = {
    "NC1": "collapse_metric", "NC2": "ETF_metric", "NC3": "WH_relation_metric", "NC4": "Wh_b_relation_metric",
    "W": "W", "b": "b", "H_bar": "H", "mu_G": "mu_G_train", "mu_G_test": "mu_G_test",
    "train_acc1": "train_acc1", "train_acc5": "train_acc5", "test_acc1": "test_acc1", "test_acc5": "test_acc5",
    "avg_cos_margin": "avg_cos_margin", "all_cos_margin": "all_cos_margin", "nuclear_ratio": "nuclear_metric",
}


class NCStats:
    """Per-class counts and sums, and the pooled within-class scatter, streamed in float64.

    Each batch's scatter is taken about the batch's own class means and merged with the running
    one by Chan et al.'s pairwise update, so no large mean is subtracted from a large second
    moment: collapsed features (tiny spread around large means) keep their precision.
    """

    def __init__(self, num_classes, dim, device=None):
        self.K = num_classes
        self.n = torch.zeros(num_classes, dtype=torch.float64, device=device)  # (K,)
        self.sum = torch.zeros(num_classes, dim, dtype=torch.float64, device=device)  # (K, d)
        self.scatter = torch.zeros(dim, dim, dtype=torch.float64, device=device)  # (d, d)

    def update(self, h, y):
        h = h.detach().to(torch.float64)  # (B, d)
        onehot = F.one_hot(y, self.K).to(torch.float64)  # (B, K)
        n_b = onehot.sum(0)  # (K,)
        sum_b = onehot.T @ h  # (K, d)
        mean_b = sum_b / n_b.clamp(min=1)[:, None]  # (K, d)
        centred = h - mean_b[y]  # (B, d)
        # Merging groups a and b adds, per class, n_a n_b / (n_a + n_b) (mean_b - mean_a)(mean_b - mean_a)^T.
        delta = mean_b - self.sum / self.n.clamp(min=1)[:, None]  # (K, d)
        weight = self.n * n_b / (self.n + n_b).clamp(min=1)  # (K,); 0 for a class new or absent
        self.scatter += centred.T @ centred + (delta.T * weight) @ delta
        self.n += n_b
        self.sum += sum_b

    def merge(self, other):
        """Add another NCStats's samples (the same pairwise update, with `other` as the new group)."""
        delta = other.sum / other.n.clamp(min=1)[:, None] - self.sum / self.n.clamp(min=1)[:, None]
        weight = self.n * other.n / (self.n + other.n).clamp(min=1)
        self.scatter += other.scatter + (delta.T * weight) @ delta
        self.n += other.n
        self.sum += other.sum

    def all_ranks(self):
        """The statistics of every rank's samples, on every rank. Scatters about per-rank means
        cannot simply be summed, so each rank's (n, sum, scatter) is gathered and merged in rank order."""
        merged = None
        for part in zip(*(_all_gather(t) for t in (self.n, self.sum, self.scatter))):
            stats = NCStats(self.K, self.sum.shape[1], self.sum.device)
            stats.n, stats.sum, stats.scatter = (t.clone() for t in part)
            if merged is None:
                merged = stats
            else:
                merged.merge(stats)
        return merged

    @property
    def N(self):
        return self.n.sum()

    def check_classes(self):
        empty = torch.nonzero(self.n == 0).flatten().tolist()
        if empty:
            raise ValueError(f"classes {empty} have no samples: class means (and NC1-NC4) are undefined")


def _all_gather(t):
    import torch.distributed as dist
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return parts


# ---------------------------------------------------------------------------- the quantities

def mu_c(stats):
    """Class means (K, d)."""
    stats.check_classes()
    return stats.sum / stats.n[:, None]


def mu_G(stats):
    """Global mean (d,): the mean over all samples (classes weighted by their counts)."""
    return stats.sum.sum(0) / stats.N


def Sigma_W(stats):
    """Within-class covariance (d, d)."""
    return stats.scatter / stats.N


def H_bar(mu_c, mu_G):
    """Centred class means as columns (d, K)."""
    return (mu_c - mu_G).T


def simplex_gram(K, dtype=torch.float64, device=None):
    """P = (I_K - 11^T/K) / sqrt(K - 1): the simplex ETF's Gram matrix with unit Frobenius norm."""
    return (torch.eye(K, dtype=dtype, device=device) - 1.0 / K) / math.sqrt(K - 1)


def centred_rows(W):
    return W - W.mean(0, keepdim=True)


def NC1(Sigma_W, mu_c, mu_G):
    """(1/K) trace(Sigma_W Sigma_B^+), without forming the d x d pseudo-inverse.

    With Hbar = U S V^T (thin SVD), Sigma_B^+ = K U S^-2 U^T, so NC1 = sum_j u_j^T Sigma_W u_j / s_j^2.
    Rounding noise must not be inverted: the weighted columns of Hbar sum to zero, so at most K - 1
    singular values are kept, and none below max(d, K) * eps * (the largest of s_max and ||mu_k||),
    the size of the rounding error of mu_k - mu_G.
    """
    Hb = H_bar(mu_c, mu_G)  # (d, K)
    U, S, _ = torch.linalg.svd(Hb, full_matrices=False)  # S in descending order
    scale = torch.maximum(S[0], torch.linalg.norm(mu_c, dim=1).max())
    keep = (S > scale * max(Hb.shape) * torch.finfo(S.dtype).eps) & (torch.arange(len(S), device=S.device) < Hb.shape[1] - 1)
    U, S = U[:, keep], S[keep]
    return ((U * (Sigma_W @ U)).sum(0) / S ** 2).sum()


def _distance_to_simplex(M):
    return torch.linalg.norm(M / torch.linalg.norm(M) - simplex_gram(M.shape[0], M.dtype, M.device))


def NC2(W):
    """|| Wc Wc^T / ||Wc Wc^T||_F - P ||_F."""
    Wc = centred_rows(W)
    return _distance_to_simplex(Wc @ Wc.T)


def NC3(W, mu_c, mu_G):
    """|| Wc Hbar / ||Wc Hbar||_F - P ||_F."""
    return _distance_to_simplex(centred_rows(W) @ H_bar(mu_c, mu_G))


def NC4(W, b, mu_G):
    """|| W mu_G + b ||_2 (W not centred)."""
    return torch.linalg.norm(W @ mu_G + b)


def paper_metrics(stats, W, b=None):
    """Every quantity the paper records of a set of statistics under the last layer W (K, d), b (K,)
    or None: NC1-NC4 as floats; W, b, H_bar (d, K) and mu_G (d,) as float64 tensors."""
    W = W.detach().to(torch.float64)
    b = torch.zeros(W.shape[0], dtype=torch.float64, device=W.device) if b is None else b.detach().to(torch.float64)
    means, centre = mu_c(stats), mu_G(stats)
    return {"NC1": NC1(Sigma_W(stats), means, centre).item(), "NC2": NC2(W).item(),
            "NC3": NC3(W, means, centre).item(), "NC4": NC4(W, b, centre).item(),
            "W": W, "b": b, "H_bar": H_bar(means, centre), "mu_G": centre}


def nc_metrics(H, y, W, b=None):
    """NC1-NC4 of features H (N, d) with labels y (N,) under the last layer W (K, d), b (K,) or None.

    Returns {"NC1", "NC2", "NC3", "NC4"} as floats. Every class must have at least one sample.
    """
    stats = NCStats(W.shape[0], H.shape[1], H.device)
    stats.update(H, y)
    return {k: v for k, v in paper_metrics(stats, W, b).items() if k in ("NC1", "NC2", "NC3", "NC4")}


# ---------------------------------------------------------------------------- per-sample extras

def cos_margins(H, y, W, b, mu_G, chunk=8192):
    """Cosine margin of each sample (N,), as the authors define it:
    cos_j = (z_j - b_j) / (||h_i - mu_G|| ||Wc_j||), margin = cos_y - max_{j != y} cos_j."""
    W = W.to(torch.float64)
    row_norms = torch.linalg.norm(centred_rows(W), dim=1)  # (K,)
    out = []
    for start in range(0, len(y), chunk):  # float64 copies of H stay a chunk at a time
        h, t = H[start:start + chunk].to(torch.float64), y[start:start + chunk]
        cos = (h @ W.T) / (torch.linalg.norm(h - mu_G, dim=1, keepdim=True) * row_norms)  # (n, K); z - b = W h
        true = cos.gather(1, t[:, None]).squeeze(1)
        out.append(true - cos.scatter(1, t[:, None], -math.inf).amax(1))
    return torch.cat(out)


def nuclear_ratio(H, y, num_classes):
    """Mean over classes of ||H_k||_* / ||H_k||_F, H_k the (n_k, d) features of class k.

    Singular values come from the eigenvalues of the smaller Gram matrix of each class.
    """
    ratios = []
    for k in range(num_classes):
        Hk = H[y == k].to(torch.float64)  # (n_k, d)
        gram = Hk @ Hk.T if Hk.shape[0] <= Hk.shape[1] else Hk.T @ Hk
        sv = torch.linalg.eigvalsh(gram).clamp(min=0).sqrt()
        ratios.append(sv.sum() / torch.linalg.norm(Hk))
    return torch.stack(ratios).mean().item()


def topk_hits(logits, y, k=5):
    """(top-1 hits, top-k hits) of a batch, as a float64 tensor on its device (no sync)."""
    hit = logits.topk(min(k, logits.shape[1]), dim=1).indices == y[:, None]  # (B, k)
    return torch.stack([hit[:, 0].sum(), hit.sum()]).to(torch.float64)
