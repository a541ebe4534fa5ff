"""Optimisers, schedules, losses, devices, seeds and safe file writes, shared by every script."""
import json
import os
import pickle
import random
import signal
import sys
import tempfile

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class UserError(Exception):
    """Bad input: reported as one line, with a non-zero exit, and nothing on disk changed."""


def run_main(main, *args):
    """Call main(*args); a UserError becomes a one-line message on stderr and exit status 2."""
    try:
        return main(*args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


# ---------------------------------------------------------------------------- devices and seeds

def get_device(gpu_id=0, device=None):
    """--device wins; else cuda:<gpu_id> when CUDA is there; else the CPU."""
    if device is not None:
        try:
            dev = torch.device(device)
        except RuntimeError as e:
            raise UserError(f"--device {device!r} is not a torch device ({e}); try 'cpu' or 'cuda:0'")
    elif torch.cuda.is_available():
        dev = torch.device("cuda", gpu_id)
    else:
        return torch.device("cpu")
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise UserError(f"device {dev} is not available (this machine has {torch.cuda.device_count()} GPUs); "
                        "pick another --gpu_id or --device cpu")
    return dev


def set_seed(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds every CUDA device too


def rng_state():
    """Every global random state, so that a resumed run draws the same numbers."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------- optimisation

def trainable_parameters(model):
    return [p for p in model.parameters() if p.requires_grad]


def make_optimizer(args, model):
    """SGD (momentum 0.9) or Adam with weight decay, or LBFGS (its decay is a penalty in the closure).

    With --sep_decay the optimiser decays nothing: the loss carries the penalties instead.
    """
    params = trainable_parameters(model)
    weight_decay = 0.0 if args.sep_decay else args.weight_decay
    # Fused kernels exist for CUDA; on the CPU the default keeps results bitwise reproducible.
    fused = {"fused": True} if next(model.parameters()).device.type == "cuda" else {}
    if args.optimizer == "SGD":
        return torch.optim.SGD(params, lr=args.lr, momentum=0.9, weight_decay=weight_decay, **fused)
    if args.optimizer == "Adam":
        # Under --cuda_graph, Adam's step counter must live on the device to be captured.
        capturable = {"capturable": True} if getattr(args, "cuda_graph", False) else {}
        return torch.optim.Adam(params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8,
                                weight_decay=weight_decay, **fused, **capturable)
    if args.optimizer == "LBFGS":
        return torch.optim.LBFGS(params, lr=args.lr, history_size=args.history_size,
                                 line_search_fn="strong_wolfe")
    raise UserError(f"unknown optimizer {args.optimizer!r}; choose SGD, Adam or LBFGS")


def parse_decay_type(decay_type):
    """'step' -> ('step', None); 'step_40_80_120' -> ('multistep', [40, 80, 120]); 'cosine'."""
    if decay_type in ("step", "cosine"):
        return decay_type, None
    parts = decay_type.split("_")
    if parts[0] == "step" and len(parts) > 1 and all(p.isdigit() and int(p) > 0 for p in parts[1:]):
        return "multistep", [int(p) for p in parts[1:]]
    raise UserError(f"unknown --decay_type {decay_type!r}; use step, step_a_b_c (e.g. step_60_120_160) or cosine")


def make_scheduler(args, optimizer):
    """Stepped once per epoch, LBFGS included."""
    kind, milestones = parse_decay_type(args.decay_type)
    if kind == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=args.patience, gamma=args.gamma)
    if kind == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=args.gamma)
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs)


class MSELoss(nn.Module):
    """nn.MSELoss against one-hot targets: the mean over all B*K entries."""

    def __init__(self, num_classes):
        super().__init__()
        self.num_classes = num_classes

    def forward(self, logits, y):
        target = F.one_hot(y, self.num_classes).to(logits.dtype)  # (B, K), made on the device
        return F.mse_loss(logits, target)


class RescaledMSELoss(nn.Module):
    """Hui & Belkin (2020): per sample (1/K) [k (z_y - M)^2 + sum_{j != y} z_j^2], batch mean."""

    def __init__(self, num_classes, M=1.0, k=1.0):
        super().__init__()
        self.num_classes, self.M, self.k = num_classes, M, k

    def forward(self, logits, y):
        onehot = F.one_hot(y, self.num_classes).to(logits.dtype)  # (B, K)
        weight = 1 + (self.k - 1) * onehot  # k on the true class, 1 elsewhere
        return (weight * (logits - self.M * onehot) ** 2).sum(1).mean() / self.num_classes


def make_criterion(args, num_classes):
    if args.loss == "MSE":
        return MSELoss(num_classes)
    if args.loss == "RescaledMSE":
        return RescaledMSELoss(num_classes, M=args.M, k=args.k)
    if args.loss == "CrossEntropy":
        return nn.CrossEntropyLoss()
    raise UserError(f"unknown loss {args.loss!r}; choose MSE, RescaledMSE or CrossEntropy")


def sep_decay_penalty(model, h, weight_decay, feature_decay_rate):
    """--sep_decay: (wd/2)(||W||^2 + ||b||^2) + (feature_decay_rate/2) sum_i ||h_i||^2 over the batch."""
    penalty = sum(p.pow(2).sum() for p in model.fc.parameters())  # a frozen ETF adds a constant
    return 0.5 * weight_decay * penalty + 0.5 * feature_decay_rate * h.float().pow(2).sum()


def l2_penalty(params, weight_decay):
    """LBFGS has no weight decay of its own: 0.5 * wd * sum ||p||^2 over the trainable parameters."""
    return 0.5 * weight_decay * sum(p.pow(2).sum() for p in params)


# ---------------------------------------------------------------------------- files

def atomic_write(path, write):
    """write(f) into a temporary file beside `path`, flush it to disk, then rename it into place.

    A process killed at any instant leaves either the old file or the new one, never half of one.
    """
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp_" + os.path.basename(path) + ".", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes files private; give them the usual mode
        fault_point("before_rename")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


_fault_hits = {}  # fault point -> times this process has reached it


def fault_point(name):
    """Tests set NC_FAULT=<name> to kill the process (SIGKILL) the first time it gets here, or
    NC_FAULT=<name>@<n> to kill it the n-th time (e.g. before_rename@3: right before the third
    file of this process is renamed into place), simulating a crash at that very instant.
    The points: before_rename (utils.atomic_write), batch:<epoch>:<batch> (training, 1-based)."""
    fault = os.environ.get("NC_FAULT")
    if not fault:
        return
    point, _, nth = fault.partition("@")
    if point == name:
        _fault_hits[name] = _fault_hits.get(name, 0) + 1
        if _fault_hits[name] == int(nth or 1):
            os.kill(os.getpid(), signal.SIGKILL)


def save_torch(obj, path):
    atomic_write(path, lambda f: torch.save(obj, f))


def save_pickle(obj, path):
    atomic_write(path, lambda f: pickle.dump(obj, f, protocol=pickle.HIGHEST_PROTOCOL))


def save_json(obj, path):
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()))


def load_json(path):
    with open(path) as f:
        return json.load(f)


class Log:
    """Appends lines to a log file in the run directory (and, when echo is set, to stdout)."""

    def __init__(self, path, echo=False):
        self.path, self.echo = path, echo

    def __call__(self, line):
        with open(self.path, "a") as f:
            f.write(line + "\n")
        if self.echo:
            print(line)
