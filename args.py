"""Command-line options of every script, with their defaults in one place.

`train_parser()` serves both training scripts, `validate_parser()` serves validate_NC.py.
Both are plain argparse parsers, so a researcher's own script can extend them.
"""
import argparse
import copy
import math
import os

import numpy as np

from datasets import DATASETS
from nclib import nc
from nclib.losses import LOSSES
from models import MODELS
from nclib.optimizers import FIRST_ORDER, SECOND_ORDER

LOADERS = ("auto", "device", "torch")
AMP = ("none", "bf16")

# Flags that fix the network; validation reads them from the run and refuses disagreements.
MODEL_FLAGS = ("model", "width", "depth", "bias", "ETF_fc", "fixdim", "SOTA", "dataset")


class Parser(argparse.ArgumentParser):
    """argparse that reports bad input in one line (the usage block is one --help away)."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def int_at_least(text, low, requirement):
    """int(text), refused in argparse's way (naming `requirement`) when below `low`."""
    value = int(text)
    if value < low:
        raise argparse.ArgumentTypeError(f"must be {requirement}, got {text}")
    return value


def positive_int(text):
    return int_at_least(text, 1, "a positive integer")


def nonnegative_int(text):
    return int_at_least(text, 0, "an integer >= 0")


def seed_int(text):
    value = int(text)
    if not 0 <= value < 2 ** 32:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2**32), got {text}")
    return value


def nonnegative_float(text):
    value = float(text)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def positive_float(text):
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


# Networks train in float32, which holds nothing beyond this: a larger --lr or weight decay cannot even
# be converted for the optimiser's step, and a larger M or k makes every loss infinite.
FLOAT32_MAX = float(np.finfo(np.float32).max)


def within_float32(value, text):
    if value > FLOAT32_MAX:
        raise argparse.ArgumentTypeError(f"must be at most {FLOAT32_MAX:.4g}, the largest float32 (networks "
                                         f"train in float32), got {text}")
    return value


def positive_float32(text):
    return within_float32(positive_float(text), text)


def nonnegative_float32(text):
    return within_float32(nonnegative_float(text), text)


def path(text):
    """A file or folder name; ~ is expanded, as the shell would in an unquoted word."""
    return os.path.expanduser(text)


MAX_NAME_BYTES = 200  # a file name may have 255 bytes; leave room for the .tmp_ names beside it


def run_name(text):
    """--uid: one folder name (no path separators)."""
    if text in ("", ".", "..") or "/" in text or os.sep in text or "\0" in text:
        raise argparse.ArgumentTypeError(f"must be a folder name without '/', got {text!r}")
    if len(text.encode()) > MAX_NAME_BYTES:
        raise argparse.ArgumentTypeError(f"is {len(text.encode())} bytes long; at most {MAX_NAME_BYTES} fit a folder name")
    return text


def add_model_args(parser):
    g = parser.add_argument_group("model")
    g.add_argument("--model", default="resnet18", choices=MODELS,
                   help="network; resnet18 as in the paper, MLP/ResNet18_adapt for cifar10_random")
    g.add_argument("--width", type=positive_int, default=1024,
                   help="MLP hidden width, or the base channel count k of ResNet18_adapt")
    g.add_argument("--depth", type=positive_int, default=6, help="number of hidden layers of the MLP")
    g.add_argument("--no-bias", dest="bias", action="store_false",
                   help="no bias in the last layer (then the optimum is an orthogonal frame)")
    g.add_argument("--ETF_fc", "--ETF", dest="ETF_fc", action="store_true",
                   help="freeze the classifier as a simplex ETF (needs feature dimension >= classes)")
    g.add_argument("--fixdim", type=nonnegative_int, default=0,
                   help="feature dimension d of ResNets (0: the architecture's own, 512 for ResNet-18)")
    g.add_argument("--SOTA", action="store_true",
                   help="CIFAR-style ResNet stem (3x3 conv, no max-pool) and crop/flip augmentation")


def add_data_args(parser, batch_size):
    g = parser.add_argument_group("data and device")
    g.add_argument("--dataset", default="cifar10", choices=list(DATASETS))
    g.add_argument("--data_dir", type=path, default="~/data", help="where data sets are found or downloaded to")
    g.add_argument("--batch_size", type=positive_int, default=batch_size)
    g.add_argument("--gpu_id", type=int, default=0, help="CUDA device index; the CPU is used when there is no GPU")
    g.add_argument("--device", default=None, help="explicit torch device ('cpu', 'cuda:1'); overrides --gpu_id")
    g.add_argument("--loader", default="auto", choices=LOADERS,
                   help="device: whole data set on the device as uint8, batched augmentation; "
                        "torch: torchvision transforms in a DataLoader; auto: device when it fits")
    g.add_argument("--num_workers", type=nonnegative_int, default=4, help="DataLoader workers of the torch loader")


