"""Measuring a model, in one place: its forward pass as validation runs it (BatchNorm folded, IEEE
float32, a CUDA graph where it can), the features of its layers (taps and hooks), the statistics
accumulated batch by batch into the entries of info.pkl, and each epoch's result kept in the run
directory. validate_NC.py, training's in-run measurement (--nc_every) and ufm.py all measure
through this module, so their numbers are the same and each reuses the other's stored results.
"""
import hashlib
import os
import sys
import warnings
from contextlib import nullcontext

import numpy as np
import torch
from torch import nn

import datasets
import models
from args import MODEL_FLAGS
from models.fold import fold_batchnorm
from models.resnet import ResNet
from nclib import nc, rundir
from nclib.base import UserError, all_finite, first_line
from nclib.distributed import gather_rows, is_rank_zero, merged_stats, sum_over_ranks, world
from nclib.steps import Captured, fp32_convolutions, on_side_stream

# Raise when the numbers a result holds change meaning: stored results of another version are recomputed.
METRIC_VERSION = 2


# info.pkl: one list entry per evaluated checkpoint under each key (the original code's key names).
INFO_KEYS = tuple(nc.INFO_KEYS.values())


def extra_keys():
    """The keys --measures and --layers add, in the order info.pkl lists them (read from the registry
    when asked, so that a measure registered later is among them)."""
    return tuple(key for measure in nc.MEASURES.values() for key in measure.keys) + ("layers", "layer_names")


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


# ---------------------------------------------------------------------------- one model, one data set


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

    @classmethod
    def of(cls, logits, H, y, num_classes, keep_pred=False):
        """The metrics of features held whole, H (N, d) with labels y (N,) and logits (N, K) (the UFM's):
        H is kept as it is given, in its own dtype and memory layout (no copy), so the numbers are
        those of the tensor itself."""
        metrics = cls(num_classes, H.shape[1], 0, H.device, keep_pred)
        metrics.stats.update(H, y)
        metrics.H, metrics.y, metrics.filled = H, y, len(y)
        if keep_pred:
            metrics.pred = logits.argmax(1)
        metrics.hits += nc.topk_hits(logits, y)
        return metrics

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
            self.stats = merged_stats(self.stats)
            self.H, self.y = gather_rows(self.H[:self.filled]), gather_rows(self.y[:self.filled])
            self.hits = sum_over_ranks(self.hits)
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
        out = nc.more_metrics(self.stats, W, measures, self.H, self.y, self.pred)
        if self.layers:
            out["layers"] = {name: nc.layer_result(self.H if name == "h" else H, self.y, self.K, self.pred, measures)
                             for name, H in self.layers.items()}
            out["layer_names"] = list(self.layers)
        return out


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
        test_hits, test_sum = sum_over_ranks(test_hits), sum_over_ranks(test_sum)
        n_test = int(sum_over_ranks(torch.tensor(n_test, device=device)).item())
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
        return first_line(e)
    if not all_finite(state):
        return "its weights are not finite (the run diverged)"
    return None


# ---------------------------------------------------------------------------- info.pkl


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
        extra = [k for k in extra_keys() if any(k in r for r in results.values())]
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
