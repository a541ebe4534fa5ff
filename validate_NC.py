"""Measure Neural Collapse (NC1-NC4), accuracy, cosine margins and nuclear ratio on every
checkpoint of a run directory; write <run>/info.pkl and <run>/test_log.txt.

    python validate_NC.py --load_path model_weights/<uid>

The model and data flags are read from the run's args.json; flags given here must agree with them.
Each checkpoint's results are kept in <run>/nc_results/ as they are computed, so a rerun (after a
crash, or while the run is still training) only evaluates the checkpoints not yet done.
"""
import argparse
import os
import pickle
import re
import sys
import time
import warnings

import numpy as np
import torch
from tqdm import tqdm

import datasets
import models
import nc
from args import MODEL_FLAGS, explicit_args, validate_parser
from training import ARGS_FILE, build_on_device
from utils import UserError, atomic_write, get_device, load_json, run_main, save_pickle

CHECKPOINT = re.compile(r"^epoch_(\d+)\.pth$")
RESULTS_DIR = "nc_results"
# info.pkl: one list entry per evaluated checkpoint under each key (the authors' key names).
INFO_KEYS = ("collapse_metric", "ETF_metric", "WH_relation_metric", "Wh_b_relation_metric",
             "train_acc1", "train_acc5", "test_acc1", "test_acc5", "W", "b", "H", "mu_G_train", "mu_G_test",
             "avg_cos_margin", "all_cos_margin", "nuclear_metric")


def list_checkpoints(run_dir, max_epoch=None):
    """[(epoch, path)] of the epoch_NNN.pth files, in epoch order."""
    found = sorted((int(m.group(1)), os.path.join(run_dir, name))
                   for name in os.listdir(run_dir) if (m := CHECKPOINT.match(name)))
    return [(e, p) for e, p in found if max_epoch is None or e <= max_epoch]


def run_arguments(cli, given):
    """The run's recorded training arguments, with this command's data and device options.
    A model or data-set flag given here that disagrees with the record is refused."""
    path = os.path.join(cli.load_path, ARGS_FILE)
    if not os.path.isfile(path):  # a run directory from elsewhere: trust the command line
        warnings.warn(f"{path} not found: the model and data set are taken from the command line")
        return argparse.Namespace(**vars(cli), sample_size=None)
    recorded = load_json(path)
    clash = [f"--{k} {given[k]} (the run has {recorded.get(k)})" for k in MODEL_FLAGS
             if k in given and given[k] != recorded.get(k)]
    if clash:
        raise UserError(f"{', '.join(clash)}: the checkpoints in {cli.load_path} were trained otherwise; "
                        "drop these flags (they are read from the run)")
    merged = dict(recorded)
    merged.update({k: getattr(cli, k) for k in ("batch_size", "gpu_id", "device", "loader", "num_workers")})
    if "data_dir" in given:
        merged["data_dir"] = cli.data_dir
    return argparse.Namespace(**merged)


class TrainingSetMetrics:
    """Everything info.pkl records about the training set, accumulated batch by batch.

    The NC statistics stream (nc.NCStats); the features themselves are also kept, in one (N, d)
    device tensor, because the cosine margins and the nuclear ratio are per-sample quantities.
    """

    def __init__(self, num_classes, dim, num_samples, device):
        self.K, self.filled = num_classes, 0
        self.stats = nc.NCStats(num_classes, dim, device)
        self.H = torch.empty(num_samples, dim, device=device)  # (N, d)
        self.y = torch.empty(num_samples, dtype=torch.int64, device=device)  # (N,)
        self.hits = torch.zeros(2, dtype=torch.float64, device=device)  # top-1, top-5

    def add(self, logits, h, y):
        self.stats.update(h, y)
        end = self.filled + len(y)
        self.H[self.filled:end], self.y[self.filled:end] = h, y
        self.hits += nc.topk_hits(logits, y)
        self.filled = end

    def result(self, W, b):
        """The training-set entries of info.pkl under the last layer W (K, d), b (K,)."""
        W, b = W.detach().to(torch.float64), b.detach().to(torch.float64)
        means, centre = nc.mu_c(self.stats), nc.mu_G(self.stats)
        margins = nc.cos_margins(self.H, self.y, W, b, centre)
        acc1, acc5 = (100 * self.hits / self.filled).tolist()
        return {
            "collapse_metric": nc.NC1(nc.Sigma_W(self.stats), means, centre).item(),
            "ETF_metric": nc.NC2(W).item(),
            "WH_relation_metric": nc.NC3(W, means, centre).item(),
            "Wh_b_relation_metric": nc.NC4(W, b, centre).item(),
            "train_acc1": acc1, "train_acc5": acc5,
            "W": to_numpy(W), "b": to_numpy(b), "H": to_numpy(nc.H_bar(means, centre)), "mu_G_train": to_numpy(centre),
            "avg_cos_margin": margins.mean().item(), "all_cos_margin": np.sort(to_numpy(margins)),
            "nuclear_metric": nc.nuclear_ratio(self.H, self.y, self.K),
        }


def to_numpy(t):
    return t.detach().cpu().numpy()


def last_layer(model):
    """(W, b) of model.fc; b is zeros without a bias."""
    W, b = model.fc.weight, model.fc.bias
    return W, torch.zeros(W.shape[0], device=W.device) if b is None else b


