"""Graph against eager: a short run, same seed, compared epoch by epoch with the spread of two eager runs.

    python bench/graph_parity.py                      # ResNet-18 --SOTA, mnist_sample, 3 epochs, on the GPU
    python bench/graph_parity.py --epochs 5 --sample_size 500 --lr 0.1 [any train_1st_order.py flag]

Trains, through train_1st_order.main with --nc_every 1 into a temporary folder, two eager runs
(--no_cuda_graph) and one graph run (--cuda_graph), and prints each epoch's loss and NC1-NC4 with
|graph - eager1| beside |eager2 - eager1|. The last line is `parity: PASS` or `parity: FAIL` (exit 1).

The rule. Two eager runs differ only where GPU sums are not bitwise reproducible, so |eager2 -
eager1| is the size of the noise; with one pair it is itself a draw of that noise, and |graph -
eager1| is, for a graph with the same kernels, another draw of the same size. So for each quantity
the largest deviation over the epochs, relative to |eager1|, may be at most SPREAD_FACTOR times the
largest eager spread, plus RELATIVE_FLOOR. When the eager runs are bitwise equal (spread 0: a
deterministic setting, --deterministic, or an MLP) the graph must then match them to RELATIVE_FLOOR
relative, i.e. in practice bitwise too: the kernels are the same, so any real difference would grow
over the epochs far beyond it.

On a CPU (or --device cpu) only the two eager runs are trained and compared, and the last line says
that the graph needs a GPU.
"""
import argparse
import contextlib
import io
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from nclib import rundir  # noqa: E402
import train_1st_order  # noqa: E402
from nclib.cli import run_main  # noqa: E402

QUANTITIES = ("loss", "NC1", "NC2", "NC3", "NC4")
SPREAD_FACTOR = 3.0  # one eager pair is one draw of the noise; allow the graph's draw to be this much larger
RELATIVE_FLOOR = 1e-6  # the graph's deviation always allowed, relative to |eager1|: float32 last bits
# The training flags unless given: ResNet-18 with the CIFAR stem and augmentation on 100 images per class,
# with cuDNN's deterministic algorithms (--deterministic), so that the eager pair repeats bit for bit and
# the graph must match it: autotuned algorithms may be non-deterministic, and then one eager pair is too
# noisy a yardstick (under the rule below a graph with the very same kernels fails by chance about one
# time in five per quantity).
DEFAULTS = ["--model", "resnet18", "--SOTA", "--dataset", "mnist_sample", "--sample_size", "100", "--lr", "0.05",
            "--batch_size", "128", "--num_workers", "0", "--deterministic"]


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seed", type=int, default=6)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--keep", default=None, help="train the runs into this folder and keep them (default: a temporary one)")
    args, training_flags = p.parse_known_args(argv)
    args.training_flags = training_flags
    return args


def train(name, args, save_dir, *flags):
    """metrics.jsonl of one run trained with the training flags (ours after the defaults: they win)."""
    argv = DEFAULTS + args.training_flags + ["--epochs", str(args.epochs), "--seed", str(args.seed), "--device",
                                             args.device, "--nc_every", "1", "--save_dir", save_dir, "--uid", name,
                                             "--force", *flags]
    t = time.time()
    with contextlib.redirect_stdout(io.StringIO()):  # each run's own lines are in its train_log.txt
        run_dir = train_1st_order.main(argv)
    records = rundir.read_metrics(run_dir)
    seconds = sum(r["seconds"] for r in records)
    print(f"{name}: {len(records)} epochs, {seconds:.1f} s training ({time.time() - t:.1f} s with NC), {run_dir}")
    return records


def relative(a, b):
    return abs(a - b) / max(abs(b), 1e-30)


def main(argv=None):
    args = get_args(argv)
    graph_possible = torch.device(args.device).type == "cuda"
    with (contextlib.nullcontext(args.keep) if args.keep else tempfile.TemporaryDirectory()) as save_dir:
        eager1 = train("eager1", args, save_dir, "--no_cuda_graph")
        eager2 = train("eager2", args, save_dir, "--no_cuda_graph")
        graph = train("graph", args, save_dir, "--cuda_graph") if graph_possible else None
    print(f"{'epoch':>5} {'':>5} {'eager1':>13} {'eager2':>13} {'graph':>13} {'|graph-eager1|':>15} "
          f"{'|eager2-eager1|':>15}")
    for e, (a, b) in enumerate(zip(eager1, eager2)):
        for q in QUANTITIES:
            if q not in a:
                continue
            g = f"{graph[e][q]:13.7g} {abs(graph[e][q] - a[q]):15.3g}" if graph else f"{'-':>13} {'-':>15}"
            print(f"{a['epoch']:>5} {q:>5} {a[q]:13.7g} {b[q]:13.7g} {g} {abs(b[q] - a[q]):15.3g}")
    if graph is None:
        print(f"the graph run needs a GPU, and this is {args.device}: only the eager pair was trained")
        print("parity: SKIP (no GPU)")
        return 0
    failed = []
    for q in QUANTITIES:
        if q not in eager1[0]:
            continue
        rows = [(a[q], b[q], g[q]) for a, b, g in zip(eager1, eager2, graph) if q in a and q in b and q in g]
        if not rows:
            continue
        spread = max(relative(b, a) for a, b, _ in rows)
        deviation = max(relative(g, a) for a, _, g in rows)
        allowed = SPREAD_FACTOR * spread + RELATIVE_FLOOR
        ok = deviation <= allowed
        print(f"{q}: largest relative |graph-eager1| {deviation:.3g}, |eager2-eager1| {spread:.3g}, "
              f"allowed {allowed:.3g}: {'ok' if ok else 'too far'}")
        if not ok:
            failed.append(q)
    print(f"parity: {'FAIL (' + ', '.join(failed) + ')' if failed else 'PASS'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(run_main(main))
