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
scatter, per-class within-class sums of squares) batch by batch on any device; `paper_metrics(stats,
W, b)` gives every quantity the paper records from them; `nc_metrics(H, y, W, b)` does it all for one
feature matrix. `more_metrics(stats, W, measures)` gives the other NC measures of the literature
(see "More NC measures" below and MEASURES).

Numerics. Everything is float64. Sigma_B has rank at most K - 1 (its columns are centred), so its
pseudo-inverse keeps at most K - 1 directions and none at the level of rounding noise: inverting
noise is what made the original code's NC1 depend on the SciPy version (its float32 pinv gave
values like -21 or 9,740 where the true value is 0.5).
"""
import math
import warnings
from dataclasses import dataclass
from typing import Callable

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


# The other NC measures of the literature (--measures) are the Measures registered at the end of
# this module, in MEASURES: each has a name, the info.pkl keys it writes and how it is computed (see
# "More NC measures" below for their formulas and sources).
#   trace_ratio       trace_ratio_metric  tr(Sigma_W) / tr(Sigma_B)                       (NC1 variant)
#   cdnv              cdnv_metric         class-distance normalised variance, pair mean  (Galanti et al. 2022)
#   within_class_var  within_class_var    tr(Sigma_W^k), a K-vector                       (per-class NC1)
#   equinorm          equinorm_M, equinorm_W       std/mean of the norms of M_c's columns / W's rows (Papyan et al. 2020)
#   equiangular       equiangular_M, equiangular_W std over pairs k<l of their cosines          (Papyan et al. 2020)
#   max_angle         max_angle_M, max_angle_W     mean over pairs of |cos + 1/(K-1)|           (Papyan et al. 2020)
#   self_duality      self_duality        || W/||W||_F - M_c^T/||M_c||_F ||_F^2                (Papyan et al. 2020)
#   ncc               ncc_train, ncc_test share of samples whose prediction is the nearest class mean
# The per-layer quantities (validate_NC.py --layers), under info.pkl's 'layers': {layer name: {these}}.
LAYER_MEASURES = ("NC1", "trace_ratio", "ncc")


class NCStats:
    """Per-class counts and sums, the pooled within-class scatter and the per-class within-class sums
    of squares, streamed in float64: memory O(K d + d^2), whatever N.

    Each batch's scatter is taken about the batch's own class means and merged with the running
    one by Chan et al.'s pairwise update, so no large mean is subtracted from a large second
    moment: collapsed features (tiny spread around large means) keep their precision.
    """

    def __init__(self, num_classes, dim, device=None):
        self.K = num_classes
        self.n = torch.zeros(num_classes, dtype=torch.float64, device=device)  # (K,)
        self.sum = torch.zeros(num_classes, dim, dtype=torch.float64, device=device)  # (K, d)
        self.scatter = torch.zeros(dim, dim, dtype=torch.float64, device=device)  # (d, d)
        self.sq = torch.zeros(num_classes, dtype=torch.float64, device=device)  # (K,) sum_{i in k} ||h_i - mu_k||^2

    def update(self, h, y):
        """Add a batch of features h (B, d) with labels y (B,). O(B d^2 + K d) work, so many classes cost
        little more than few; no host sync, as no shape depends on the labels' values."""
        h = h.detach().to(torch.float64)  # (B, d)
        n_b = torch.zeros_like(self.n).index_add_(0, y, torch.ones_like(h[:, 0]))  # (K,)
        sum_b = torch.zeros_like(self.sum).index_add_(0, y, h)  # (K, d)
        mean_b = sum_b / n_b.clamp(min=1)[:, None]  # (K, d)
        centred = h - mean_b[y]  # (B, d)
        # Merging groups a and b adds, per class, n_a n_b / (n_a + n_b) (mean_b - mean_a)(mean_b - mean_a)^T,
        # which is 0 for a class absent from the batch: only the batch's classes (at most B) are merged.
        # The min(K, B) largest batch counts include every class present, without a data-dependent size.
        present = torch.topk(n_b, min(self.K, len(y)), sorted=False).indices.sort().values  # (m,)
        delta, weight = _merge_terms(self.n[present], self.sum[present], n_b[present], sum_b[present])
        self.scatter += centred.T @ centred + (delta.T * weight) @ delta
        # The traces of the per-class scatters, merged the same way (B d operations, against B d^2 above).
        self.sq.index_add_(0, y, (centred * centred).sum(1))
        self.sq.index_add_(0, present, weight * (delta * delta).sum(1))
        self.n += n_b
        self.sum += sum_b

    def merge(self, other):
        """Add another NCStats's samples (the same pairwise update, with `other` as the new group)."""
        delta, weight = _merge_terms(self.n, self.sum, other.n, other.sum)
        self.scatter += other.scatter + (delta.T * weight) @ delta
        self.sq += other.sq + weight * (delta * delta).sum(1)
        self.n += other.n
        self.sum += other.sum

    @property
    def N(self):
        return self.n.sum()

    def check_classes(self):
        empty = torch.nonzero(self.n == 0).flatten().tolist()
        if empty:
            raise ValueError(f"classes {empty} have no samples: class means (and NC1-NC4) are undefined")


