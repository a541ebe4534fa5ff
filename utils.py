"""Small shared helpers: one-line errors, devices, seeds, and files written whole.

The authors' scripts import make_optimizer, make_scheduler, make_criterion and set_seed from here;
those names keep working (the first three live in optimizers.py and losses.py).
"""
import json
import os
import pickle
import random
import sys
import tempfile

import numpy as np
import torch

EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 1, 2, 130


class UserError(Exception):
    """Bad input: reported as one line, with a non-zero exit, and nothing on disk changed."""


def _interrupted(e):
    """Whether e is, or was raised while handling, a Ctrl-C (torch.save wraps it in a RuntimeError)."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, KeyboardInterrupt):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def run_main(main, *args):
    """Call main(*args) as a script does: a UserError becomes a one-line message on stderr and exit
    status 2; a file-system error one line and status 1; Ctrl-C one line and status 130, however
    deep inside a save it struck."""
    try:
        return main(*args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    except OSError as e:  # the file system refused: a full disk, a folder where a file should be, ...
        if _interrupted(e):
            raise
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}; files written before this are complete: free the space "
              "or move what is in the way, then run the command again", file=sys.stderr)
        sys.exit(EXIT_FAILED)
    except BaseException as e:
        if not _interrupted(e):
            raise
        print("interrupted: files written so far are complete", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)


# ---------------------------------------------------------------------------- devices and seeds

def get_device(gpu_id=0, device=None):
    """--device wins; else cuda:<gpu_id> when CUDA is there; else the CPU."""
    if device is not None:
        try:
            dev = torch.device(device)
        except RuntimeError as e:
            raise UserError(f"--device {device!r} is not a torch device ({e}); try 'cpu' or 'cuda:0'")
        if dev.type not in ("cpu", "cuda"):
            raise UserError(f"--device {device!r}: this repository runs on 'cpu' or 'cuda[:N]' devices only")
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


def all_finite(state_dict):
    """Whether every floating-point tensor of a state_dict is free of inf and NaN (one device sync)."""
    checks = [torch.isfinite(t).all() for t in state_dict.values() if torch.is_floating_point(t)]
    return bool(torch.stack(checks).all()) if checks else True


# ---------------------------------------------------------------------------- the authors' names

def make_optimizer(args, model):
    import optimizers
    return optimizers.make_optimizer(args, model)


def make_scheduler(args, optimizer):
    import optimizers
    return optimizers.make_scheduler(args, optimizer)


def make_criterion(args, num_classes=None):
    import losses
    return losses.make_criterion(args, num_classes)


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
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


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
    """Appends lines to a log file."""

    def __init__(self, path):
        self.path = path

    def __call__(self, line):
        with open(self.path, "a") as f:
            f.write(line + "\n")
