"""Time the NC metrics' hot spots: nc.py against the implementations it replaced, in one run.

The baseline is nc.py's code before its hot spots were reworked, kept below (clearly labelled):
NCStats.update with one-hot class sums and the merge term over all K classes, cos_margins with a
float64 N x K logit matmul, nuclear_ratio with one boolean mask, Gram and eigen-solve per class.
Each hot spot runs on the same random features (float32, as validate_NC.py keeps them) for
K = 10 and K = 1,000 classes at d = 512 (and d = 2048 for the nuclear ratio), in interleaved rounds
whose order alternates; each line gives the median time of both and the spread (min-max) over rounds:
CPU seconds of this process on a CPU (other processes on a shared machine disturb them far less than
wall-clock seconds), in one thread unless --threads says otherwise, wall-clock seconds on a GPU.
Both must give the same numbers (to 1e-9 relative; the margins and the scatter are float64 sums in
another order), or the script fails.

    python bench/metrics.py                      # CPU
    python bench/metrics.py --device cuda --num_samples 50000

The last line is `ratio: <total baseline seconds / total nc.py seconds>` (medians of the per-round totals).
"""
import argparse
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from nclib import nc  # noqa: E402

SAME = 1e-9  # relative agreement required of the two implementations


# ---------------------------------------------------------------------------- the baseline (nc.py before)

class BaselineNCStats(nc.NCStats):
    """NCStats with the former update: one-hot class sums (B K d) and the merge over all K classes (K d^2)."""

    def update(self, h, y):
        h = h.detach().to(torch.float64)  # (B, d)
        onehot = F.one_hot(y, self.K).to(torch.float64)  # (B, K)
        n_b = onehot.sum(0)  # (K,)
        sum_b = onehot.T @ h  # (K, d)
        mean_b = sum_b / n_b.clamp(min=1)[:, None]  # (K, d)
        centred = h - mean_b[y]  # (B, d)
        delta = mean_b - self.sum / self.n.clamp(min=1)[:, None]  # (K, d)
        weight = self.n * n_b / (self.n + n_b).clamp(min=1)  # (K,)
        self.scatter += centred.T @ centred + (delta.T * weight) @ delta
        self.sq += onehot.T @ (centred * centred).sum(1) + weight * (delta * delta).sum(1)
        self.n += n_b
        self.sum += sum_b


def baseline_cos_margins(H, y, W, b, mu_G, chunk=8192):
    """The former cos_margins: the logits recomputed in float64, N x K x d float64 work."""
    W = W.to(torch.float64)
    row_norms = torch.linalg.norm(nc.centred_rows(W), dim=1)  # (K,)
    out = []
    for start in range(0, len(y), chunk):
        h, t = H[start:start + chunk].to(torch.float64), y[start:start + chunk]
        cos = (h @ W.T) / (torch.linalg.norm(h - mu_G, dim=1, keepdim=True) * row_norms)  # (n, K)
        true = cos.gather(1, t[:, None]).squeeze(1)
        out.append(true - cos.scatter(1, t[:, None], -math.inf).amax(1))
    return torch.cat(out)


def baseline_nuclear_ratio(H, y, num_classes):
    """The former nuclear_ratio: a boolean mask over N, a Gram and an eigen-solve per class, in a Python loop."""
    ratios = []
    for k in range(num_classes):
        Hk = H[y == k].to(torch.float64)  # (n_k, d)
        gram = Hk @ Hk.T if Hk.shape[0] <= Hk.shape[1] else Hk.T @ Hk
        sv = torch.linalg.eigvalsh(gram).clamp(min=0).sqrt()
        ratios.append(sv.sum() / torch.linalg.norm(Hk))
    return torch.stack(ratios).mean().item()


# ---------------------------------------------------------------------------- the cases

def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--num_samples", type=int, default=10000, help="N, the samples of each case")
    p.add_argument("--classes", type=int, nargs="+", default=[10, 1000], help="K of the cases")
    p.add_argument("--dim", type=int, default=512, help="d of every hot spot")
    p.add_argument("--wide_dim", type=int, default=2048, help="the second d of the nuclear ratio (0: none)")
    p.add_argument("--wide_samples", type=int, default=5000, help="N of the nuclear ratio at the second d")
    p.add_argument("--batch_size", type=int, default=1024, help="NCStats.update's batch (validate_NC.py's)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch's intra-op threads on a CPU (0: torch's default)")
    return p.parse_args(argv)


