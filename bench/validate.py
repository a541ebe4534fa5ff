"""Time one checkpoint's NC measurement: this repository against the authors' way of doing it.

The reference is written as the authors' validate_NC.py works: a DataLoader of per-image PIL
transforms feeds the forward pass; then a Python loop over samples with `.item()` per sample,
features and outputs collected in per-class lists of host arrays, Sigma_W as a sum of per-sample
outer products formed in batches of 1,024, scipy's pinv in float32, per-class margins and numpy
nuclear norms. Ours is validate_NC.py's own code (nclib.measure). Both give the same NC1-NC4 (to 1e-3 relative:
the reference keeps float32 arithmetic; exactness against float64 is the tests' job); end to end
on a GPU NC1 to 1e-2, as the reference convolves in PyTorch's default TF32 and ours in float32.

    python bench/validate.py                                   # CPU: MLP 1024x6 on mnist_sample
    python bench/validate.py --model resnet18 --SOTA --dataset synthetic --num_samples 20000 --device cuda
    python bench/validate.py --model resnet18 --SOTA --dataset synthetic_mini --num_samples 10000 --device cuda

--dataset synthetic_mini: random 84x84x3 images of 100 classes, as mini-ImageNet (ImageNet's
normalisation). Each side runs once untimed, then --rounds times, interleaved (a b, b a, ...).
The headline is end to end (from uint8 images to the metrics, forward passes included; the
reference's DataLoader starts its workers inside each timing, as each validation of the authors'
code does); also after the forward pass (from each batch's features and labels to the metrics).
Our forward pass alone is timed too: the reference's time over it bounds the end-to-end ratio.
Each is printed as medians over rounds with their spread, then
`end_to_end_ratio: <median over rounds of reference seconds / repository seconds>` and, last,
`ratio: <the same for the part after the forward pass>`.

    python bench/validate.py --measures all [--layers]

also times the training-set measurement (forward pass included) with the extra measures (and the
per-layer ones) against without, --repeats interleaved rounds after a warm-up, and ends with
`measures_overhead: <(median with - median without) / median without>`, the extras' share of the
validation time (CPU time on a CPU: see measures_overhead).
"""
import argparse
import os
import sys
import time

import numpy as np
import scipy.linalg
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import ROUNDS, SYNTHETIC, check_model_fits, interleaved, median, spread, synthetic  # noqa: E402
sys.path.insert(0, os.path.dirname(HERE))
import datasets  # noqa: E402
import models  # noqa: E402
from args import add_model_args, positive_int  # noqa: E402
from nclib.measure import EvalForward, TrainingSetMetrics, last_layer, parse_measures, select_layers, training_set_metrics  # noqa: E402


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(p)  # the training scripts' model flags
    p.set_defaults(model="MLP")
    p.add_argument("--dataset", default="mnist_sample",
                   help="a data set name, or synthetic (random CIFAR-shaped images) or synthetic_mini "
                        "(random mini-ImageNet-shaped ones: 84x84, 100 classes)")
    p.add_argument("--data_dir", default="~/data")
    p.add_argument("--num_samples", type=int, default=None, help="training images used (default: all)")
    p.add_argument("--num_classes", type=positive_int, default=None,
                   help="classes of the synthetic data (default: 10, or 100 for synthetic_mini)")
    p.add_argument("--checkpoint", default=None, help="a state_dict to load (default: the random initialisation)")
    p.add_argument("--batch_size", type=int, default=1024)
    p.add_argument("--num_workers", type=int, default=4, help="DataLoader workers of the reference")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--measures", nargs="+", default=["paper"], help="also time these extra measures (all, or names)")
    p.add_argument("--layers", nargs="*", default=None, help="also time the per-layer measures (of these layers)")
    p.add_argument("--rounds", type=positive_int, default=ROUNDS, help="timed runs of each side, interleaved")
    p.add_argument("--repeats", type=positive_int, default=ROUNDS,
                   help="timings of the overhead: the median of this many interleaved rounds")
    return p.parse_args(argv)