def _merge_terms(n_a, sum_a, n_b, sum_b):
    """(delta (m, d), weight (m,)) of Chan et al.'s merge of groups a and b of m classes, counts (m,) and
    sums (m, d): mean_b - mean_a, and n_a n_b / (n_a + n_b), 0 where either group is empty."""
    delta = sum_b / n_b.clamp(min=1)[:, None] - sum_a / n_a.clamp(min=1)[:, None]
    return delta, n_a * n_b / (n_a + n_b).clamp(min=1)


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
    U, S = _between_class_basis(mu_c, mu_G)
    return ((U * (Sigma_W @ U)).sum(0) / S ** 2).sum()


def _between_class_basis(mu_c, mu_G):
    """(U (d, r), S (r,)): the left singular vectors and values of Hbar that NC1 keeps (see NC1)."""
    Hb = H_bar(mu_c, mu_G)  # (d, K)
    U, S, _ = torch.linalg.svd(Hb, full_matrices=False)  # S in descending order
    scale = torch.maximum(S[0], torch.linalg.norm(mu_c, dim=1).max())
    keep = (S > scale * max(Hb.shape) * torch.finfo(S.dtype).eps) & (torch.arange(len(S), device=S.device) < Hb.shape[1] - 1)
    return U[:, keep], S[keep]


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


# ---------------------------------------------------------------------------- more NC measures
# From the streamed statistics (O(K d + d^2) memory, O(K^2) for the pairwise ones, never O(N)),
# except the NCC agreement, which needs each sample's features again once the class means are known.

def within_class_var(stats):
    """tr(Sigma_W^k) = (1/n_k) sum_{i in class k} ||h_i - mu_k||^2, per class: a (K,) tensor.

    The per-class form of NC1's numerator (their count-weighted mean is tr(Sigma_W)). From the
    streamed per-class sums of squares. A class with fewer than two samples has no spread to
    measure: NaN, with a warning naming it.
    """
    stats.check_classes()
    var = stats.sq / stats.n  # (K,)
    single = torch.nonzero(stats.n < 2).flatten().tolist()
    if single:
        warnings.warn(f"classes {single} have a single sample: their within-class variance (and CDNV) is NaN")
        var[stats.n < 2] = math.nan
    return var


def trace_ratio(tr_Sigma_W, mu_c, mu_G):
    """tr(Sigma_W) / tr(Sigma_B), with tr(Sigma_B) = (1/K) sum_k ||mu_k - mu_G||^2; given tr(Sigma_W).

    The NC1 variant that needs no pseudo-inverse (used e.g. by Rangamani et al. 2023 for NC at
    intermediate layers). Scale-free. From streamed statistics.
    """
    return tr_Sigma_W / (mu_c - mu_G).pow(2).sum(1).mean()


