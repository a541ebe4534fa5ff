"""Measure Neural Collapse (NC1-NC4), accuracy, cosine margins and nuclear ratio on every
checkpoint of a run directory; write <run>/info.pkl and <run>/test_log.txt.

    python validate_NC.py --load_path model_weights/<uid>
    python validate_NC.py --load_path model_weights/<uid> --measures all --layers

--measures adds the other NC measures of the literature (nc.MEASURES) to info.pkl; --layers records
NC1, tr(Sigma_W)/tr(Sigma_B) and the NCC agreement at every layer (layer_taps), in the same pass.

The model and data flags are read from the run's args.json; flags given here must agree with them.
Each checkpoint's results are kept in <run>/nc_results/ as they are computed, keyed to everything
they depend on (the checkpoint file, the data, the metric code's version), so a rerun (after a
crash, or while the run is still training) only evaluates what is new or changed. info.pkl is
rebuilt from them, and keeps what it held of epochs that can be neither reused nor measured again.
"""
import argparse
import hashlib
import os
import sys
import time
import warnings
from contextlib import nullcontext

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

import datasets
import models
import nc
import rundir
from models.fold import fold_batchnorm
from models.resnet import ResNet
from args import MODEL_FLAGS, explicit_args, train_parser, validate_parser
from utils import (Captured, UserError, all_finite, broadcast_from_rank_zero, end_distributed, fp32_convolutions,
                   get_device, init_distributed, is_rank_zero, on_side_stream, rank_device, run_main, torchrun_env,
                   world)

# Raise when the numbers a result holds change meaning: stored results of another version are recomputed.
METRIC_VERSION = 2
# info.pkl: one list entry per evaluated checkpoint under each key (the original code's key names).
INFO_KEYS = tuple(nc.INFO_KEYS.values())
# The keys --measures and --layers add, in the order info.pkl lists them.
EXTRA_KEYS = tuple(key for keys in nc.MEASURES.values() for key in keys) + ("layers", "layer_names")


def parse_measures(items):
    """--measures all|paper|NAME[,NAME ...] -> the measure names (nc.MEASURES), in their canonical order;
    () for paper. An unknown name is a UserError that lists the valid ones."""
    names = [n for item in items or ["paper"] for n in item.split(",") if n]
    if names == ["paper"]:
        return ()
    if names == ["all"]:
        return tuple(nc.MEASURES)
    unknown = [n for n in names if n not in nc.MEASURES]
    if unknown:
        raise UserError(f"--measures: unknown {', '.join(unknown)}; choose all, paper, or any of "
                        f"{', '.join(nc.MEASURES)}")
    return tuple(n for n in nc.MEASURES if n in names)


# ---------------------------------------------------------------------------- layers

def _flat(t):
    return t.flatten(1)


def _gap(t):
    return t.mean((2, 3))  # (B, C): global average pooling of a stage's (B, C, H, W) output


def layer_taps(model):
    """{layer name: (module, map of its output to (B, d_l) features)}, in depth order; the last is 'h',
    the features the model returns. MLP: hidden1 .. hidden{depth-1}, the outputs of its ReLUs (the last
    ReLU's is h); ResNets: layer1 .. layer4, each stage's output after global average pooling, and h
    (layer4 after the model's own pooling). Another model is a UserError."""
    if isinstance(model, models.MLP):
        relus = [m for m in model.features if isinstance(m, nn.ReLU)]
        taps = {f"hidden{i + 1}": (m, _flat) for i, m in enumerate(relus[:-1])}
        taps["h"] = (relus[-1], _flat)
        return taps
    if isinstance(model, ResNet):
        taps = {f"layer{i}": (getattr(model, f"layer{i}"), _gap) for i in range(1, 5)}
        taps["h"] = (model.avgpool, _flat)
        return taps
    raise UserError(f"--layers: the layers of {type(model).__name__} are not known; "
                    "--layers works with the MLP and the ResNets")