@torch.no_grad()
def training_set_metrics(model, loader, num_classes):
    """The training-set entries of info.pkl, from one forward pass over `loader` (model in eval mode)."""
    device = model.fc.weight.device
    train = TrainingSetMetrics(num_classes, models.feature_dim(model), datasets.num_samples(loader), device)
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        logits, h = model(x)
        train.add(logits, h, y)
    return train.result(*last_layer(model))


@torch.no_grad()
def evaluate(model, train_loader, test_loader, num_classes):
    """Every per-checkpoint quantity of info.pkl, in one forward pass over each split."""
    model.eval()
    device = model.fc.weight.device
    train = training_set_metrics(model, train_loader, num_classes)
    test_hits = torch.zeros(2, dtype=torch.float64, device=device)
    test_sum = torch.zeros(models.feature_dim(model), dtype=torch.float64, device=device)
    for x, y in test_loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        logits, h = model(x)
        test_hits += nc.topk_hits(logits, y)
        test_sum += h.to(torch.float64).sum(0)
    n_test = datasets.num_samples(test_loader)
    acc1, acc5 = (100 * test_hits / n_test).tolist()
    return {**train, "test_acc1": acc1, "test_acc5": acc5,
            "mu_G_test": to_numpy(test_sum / n_test)}


def load_checkpoint(model, path, device):
    """Load a state_dict; None on success, else the reason it cannot be used."""
    try:
        model.load_state_dict(torch.load(path, map_location=device, weights_only=True))
    except Exception as e:
        return (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
    return None


def cached_result(path, checkpoint):
    """The stored result of a checkpoint, if it was computed from this very file."""
    try:
        with open(path, "rb") as f:
            saved = pickle.load(f)
        st = os.stat(checkpoint)
        return saved["result"] if saved["checkpoint"] == (st.st_size, st.st_mtime_ns) else None
    except Exception:
        return None


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = validate_parser()
    cli = parser.parse_args(argv)
    cli.load_path = os.path.normpath(cli.load_path)
    run_dir = cli.load_path
    if not os.path.isdir(run_dir):
        raise UserError(f"--load_path {run_dir} is not a directory; give a run directory such as model_weights/<uid>")
    checkpoints = list_checkpoints(run_dir, cli.epochs)
    if not checkpoints:
        raise UserError(f"no checkpoints named epoch_NNN.pth in {run_dir}; train first, or check --load_path")
    args = run_arguments(cli, explicit_args(parser, argv))

    device = get_device(args.gpu_id, args.device)
    data = datasets.load_data(args.dataset, args.data_dir, args.sample_size, args.SOTA)
    model, channels_last = build_on_device(args, data.num_classes, device)
    train_loader, test_loader = datasets.make_loaders(data, args.batch_size, device, args.loader, train=False,
                                                      num_workers=args.num_workers, channels_last=channels_last)

    results_dir = os.path.join(run_dir, RESULTS_DIR)
    os.makedirs(results_dir, exist_ok=True)
    results, skipped, computed, t0 = {}, [], 0, time.time()
    for epoch, path in tqdm(checkpoints, desc="validating", dynamic_ncols=True):
        cache = os.path.join(results_dir, f"epoch_{epoch:03d}.pkl")
        result = cached_result(cache, path)
        if result is None:
            # stat before loading: should training replace the file in between, the result is
            # keyed to the old file and is computed again on the next run, never wrongly reused
            st = os.stat(path)
            reason = load_checkpoint(model, path, device)
            if reason is not None:
                warnings.warn(f"skipping {path}: {reason}")
                skipped.append(path)
                continue
            result = evaluate(model, train_loader, test_loader, data.num_classes)
            save_pickle({"checkpoint": (st.st_size, st.st_mtime_ns), "result": result}, cache)
            computed += 1
        results[epoch] = result
    if not results:
        raise UserError(f"none of the {len(checkpoints)} checkpoints in {run_dir} could be loaded; "
                        "were they written by this repository for this model?")

    epochs = sorted(results)
    info = {key: [results[e][key] for e in epochs] for key in INFO_KEYS}
    info["epochs"] = epochs
    save_pickle(info, os.path.join(run_dir, "info.pkl"))
    # written whole and renamed into place, as info.pkl is, so that a kill never leaves half of it
    lines = "".join(format_line(e, results[e]) + "\n" for e in epochs)
    atomic_write(os.path.join(run_dir, "test_log.txt"), lambda f: f.write(lines.encode()))
    print(f"validated {len(epochs)} checkpoints ({computed} computed, {len(epochs) - computed} reused, "
          f"{len(skipped)} skipped) in {time.time() - t0:.1f} s; wrote {run_dir}/info.pkl")
    print("last " + format_line(epochs[-1], results[epochs[-1]]))
    return info


def format_line(epoch, r):
    return (f"epoch {epoch}: NC1 {r['collapse_metric']:.4g} NC2 {r['ETF_metric']:.4g} "
            f"NC3 {r['WH_relation_metric']:.4g} NC4 {r['Wh_b_relation_metric']:.4g} | "
            f"train acc {r['train_acc1']:.2f} test acc {r['test_acc1']:.2f}")


if __name__ == "__main__":
    warnings.formatwarning = lambda message, category, *args, **kwargs: f"warning: {message}\n"
    run_main(main)