def cdnv(var, mu_c):
    """Class-distance normalised variance (Galanti et al. 2022), averaged over the pairs k < l:
    (var_k + var_l) / (2 ||mu_k - mu_l||^2), var_k = tr(Sigma_W^k) (within_class_var).

    All K(K-1)/2 pairs at once from the Gram matrix of the class means: O(K^2) memory (8 MB for
    K = 1,000). The means are centred first so that the Gram holds no large common part.
    """
    M = mu_c - mu_c.mean(0)  # (K, d); distances do not change
    G = M @ M.T  # (K, K)
    sq_norms = torch.diagonal(G)
    dist2 = (sq_norms[:, None] + sq_norms[None, :] - 2 * G).clamp(min=0)  # (K, K) ||mu_k - mu_l||^2
    k, l = torch.triu_indices(len(var), len(var), 1, device=var.device)
    return ((var[k] + var[l]) / (2 * dist2[k, l])).mean()


def M_c(mu_c, mu_G):
    """Papyan et al.'s centred class means as columns, mu_k - mu_G: (d, K) (the same matrix as H_bar)."""
    return H_bar(mu_c, mu_G)


def equinorm(X):
    """std / mean of the norms of the rows of X (K, d) (Papyan et al. 2020): 0 when the norms are equal.
    Pass W, or M_c.T for the class means. The std is the population one (ddof = 0, divide by K):
    the K rows are all the classes there are, not a sample from more, so there is nothing to
    correct for. rhubarbwu/neural-collapse uses the sample std (ddof = 1), sqrt(K / (K - 1)) times
    this: 5.4% more at K = 10, 0.5% at K = 100."""
    norms = torch.linalg.norm(X, dim=1)  # (K,)
    return norms.std(correction=0) / norms.mean()


def _pair_cosines(X):
    """Cosines between the rows of X (K, d) over the pairs k < l: (K(K-1)/2,)."""
    U = X / torch.linalg.norm(X, dim=1, keepdim=True)
    k, l = torch.triu_indices(X.shape[0], X.shape[0], 1, device=X.device)
    return (U @ U.T)[k, l]


def equiangularity(X):
    """std over the pairs k < l of cos(x_k, x_l), the rows of X (K, d) (Papyan et al. 2020): 0 when all
    angles are equal. Population std. O(K^2) memory."""
    return _pair_cosines(X).std(correction=0)


def max_angle(X):
    """mean over the pairs k < l of |cos(x_k, x_l) + 1/(K-1)| (Papyan et al. 2020): 0 when the rows of X
    (K, d) are maximally apart, as a simplex ETF's are. O(K^2) memory."""
    return (_pair_cosines(X) + 1.0 / (X.shape[0] - 1)).abs().mean()


def self_duality(W, M):
    """|| W/||W||_F - M^T/||M||_F ||_F^2 (Papyan et al. 2020), W (K, d) the classifier, M = M_c (d, K):
    0 when the classifier rows are the centred class means up to one scale."""
    return (W / torch.linalg.norm(W) - M.T / torch.linalg.norm(M)).pow(2).sum()