def select_layers(model, names):
    """The layer names --layers asks for ([] for all) among layer_taps(model); an unknown one is a
    UserError that lists the valid ones."""
    taps = layer_taps(model)
    unknown = [n for n in names if n not in taps]
    if unknown:
        raise UserError(f"--layers: unknown {', '.join(unknown)}; this model's layers are {', '.join(taps)}")
    return tuple(n for n in taps if not names or n in names)


class LayerHooks:
    """Forward hooks that keep, for each named layer, the features of the last forward pass
    (self.features[name], (B, d_l)). A context manager: the hooks are removed on exit."""

    def __init__(self, model, names):
        taps = layer_taps(model)
        self.taps, self.features, self.handles = {n: taps[n] for n in names}, {}, []

    def __enter__(self):
        for name, (module, to_features) in self.taps.items():
            def hook(module, inputs, output, name=name, to_features=to_features):
                self.features[name] = to_features(output)
            self.handles.append(module.register_forward_hook(hook))
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        self.handles = []


def run_arguments(cli, given):
    """The run's recorded training arguments, with this command's data and device options.
    A model or data-set flag given here that disagrees with the record is refused."""
    recorded = rundir.read_args(cli.load_path)
    if recorded is None:  # a run directory from elsewhere: trust the command line
        warnings.warn(f"{os.path.join(cli.load_path, rundir.ARGS)} not found: "
                      "the model and data set are taken from the command line")
        return argparse.Namespace(**vars(cli), sample_size=None)
    clash = [f"--{k} {given[k]} (the run has {recorded.get(k)})" for k in MODEL_FLAGS
             if k in given and given[k] != recorded.get(k)]
    if clash:
        raise UserError(f"{', '.join(clash)}: the checkpoints in {cli.load_path} were trained otherwise; "
                        "drop these flags (they are read from the run)")
    # options newer than the run take their defaults (args.RECORD_REQUIRED are there: read_args checked)
    merged = {**vars(train_parser().parse_args([])), **recorded}
    merged.update({k: getattr(cli, k) for k in ("batch_size", "gpu_id", "device", "loader", "num_workers")})
    if "data_dir" in given:
        merged["data_dir"] = cli.data_dir
    return argparse.Namespace(**merged)


def data_key(data):
    """A digest of the images and labels a result was computed on: the same data wherever it lies."""
    digest = hashlib.blake2b(digest_size=16)
    for array in (data.train_images, data.train_labels, data.test_images, data.test_labels):
        digest.update(np.ascontiguousarray(array).data)
    return digest.hexdigest()


class Measurement:
    """Measures one run's model on one data set and keeps each epoch's result in the run directory,
    keyed to everything it depends on: the metric code's version, the data, the model flags, and
    the epoch's checkpoint file (its size and mtime; None when the epoch's checkpoint
    was not kept, as training with --save_every leaves it). validate_NC.py and training with
    --nc_every measure through this one class, so their results are the same and each reuses the other's."""

    def __init__(self, run_dir, args, data, model, device, channels_last, batch_size, measures=(), layers=()):
        self.run_dir, self.model, self.K = run_dir, model, data.num_classes
        rank, size = world()  # under torchrun each rank measures its block of each split; evaluate() merges them
        self.measures, self.layers = tuple(measures), tuple(layers)
        self.train_loader, self.test_loader = datasets.make_loaders(
            data if size == 1 else datasets.shard(data, rank, size), batch_size, device, args.loader, train=False,
            num_workers=args.num_workers, channels_last=channels_last)
        # Not keyed to the batch size: it changes no formula, only how sums are rounded.
        self.key = {"version": METRIC_VERSION, "data": data_key(data),
                    "model": {k: getattr(args, k, None) for k in MODEL_FLAGS}}
        # Only a measurement with extras says so: the paper's results keep the key they always had.
        if self.measures:
            self.key["measures"] = self.measures
        if self.layers:
            self.key["layers"] = self.layers

    def stored_paper(self, epoch):
        """The stored result of an epoch measured without --measures and --layers, or None."""
        return self._read(epoch, {k: v for k, v in self.key_of(epoch).items() if k not in ("measures", "layers")})

    def key_of(self, epoch):
        path = rundir.checkpoint_path(self.run_dir, epoch)
        return dict(self.key, checkpoint=rundir.checkpoint_id(path) if os.path.exists(path) else None)

    def stored(self, epoch):
        """The stored result of an epoch under this measurement's key, or None."""
        return self._read(epoch, self.key_of(epoch))

    def _read(self, epoch, key):
        if key["checkpoint"] is not None:
            return rundir.read_result(self.run_dir, epoch, key)
        # No checkpoint now (not kept, or removed since it was measured): its result stands for it
        return rundir.read_result(self.run_dir, epoch, key, ignoring="checkpoint")

    def stored_results(self, max_epoch=None):
        """{epoch: result} of every epoch up to max_epoch with a stored result under this key."""
        results = {e: self.stored(e) for e in rundir.result_epochs(self.run_dir) if max_epoch is None or e <= max_epoch}
        return {e: r for e, r in results.items() if r is not None}

    def measure(self, epoch):
        """Evaluate the model as it is now, as the epoch's result, and store it. Returns (result,
        None), or (None, the reason) when the metrics cannot be computed (e.g. an SVD that fails)."""
        key = self.key_of(epoch)  # before evaluating: a checkpoint replaced meanwhile is measured again later
        try:
            result = evaluate(self.model, self.train_loader, self.test_loader, self.K, self.measures, self.layers)
        except (RuntimeError, ValueError) as e:
            return None, f"its metrics cannot be computed ({' '.join(str(e).split())[:120]})"
        if is_rank_zero():  # every rank has the same result; one writes it
            rundir.write_result(self.run_dir, epoch, key, result)
        return result, None


