"""The runbook's scales: `paper` (runs.py's runs as the paper ran them) and `laptop` (the same
figures on the 5,000 real MNIST digits in data/, small enough for all five figures, their plots
and claims.py to finish in 30 minutes on a 2-core CPU: 21 minutes measured).

A scale is a table {figure: (plot script, {legend label: training flags})}, the run name of a
flag string, and the root its run directories go under (two scales never share one). The laptop
flags are the paper's with a few replaced; `differences(figure)` says which, and why, in one line.
"""
import os
import shlex

from nclib import runs
from nclib.base import UserError

PAPER_SEED = runs.parse("").seed  # args.py's default: the seed of every paper run
SECOND_SEED = 7  # the second seed of the reference runs: the spread an accuracy comparison allows
# The reference runs of the accuracy comparisons (etf-accuracy, dK-memory): the learned classifier
# at d = 512 and at d = K, by their labels in the etf figure.
REFERENCES = ("learned, $d=512$", "learned, $d=10$")

# ---------------------------------------------------------------------------- the laptop's choices

LAPTOP_ROOT = os.path.join("model_weights", "laptop")
LAPTOP_DATASET = "mnist_sample"  # 400 training and 100 test digits per class, offline
SAMPLE = 50  # training images per class (first-order runs): 500 images, 4 batches of 128
EPOCHS = 60
LBFGS_SAMPLE, LBFGS_EPOCHS = 20, 10  # LBFGS: one full batch of 200 images, 10 strong-Wolfe epochs
RMSE_LR = 0.002
NC_EVERY = 3  # NC measured every 3rd epoch and after the last: 21 points per curve

WHY = {
    "dataset": f"--dataset {LAPTOP_DATASET}: CIFAR-10 cannot be downloaded here; the 5,000 real MNIST digits "
               "ship in data/",
    "mini_imagenet": f"--dataset {LAPTOP_DATASET}: mini-ImageNet cannot be downloaded; the 5,000 real MNIST "
                     "digits ship in data/ (K = 100 becomes K = 10)",
    "SOTA": "--SOTA dropped: its crop and flip augmentations are meant for natural images (a flipped digit "
            "is another glyph), and the plain stem (stride 4 before layer1) is far cheaper on a CPU",
    "sample": f"--sample_size {SAMPLE} per class instead of all{{lbfgs}}",
    "epochs": f"--epochs {EPOCHS} --patience {EPOCHS // 5}{{lbfgs}} instead of 200 / 40: the same four "
              "learning-rate decays, in fewer epochs",
    "nc_every": f"--nc_every {NC_EVERY}: NC measured every {NC_EVERY} epochs, not every epoch",
    "rmse_lr": f"--lr {RMSE_LR} for RescaledMSE instead of 0.01: targets up to M = 10 and weights up to "
               "k = 20 scale its gradients up to 20x; an earlier laptop plan used this rate "
               "(divergence at 0.01 not re-measured here)",
    "seed": f"a second seed ({SECOND_SEED}) of the reference runs, for the spread of test accuracy",
}


# What a figure with an LBFGS run adds to a reason (its {lbfgs}).
LBFGS_WHY = {"sample": f" (LBFGS {LBFGS_SAMPLE}: its 200 images are one full batch of its 512, where the paper's "
                       "LBFGS took mini-batches)",
             "epochs": f" (LBFGS {LBFGS_EPOCHS} / {LBFGS_EPOCHS // 5})"}


def _replace(tokens, flag, value):
    """tokens with `flag value` set (replaced where present, appended where not)."""
    if flag in tokens:
        i = tokens.index(flag)
        return tokens[:i + 1] + [value] + tokens[i + 2:]
    return tokens + [flag, value]