def ncc_predictions(H, mu_c, chunk=8192):
    """argmin_k ||h_i - mu_k|| of each row of H (N, d): (N,). In chunks of rows, so memory is
    O(chunk K), never N x N or N x K at once."""
    mu_c = mu_c.to(torch.float64)
    half_sq = 0.5 * mu_c.pow(2).sum(1)  # (K,); ||h - mu||^2 / 2 = ||h||^2 / 2 - h.mu + ||mu||^2 / 2
    out = []
    for start in range(0, H.shape[0], chunk):
        h = H[start:start + chunk].to(torch.float64)  # (n, d)
        out.append((half_sq - h @ mu_c.T).argmin(1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.int64, device=H.device)


def ncc_hits(H, pred, mu_c, chunk=8192):
    """How many samples the network (predictions pred (N,), argmax of its logits) classifies as the
    nearest class centre does, mu_c (K, d) the class means. A float64 tensor (no sync). Papyan et
    al. 2020's NC4 (simplification to the nearest class centre) measures the share of these.

    The NCC agreement is this over N. It needs the class means before the features: a second pass
    over the data, or the features kept. validate_NC.py keeps the (N, d) training features anyway
    (O(N d) memory, already there) and streams the test set, whose means are the training ones.
    """
    return (ncc_predictions(H, mu_c, chunk) == pred).sum().to(torch.float64)


def ncc_agreement(H, pred, mu_c, chunk=8192):
    """Share of the samples H (N, d) whose prediction pred (N,) is their nearest class mean (ncc_hits / N)."""
    return (ncc_hits(H, pred, mu_c, chunk) / H.shape[0]).item()


class Quantities:
    """What a measure may ask of one set of features: the streamed statistics `stats`, the classifier
    W (K, d) (None at a layer inside the network), and, where they are kept, the features H (N, d),
    their labels y (N,) and the network's predictions pred (N,). The derived quantities are computed
    once, when first asked for."""

    def __init__(self, stats, W=None, H=None, y=None, pred=None):
        self.stats, self.H, self.y, self.pred = stats, H, y, pred
        self.W = None if W is None else W.detach().to(torch.float64)  # (K, d)
        self._cache = {}

    def _get(self, name, compute):
        if name not in self._cache:
            self._cache[name] = compute()
        return self._cache[name]

    @property
    def K(self):
        return self.stats.K

    @property
    def mu_c(self):  # (K, d)
        return self._get("mu_c", lambda: mu_c(self.stats))

    @property
    def mu_G(self):  # (d,)
        return self._get("mu_G", lambda: mu_G(self.stats))

    @property
    def M(self):  # (d, K): M_c, the centred class means as columns
        return self._get("M", lambda: M_c(self.mu_c, self.mu_G))

    @property
    def Sigma_W(self):  # (d, d)
        return self._get("Sigma_W", lambda: Sigma_W(self.stats))

    @property
    def within_class_var(self):  # (K,)
        return self._get("within_class_var", lambda: within_class_var(self.stats))


@dataclass(frozen=True)
class Measure:
    """One NC measure: `compute(q)`, q a Quantities, gives {info.pkl key: value} for each of `keys`
    (floats, or numpy arrays). `per_layer`: it needs neither the classifier nor the predictions, so
    --layers measures it at every layer too (under info.pkl's 'layers')."""
    name: str
    keys: tuple
    compute: Callable
    per_layer: bool = False
    needs_features: bool = False  # it needs the kept features and predictions, not only the statistics


MEASURES = {}


def register(measure):
    """Add a measure to the table: --measures (validation and in-run), --layers and ufm.py all find it."""
    MEASURES[measure.name] = measure
    return measure


def more_metrics(stats, W, measures, H=None, y=None, pred=None):
    """The measures named in `measures` (of MEASURES) of a set of statistics under the classifier W
    (K, d), by their info.pkl keys. A measure of the kept features (ncc) is left out unless H, y and
    pred are given."""
    q = Quantities(stats, W, H, y, pred)
    out = {}
    for name in measures:
        if H is not None or not MEASURES[name].needs_features:
            out.update(MEASURES[name].compute(q))
    return out


def layer_result(H, y, num_classes, pred=None, measures=(), chunk=8192):
    """A layer's entry under info.pkl's 'layers': layer_measures of its kept features H (N, d_l), and the
    registered per-layer measures among `measures`, from statistics streamed over H in chunks."""
    out = layer_measures(H, y, num_classes, pred, chunk)
    extra = [m for m in measures if MEASURES[m].per_layer]
    if extra:
        stats = NCStats(num_classes, H.shape[1], H.device)
        for start in range(0, H.shape[0], chunk):
            stats.update(H[start:start + chunk], y[start:start + chunk])
        q = Quantities(stats, None, H, y, pred)
        for name in extra:
            out.update(MEASURES[name].compute(q))
    return out


def layer_measures(H, y, num_classes, pred=None, chunk=8192):
    """NC1, tr(Sigma_W)/tr(Sigma_B) and (given the network's predictions pred (N,)) the NCC agreement of
    features held in memory, H (N, d) with labels y (N,): {"NC1", "trace_ratio", "ncc"} as floats.

    Two passes over the kept features, in float64 chunks: the class means first, then the centred
    features h_i - mu_{y_i}, exact about the final means. NC1 needs Sigma_W only on the r <= K - 1
    directions U it keeps (NC1 = sum_j u_j^T Sigma_W u_j / s_j^2), so no d x d scatter is formed:
    O(N d K) time and O(K d) memory beside H, against O(N d^2) for streaming the scatter, which makes
    the measures of many wide layers cheap. The same numbers as NC1 and trace_ratio of NCStats.
    """
    N, d = H.shape
    n = torch.bincount(y, minlength=num_classes).to(torch.float64)  # (K,)
    empty = torch.nonzero(n == 0).flatten().tolist()
    if empty:
        raise ValueError(f"classes {empty} have no samples: class means (and NC1) are undefined")
    sums = torch.zeros(num_classes, d, dtype=torch.float64, device=H.device)  # (K, d)
    for start in range(0, N, chunk):  # one-hot products: far faster than index_add_ on a CPU
        onehot = F.one_hot(y[start:start + chunk], num_classes).to(torch.float64)  # (n, K)
        sums += onehot.T @ H[start:start + chunk].to(torch.float64)
    means, centre = sums / n[:, None], sums.sum(0) / N
    U, S = _between_class_basis(means, centre)  # (d, r), (r,)
    half_sq = 0.5 * means.pow(2).sum(1)  # (K,), for the nearest class mean (see ncc_predictions)
    within = torch.zeros((), dtype=torch.float64, device=H.device)  # sum_i ||h_i - mu_{y_i}||^2
    projected = torch.zeros(len(S), dtype=torch.float64, device=H.device)  # (r,) sum_i (u_j^T (h_i - mu_{y_i}))^2
    agree = torch.zeros((), dtype=torch.float64, device=H.device)
    for start in range(0, N, chunk):
        h = H[start:start + chunk].to(torch.float64)  # (n, d)
        c = h - means[y[start:start + chunk]]  # (n, d)
        within += (c * c).sum()
        projected += (c @ U).pow(2).sum(0)
        if pred is not None:
            agree += ((half_sq - h @ means.T).argmin(1) == pred[start:start + chunk]).sum()
    out = {"NC1": (projected / N / S ** 2).sum().item(), "trace_ratio": trace_ratio(within / N, means, centre).item()}
    if pred is not None:
        out["ncc"] = (agree / N).item()
    return out


# ---------------------------------------------------------------------------- per-sample extras

def cos_margins(H, y, W, b, mu_G, chunk=8192):
    """Cosine margin of each sample (N,), as the authors define it:
    cos_j = (z_j - b_j) / (||h_i - mu_G|| ||Wc_j||), margin = cos_y - max_{j != y} cos_j.

    In float64. ||h_i - mu_G|| > 0 is common to a sample's cosines, so the classes are compared by
    (z_j - b_j) / ||Wc_j|| = h_i . (w_j / ||Wc_j||), one matmul with W's rows scaled beforehand, and only
    the two cosines kept are divided by it: no other pass over the (chunk, K) matrix but its max.
    """
    W = W.to(torch.float64)
    W_scaled = W / torch.linalg.norm(centred_rows(W), dim=1, keepdim=True)  # (K, d) w_j / ||Wc_j||
    out = []
    for start in range(0, len(y), chunk):  # float64 copies of H stay a chunk at a time
        h, t = H[start:start + chunk].to(torch.float64), y[start:start + chunk]  # (n, d), (n,)
        scores = h @ W_scaled.T  # (n, K) z - b = W h, over ||Wc_j||
        true = scores.gather(1, t[:, None]).squeeze(1)  # (n,)
        runner_up = scores.scatter_(1, t[:, None], -math.inf).amax(1)  # (n,)
        h_norms = torch.linalg.norm(h - mu_G, dim=1)  # (n,)
        out.append(true / h_norms - runner_up / h_norms)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64, device=H.device)


