"""May this run start, or resume? Every check a training command passes before anything is written:
the run directory and --resume, the options, the sizes, the data and the thread count a resume must
find again. Each refusal is a UserError of one line that names the fix."""
import os
import time
from contextlib import nullcontext

import torch

import models
from nclib import rundir
from nclib.base import UserError, machine_memory
from nclib.optimizers import parse_decay_type

# Options that may differ from the recorded ones when resuming, because they do not change the
# numbers (--deterministic and --cuda_graph change at most the last bits of GPU sums). --save_dir,
# --uid and --data_dir only say where things are (a run or its data may have moved).
# A plain --resume keeps the recorded --cuda_graph. Runs from before the auto default recorded
# `false` for "not asked", which now reads as --no_cuda_graph: such a run goes on eagerly, as it was
# trained. That is the safe reading, because a new run's `false` (--no_cuda_graph) looks the same
# and must stay eager; `--resume --cuda_graph` speeds an old run up.
RESUME_MAY_CHANGE = {"gpu_id", "device", "num_workers", "epochs", "save_dir", "uid", "data_dir", "cuda_graph",
                     "deterministic", "nc_every", "save_every"}


NOT_RECORDED = ("resume", "force")  # what this command does, not what the run is


# Recorded in args.json beside the arguments when a run starts (neither is a flag): the digest of the
# images and labels it trains on (nclib.measure.data_key: the same data wherever they lie), which a
# resume must find again, and the number of CPU threads, which a resume on the CPU keeps (a sum split
# over another number of threads rounds differently). Runs from before these were recorded resume as before.
DATA_KEY, THREADS = "data_key", "num_threads"


THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")  # a thread count asked for explicitly


def check_run_dir(args, given):
    """Decide, before anything is written, whether this run may start or resume. `given` holds the
    options typed on the command line. Returns the arguments to train with (on --resume, the
    recorded ones, with the typed options that may change)."""
    rundir.check_is_dir_or_absent(args.save_dir, "--save_dir")
    run_dir = os.path.join(args.save_dir, args.uid)
    rundir.check_is_dir_or_absent(run_dir, "--uid")
    if not args.resume:
        if rundir.has_run(run_dir) and not args.force:
            raise UserError(f"run directory {run_dir} exists already: pass --resume to continue it, "
                            "--force to start over, or choose another --uid")
        return args
    recorded = rundir.read_args(run_dir)
    if recorded is None:
        raise UserError(f"--resume: there is no run {run_dir} (no {rundir.ARGS}); check --uid and --save_dir")
    clash = [f"--{k} {given[k]} (recorded: {recorded.get(k)})" for k in sorted(given)
             if k not in RESUME_MAY_CHANGE | set(NOT_RECORDED) and given[k] != recorded.get(k)]
    if clash:
        raise UserError(f"--resume with arguments that differ from the run's: {', '.join(clash)}; "
                        "drop them to continue the run as it was, or start a new --uid")
    epochs = given.get("epochs", recorded["epochs"])
    if epochs != recorded["epochs"] and recorded.get("decay_type") == "cosine":
        # the schedule (and the scheduler state in last.pth) is laid out over the recorded epochs
        raise UserError(f"--resume with --epochs {epochs}: this run's cosine schedule spans its "
                        f"recorded {recorded['epochs']} epochs; drop --epochs, or start a new --uid")
    done = rundir.finished_epoch(run_dir)
    if epochs < done:
        raise UserError(f"--resume with --epochs {epochs}: {run_dir} has finished {done} epochs already; "
                        f"give --epochs {done} or more (its checkpoints are kept as they are)")
    # The recorded values, and those typed now; defaults of options newer than the run fill the rest.
    merged = {**vars(args), **recorded, "save_dir": args.save_dir, "uid": args.uid, "resume": True, "force": False}
    merged.update({k: v for k, v in given.items() if k in RESUME_MAY_CHANGE})
    return type(args)(**merged)


