"""Small shared helpers: one-line errors, devices, CUDA-graph capture, seeds, and files written whole.

The authors' scripts import make_optimizer, make_scheduler, make_criterion and set_seed from here;
those names keep working (the first three live in optimizers.py and losses.py).
"""
import json
import os
import pickle
import random
import sys
import tempfile
from contextlib import contextmanager

import numpy as np
import torch

EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 1, 2, 130


class UserError(Exception):
    """Bad input: reported as one line, with a non-zero exit, and nothing on disk changed."""


class RefusedOnRankZero(UserError):
    """Under torchrun, the other ranks' exit when rank 0 refused: rank 0 has said why."""


def _interrupted(e):
    """Whether e is, or was raised while handling, a Ctrl-C (torch.save wraps it in a RuntimeError)."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, KeyboardInterrupt):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


# What run_main suggests after a failed write, unless the error carries a `fix` of its own (training's
# says whether to run the command again or to continue with --resume).
WRITE_FIX = "free the space or move what is in the way, then run the command again"


def run_main(main, *args):
    """Call main(*args) as a script does: a UserError becomes a one-line message on stderr and exit
    status 2; a file-system error one line and status 1; Ctrl-C one line and status 130, however
    deep inside a save it struck."""
    try:
        return main(*args)
    except UserError as e:
        # under torchrun every rank meets the same bad input; rank 0 says it once
        if not isinstance(e, RefusedOnRankZero) and (torchrun_env() or (0,))[0] == 0:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    except OSError as e:  # the file system refused: a full disk, a folder where a file should be, ...
        if _interrupted(e):
            raise
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}; files written before this are complete: "
              f"{getattr(e, 'fix', None) or WRITE_FIX}", file=sys.stderr)
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


# ---------------------------------------------------------------------------- torchrun

def torchrun_env():
    """(rank, world_size, local_rank) when this process was started by torchrun, else None."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))


def init_distributed():
    """Join torchrun's process group: gloo for CPU tensors, and NCCL for CUDA ones when there is a GPU."""
    import torch.distributed as dist
    _, _, local_rank = torchrun_env()
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        dist.init_process_group("cpu:gloo,cuda:nccl")
    else:
        dist.init_process_group("gloo")


def end_distributed():
    import torch.distributed as dist
    if dist.is_initialized():
        dist.destroy_process_group()


def world():
    """(rank, world size) of the process group; (0, 1) in a single process."""
    import torch.distributed as dist
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def is_rank_zero():
    return world()[0] == 0


def broadcast_from_rank_zero(obj):
    """rank 0's obj on every rank (any picklable object)."""
    import torch.distributed as dist
    if world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def rank_device(device_arg):
    """Under torchrun, each rank's device: cuda:LOCAL_RANK unless --device names the CPU (or there is no GPU)."""
    _, _, local_rank = torchrun_env()
    if (device_arg is not None and get_device(0, device_arg).type == "cpu") or not torch.cuda.is_available():
        return torch.device("cpu")
    return get_device(local_rank)


# ---------------------------------------------------------------------------- CUDA: float32 convolutions, graphs

@contextmanager
def fp32_convolutions():
    """cuDNN convolutions in IEEE float32 inside. PyTorch lets them round their inputs to TF32 by
    default (10-bit mantissas: features off by ~1e-3 relative), which training may keep, as the
    authors' runs did, but measured features must not."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    owner, name, value = (conv, "fp32_precision", "ieee") if hasattr(conv, "fp32_precision") \
        else (torch.backends.cudnn, "allow_tf32", False)  # torch < 2.9
    old = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, old)


def on_side_stream(fn, *args):
    """fn(*args) run eagerly on a side stream, ordered after and before the current stream's work, as
    the warm-up before a capture should be (lazily created state then belongs to no capture)."""
    current = torch.cuda.current_stream()
    side = torch.cuda.Stream()
    side.wait_stream(current)
    with torch.cuda.stream(side):
        out = fn(*args)
    current.wait_stream(side)
    return out


class Captured:
    """fn(*inputs) recorded once as a CUDA graph on static copies of `inputs`. load() copies new
    inputs into them, replay() runs the recorded kernels and returns fn's outputs, which live in
    the graph's memory: the next replay overwrites them."""

    def __init__(self, fn, inputs):
        self.inputs = [t.clone() for t in inputs]
        self.graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.current_stream()
        try:
            # Records; nothing runs until replay(). Thread-local: a DataLoader's pin-memory thread may
            # allocate pinned memory meanwhile, which the global mode would count as breaking the capture.
            with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
                self.outputs = fn(*self.inputs)
        except RuntimeError as e:
            # When fn breaks the capture, ending it fails too, and torch.cuda.graph then leaves its
            # capture stream current: the caller's stream is restored, the half-made graph released,
            # and the error raised is fn's, not the one about the capture's end.
            torch.cuda.set_stream(stream)
            self.graph = None
            raise RuntimeError(" ".join(str(e.__context__ or e).split())) from e

    def load(self, *inputs):
        for static, t in zip(self.inputs, inputs):
            static.copy_(t)

    def replay(self):
        self.graph.replay()
        return self.outputs


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
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp_" + os.path.basename(path) + ".", dir=folder)
    try:
        with naming(path):
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
        with naming(self.path), open(self.path, "a") as f:
            f.write(line + "\n")