def train_parser(default_optimizer="SGD", description=None):
    p = Parser(description=description)
    add_model_args(p)
    add_data_args(p, batch_size=128)
    g = p.add_argument_group("run directory")
    g.add_argument("--uid", type=run_name, default=None,
                   help="run name; the run lives in <save_dir>/<uid>/ (default: timestamp plus a random id)")
    g.add_argument("--save_dir", type=path, default="model_weights", help="folder that holds the run directories")
    g.add_argument("--force", action="store_true", help="start over in an existing run directory")
    g.add_argument("--resume", action="store_true", help="continue the run --uid from its last complete epoch")
    g.add_argument("--seed", type=seed_int, default=6)
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=positive_int, default=200)
    g.add_argument("--loss", default="MSE", choices=LOSSES)
    g.add_argument("--M", type=positive_float32, default=1.0, help="RescaledMSE: target value of the true class")
    g.add_argument("--k", type=positive_float32, default=1.0, help="RescaledMSE: weight of the true class (alpha in the paper)")
    g.add_argument("--sample_size", type=positive_int, default=None, help="training images per class (default: all)")
    g.add_argument("--optimizer", default=default_optimizer, choices=FIRST_ORDER + SECOND_ORDER,
                   help="SGD and Adam run in train_1st_order.py, LBFGS in train_2nd_order.py")
    g.add_argument("--lr", type=positive_float32, default=0.1)
    g.add_argument("--patience", type=positive_int, default=40, help="StepLR: epochs between decays")
    g.add_argument("--decay_type", default="step",
                   help="step (every --patience epochs), step_a_b_c (at epochs a, b, c) or cosine")
    g.add_argument("--gamma", type=positive_float32, default=0.1, help="learning-rate decay factor")
    g.add_argument("--weight_decay", type=nonnegative_float32, default=5e-4)
    g.add_argument("--sep_decay", action="store_true",
                   help="decay only the classifier (W, b) and the features h, instead of all parameters")
    g.add_argument("--feature_decay_rate", type=nonnegative_float32, default=1e-4,
                   help="--sep_decay: weight of (1/2) sum_i ||h_i||^2 over the batch")
    g.add_argument("--history_size", type=positive_int, default=10, help="LBFGS memory")
    g = p.add_argument_group("what a run keeps")
    g.add_argument("--nc_every", type=nonnegative_int, default=1,
                   help="measure NC (everything validate_NC.py records) after every N-th epoch and after the "
                        "last, into info.pkl as training goes; 0: never (validate the checkpoints afterwards)")
    add_measures_arg(g, "measured in-run (--nc_every) into info.pkl beside the paper's quantities")
    g.add_argument("--save_every", type=positive_int, default=1,
                   help="keep the checkpoint epoch_NNN.pth of every N-th epoch (and of the last; last.pth is "
                        "always kept); with --nc_every, thinning loses no curve")
    g.add_argument("--sync_bn", action="store_true",
                   help="under torchrun: BatchNorm over the global batch, as in one process (default: each rank "
                        "normalises its own batch_size / world size images); no effect in one process")
    g = p.add_argument_group("speed (fp32 without compilation is the faithful default)")
    g.add_argument("--amp", default="none", choices=AMP, help="bf16 autocast for forward and loss")
    g.add_argument("--compile", action="store_true", help="torch.compile the model for training")
    # One destination, three values: None (auto, the default: a graph on a CUDA device where one can be
    # captured, else eager with a note why), True (asked: refused where it cannot be), False (never).
    graph = g.add_mutually_exclusive_group()
    graph.add_argument("--cuda_graph", dest="cuda_graph", action="store_const", const=True, default=None,
                       help="insist on CUDA graphs: refused where one cannot be used (the default already uses "
                            "them on a CUDA device where it can: each first-order step, or LBFGS's loss and "
                            "gradient evaluation, replayed as one graph; same numbers, far fewer kernel launches)")
    graph.add_argument("--no_cuda_graph", dest="cuda_graph", action="store_const", const=False,
                       help="eager steps even on a GPU (each kernel launched from Python)")
    g.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=False,
                   help="cuDNN as the authors set it (deterministic algorithms, no autotuning, NCHW layout): "
                        "runs that repeat bit for bit on a GPU, somewhat slower; --no-deterministic on --resume "
                        "switches it off again")
    return p


VALIDATION_BATCH = 1024  # validate_NC.py's --batch_size, and the batch of the NC pass during training


def validate_parser():
    p = Parser(description="Measure NC1-NC4 on every checkpoint of a run directory.")
    p.add_argument("--load_path", type=path, required=True, help="run directory, e.g. model_weights/<uid>")
    p.add_argument("--epochs", type=positive_int, default=None, help="only checkpoints up to this epoch")
    add_model_args(p)
    add_data_args(p, batch_size=VALIDATION_BATCH)
    g = p.add_argument_group("what is measured")
    add_measures_arg(g, "added to info.pkl")
    g.add_argument("--layers", nargs="*", default=None, metavar="LAYER",
                   help="also NC1, tr(Sigma_W)/tr(Sigma_B) and the NCC agreement at each layer (or the layers "
                        "named: hidden1 .. and h of the MLP, layer1 .. layer4 and h of the ResNets)")
    return p


def add_measures_arg(group, where):
    """--measures: the NC measures of nclib.nc.MEASURES to record besides the paper's, `where`."""
    group.add_argument("--measures", nargs="+", default=["paper"], metavar="MEASURE",
                       help=f"paper (the paper's quantities only), all, or names among {', '.join(nc.MEASURES)} "
                            f"(nclib.nc.MEASURES), {where}")


def explicit_args(parser, argv):
    """The options actually typed on the command line, as a dict (defaults left out).

    argv is parsed a second time by a copy of the parser whose defaults are all a marker: whatever
    still holds the marker afterwards was not typed."""
    unset = object()
    quiet = copy.deepcopy(parser)
    quiet.set_defaults(**{dest: unset for dest in vars(parser.parse_args(argv))})
    return {k: v for k, v in vars(quiet.parse_args(argv)).items() if v is not unset}
