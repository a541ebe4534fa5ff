"""The plotting helper behind every plot script: load the info.pkl of a set of runs and draw,
one figure per quantity against epoch, the curves of all runs in the paper's look.

Figures written to the output folder, each as .png and .pdf:

    NC1            NC1 = (1/K) tr(Sigma_W Sigma_B^+), log y axis
    NC2            distance of the centred classifier to a simplex ETF
    NC3            distance between the centred classifier and the class means (self-duality)
    NC4            ||W mu_G + b||
    train_acc      top-1 training accuracy (%)
    test_acc       top-1 test accuracy (%)
    avg_cos_margin mean cosine margin over the training set
    nuclear_ratio  mean over classes of ||H_k||_* / ||H_k||_F
    cos_margin_all sorted cosine margins of all training samples, at the last checkpoint
    cos_margin_low the lowest 1% of those margins (at least 10 samples; 500 of CIFAR-10's and of
                   mini-ImageNet's 50,000), where the misclassified and hardest samples sit;
                   --margin_head K shows the K lowest instead

With --keys KEY ..., also any stored scalar key of info.pkl against epoch (one figure per key, named
after it; e.g. the keys validate_NC.py --measures adds). Runs validated with --layers also get, per
run and per quantity (NC1, trace_ratio, ncc):

    <label>_layers_<quantity>_depth   the quantity against depth, one curve per checked epoch
    <label>_layers_<quantity>_epoch   the quantity against epoch, one curve per layer

Markers sit every 25 epochs on the paper's 200-epoch runs (about 8 per curve on shorter runs,
or every --markevery epochs). Runs that end at different epochs are drawn with a one-line warning
naming the short ones. Nothing is drawn or read at import time.
"""
import argparse
import math
import numbers
import os
import re
import sys

import matplotlib

matplotlib.use("Agg")  # files only: no display needed, and no GUI backend is ever picked up
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import FuncFormatter, MaxNLocator  # noqa: E402

from args import Parser, path, positive_int  # noqa: E402
from nclib import rundir  # noqa: E402
from nclib import runs as paper_runs  # noqa: E402
from nclib.base import UserError, first_line  # noqa: E402
from nclib.nc import INFO_KEYS, LAYER_MEASURES  # noqa: E402
from nclib.rundir import INFO, info_epochs  # noqa: E402

# (file name, quantity, y-axis label, log y axis); the quantity's info.pkl key is nc.INFO_KEYS[quantity]
CURVES = tuple((name, INFO_KEYS[quantity], ylabel, log) for name, quantity, ylabel, log in (
    ("NC1", "NC1", r"$\mathcal{NC}_1$", True),
    ("NC2", "NC2", r"$\mathcal{NC}_2$", False),
    ("NC3", "NC3", r"$\mathcal{NC}_3$", False),
    ("NC4", "NC4", r"$\mathcal{NC}_4$", False),
    ("train_acc", "train_acc1", "Training accuracy (%)", False),
    ("test_acc", "test_acc1", "Test accuracy (%)", False),
    ("avg_cos_margin", "avg_cos_margin", "Average cosine margin", False),
    ("nuclear_ratio", "nuclear_ratio", r"$\|\mathbf{H}_k\|_* \,/\, \|\mathbf{H}_k\|_F$", False),
))
MARGIN_KEY = INFO_KEYS["all_cos_margin"]
MARGIN_FIGURES = ("cos_margin_all", "cos_margin_low")
FIGURE_NAMES = tuple(c[0] for c in CURVES) + MARGIN_FIGURES

MARGIN_HEAD_FRACTION = 0.01  # cos_margin_low: the lowest 1% of the training samples ...
MARGIN_HEAD_MIN = 10         # ... but never fewer than 10
PAPER_MARKEVERY = 25         # epochs between markers on runs of 100 epochs or more
DEPTH_CURVES = 8             # at most this many epochs drawn against depth
LAYER_LABELS = {"NC1": r"$\mathcal{NC}_1$", "trace_ratio": r"$\mathrm{tr}(\Sigma_W) / \mathrm{tr}(\Sigma_B)$",
                "ncc": "NCC agreement"}