def problem(N, K, d, device, seed=0):
    """Features (N, d) float32 around K class means, balanced labels (N,) in random order, W (K, d), b (K,)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(N)[torch.randperm(N, generator=g)] % K
    H = (torch.randn(K, d, generator=g)[y] + torch.randn(N, d, generator=g)).relu()  # non-negative, as after a ReLU
    W, b = torch.randn(K, d, generator=g) / math.sqrt(d), torch.randn(K, generator=g)
    return H.to(device), y.to(device), W.double().to(device), b.double().to(device)


def cases(args, device):
    """[(name, baseline thunk, nc.py thunk, comparison of their results)]."""
    out = []
    for K in args.classes:
        H, y, W, b = problem(args.num_samples, K, args.dim, device)

        def stream(cls, H=H, y=y, K=K):
            stats = cls(K, H.shape[1], device)
            for start in range(0, len(y), args.batch_size):
                stats.update(H[start:start + args.batch_size], y[start:start + args.batch_size])
            return stats
        whole = stream(nc.NCStats)
        mu = nc.mu_G(whole)
        out.append((f"NCStats.update K={K} d={args.dim}", lambda s=stream: s(BaselineNCStats),
                    lambda s=stream: s(nc.NCStats), same_stats))
        out.append((f"cos_margins K={K} d={args.dim}", lambda H=H, y=y, W=W, b=b, mu=mu: baseline_cos_margins(H, y, W, b, mu),
                    lambda H=H, y=y, W=W, b=b, mu=mu: nc.cos_margins(H, y, W, b, mu), same_tensors))
        for d in (args.dim, args.wide_dim) if args.wide_dim else (args.dim,):
            Hd, yd = (H, y) if d == args.dim else problem(args.wide_samples, K, d, device, seed=1)[:2]
            out.append((f"nuclear_ratio K={K} d={d} N={len(yd)}", lambda Hd=Hd, y=yd, K=K: baseline_nuclear_ratio(Hd, y, K),
                        lambda Hd=Hd, y=yd, K=K: nc.nuclear_ratio(Hd, y, K), same_floats))
    return out


def same_tensors(a, b):
    torch.testing.assert_close(a, b, rtol=SAME, atol=SAME * a.abs().max().item())


def same_stats(a, b):
    for name in ("n", "sum", "scatter", "sq"):
        same_tensors(getattr(a, name), getattr(b, name))


def same_floats(a, b):
    assert abs(a - b) <= SAME * abs(a), (a, b)


def timed(fn, device):
    clock = time.process_time if device.type == "cpu" else time.perf_counter
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = clock()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, clock() - t


def main(argv=None):
    args = get_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    todo = cases(args, device)
    times = {name: ([], []) for name, *_ in todo}  # name -> (baseline seconds, nc.py seconds) per round
    for r in range(args.rounds):
        for name, old, new, compare in todo:
            runs = [(0, old), (1, new)] if r % 2 == 0 else [(1, new), (0, old)]  # alternate who goes first
            results = {}
            for which, fn in runs:
                results[which], seconds = timed(fn, device)
                times[name][which].append(seconds)
            if r == 0:
                compare(results[0], results[1])
    unit = "CPU seconds" if device.type == "cpu" else "seconds"
    print(f"{args.rounds} rounds, N = {args.num_samples}, batch {args.batch_size}, device {device}, "
          f"torch threads {torch.get_num_threads()}; median {unit} [min-max]")
    for name, (old, new) in times.items():
        print(f"{name:38s} baseline {spread(old)}  nc.py {spread(new)}  ratio {statistics.median(old) / statistics.median(new):.2f}")
    totals = [[sum(times[name][which][r] for name in times) for r in range(args.rounds)] for which in (0, 1)]
    print(f"{'total':38s} baseline {spread(totals[0])}  nc.py {spread(totals[1])}")
    print(f"ratio: {statistics.median(totals[0]) / statistics.median(totals[1]):.3f}")


def spread(seconds):
    return f"{statistics.median(seconds):7.3f} [{min(seconds):.3f}-{max(seconds):.3f}]"


if __name__ == "__main__":
    main()