class TrainingSetMetrics:
    """Everything info.pkl records about the training set, accumulated batch by batch.

    The NC statistics stream (nc.NCStats); the features themselves are also kept, in one (N, d)
    device tensor, because the cosine margins and the nuclear ratio are per-sample quantities. With
    layers, each layer's features are kept too ((N, d_l) each), for nc.layer_measures.
    """

    def __init__(self, num_classes, dim, num_samples, device, keep_pred=False, layers=()):
        self.K, self.filled = num_classes, 0
        # The network's predictions, for the NCC agreement (N,): only when asked for.
        self.pred = torch.empty(num_samples, dtype=torch.int64, device=device) if keep_pred else None
        # Each layer's features (N, d_l), allocated at the first batch; h's are self.H.
        self.layers = {name: None for name in layers}
        self.stats = nc.NCStats(num_classes, dim, device)
        self.H = torch.empty(num_samples, dim, device=device)  # (N, d)
        self.y = torch.empty(num_samples, dtype=torch.int64, device=device)  # (N,)
        self.hits = torch.zeros(2, dtype=torch.float64, device=device)  # top-1, top-5

    def add(self, logits, h, y, layer_features=None):
        self.stats.update(h, y)
        end = self.filled + len(y)
        self.H[self.filled:end], self.y[self.filled:end] = h, y
        if self.pred is not None:
            self.pred[self.filled:end] = logits.argmax(1)
        for name in self.layers:
            if name != "h":
                f = layer_features[name]  # (B, d_l)
                if self.layers[name] is None:
                    self.layers[name] = torch.empty(len(self.H), f.shape[1], dtype=f.dtype, device=f.device)
                self.layers[name][self.filled:end] = f
        self.hits += nc.topk_hits(logits, y)
        self.filled = end

    def result(self, W, b):
        """The training-set entries of info.pkl (by their info.pkl keys) under the last layer W (K, d), b (K,)."""
        if world()[1] > 1:  # this rank saw its block of the data: merge every rank's, on every rank
            self.stats = self.stats.all_ranks()
            self.H, self.y = gather_rows(self.H[:self.filled]), gather_rows(self.y[:self.filled])
            self.hits = all_reduce_sum(self.hits)
            self.filled = len(self.y)
        paper = nc.paper_metrics(self.stats, W, b)
        margins = nc.cos_margins(self.H, self.y, paper["W"], paper["b"], paper["mu_G"])
        acc1, acc5 = (100 * self.hits / self.filled).tolist()
        quantities = {**paper, "train_acc1": acc1, "train_acc5": acc5, "avg_cos_margin": margins.mean().item(),
                      "all_cos_margin": np.sort(to_numpy(margins)),
                      "nuclear_ratio": nc.nuclear_ratio(self.H, self.y, self.K)}
        return {nc.INFO_KEYS[k]: to_numpy(v) if torch.is_tensor(v) else v for k, v in quantities.items()}

    def entries(self, W, b, measures=()):
        """Every training-set entry of info.pkl: the paper's, and those --measures and --layers add."""
        out = self.result(W, b)
        if measures or self.layers:
            out.update(self.more_result(W, measures))
        return out

    def more_result(self, W, measures):
        """The entries of info.pkl that --measures and --layers add (the training set's; ncc_test is
        the test pass's)."""
        out = nc.more_metrics(self.stats, W, measures)
        if "ncc" in measures:
            out["ncc_train"] = nc.ncc_agreement(self.H, self.pred, nc.mu_c(self.stats))
        if self.layers:
            out["layers"] = {name: nc.layer_measures(self.H if name == "h" else H, self.y, self.K, self.pred)
                             for name, H in self.layers.items()}
            out["layer_names"] = list(self.layers)
        return out