# Float64 elements of the per-class features (and their Grams) that nuclear_ratio holds at once: batches
# pay off for many small classes; for large ones, larger batches only cost fresh memory (8 MB here).
NUCLEAR_BATCH_ELEMENTS = 1 << 20


def nuclear_ratio(H, y, num_classes):
    """Mean over classes of ||H_k||_* / ||H_k||_F, H_k the (n_k, d) features of class k.

    Singular values come from the eigenvalues of the smaller Gram matrix of each class, H_k H_k^T
    (n_k x n_k) or H_k^T H_k (d x d), in float64. Classes whose Grams have the same size are solved in
    one batched call: all classes with n_k >= d together (their rows padded with zero rows, which add
    exactly nothing to H_k^T H_k), the others by equal n_k (nothing padded: a zero-padded Gram's
    eigenvalues would come out at rounding level, and their square roots are not negligible).
    """
    N, d = H.shape
    counts = torch.bincount(y, minlength=num_classes)  # (K,)
    starts = torch.cumsum(counts, 0) - counts  # (K,) each class's first row in `order`
    order = torch.argsort(y, stable=True)  # (N,) rows grouped by class, in their order
    sizes = counts.tolist()
    groups = {}
    for k in sorted(range(num_classes), key=lambda k: -sizes[k]):  # neighbours in a batch pad little
        groups.setdefault(min(sizes[k], d), []).append(k)
    ratios = torch.empty(num_classes, dtype=torch.float64, device=H.device)  # (K,)
    for m, classes in groups.items():
        per_batch = max(1, NUCLEAR_BATCH_ELEMENTS // max(1, sizes[classes[0]] * d + m * m))
        for first in range(0, len(classes), per_batch):
            part = classes[first:first + per_batch]
            n_max, n_min = sizes[part[0]], sizes[part[-1]]
            part = torch.tensor(part, device=H.device)  # (g,)
            rows = torch.arange(n_max, device=H.device)  # (n_max,)
            index = order[(starts[part, None] + rows).clamp(max=max(N - 1, 0))]  # (g, n_max)
            X = H[index].to(torch.float64)  # (g, n_max, d)
            if n_min < n_max:
                X.masked_fill_((rows >= counts[part, None])[..., None], 0.0)
            gram = X @ X.mT if n_max <= d else X.mT @ X  # (g, m, m)
            sv = torch.linalg.eigvalsh(gram).clamp(min=0).sqrt()  # (g, m)
            ratios[part] = sv.sum(1) / torch.linalg.norm(X, dim=(1, 2))
    return ratios.mean().item()


def topk_hits(logits, y, k=5):
    """(top-1 hits, top-k hits) of a batch, as a float64 tensor on its device (no sync)."""
    hit = logits.topk(min(k, logits.shape[1]), dim=1).indices == y[:, None]  # (B, k)
    return torch.stack([hit[:, 0].sum(), hit.sum()]).to(torch.float64)


# ---------------------------------------------------------------------------- the measures of --measures

def _within(q):
    return {"within_class_var": q.within_class_var.cpu().numpy()}


def _pairs(name, fn):
    return lambda q: {f"{name}_M": fn(q.M.T).item(), f"{name}_W": fn(q.W).item()}


register(Measure("trace_ratio", ("trace_ratio_metric",),
                 lambda q: {"trace_ratio_metric": trace_ratio(torch.trace(q.Sigma_W), q.mu_c, q.mu_G).item()}))
register(Measure("cdnv", ("cdnv_metric",), lambda q: {"cdnv_metric": cdnv(q.within_class_var, q.mu_c).item()}))
register(Measure("within_class_var", ("within_class_var",), _within))
register(Measure("equinorm", ("equinorm_M", "equinorm_W"), _pairs("equinorm", equinorm)))
register(Measure("equiangular", ("equiangular_M", "equiangular_W"), _pairs("equiangular", equiangularity)))
register(Measure("max_angle", ("max_angle_M", "max_angle_W"), _pairs("max_angle", max_angle)))
register(Measure("self_duality", ("self_duality",), lambda q: {"self_duality": self_duality(q.W, q.M).item()}))
# ncc_test is the test pass's (measure.evaluate): the test features are not kept
register(Measure("ncc", ("ncc_train", "ncc_test"), lambda q: {"ncc_train": ncc_agreement(q.H, q.pred, q.mu_c)},
                 needs_features=True))