def get_data(args):
    check_model_fits(args.model, args.dataset)
    if args.dataset in SYNTHETIC:
        images, _, stats, K = synthetic(args.dataset, args.num_samples or 50000)
        K = args.num_classes or K
        return images, np.arange(len(images)) % K, stats, K
    data = datasets.load_data(args.dataset, args.data_dir)
    keep = datasets.first_per_class(data.train_labels, (args.num_samples or len(data.train_labels)) // data.num_classes)
    return data.train_images[keep], data.train_labels[keep], (data.mean, data.std), data.num_classes


# ---------------------------------------------------------------------------- the reference

def reference_collect(batches, num_classes):
    """The authors' per-sample loop: class sums on the device, per-class lists of host arrays."""
    mu_G, mu_c, features, outputs = 0, {}, {}, {}
    top1 = top5 = n = 0
    for logits, h, y in batches:
        mu_G = mu_G + torch.sum(h, dim=0)
        for i in range(len(y)):
            t = y[i].item()
            if t not in mu_c:
                mu_c[t] = h[i, :].clone()
                features[t], outputs[t] = [h[i, :].cpu().numpy()], [logits[i, :].cpu().numpy()]
            else:
                mu_c[t] += h[i, :]
                features[t].append(h[i, :].cpu().numpy())
                outputs[t].append(logits[i, :].cpu().numpy())
        hit = logits.topk(5, dim=1).indices == y[:, None]
        top1 += hit[:, 0].sum().item()
        top5 += hit.sum().item()
        n += len(y)
    mu_G = mu_G / n
    for t in mu_c:
        mu_c[t] = mu_c[t] / len(features[t])
    return mu_G, mu_c, features, outputs, 100 * top1 / n, 100 * top5 / n


def reference_metrics(batches, W, b, num_classes, device, batchsize=1024):
    mu_G, mu_c, features, outputs, acc1, acc5 = reference_collect(batches, num_classes)
    K = len(mu_c)
    Sigma_W, n = 0, 0
    for t in features:  # sum of per-sample outer products, formed in batches
        class_features = torch.from_numpy(np.array(features[t])).float().to(device)
        for i in range(0, len(class_features), batchsize):
            f = class_features[i:i + batchsize] - mu_c[t].unsqueeze(0)
            Sigma_W = Sigma_W + torch.sum(f.unsqueeze(2) @ f.unsqueeze(1), dim=0)
            n += len(f)
    Sigma_W = (Sigma_W / n).cpu().numpy()
    Sigma_B = 0
    for t in range(K):
        v = (mu_c[t] - mu_G).unsqueeze(1)
        Sigma_B = Sigma_B + v @ v.T
    Sigma_B = (Sigma_B / K).cpu().numpy()
    NC1 = np.trace(Sigma_W @ scipy.linalg.pinv(Sigma_B)) / K

    Wn, bn, mu_G_n = W.cpu().numpy(), b.cpu().numpy(), mu_G.cpu().numpy()
    P = (np.eye(K) - np.ones((K, K)) / K) / np.sqrt(K - 1)
    Wc = Wn - Wn.mean(0, keepdims=True)
    WWT = Wc @ Wc.T
    NC2 = np.linalg.norm(WWT / np.linalg.norm(WWT) - P)
    Hbar = np.stack([(mu_c[t] - mu_G).cpu().numpy() for t in range(K)], axis=1)
    WH = Wc @ Hbar
    NC3 = np.linalg.norm(WH / np.linalg.norm(WH) - P)
    NC4 = np.linalg.norm(Wn @ mu_G_n + bn)

    margins = []  # per class, in batches, as the authors do
    Wc_t = torch.from_numpy(Wc).to(device)
    for t in features:
        f = torch.from_numpy(np.array(features[t])).to(device)
        z = torch.from_numpy(np.array(outputs[t])).to(device)
        for i in range(0, len(f), batchsize):
            cos = (z[i:i + batchsize] - b.unsqueeze(0)) / (
                torch.norm(f[i:i + batchsize] - mu_G.unsqueeze(0), dim=1, keepdim=True) * torch.norm(Wc_t.T, dim=0, keepdim=True))
            false = cos.clone()
            false[:, t] = -np.inf
            margins.append((cos[:, t] - torch.amax(false, dim=1)).cpu().numpy())
    margins = np.sort(np.concatenate(margins))
    nuclear = np.mean([np.linalg.norm(np.array(features[t]), ord="nuc") / np.linalg.norm(np.array(features[t]))
                       for t in features])
    return {"NC1": NC1, "NC2": NC2, "NC3": NC3, "NC4": NC4, "train_acc1": acc1, "train_acc5": acc5,
            "avg_cos_margin": margins.mean(), "nuclear_metric": nuclear}


# ---------------------------------------------------------------------------- the two pipelines

def ours_after_forward(batches, W, b, num_classes, device):
    n = sum(len(y) for _, _, y in batches)
    metrics = TrainingSetMetrics(num_classes, W.shape[1], n, device)
    for logits, h, y in batches:
        metrics.add(logits, h, y)
    r = metrics.result(W, b)
    return {"NC1": r["collapse_metric"], "NC2": r["ETF_metric"], "NC3": r["WH_relation_metric"],
            "NC4": r["Wh_b_relation_metric"], "train_acc1": r["train_acc1"], "train_acc5": r["train_acc5"],
            "avg_cos_margin": r["avg_cos_margin"], "nuclear_metric": r["nuclear_metric"]}


@torch.no_grad()
def forward_batches(model, loader, device):
    out = []
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        logits, h = model(x)
        out.append((logits, h, y))
    return out


def main(argv=None):
    args = get_args(argv)
    device = torch.device(args.device)
    images, labels, (mean, std), K = get_data(args)
    model, channels_last = models.build_on_device(args, K, device)
    model.eval()
    if args.checkpoint:
        model.load_state_dict(torch.load(args.checkpoint, map_location=device))
    W, b = (t.detach() for t in last_layer(model))
    print(f"{args.model}{' --SOTA' if args.SOTA else ''} on {len(labels)} {args.dataset} images, "
          f"d = {W.shape[1]}, K = {K}, batch {args.batch_size}, {device}")

    fast = datasets.DeviceLoader(images, labels, args.batch_size, mean, std, device, channels_last=channels_last)
    data = datasets.ImageData(images, labels, images[:1], labels[:1], K, mean, std, augment=False)
    slow = datasets.torch_loader(data, True, args.batch_size, shuffle=False, num_workers=args.num_workers,
                                 augment=False)

    # End to end: each pipeline from uint8 images to metrics. The warm-up round tunes cuDNN and
    # fills the allocator; the reference's DataLoader starts its workers inside each timing, as
    # each validation of the authors' code does.
    end_to_end = {"ours": lambda: training_set_metrics(model, fast, K),
                  "reference": lambda: reference_metrics(forward_batches(model, slow, device), W, b, K, device)}
    t_e2e, last = interleaved(end_to_end, args.rounds, device)
    ours, ref = last["ours"], last["reference"]

    # After the forward pass: the same features, logits and labels for both.
    batches = forward_batches(model, fast, device)
    after = {"ours": lambda: ours_after_forward(batches, W, b, K, device),
             "reference": lambda: reference_metrics(batches, W, b, K, device),
             "forward": lambda: forward_batches(EvalForward(model), fast, device)}  # ours, folding included
    t_after, last = interleaved(after, args.rounds, device)
    ours2, ref2 = last["ours"], last["reference"]

    print(f"{'':16s}{'ours':>14s}{'reference':>14s}{'rel. diff':>12s}")
    for key in ref2:
        diff = abs(ours2[key] - ref2[key]) / max(abs(ref2[key]), 1e-12)
        print(f"{key:16s}{ours2[key]:14.6g}{ref2[key]:14.6g}{diff:12.2e}")
        if key.startswith("NC") and diff > 1e-3:
            raise SystemExit(f"error: {key} differs by {diff:.2e} relative (more than 1e-3)")
    # End to end the features differ: ours come from float32 convolutions, and on a GPU the reference's
    # from PyTorch's default TF32 ones (as the authors' ran), off by ~1e-3 relative.
    tolerance = 1e-2 if device.type == "cuda" else 1e-3
    diff = abs(ours["collapse_metric"] - ref["NC1"]) / abs(ref["NC1"])
    if diff > tolerance:
        raise SystemExit(f"error: end to end, NC1 differs by {diff:.2e} relative (more than {tolerance:g})")
    print(f"NC1-NC4 agree to 1e-3 relative after the forward pass, NC1 to {tolerance:g} end to end; times are "
          f"medians over {args.rounds} round{'s' * (args.rounds != 1)} (min-max, +- half the range)")
    ratio_e2e = [r / o for r, o in zip(t_e2e["reference"], t_e2e["ours"])]
    ratio_after = [r / o for r, o in zip(t_after["reference"], t_after["ours"])]
    ceiling = [r / f for r, f in zip(t_e2e["reference"], t_after["forward"])]
    print(f"our forward pass alone (device-resident data, BatchNorm folded): {spread(t_after['forward'])} s; "
          f"the end-to-end ratio cannot exceed reference / that = {spread(ceiling, '{:.1f}')}")
    print(f"end to end (headline):  ours {spread(t_e2e['ours'])} s, reference {spread(t_e2e['reference'])} s, "
          f"ratio {spread(ratio_e2e, '{:.1f}')}")
    print(f"after the forward pass: ours {spread(t_after['ours'])} s, reference {spread(t_after['reference'])} s, "
          f"ratio {spread(ratio_after, '{:.1f}')}")
    print(f"end_to_end_ratio: {median(ratio_e2e):.1f}")
    print(f"ratio: {median(ratio_after):.1f}")
    measures = parse_measures(args.measures)
    layers = () if args.layers is None else select_layers(model, args.layers)
    if measures or layers:
        measures_overhead(model, fast, K, measures, layers, device, args.repeats)


def measures_overhead(model, loader, K, measures, layers, device, repeats):
    """The extras' share of the training set's validation: (with - without) / without, each the median
    of `repeats` interleaved rounds after a warm-up, in CPU seconds of this process on a CPU (other
    processes on a shared machine disturb them far less than wall-clock seconds) and in wall-clock
    seconds on a GPU. Prints it last."""
    clock = time.process_time if device.type == "cpu" else time.perf_counter
    sides = {"plain": lambda: training_set_metrics(model, loader, K),
             "extra": lambda: training_set_metrics(model, loader, K, measures, layers)}
    seconds, _ = interleaved(sides, repeats, device, clock=clock)
    t0, t1 = median(seconds["plain"]), median(seconds["extra"])
    what = ", ".join(measures) + (f"; layers {', '.join(layers)}" if layers else "")
    unit = "CPU s" if device.type == "cpu" else "s"
    print(f"validation of the training set: {spread(seconds['plain'])} {unit}; with {what}: "
          f"{spread(seconds['extra'])} {unit} (medians over {repeats} rounds)")
    print(f"measures_overhead: {(t1 - t0) / t0:.3f}")
    return t0, t1


if __name__ == "__main__":
    main()