LOG_KEYS = {INFO_KEYS["NC1"], "trace_ratio_metric", "cdnv_metric"}  # --keys drawn on a log axis

# The look: a 10 x 8 inch canvas with thick lines and large type, so that a panel shrunk to a
# quarter of a column in the paper stays readable.
STYLE = {
    "figsize": (10, 8), "linewidth": 4, "markersize": 15, "alpha": 0.85,
    "label_size": 36, "tick_size": 28, "legend_size": 26, "legend_size_long": 15,
}
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
          "#7f7f7f", "#bcbd22")
LONG_LABEL = 24  # characters; longer legend labels are set small, under the axes
MARKERS = ("o", "s", "^", "D", "v", "p", "*", "X", "P", "<")


# ---------------------------------------------------------------------------- loading

def load_info(run_dir, label=None, hint=""):
    """The info dict of a run directory. A missing directory, a missing or unreadable info.pkl,
    or one without checkpoints is a UserError whose one-line message names the run."""
    who = f"run {label!r} ({run_dir})" if label is not None else f"run {run_dir}"
    if not os.path.isdir(run_dir):
        raise UserError(f"{who} not found{hint}")
    path = os.path.join(run_dir, INFO)
    if not os.path.isfile(path):
        raise UserError(f"{who} has no {INFO}: validate it with "
                        f"python validate_NC.py --load_path {run_dir} --batch_size 1024")
    try:
        info = rundir.read_info(run_dir)
    except Exception as e:
        first = first_line(e, 120)
        raise UserError(f"{who}: cannot read {path} ({first}); rerun validate_NC.py on it")
    if not info_epochs(info):
        raise UserError(f"{who}: {path} holds no checkpoints; rerun validate_NC.py on it")
    return info


# ---------------------------------------------------------------------------- drawing

def marker_indices(epochs, markevery=None):
    """Indices of the points that get a marker: epochs that are multiples of `markevery`
    (default 25 on runs reaching epoch 100, else about 8 markers per curve)."""
    last = max(epochs)
    step = markevery or (PAPER_MARKEVERY if last >= 100 else max(1, round(last / 8)))
    idx = [i for i, e in enumerate(epochs) if e % step == 0]
    return idx or [len(epochs) - 1]


def has_margins(info):
    return MARGIN_KEY in info and len(info[MARGIN_KEY]) > 0


def margin_head_size(n, margin_head=None):
    if margin_head:
        return min(n, margin_head)
    return min(n, max(MARGIN_HEAD_MIN, math.ceil(MARGIN_HEAD_FRACTION * n)))


def _style_axes(ax, xlabel, ylabel, labels):
    ax.set_xlabel(xlabel, fontsize=STYLE["label_size"])
    ax.set_ylabel(ylabel, fontsize=STYLE["label_size"])
    ax.tick_params(axis="both", which="major", labelsize=STYLE["tick_size"], length=8, width=1.5)
    # labelsize of the minor ticks too: a log axis spanning less than a decade labels its minor ticks
    ax.tick_params(axis="both", which="minor", length=4, labelsize=STYLE["tick_size"] * 0.8)
    ax.yaxis.get_offset_text().set_fontsize(STYLE["tick_size"] * 0.8)
    ax.grid(True, which="major", linestyle="-", alpha=0.4)
    if max((len(s) for s in labels), default=0) > LONG_LABEL:
        # Long labels (run directory names) would cover the curves: the legend goes under the axes.
        ax.legend(fontsize=STYLE["legend_size_long"], loc="upper center", bbox_to_anchor=(0.5, -0.2),
                  frameon=False, handlelength=2.5)
    else:
        ax.legend(fontsize=STYLE["legend_size"], framealpha=0.85, handlelength=2.5)


def _save(fig, out_dir, name):
    paths = []
    for ext in ("png", "pdf"):
        path = os.path.join(out_dir, f"{name}.{ext}")
        # No creation date in the PDF: the same data gives the same file.
        fig.savefig(path, bbox_inches="tight", dpi=100, metadata={"CreationDate": None} if ext == "pdf" else None)
        paths.append(path)
    plt.close(fig)
    return paths


def _line_kwargs(i):
    return dict(color=COLORS[i % len(COLORS)], marker=MARKERS[i % len(MARKERS)], linewidth=STYLE["linewidth"],
                markersize=STYLE["markersize"], alpha=STYLE["alpha"])


