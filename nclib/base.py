"""The bottom layer: one-line errors, devices, seeds and files written whole. It imports nothing of
the project, so that every other module may import it."""
import json
import os
import pickle
import random
import tempfile
from contextlib import contextmanager

import numpy as np
import torch

EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 1, 2, 130


class UserError(Exception):
    """Bad input: reported as one line, with a non-zero exit, and nothing on disk changed."""


class RefusedOnRankZero(UserError):
    """Under torchrun, the other ranks' exit when rank 0 refused: rank 0 has said why."""


# What run_main suggests after a failed write, unless the error carries a `fix` of its own (training's
# says whether to run the command again or to continue with --resume).
WRITE_FIX = "free the space or move what is in the way, then run the command again"


def first_line(e, limit=160):
    """The first line of an exception's message, or its type's name when the message is empty."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:limit]


def machine_memory():
    """The machine's memory in bytes; inf where the OS does not say (no sysconf)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return float("inf")


def allowed_bytes(cap):
    """cap, or half the machine's memory if that is less: what a size check lets one step allocate."""
    return min(cap, machine_memory() / 2)


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


# ---------------------------------------------------------------------------- files

def write_error(e):
    """The OSError behind a failed write: e itself, or the one e was raised while handling (torch.save
    turns a full disk into a RuntimeError); None when there is none, or when a Ctrl-C struck."""
    seen, found = set(), None
    while e is not None and id(e) not in seen:
        if isinstance(e, KeyboardInterrupt):
            return None
        found = found or (e if isinstance(e, OSError) else None)
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return found


@contextmanager
def naming(path):
    """A write to `path` inside that fails (full disk, file-size limit, ...) raises an OSError naming
    `path`, so that the one-line error says which file could not be written."""
    try:
        yield
    except BaseException as e:
        failed = write_error(e)
        if failed is None or (isinstance(e, OSError) and e.filename):
            raise
        raise OSError(failed.errno, failed.strerror or str(failed), path) from e


def atomic_write(path, write):
    """write(f) into a temporary file beside `path`, flush it to disk, then rename it into place.

    A process killed at any instant leaves either the old file or the new one, never half of one;
    a write that fails leaves the old file too, and raises an OSError naming `path`.
    """
    atomic_write_all([(path, write)])


def atomic_write_all(files):
    """atomic_write of several [(path, write)] that change together: every temporary file is whole
    on disk before any is renamed into place, so a write that fails (a full disk, a folder in the
    way) changes none of them."""
    files, tmps = list(files), []
    try:
        for path, write in files:
            fd, tmp = tempfile.mkstemp(prefix=".tmp_" + os.path.basename(path) + ".",
                                       dir=os.path.dirname(os.path.abspath(path)))
            tmps.append(tmp)
            with naming(path):
                with os.fdopen(fd, "wb") as f:
                    write(f)
                    f.flush()
                    os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        for tmp, (path, _) in zip(tmps, files):
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes files private; give them the usual mode
            os.replace(tmp, path)
    except BaseException:
        for tmp in tmps:
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
        with naming(self.path), open(self.path, "a") as f:
            f.write(line + "\n")