def laptop_flags(flags):
    """The laptop run of a paper run's flag string (a flag string)."""
    args = runs.parse(flags)
    tokens = [t for t in shlex.split(flags) if t != "--SOTA"]
    tokens = _replace(tokens, "--dataset", LAPTOP_DATASET)
    lbfgs = args.optimizer == "LBFGS"
    epochs = LBFGS_EPOCHS if lbfgs else EPOCHS
    tokens = _replace(tokens, "--sample_size", str(LBFGS_SAMPLE if lbfgs else SAMPLE))
    tokens = _replace(tokens, "--epochs", str(epochs))
    tokens = _replace(tokens, "--patience", str(epochs // 5))
    if args.loss == "RescaledMSE":
        tokens = _replace(tokens, "--lr", str(RMSE_LR))
    return shlex.join(tokens)


def differences(figure):
    """One line: the laptop's flags that differ from the paper's in this figure, and why."""
    table = runs.FIGURES[figure][1]
    parsed = [runs.parse(f) for f in table.values()]
    lbfgs = any(a.optimizer == "LBFGS" for a in parsed)
    keys = ["mini_imagenet" if any(a.dataset == "mini_imagenet" for a in parsed) else "dataset"]
    keys += (["SOTA"] if any(a.SOTA for a in parsed) else [])
    keys += ["sample", "epochs", "nc_every"]
    if any(a.loss == "RescaledMSE" for a in parsed):
        keys.append("rmse_lr")
    if figure == "etf":
        keys.append("seed")
    return f"laptop scale, figure {figure}: " + "; ".join(
        WHY[k].replace("{lbfgs}", LBFGS_WHY.get(k, "") if lbfgs else "") for k in keys)


# ---------------------------------------------------------------------------- the scales

class Scale:
    """A scale of the runbook. paper: runs.py's table as it is; laptop: laptop_flags of each run,
    and in the etf figure a second seed of each reference run."""

    def __init__(self, name):
        self.name = name
        self.root = LAPTOP_ROOT if name == "laptop" else "model_weights"
        # the runbook's flags for what a run keeps: NC as it trains, few checkpoints
        self.keeping = ["--nc_every", str(NC_EVERY), "--save_every", str(EPOCHS)] if name == "laptop" else None

    def table(self, figure):
        """(plot script, {label: flags}) of a figure at this scale."""
        script, paper = runs.FIGURES[figure]
        if self.name == "paper":
            return script, dict(paper)
        table = {label: laptop_flags(flags) for label, flags in paper.items()}
        if figure == "etf":
            for label in REFERENCES:
                table[f"{label}, seed {SECOND_SEED}"] = f"{table[label]} --seed {SECOND_SEED}"
        return script, table

    def run_name(self, flags):
        """The authors' run name of the flags, plus _seed_<s> for a seed other than the paper's."""
        args = runs.parse(flags)
        return runs.run_name(args) + (f"_seed_{args.seed}" if args.seed != PAPER_SEED else "")

    def epochs(self, flags):
        return runs.parse(flags).epochs

    def figure_runs(self, figure):
        """{label: run name} of a figure at this scale."""
        return {label: self.run_name(flags) for label, flags in self.table(figure)[1].items()}

    def second_seed(self, figure, label):
        """The flags of the second seed of a reference run (laptop: in the table; paper: not in the
        runbook, found under this name if someone ran it)."""
        flags = self.table(figure)[1][label]
        return f"{flags} --seed {SECOND_SEED}"

    def runs_under(self, root):
        """The names of this scale's runs that have a folder under root."""
        names = {self.run_name(flags) for figure in runs.FIGURES for flags in self.table(figure)[1].values()}
        return sorted(n for n in names if os.path.isdir(os.path.join(root, n)))

    def plot_arguments(self, figure, root):
        """The plot script's arguments: the laptop's runs by label, its figures beside the paper's."""
        script = self.table(figure)[0]
        out = os.path.join("figures", "laptop", os.path.splitext(script)[0])
        pairs = [f"{label}={name}" for label, name in self.figure_runs(figure).items()]
        return ["--root", root, "--out_dir", out, "--runs"] + pairs


SCALES = ("paper", "laptop")


def check_own_root(root, name):
    """Refuse a root that is another scale's default or holds another scale's runs: two scales never
    share a folder, so that neither's plots or claims read the other's runs."""
    for other in SCALES:
        if other == name:
            continue
        scale = Scale(other)
        if os.path.normpath(root) == os.path.normpath(scale.root):
            raise UserError(f"--root {root} is the {other} scale's folder: leave --root out for --scale {name} "
                            f"(it keeps its runs under {Scale(name).root}) or give another folder")
        found = scale.runs_under(root)
        if found:
            raise UserError(f"--root {root} holds {other}-scale runs ({found[0]}): each scale keeps its own "
                            f"folder; leave --root out for --scale {name} or give another folder")