def all_reduce_sum(t):
    import torch.distributed as dist
    t = t.clone()
    dist.all_reduce(t)
    return t


def gather_rows(t):
    """Every rank's rows of t, concatenated in rank order (ranks may hold different numbers of rows)."""
    sizes = nc._all_gather(torch.tensor([len(t)], device=t.device))
    most = int(max(sizes).item())
    padded = torch.zeros((most,) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[:len(t)] = t
    return torch.cat([part[:int(n.item())] for part, n in zip(nc._all_gather(padded), sizes)])


def to_numpy(t):
    return t.detach().cpu().numpy()


def last_layer(model):
    """(W, b) of model.fc; b is zeros without a bias."""
    W, b = model.fc.weight, model.fc.bias
    return W, torch.zeros(W.shape[0], device=W.device) if b is None else b


class EvalForward:
    """Validation's forward pass: (logits, h) = forward(x) of `model` in eval mode, as fast as fp32 allows.

    It runs a copy with BatchNorm folded into the preceding layers (models/fold.py: the same function up
    to float rounding; on a CPU one pass over each activation instead of two). On a GPU its convolutions
    run in IEEE float32, not PyTorch's default TF32, and, unless layer hooks must see each module run,
    a full-size batch is replayed as one CUDA graph (the kernels of an eager pass, launched at once);
    other sizes run eagerly, and so does every pass after a capture that failed (said once, in one
    line). The outputs of a replay are the graph's own tensors: use them before the next call (in
    stream order, as everything here does)."""

    capture_failed = False  # for the whole process: each checkpoint's pass would fail the same way

    def __init__(self, model, graph=True):
        self.module = fold_batchnorm(model)
        self.cuda = model.fc.weight.is_cuda
        self.use_graph = graph and self.cuda and not EvalForward.capture_failed
        self.graph = None  # a Captured forward pass of the first full-size batch

    @torch.no_grad()
    def __call__(self, x):
        with fp32_convolutions() if self.cuda else nullcontext():
            if not self.use_graph or (self.graph is not None and x.shape != self.graph.inputs[0].shape):
                return self.module(x)
            with torch.cuda.device(x.device):
                if self.graph is not None:
                    self.graph.load(x)
                    return self.graph.replay()
                on_side_stream(self.module, x)  # warm-up off the capture stream: cuDNN tuning, the allocator
                try:
                    self.graph = Captured(self.module, (x,))  # records only: nothing has run if it fails
                except RuntimeError as e:
                    EvalForward.capture_failed, self.use_graph = True, False
                    print(f"note: validation's forward pass cannot be captured as a CUDA graph "
                          f"({str(e)[:160]}); it runs eagerly", file=sys.stderr)
                    return self.module(x)
                return self.graph.replay()


@torch.no_grad()
def training_pass(model, loader, num_classes, measures=(), layers=(), forward=None):
    """The TrainingSetMetrics of one forward pass over `loader` (model in eval mode); with `layers`,
    each named layer's features too, taken by forward hooks in the same pass."""
    device = model.fc.weight.device
    forward = forward or EvalForward(model, graph=not layers)
    train = TrainingSetMetrics(num_classes, models.feature_dim(model), datasets.num_samples(loader), device,
                               keep_pred="ncc" in measures or bool(layers), layers=layers)
    with LayerHooks(forward.module, layers) as hooks:
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            logits, h = forward(x)
            train.add(logits, h, y, hooks.features)
    return train


def training_set_metrics(model, loader, num_classes, measures=(), layers=()):
    """The training-set entries of info.pkl, from one forward pass over `loader` (model in eval mode)."""
    return training_pass(model, loader, num_classes, measures, layers).entries(*last_layer(model), measures)


@torch.no_grad()
def evaluate(model, train_loader, test_loader, num_classes, measures=(), layers=()):
    """Every per-checkpoint quantity of info.pkl, in one forward pass over each split; `measures`
    (names of nc.MEASURES) and `layers` (of layer_taps) add their entries."""
    model.eval()
    device = model.fc.weight.device
    forward = EvalForward(model, graph=not layers)
    train_pass = training_pass(model, train_loader, num_classes, measures, layers, forward)
    train = train_pass.entries(*last_layer(model), measures)
    # The test set's NCC agreement is measured against the training class means, known by now.
    train_means = nc.mu_c(train_pass.stats) if "ncc" in measures else None
    ncc_hits = torch.zeros((), dtype=torch.float64, device=device)
    test_hits = torch.zeros(2, dtype=torch.float64, device=device)
    test_sum = torch.zeros(models.feature_dim(model), dtype=torch.float64, device=device)
    for x, y in test_loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        logits, h = forward(x)
        test_hits += nc.topk_hits(logits, y)
        test_sum += h.to(torch.float64).sum(0)
        if train_means is not None:
            ncc_hits += nc.ncc_hits(h, logits.argmax(1), train_means)
    n_test = datasets.num_samples(test_loader)
    if world()[1] > 1:  # this rank's block of the test set
        test_hits, test_sum = all_reduce_sum(test_hits), all_reduce_sum(test_sum)
        n_test = int(all_reduce_sum(torch.tensor(n_test, device=device)).item())
    acc1, acc5 = (100 * test_hits / n_test).tolist()
    extra = {"ncc_test": (ncc_hits / n_test).item()} if train_means is not None else {}
    return {**train, "test_acc1": acc1, "test_acc5": acc5,
            "mu_G_test": to_numpy(test_sum / n_test), **extra}


def load_checkpoint(model, path, device):
    """Load a state_dict; None on success, else the reason it cannot be used."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
        model.load_state_dict(state)
    except Exception as e:
        return (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
    if not all_finite(state):
        return "its weights are not finite (the run diverged)"
    return None


def main(argv=None):
    if torchrun_env() is None:
        return main_one(argv)
    # Under torchrun every rank evaluates its block of the data and the statistics are merged
    # (see evaluate); rank 0 alone holds the lock and writes.
    init_distributed()
    try:
        return main_one(argv)
    finally:
        end_distributed()


def main_one(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = validate_parser()
    cli = parser.parse_args(argv)
    cli.load_path = run_dir = os.path.normpath(cli.load_path)
    if not os.path.isdir(run_dir):
        raise UserError(f"--load_path {run_dir} is not a directory; give a run directory such as model_weights/<uid>")
    if not rundir.list_checkpoints(run_dir, cli.epochs) and not rundir.result_epochs(run_dir):
        raise UserError(f"no checkpoints named epoch_NNN.pth in {run_dir}; train first, or check --load_path")
    measures = parse_measures(cli.measures)
    recorded = rundir.read_args(run_dir)
    args = run_arguments(cli, explicit_args(parser, argv))
    rundir.results_dir(run_dir)  # refuses a file in the way before any work
    distributed = torchrun_env() is not None
    if distributed and (measures or cli.layers is not None):
        raise UserError("--measures and --layers are measured by one process: run validate_NC.py without torchrun")
    device = rank_device(args.device) if distributed else get_device(args.gpu_id, args.device)
    lock = rundir.locked(run_dir, rundir.VALIDATE_LOCK, "validated",
                         fix="validation writes info.pkl and nc_results/ there: make it writable, or validate a copy "
                             "of it (--load_path)")
    with lock if is_rank_zero() else nullcontext():
        if is_rank_zero() and network(rundir.read_args(run_dir)) != network(recorded):  # read before the lock
            raise UserError(f"{run_dir} was started over with another model or data by another process as this "
                            "validation began: run it again")
        return validate(args, run_dir, rundir.list_checkpoints(run_dir, cli.epochs), device, cli.epochs,
                        measures, cli.layers)


def network(record):
    """What validation takes from a run's record to build its model and data."""
    return {k: (record or {}).get(k) for k in MODEL_FLAGS + ("sample_size",)}


def validate(args, run_dir, checkpoints, device, max_epoch=None, measures=(), layers=None):
    """layers: None (no per-layer measures), [] (every layer) or layer names."""
    data = datasets.load_data(args.dataset, args.data_dir, args.sample_size, args.SOTA)
    model, channels_last = models.build_on_device(args, data.num_classes, device)
    layers = () if layers is None else select_layers(model, layers)
    measurement = Measurement(run_dir, args, data, model, device, channels_last, args.batch_size, measures, layers)
    in_range = (lambda e: True) if max_epoch is None else (lambda e: e <= max_epoch)
    # Epochs measured during training whose checkpoints were not kept: their results are all there is
    # (without the extra measures, if they were measured without them: those entries are None).
    results, other, unreadable = {}, [], []
    for e in rundir.result_epochs(run_dir):
        if in_range(e) and not os.path.exists(rundir.checkpoint_path(run_dir, e)):
            r = measurement.stored(e) or measurement.stored_paper(e)
            if r is not None:
                results[e] = r
            else:
                (unreadable if rundir.stored_results(run_dir, e) is None else other).append(e)
    if other:
        warnings.warn(f"{rundir.INFO} leaves out {epochs_text(other)}: measured during training on other data or by "
                      "other code, without a kept checkpoint, so not measurable here (the results stay in "
                      f"{rundir.RESULTS}/)")
    skipped, computed, t0 = [], 0, time.time()
    # Under torchrun, rank 0 decides what is reused (its writes must not change another rank's answer)
    reuse = broadcast_from_rank_zero({e: measurement.stored(e) for e, _ in checkpoints} if is_rank_zero() else None) \
        if world()[1] > 1 else None
    quiet = {} if is_rank_zero() else {"disable": True}  # (passed only when set: TQDM_DISABLE still works)
    for epoch, path in tqdm(checkpoints, desc="validating", dynamic_ncols=True, **quiet):
        result = measurement.stored(epoch) if reuse is None else reuse[epoch]
        if result is None:
            reason = load_checkpoint(model, path, device)
            if reason is None:
                result, reason = measurement.measure(epoch)
            if reason is not None:
                warnings.warn(f"skipping {path}: {reason}")
                skipped.append(epoch)
                continue
            computed += 1
        results[epoch] = result
    if not results:  # info.pkl stays as it is
        raise UserError(f"none of the {len(checkpoints)} checkpoints in {run_dir} could be evaluated; "
                        "were they written by this repository for this model?")
    if not is_rank_zero():
        return None

    def keep(e):
        """Whether an earlier info.pkl's entry of an epoch not in results stays: all do but those of
        epochs without a checkpoint whose results nc_results/ holds under other keys (left out above)."""
        return not in_range(e) or e not in other
    info = write_info(run_dir, results, keep)
    epochs = info["epochs"]
    kept = [e for e in epochs if e not in results and in_range(e)]
    if kept:
        unmeasurable = [e for e in kept if e in skipped]
        damaged = [e for e in kept if e in unreadable]
        gone = [e for e in kept if e not in skipped + unreadable
                and not os.path.exists(rundir.checkpoint_path(run_dir, e))]
        why = [(unmeasurable, "their checkpoints cannot be measured"),
               (damaged, f"their files in {rundir.RESULTS}/ cannot be read, and their checkpoints are gone"),
               (gone, f"neither their checkpoints nor their results in {rundir.RESULTS}/ are left")]
        warnings.warn(f"{rundir.INFO} keeps its earlier results of "
                      + "; ".join(f"{epochs_text(es)} ({reason})" for es, reason in why if es))
    lost = [e for e in unreadable if e not in epochs]
    if lost:
        warnings.warn(f"{rundir.INFO} leaves out {epochs_text(lost)}: the files in {rundir.RESULTS}/ cannot be read, "
                      "and the checkpoints are gone")
    print(f"validated {len(results)} epochs ({computed} computed, {len(results) - computed} reused, "
          f"{len(skipped)} skipped) in {time.time() - t0:.1f} s; wrote {run_dir}/{rundir.INFO}"
          + (f" ({len(epochs)} epochs)" if len(epochs) != len(results) else ""))
    print("last " + format_line(epochs[-1], {k: v[-1] for k, v in info.items() if k != "epochs"}))
    return info


def epochs_text(epochs):
    """Epochs in words, as ranges: [1, 2, 3, 5] -> 'epochs 1-3, 5'; [4] -> 'epoch 4'."""
    parts, epochs = [], sorted(epochs)
    for i, e in enumerate(epochs):
        if i and e == epochs[i - 1] + 1:
            parts[-1][1] = e
        else:
            parts.append([e, e])
    return ("epochs " if len(epochs) > 1 else "epoch ") + ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in parts)