def recorded(args):
    return {k: v for k, v in vars(args).items() if k not in NOT_RECORDED}


def least_parameters(args):
    """A lower bound on the parameter count of the network the arguments describe (models.ModelSpec)."""
    return models.least_parameters(args)


def memory_bytes(device):
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return machine_memory()


def check_fits(args, device):
    """Refuse, before anything is built or written, a network whose weights and gradients (float32,
    4 bytes each) alone exceed the device's memory: the allocator would fail with a traceback, or,
    where memory is overcommitted, the process would be killed mid-run."""
    n = least_parameters(args)
    need, have = 2 * 4 * n, memory_bytes(device)
    if need > have:
        sizes = models.MODELS[args.model].size_flags
        flags = " ".join(f"--{k} {getattr(args, k)}" for k in sizes)
        raise UserError(f"--model {args.model} {flags} has {n:.3g} parameters or more, whose weights and gradients "
                        f"alone take {need / 2 ** 30:,.0f} GiB, more than the {have / 2 ** 30:,.0f} GiB of {device}: "
                        f"choose a smaller {' or '.join('--' + k for k in sizes)}")


def check_same_data(args, key):
    """A new run records the digest `key` of its data; a resumed one must be given the same data
    (moved, perhaps: --data_dir may change), or it would train its later epochs on other images and
    lose the NC results of its earlier ones. Refused in one line before anything is written."""
    if not args.resume:
        setattr(args, DATA_KEY, key)
        return
    started = getattr(args, DATA_KEY, None)
    if started is not None and started != key:
        raise UserError(f"--resume: the {args.dataset} images and labels found now (--data_dir {args.data_dir}) "
                        f"are not those this run trained on (data digest {key[:12]}, the run's {started[:12]}): "
                        "give the --data_dir of the run's data, or start a new --uid")


def keep_threads(args, device):
    """A new run records its CPU thread count; resumed on the CPU, a run goes on with the count it
    started with (torch.set_num_threads), so that its numbers are an uninterrupted run's, unless
    OMP_NUM_THREADS or MKL_NUM_THREADS asks for a count: then it keeps that, and the one-line note
    returned says that later epochs may differ (None otherwise)."""
    now = torch.get_num_threads()
    if not args.resume:
        setattr(args, THREADS, now)
        return None
    started = getattr(args, THREADS, None)
    if started is None or started == now or device.type != "cpu":
        return None
    asked = [name for name in THREAD_VARIABLES if os.environ.get(name)]
    if not asked:
        torch.set_num_threads(started)
        return None
    return (f"note: {now} CPU threads ({asked[0]}), where this run started with {started}: its later epochs may "
            f"differ in the last bits from an uninterrupted run's (without {asked[0]} it would keep {started})")


def start_lock(args, run_dir):
    """What a run holds while it starts: to start over a run, validation's lock too (a validation of
    the old run must neither read it as it goes nor write its results after), released by train()
    once the old files are gone; nothing for --resume (validating a run as it trains is fine) or a
    new run."""
    if args.resume or not rundir.has_run(run_dir):
        return nullcontext()
    return rundir.locked(run_dir, rundir.VALIDATE_LOCK, "started over")


def checked(args, optimizers, given):
    """The arguments to train with, once the run directory and the options pass every check."""
    if args.uid is None:
        if args.resume:
            raise UserError("--resume needs the --uid of the run to continue")
        args.uid = time.strftime("%Y%m%d-%H%M%S-") + os.urandom(3).hex()
    given = dict(given)
    args = check_run_dir(args, given)
    if args.optimizer not in optimizers:
        script = "train_2nd_order.py" if args.optimizer == "LBFGS" else "train_1st_order.py"
        raise UserError(f"this script runs {' and '.join(optimizers)}, not {args.optimizer}: use {script}")
    if args.batch_size < 2:
        raise UserError("--batch_size 1: BatchNorm cannot normalise a batch of one image in training; "
                        "use --batch_size 2 or more")
    parse_decay_type(args.decay_type)
    return args