def draw_curve(runs, key, ylabel, log, markevery=None):
    """One figure: `key` against epoch for every (label, info) that has it; None if none has."""
    have = [(i, label, info) for i, (label, info) in enumerate(runs) if key in info]
    if not have:
        return None
    fig, ax = plt.subplots(figsize=STYLE["figsize"])
    for i, label, info in have:
        epochs = info_epochs(info)
        values = np.asarray(info[key], dtype=float)
        plot = ax.semilogy if log else ax.plot
        plot(epochs, values, label=label, markevery=marker_indices(epochs, markevery), **_line_kwargs(i))
    _style_axes(ax, "Epoch", ylabel, [h[1] for h in have])
    return fig


def draw_margins(runs, head=False, margin_head=None):
    """Sorted cosine margins of the training samples at each run's last checkpoint: all of them,
    or (head) the lowest 1% / the lowest `margin_head`."""
    have = [(i, label, info) for i, (label, info) in enumerate(runs) if has_margins(info)]
    if not have:
        return None
    fig, ax = plt.subplots(figsize=STYLE["figsize"])
    exact_fraction = True  # every run shows exactly its lowest 1%
    for i, label, info in have:
        margins = np.sort(np.asarray(info[MARGIN_KEY][-1], dtype=float).ravel())
        if head:
            k = margin_head_size(len(margins), margin_head)
            exact_fraction &= k == math.ceil(MARGIN_HEAD_FRACTION * len(margins))
            margins = margins[:k]
        rank = np.arange(1, len(margins) + 1)
        ax.plot(rank, margins, label=label, markevery=max(1, len(margins) // 8), **_line_kwargs(i))
    ax.axhline(0.0, color="black", linewidth=1.5, linestyle="--", alpha=0.7)  # below: misclassified
    ax.xaxis.set_major_locator(MaxNLocator(nbins=5, steps=[1, 2, 5, 10], integer=True))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x / 1000:g}k" if abs(x) >= 1000 else f"{x:g}"))
    if not head:
        xlabel = "Training samples (sorted)"
    elif margin_head:
        xlabel = f"Lowest {margin_head} training samples"
    elif exact_fraction:
        xlabel = f"Lowest {MARGIN_HEAD_FRACTION:.0%} of training samples"
    else:  # small training sets: at least MARGIN_HEAD_MIN samples, more than 1%
        xlabel = "Lowest-margin training samples"
    _style_axes(ax, xlabel, "Cosine margin", [h[1] for h in have])
    return fig


def is_scalar_key(info, key):
    """Whether info[key] holds one number (or None, for an epoch measured without it) per epoch."""
    values = info.get(key)
    return (isinstance(values, (list, tuple)) and
            all(v is None or isinstance(v, numbers.Real) or (np.ndim(v) == 0 and np.issubdtype(np.asarray(v).dtype, np.number))
                for v in values) and any(v is not None for v in values))


def check_keys(runs, keys):
    """--keys: each must be a scalar key of some run's info.pkl; else a UserError listing those there are."""
    for key in keys:
        if not any(is_scalar_key(info, key) for _, info in runs):
            scalars = sorted({k for _, info in runs for k in info if k != "epochs" and is_scalar_key(info, k)})
            raise UserError(f"--keys {key}: no run has it as a number per epoch; the runs have {', '.join(scalars)}")


def _layer_series(info, quantity):
    """(epochs, layer names, values (epochs x layers)) of a run's per-layer measures; epochs without them left out."""
    pairs = [(e, layers) for e, layers in zip(info_epochs(info), info["layers"]) if layers]
    names = list(pairs[-1][1])
    values = np.array([[layers.get(n, {}).get(quantity, np.nan) for n in names] for _, layers in pairs], dtype=float)
    return [e for e, _ in pairs], names, values


def draw_layers_vs_depth(info, quantity):
    """One run's quantity against depth, one curve per checked epoch (at most DEPTH_CURVES, the last included)."""
    epochs, names, values = _layer_series(info, quantity)
    picks = sorted(set(np.linspace(0, len(epochs) - 1, min(DEPTH_CURVES, len(epochs))).round().astype(int)))
    fig, ax = plt.subplots(figsize=STYLE["figsize"])
    plot = ax.semilogy if quantity != "ncc" else ax.plot
    for j, i in enumerate(picks):
        plot(range(len(names)), values[i], label=f"epoch {epochs[i]}", **_line_kwargs(j))
    ax.set_xticks(range(len(names)), names, rotation=30 if len(names) > 5 else 0)
    _style_axes(ax, "Layer", LAYER_LABELS.get(quantity, quantity), [f"epoch {epochs[i]}" for i in picks])
    return fig


def draw_layers_vs_epoch(info, quantity, markevery=None):
    """One run's quantity against epoch, one curve per layer."""
    epochs, names, values = _layer_series(info, quantity)
    fig, ax = plt.subplots(figsize=STYLE["figsize"])
    plot = ax.semilogy if quantity != "ncc" else ax.plot
    for j, name in enumerate(names):
        plot(epochs, values[:, j], label=name, markevery=marker_indices(epochs, markevery), **_line_kwargs(j))
    _style_axes(ax, "Epoch", LAYER_LABELS.get(quantity, quantity), names)
    return fig


def layer_quantities(info):
    """The per-layer quantities a run holds: nc.LAYER_MEASURES, then those of registered per-layer measures."""
    found = [q for layers in info["layers"] if layers for entry in layers.values() for q in entry]
    return list(LAYER_MEASURES) + [q for q in dict.fromkeys(found) if q not in LAYER_MEASURES]


def layer_figures(runs, markevery=None):
    """[(file name, figure)] of the per-layer measures of every run that has them."""
    figures = []
    for label, info in runs:
        if not any(info.get("layers") or []):
            continue
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", label)
        for quantity in layer_quantities(info):
            figures.append((f"{stem}_layers_{quantity}_depth", draw_layers_vs_depth(info, quantity)))
            figures.append((f"{stem}_layers_{quantity}_epoch", draw_layers_vs_epoch(info, quantity, markevery)))
    return figures


def plot_infos(runs, out_dir, markevery=None, margin_head=None, keys=()):
    """Draw every figure for runs = [(label, info)] into out_dir (and one per `keys`, any scalar key of
    info.pkl). Returns the written paths."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        if not os.access(out_dir, os.W_OK):
            raise PermissionError(13, "not writable")
    except OSError as e:
        raise UserError(f"cannot write figures to --out_dir {out_dir} ({e.strerror}): choose another folder")
    figures = [(name, draw_curve(runs, key, ylabel, log, markevery)) for name, key, ylabel, log in CURVES]
    figures += [(name, draw_margins(runs, head, margin_head)) for name, head in zip(MARGIN_FIGURES, (False, True))]
    figures += [(re.sub(r"[^A-Za-z0-9_.-]+", "_", key), draw_curve([(label, info) for label, info in runs
                                                                    if is_scalar_key(info, key)],
                                                                   key, key, key in LOG_KEYS, markevery))
                for key in keys]
    figures += layer_figures(runs, markevery)
    written = [path for name, fig in figures if fig is not None for path in _save(fig, out_dir, name)]
    missing = [name for name, fig in figures if fig is None]
    for label, info in runs:
        lacks = [key for _, key, _, _ in CURVES if key not in info] + ([] if has_margins(info) else [MARGIN_KEY])
        if lacks:
            print(f"warning: run {label!r} has no {', '.join(lacks)} in its {INFO}: left out of those figures",
                  file=sys.stderr)
    if missing:
        print(f"warning: no run has the data of {', '.join(missing)}: not drawn", file=sys.stderr)
    return written


def unequal_epochs(runs):
    """One line naming each run of runs = [(label, info)] that ends before the others, or None when
    all end at the same epoch: their curves stop early, and the last-epoch margin figures would
    set a run of less training beside the others."""
    last = [(label, max(info_epochs(info))) for label, info in runs]
    longest = max(epoch for _, epoch in last)
    short = [f"run {label!r} ends at epoch {epoch}" for label, epoch in last if epoch < longest]
    if not short:
        return None
    rest = len(last) - len(short)
    return (f"warning: {', '.join(short)}, the other {'run' if rest == 1 else f'{rest} runs'} at epoch {longest}: "
            "the curves stop early and the last-epoch margin figures compare unequal training")


def plot_runs(runs, out_dir, markevery=None, margin_head=None, skip_missing=False, hint="", keys=()):
    """runs = [(label, run directory)]. Every info.pkl is read before anything is written; a run
    that cannot be read is a UserError (with skip_missing: a warning, and the run is left out)."""
    labels = [label for label, _ in runs]
    twice = sorted({label for label in labels if labels.count(label) > 1})
    if twice:
        raise UserError(f"label {twice[0]!r} is given to more than one run; labels must tell runs apart")
    loaded = []
    for label, run_dir in runs:
        try:
            loaded.append((label, load_info(run_dir, label, hint)))
        except UserError as e:
            if not skip_missing:
                raise
            print(f"warning: {e}; left out", file=sys.stderr)
    if not loaded:
        raise UserError("none of the runs could be read: nothing to plot")
    check_keys(loaded, keys)
    mismatch = unequal_epochs(loaded)
    if mismatch:
        print(mismatch, file=sys.stderr)
    written = plot_infos(loaded, out_dir, markevery, margin_head, keys)
    runs_word = "run" if len(loaded) == 1 else "runs"
    print(f"wrote {len(written) // 2} figures (png and pdf) of {len(loaded)} {runs_word} to {out_dir}/")
    return written


# ---------------------------------------------------------------------------- command line

def label_dir(text):
    """argparse type of --runs: LABEL=DIR, split at the last '=' (labels such as 'd=10' are fine)."""
    label, sep, run_dir = text.rpartition("=")
    if not sep or not label or not run_dir:
        raise argparse.ArgumentTypeError(f"expected LABEL=DIR, got {text!r}")
    return label, run_dir


def script_name(script):
    return os.path.splitext(os.path.basename(script))[0]


def base_parser(script, description=None, epilog=None):
    """The options every plot script shares: --root, --out_dir (figures/<script>/), the look."""
    p = Parser(description=description, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=path, default="model_weights",
                   help="folder holding the run directories (default: %(default)s)")
    p.add_argument("--out_dir", type=path, default=os.path.join("figures", script_name(script)),
                   help="where the .png and .pdf files go (default: %(default)s)")
    p.add_argument("--markevery", type=positive_int, default=None, metavar="EPOCHS",
                   help="epochs between markers (default: 25, or about 8 markers per curve on runs under 100 epochs)")
    p.add_argument("--margin_head", type=positive_int, default=None, metavar="K",
                   help="cos_margin_low shows the K lowest margins (default: the lowest 1%%, at least 10)")
    p.add_argument("--skip_missing", action="store_true",
                   help="leave out, with a warning, runs that are missing or not validated yet")
    return p


def figure_parser(script, description, table):
    """base_parser plus --runs, for a figure script whose default runs are `table` (label -> run name)."""
    width = max(len(label) for label in table)
    epilog = "default runs (under --root):\n" + "\n".join(f"  {label:<{width}}  {name}"
                                                         for label, name in table.items())
    p = base_parser(script, description, epilog)
    p.add_argument("--runs", nargs="+", type=label_dir, default=None, metavar="LABEL=DIR",
                   help="plot these runs instead of the paper's; DIR is relative to --root or absolute")
    return p


def resolve(root, run_dir):
    return os.path.join(os.path.expanduser(root), os.path.expanduser(run_dir))  # an absolute DIR ignores root


def figure_main(script, figure, description=None, argv=None):
    """The whole of a figure script: parse argv, plot the paper's runs of `figure` (a key of
    runs.FIGURES), or --runs, under --root."""
    table = paper_runs.figure_runs(figure)
    args = figure_parser(script, description, table).parse_args(argv)
    pairs = args.runs if args.runs is not None else list(table.items())
    runs = [(label, resolve(args.root, run_dir)) for label, run_dir in pairs]
    hint = ""
    if args.runs is None:
        hint = f"; train and validate it (python experiments.py --figure {figure} prints the commands), or set --root"
    return plot_runs(runs, args.out_dir, args.markevery, args.margin_head, args.skip_missing, hint)