def earlier_info(run_dir):
    """{epoch: entry} of the info.pkl there now; {} (with a warning) when it cannot be read."""
    try:
        return rundir.info_entries(run_dir)
    except OSError:  # the file system's refusal (a folder in the way, ...), said by run_main
        raise
    except Exception as e:
        warnings.warn(f"{os.path.join(run_dir, rundir.INFO)} cannot be read ({' '.join(str(e).split())[:120]}): "
                      "it is written anew from the results at hand")
        return {}


def write_info(run_dir, results, keep=lambda epoch: True):
    """info.pkl and test_log.txt of results = {epoch: result}, and of the entries of the info.pkl there
    now whose epochs are not in results and for which keep(epoch) holds: rebuilt, info.pkl never loses
    a result that can be found nowhere else. The keys of --measures and --layers are written when a
    result has them; an epoch measured without them gets None there. Returns the info dict."""
    with rundir.results_locked(run_dir):  # read, merge and write in one turn
        results = {**{e: r for e, r in earlier_info(run_dir).items() if e not in results and keep(e)}, **results}
        extra = [k for k in EXTRA_KEYS if any(k in r for r in results.values())]
        lacking = sorted(e for e, r in results.items() if any(k not in r for k in extra))
        if lacking:
            warnings.warn(f"{epochs_text(lacking)}: measured without some of {', '.join(extra)} (the checkpoints "
                          "are gone), so None there in info.pkl")
        keys = INFO_KEYS + tuple(extra)
        results = {e: {**{k: None for k in keys}, **r} for e, r in results.items()}
        return rundir.write_info(run_dir, results, keys, format_line)


def format_line(epoch, r):
    def number(key, spec):  # an entry kept from an older info.pkl may lack a key
        return "-" if r.get(key) is None else format(r[key], spec)
    return (f"epoch {epoch}: NC1 {number('collapse_metric', '.4g')} NC2 {number('ETF_metric', '.4g')} "
            f"NC3 {number('WH_relation_metric', '.4g')} NC4 {number('Wh_b_relation_metric', '.4g')} | "
            f"train acc {number('train_acc1', '.2f')} test acc {number('test_acc1', '.2f')}")


if __name__ == "__main__":
    warnings.formatwarning = lambda message, category, *args, **kwargs: f"warning: {message}\n"
    run_main(main)
