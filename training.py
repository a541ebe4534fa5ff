"""The training loop that both training scripts share; they differ only in `step`.

A step is `step(optimizer, objective, x, y) -> (loss, logits)`: `objective(x, y)` runs the forward
pass and returns (loss, logits); the step turns it into an update. The logged training accuracy
comes from those logits, so no second forward pass is made.

The run directory's files are rundir.py's; this module decides when a run may start or resume and
writes them: args.json first, then after each epoch its checkpoint and the resume state.
"""
import os
import sys
import time
import types
import warnings
from contextlib import ExitStack, contextmanager, nullcontext

import torch
import torch.distributed as dist
from tqdm import tqdm

import datasets
import models
import nc
import rundir
import validate_NC
from args import VALIDATION_BATCH, explicit_args
from losses import make_criterion, sep_decay_penalty
from nc import topk_hits
from optimizers import make_optimizer, make_scheduler, parse_decay_type
from utils import (WRITE_FIX, Captured, Log, RefusedOnRankZero, UserError, all_finite, broadcast_from_rank_zero,
                   end_distributed, get_device, init_distributed, is_rank_zero, naming, on_side_stream, rank_device,
                   rng_state, set_rng_state, set_seed, save_torch, torchrun_env, world)

LOG_EVERY = 50  # steps between progress-bar updates (each one waits for the device)
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
# images and labels it trains on (validate_NC.data_key: the same data wherever they lie), which a
# resume must find again, and the number of CPU threads, which a resume on the CPU keeps (a sum split
# over another number of threads rounds differently). Runs from before these were recorded resume as before.
DATA_KEY, THREADS = "data_key", "num_threads"
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")  # a thread count asked for explicitly
RESUME_FIX = "free the space or move what is in the way, then continue the run with --resume"  # after a failed write


class TrainingDiverged(UserError):
    pass


def divergence_hint(args):
    return "lower --lr, or --M/--k of RescaledMSE" if args.loss == "RescaledMSE" else "lower --lr"


def train_one_epoch(model, loader, step, optimizer, objective, epoch, device, hint="lower --lr"):
    """One pass over the loader. Returns the mean loss and top-1/top-5 training accuracy (%)."""
    model.train()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss * B, top-1 hits, top-5 hits
    first_bad = torch.full((), -1, dtype=torch.int64, device=device)  # first batch with a non-finite loss
    n = 0
    bar = tqdm(loader, desc=f"epoch {epoch}", leave=False, dynamic_ncols=True, disable=None)  # None: TTY only
    for i, (x, y) in enumerate(bar):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        try:
            loss, logits = step(optimizer, objective, x, y)
        except RuntimeError as e:  # a step size beyond float32 (Adam's first steps divide --lr by 1 - beta1)
            if "without overflow" not in str(e):
                raise
            raise TrainingDiverged(f"a step overflowed float32 at epoch {epoch}, batch {i + 1}; "
                                   f"checkpoints of earlier epochs are kept: {hint}") from e
        sums += torch.cat([(loss.double() * len(y)).view(1), topk_hits(logits, y)])
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), i, first_bad)
        n += len(y)
        if (i + 1) % LOG_EVERY == 0 or i + 1 == len(loader):  # the only waits for the device
            if dist.is_initialized():  # every rank stops together, and logs the global loss
                dist.all_reduce(first_bad, dist.ReduceOp.MAX)
            if first_bad.item() >= 0:
                raise TrainingDiverged(f"the loss became non-finite at epoch {epoch}, batch {first_bad.item() + 1}; "
                                       f"checkpoints of earlier epochs are kept: {hint}")
            bar.set_postfix(loss=f"{sums[0].item() / n:.4g}", acc=f"{100 * sums[1].item() / n:.1f}")
    if dist.is_initialized():  # every rank's samples: rank 0 logs the global mean
        dist.all_reduce(sums)
        count = torch.tensor(float(n), dtype=torch.float64, device=device)
        dist.all_reduce(count)
        n = count.item()
    loss, top1, top5 = (sums / n).tolist()
    return {"loss": loss, "acc1": 100 * top1, "acc5": 100 * top5}


# ---------------------------------------------------------------------------- CUDA graphs

WARMUP = 2  # eager steps before the first capture: they create optimiser state and tune cuDNN


def build_step(args, make_step, device, distributed=False):
    """(step, note): the step `make_step(args)` to train with, replayed as a CUDA graph or not, and
    a one-line note for stdout and the run's log when the default trains eagerly on a CUDA device
    (None otherwise). The one place that decides: --no_cuda_graph (False) never graphs; --cuda_graph
    (True) insists, and is refused where a graph cannot be used; the default (None) graphs where one
    can be used, and on the CPU, which has no graphs, trains eagerly without a word.

    A step that is not captured whole (LBFGS: its line search decides on the host) provides its own
    graphed form as `step.graphed()`; any other step is captured whole by CUDAGraphStep."""
    step = make_step(args)
    if args.cuda_graph is False:
        return step, None
    if device.type != "cuda":
        if args.cuda_graph:
            raise UserError(f"--cuda_graph needs a CUDA device, and this run is on {device}; drop the flag "
                            "(or, resuming a run that recorded it, add --no_cuda_graph)")
        return step, None
    if distributed:  # --cuda_graph itself is refused before this, by check_torchrun
        return step, "note: eager steps, no CUDA graph: under torchrun DDP's gradient all-reduce is not captured"
    graphed = getattr(step, "graphed", None)
    graph_step = graphed() if graphed is not None else CUDAGraphStep(step)
    graph_step.fallback = args.cuda_graph is None  # the default: a step that fails to capture runs eagerly
    return graph_step, None


def make_capturable(optimizer):
    """Adam's step() refuses to be captured unless its groups say `capturable`, which needs each
    step counter on its parameter's device. The counters of a fused Adam are there already, and the
    fused kernel ignores the flag: the numbers stay the same. (A run started eagerly, or resumed
    from one, has the flag off in its saved state.)"""
    for group in optimizer.param_groups:
        if "capturable" not in group or group["capturable"]:
            continue
        group["capturable"] = True
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].to(device=p.device, dtype=torch.float32)


class CUDAGraphStep:
    """A first-order step (forward, loss, backward, optimiser step) replayed as one CUDA graph.

    Eager PyTorch launches some hundreds of small kernels per ResNet step, and at batch 128 a
    fast GPU waits on those launches; a graph launches them all at once. The kernels are the same,
    so the numbers are too. The graph has the shape of the first batch; batches of another size
    (the last of an epoch) run eagerly. The learning rate is baked into a first-order step's graph,
    so it is captured again when the rate changes. Subclasses (the LBFGS step) change what is
    captured (capture) and how a step uses it (run).

    With `fallback` (the default's graphs, not --cuda_graph's), a step whose capture fails is said
    in one line and the run goes on eagerly from that batch on: nothing has run yet when a capture
    fails (it only records), so no batch is lost or applied twice."""

    fallback = False

    def __init__(self, step):
        self.step, self.captured, self.shape, self.warm, self.baked = step, None, None, 0, None
        self.eager = False  # set for good when a capture failed

    def __call__(self, optimizer, objective, x, y):
        if self.shape is None:
            self.shape = x.shape
        if x.shape != self.shape or self.eager:
            return self.step(optimizer, objective, x, y)
        baked = self.baked_in(optimizer)
        if baked != self.baked:
            if self.captured is not None:  # the gradients live in the old graph's memory: let it go with them
                optimizer.zero_grad(set_to_none=True)
            self.captured, self.baked = None, baked
        with torch.cuda.device(x.device):  # streams and capture on the run's GPU (--gpu_id 1 too)
            if self.captured is None:
                if self.warm < WARMUP:
                    self.warm += 1
                    return on_side_stream(self.step, optimizer, objective, x, y)
                try:
                    self.captured = self.capture(optimizer, objective, x, y)
                except RuntimeError as e:
                    if not self.fallback:
                        raise
                    self.eager = True
                    print(f"note: the training step cannot be captured as a CUDA graph "
                          f"({' '.join(str(e).split())[:160]}); training on eagerly (--no_cuda_graph "
                          "says so from the start)", file=sys.stderr)
                    return self.step(optimizer, objective, x, y)
            else:
                self.captured.load(x, y)
            return self.run(optimizer)

    def baked_in(self, optimizer):
        """What the graph holds as constants; when it changes, the step is captured again."""
        return tuple(group["lr"] for group in optimizer.param_groups)

    def capture(self, optimizer, objective, x, y):
        make_capturable(optimizer)
        return Captured(lambda x, y: self.step(optimizer, objective, x, y), (x, y))

    def run(self, optimizer):
        """One training step on the batch just loaded: (loss, logits)."""
        return self.captured.replay()


def make_objective(args, model, criterion, net=None):
    """objective(x, y) -> (loss, logits): forward pass (autocast if asked), loss and --sep_decay penalty.
    `net` runs the forward pass when it is not the model itself (DistributedDataParallel around it)."""
    net = model if net is None else net
    net = torch.compile(net) if args.compile else net
    # Under torchrun DDP averages the ranks' gradients, and the feature penalty is a sum over the
    # rank's share of the batch: scaled by the world size, the average is the one-process sum.
    if args.sep_decay:
        feature_decay_rate = args.feature_decay_rate * (world()[1] if dist.is_initialized() else 1)
    device_type = next(model.parameters()).device.type
    # No autocast weight cache: it would outlive a CUDA graph's capture.
    autocast = (lambda: torch.autocast(device_type, dtype=torch.bfloat16, cache_enabled=False)) \
        if args.amp == "bf16" else nullcontext

    def objective(x, y):
        with autocast():
            logits, h = net(x)
            loss = criterion(logits.float(), y)
        if args.sep_decay:
            loss = loss + sep_decay_penalty(model, h, args.weight_decay, feature_decay_rate)
        return loss, logits.float()
    return objective


# ---------------------------------------------------------------------------- may this run start?

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
    """A lower bound on the parameter count of the network the arguments describe, from its largest
    weight tensors alone, computed without building it: sizes only the flags make large."""
    if args.model == "MLP":  # its input is a flattened 3x32x32 image; then depth - 1 square layers
        return 3 * 32 * 32 * args.width + (args.depth - 1) * args.width ** 2
    if args.model == "ResNet18_adapt":  # three of layer4's 3x3 convolutions map 8k channels to 8k
        return 3 * 9 * (8 * args.width) ** 2
    return 512 * args.fixdim  # the last block's shortcut maps at least 512 channels to d


def memory_bytes(device):
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_fits(args, device):
    """Refuse, before anything is built or written, a network whose weights and gradients (float32,
    4 bytes each) alone exceed the device's memory: the allocator would fail with a traceback, or,
    where memory is overcommitted, the process would be killed mid-run."""
    n = least_parameters(args)
    need, have = 2 * 4 * n, memory_bytes(device)
    if need > have:
        sizes = {"MLP": ("width", "depth"), "ResNet18_adapt": ("width",)}.get(args.model, ("fixdim",))
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


def holds_no_epoch(run_dir):
    """Whether run_dir holds only what a run writes before its first epoch ends (its arguments and log)."""
    return all(name.startswith(".") or name in (rundir.ARGS, rundir.TRAIN_LOG, rundir.RUNBOOK_LOG)
               for name in os.listdir(run_dir))


@contextmanager
def attempt(args, run_dir):
    """Around train(): the CPU thread count as it was before, afterwards (a resume may pin another).
    A new run that fails before its first epoch is written leaves no run behind, so that the corrected
    command (or, after a full disk, the same one) starts it without --force; and a failed write says
    which command goes on: that one, or --resume."""
    threads = torch.get_num_threads()
    try:
        yield
    except Exception as e:
        cleared = not args.resume and is_rank_zero() and os.path.isdir(run_dir) and holds_no_epoch(run_dir)
        if cleared:
            rundir.clear(run_dir)
        if isinstance(e, OSError):
            e.fix = WRITE_FIX if cleared else RESUME_FIX
        raise
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------- main

def main(args, make_step, optimizers, given=()):
    """Train with the update rule `make_step(args)`, which only `optimizers` may drive. Everything
    that can be refused is checked before anything is written to disk."""
    if torchrun_env() is not None:
        return main_torchrun(args, make_step, optimizers, given)
    args = checked(args, optimizers, given)
    device = get_device(args.gpu_id, args.device)
    check_fits(args, device)
    step, note = build_step(args, make_step, device)
    run_dir = os.path.join(args.save_dir, args.uid)
    with rundir.locked(run_dir, rundir.TRAIN_LOCK, "trained"), ExitStack() as starting:
        args = check_run_dir(args, dict(given))  # again, now that no other process can change the answer
        starting.enter_context(start_lock(args, run_dir))
        with attempt(args, run_dir):
            return train(args, step, device, run_dir, note, started=starting.close)


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


def check_torchrun(args, size):
    """What one run on several processes cannot do, refused in one line."""
    if args.optimizer == "LBFGS":
        raise UserError("train_2nd_order.py (LBFGS) does not run under torchrun: its closure and line search would "
                        "need every rank to agree on each evaluation; run it as one process")
    if args.cuda_graph:
        raise UserError("--cuda_graph does not run under torchrun (DDP's gradient all-reduce is not captured); "
                        "drop the flag")
    if args.loader == "torch":
        raise UserError("--loader torch does not run under torchrun (it has no per-rank sampler here); "
                        "use --loader device or auto")
    if args.batch_size % size:
        raise UserError(f"--batch_size {args.batch_size} does not split over {size} ranks: under torchrun it is the "
                        f"global batch, so give a multiple of {size}")
    if args.batch_size // size < 2:
        raise UserError(f"--batch_size {args.batch_size} over {size} ranks leaves each {args.batch_size // size} "
                        "image, and BatchNorm cannot normalise one; give a larger --batch_size")


def main_torchrun(args, make_step, optimizers, given):
    """One run trained by every process torchrun started, with DistributedDataParallel. Rank 0
    decides whether the run may start, holds the run directory's lock and writes every file; it
    sends the others its decision (the arguments to train with, or why not)."""
    init_distributed()
    rank, size = world()
    try:
        with ExitStack() as lock, ExitStack() as starting:
            refusal, verdict = None, None
            if rank == 0:
                try:
                    args = checked(args, optimizers, given)
                    check_torchrun(args, size)
                    check_fits(args, rank_device(args.device))  # refuses a bad --device here, once
                    run_dir = os.path.join(args.save_dir, args.uid)
                    lock.enter_context(rundir.locked(run_dir, rundir.TRAIN_LOCK, "trained"))
                    verdict = check_run_dir(args, dict(given))
                    starting.enter_context(start_lock(verdict, run_dir))
                except UserError as e:
                    refusal, verdict = e, str(e)
            verdict = broadcast_from_rank_zero(verdict)
            if refusal is not None:
                raise refusal
            if isinstance(verdict, str):
                raise RefusedOnRankZero(verdict)
            args = verdict
            device = rank_device(args.device)
            step, note = build_step(args, make_step, device, distributed=True)
            run_dir = os.path.join(args.save_dir, args.uid)
            with attempt(args, run_dir):
                return train(args, step, device, run_dir, note, started=starting.close)
    finally:
        end_distributed()


def sync_batchnorm(model, device):
    """--sync_bn: BatchNorm over the global batch, as in one process. CUDA has nn.SyncBatchNorm; on
    the CPU (which it does not support) each BatchNorm's training forward is replaced by one that
    all-reduces the batch sums (a differentiable all-reduce, so gradients flow through them too).
    Either way the modules keep their parameter and buffer names: checkpoints are unchanged."""
    if device.type == "cuda":
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    # its suggested replacement has no autograd; this one is still there and right
    warnings.filterwarnings("ignore", message="torch.distributed.nn.functional.all_reduce is deprecated")
    for bn in model.modules():
        if isinstance(bn, torch.nn.modules.batchnorm._BatchNorm):
            bn.forward = types.MethodType(_global_batchnorm, bn)
    return model


def _global_batchnorm(bn, x):
    if not bn.training:
        return type(bn).forward(bn, x)
    from torch.distributed.nn.functional import all_reduce
    C, dims = x.shape[1], [0] + list(range(2, x.dim()))
    count = torch.full((1,), x.numel() / C, dtype=x.dtype, device=x.device)
    totals = all_reduce(torch.cat([x.sum(dims), (x * x).sum(dims), count]))
    n = totals[-1]
    mean = totals[:C] / n
    var = totals[C:2 * C] / n - mean * mean  # biased: what BatchNorm normalises with
    if bn.track_running_stats:
        with torch.no_grad():  # kept as BatchNorm keeps them (unbiased variance)
            bn.num_batches_tracked += 1
            momentum = bn.momentum if bn.momentum is not None else 1.0 / bn.num_batches_tracked.item()
            bn.running_mean.mul_(1 - momentum).add_(momentum * mean)
            bn.running_var.mul_(1 - momentum).add_(momentum * var * n / (n - 1))
    shape = [1, C] + [1] * (x.dim() - 2)
    out = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + bn.eps)
    return out * bn.weight.view(shape) + bn.bias.view(shape) if bn.affine else out


def match_parameter_layout(optimizer):
    """Give each optimiser state tensor its parameter's memory layout. A loaded state keeps the layout
    it was saved in, and a run resumed with another (--deterministic switched: the ResNets become NCHW
    instead of channels_last; or another device) would hand the fused GPU optimisers state whose
    strides differ from their parameters'. The values are unchanged."""
    for p, state in optimizer.state.items():
        for key, value in state.items():
            if torch.is_tensor(value) and value.shape == p.shape and value.stride() != p.stride():
                state[key] = torch.empty_like(p).copy_(value)


def resume_data_order(generator, saved, seed):
    """Go on with the training loader's random order from its saved state, and return None. A state
    saved by a generator of another kind (the run trained on another device, or through the other
    loader) cannot be loaded: the generator is seeded with `seed` instead, and a note says so."""
    try:
        generator.set_state(saved)
        return None
    except RuntimeError:
        generator.manual_seed(seed)
        return ("note: the saved data order was drawn on another device or by the other loader and cannot go "
                f"on here: later epochs are shuffled from seed {seed}, not as an uninterrupted run's")


def train(args, step, device, run_dir, note=None, started=lambda: None):
    """Train the run in run_dir with `step`; `note` (build_step's) goes to stdout and the run's log;
    `started()` is called once the run directory is ready to be validated (see start_lock)."""
    set_seed(args.seed)
    data = datasets.load_data(args.dataset, args.data_dir, args.sample_size, args.SOTA)
    check_same_data(args, validate_NC.data_key(data))
    threads_note = keep_threads(args, device)
    model, channels_last = models.build_on_device(args, data.num_classes, device)
    # Under torchrun the forward pass runs through DDP (gradients all-reduced in backward); `model`
    # stays the plain module, whose state_dict the files hold, as in one process.
    distributed = dist.is_initialized()
    rank, size = world()
    writer = rank == 0  # the one process that writes the run's files
    net = None
    if distributed:
        if getattr(args, "sync_bn", False):
            model = sync_batchnorm(model, device)
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    optimizer = make_optimizer(args, model)
    scheduler = make_scheduler(args, optimizer)
    objective = make_objective(args, model, make_criterion(args, data.num_classes), net)
    train_loader, _ = datasets.make_loaders(data, args.batch_size, device, args.loader, train=True,
                                            seed=args.seed, num_workers=args.num_workers,
                                            channels_last=channels_last, share=(rank, size) if distributed else None)

    start, changed, order_note = 0, [], None
    if args.resume:
        if writer:  # what a killed process left: training's own temporaries, and any of the results
            rundir.clear_stale_training(run_dir)
            rundir.clear_stale_results(run_dir)
        # A new --epochs, --data_dir, ... is recorded, so that a later plain --resume goes on with it;
        # a run that was moved or renamed is left as it is.
        where = ("save_dir", "uid")
        before = {k: v for k, v in rundir.read_args(run_dir).items() if k not in where}
        changed = [f"--{k} {v} (was {before.get(k)})" for k, v in sorted(recorded(args).items())
                   if k not in where and before.get(k) != v]
        if changed and writer:
            rundir.write_args(run_dir, recorded(args))
        # rank 0 reads the state (load_state may repair last.pth) and sends it to the others
        state = broadcast_from_rank_zero(rundir.load_state(run_dir) if writer else None)
        if state is not None:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            match_parameter_layout(optimizer)
            scheduler.load_state_dict(state["scheduler"])
            set_rng_state(state["rng"])
            start = state["epoch"]
            order_note = resume_data_order(train_loader.generator, state["loader_rng"], args.seed + start)
        if writer:
            rundir.truncate_metrics(run_dir, start)  # the epochs after it are trained again
    elif writer:
        rundir.start_over(run_dir)
        rundir.write_args(run_dir, recorded(args))
    started()
    log = Log(os.path.join(run_dir, rundir.TRAIN_LOG)) if writer else (lambda line: None)
    log(f"{'resumed after epoch ' + str(start) if args.resume else 'started'} on {device}"
        + (f" with {', '.join(changed)}" if changed else "")
        + (f" and {size - 1} more ranks (torchrun{', --sync_bn' if getattr(args, 'sync_bn', False) else ''})"
           if distributed else ""))
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    say = print if writer else (lambda *a, **k: None)
    for line in filter(None, (note, order_note, threads_note)):
        log(line)
        say(line)
    say(f"run {run_dir}: {args.model} on {args.dataset} ({len(data.train_labels)} training images, "
          f"{data.num_classes} classes), {n_params:,} trainable parameters, {args.optimizer}, {device}")
    measurement, results = None, {}
    if args.nc_every:  # measured exactly as validate_NC.py measures, with its batch size
        measurement = validate_NC.Measurement(run_dir, args, data, model, device, channels_last, VALIDATION_BATCH)
        results = measurement.stored_results(max_epoch=start)
        # info.pkl keeps these when it is rewritten (validate_NC.write_info); a validation measures again
        # those that have checkpoints
        only_in_info = [e for e in sorted(rundir.validated_epochs(run_dir) - set(results))
                        if not rundir.stored_results(run_dir, e)]
        if only_in_info:
            line = (f"note: {rundir.INFO} holds {validate_NC.epochs_text(only_in_info)} without a result in "
                    f"{rundir.RESULTS}/ (removed?): it keeps them as they are")
            log(line)
            say(line)

    t0, stats, hint = time.time(), None, divergence_hint(args)
    epochs = tqdm(range(start + 1, args.epochs + 1), desc="training", initial=start, total=args.epochs,
                  dynamic_ncols=True, **({} if writer else {"disable": True}))  # TQDM_DISABLE still works
    for epoch in epochs:
        t = time.time()
        lr = optimizer.param_groups[0]["lr"]
        try:
            stats = train_one_epoch(model, train_loader, step, optimizer, objective, epoch, device, hint)
            if distributed:  # per-rank BatchNorm statistics: rank 0's are the run's, as DDP's next forward would make them
                for buffer in model.buffers():
                    dist.broadcast(buffer, 0)
            if not all_finite(model.state_dict()):
                raise TrainingDiverged(f"the weights became non-finite in epoch {epoch} and were not saved; "
                                       f"checkpoints of earlier epochs are kept: {hint}")
        except TrainingDiverged as e:
            log(f"stopped: {e}")
            raise
        scheduler.step()
        seconds = time.time() - t
        # loop_acc: the training loop's accuracies, in train mode on augmented batches while the weights
        # move; train_acc (where measured) is the measured one, as in info.pkl
        record = {"epoch": epoch, "loss": stats["loss"], "loop_acc1": stats["acc1"], "loop_acc5": stats["acc5"],
                  "lr": lr, "seconds": round(seconds, 3)}
        last = epoch == args.epochs
        kept = epoch % args.save_every == 0 or last
        if kept and writer:
            save_torch(model.state_dict(), rundir.checkpoint_path(run_dir, epoch))
        # Everything about the epoch is written before its resume state: a run killed before that
        # state lands does the epoch again, measurement included, and loses nothing.
        if measurement is not None and (epoch % args.nc_every == 0 or last):
            result = measure(measurement, epoch, log)
            if result is not None:
                results[epoch] = result
                if writer:
                    validate_NC.write_info(run_dir, results)
                record.update({name: result[key] for name, key in nc.INFO_KEYS.items() if name in IN_METRICS})
                record["nc_seconds"] = round(time.time() - t - seconds, 3)
        if not writer:
            continue
        with naming(os.path.join(run_dir, rundir.METRICS)):
            rundir.append_metrics(run_dir, record)
        rundir.save_state(run_dir, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "epoch": epoch, "checkpoint_kept": kept, "args": recorded(args), "rng": rng_state(),
            "loader_rng": train_loader.generator.get_state()})
        log(f"epoch {epoch:3d} | loss {stats['loss']:.6f} | loop acc1 {stats['acc1']:.2f} acc5 {stats['acc5']:.2f}"
            f" | lr {lr:.3g} | {seconds:.1f} s | {len(data.train_labels) / seconds:,.0f} img/s"
            + (f" | NC1 {record['NC1']:.4g}" if "NC1" in record else ""))
        epochs.set_postfix(loss=f"{stats['loss']:.4g}", acc=f"{stats['acc1']:.1f}",
                           **({"NC1": f"{record['NC1']:.3g}"} if "NC1" in record else {}))
    epochs.close()
    if stats is None:
        say(f"nothing to do: {run_dir} has all {args.epochs} epochs")
    else:
        say(f"trained epochs {start + 1}-{args.epochs} in {time.time() - t0:.1f} s: last loss {stats['loss']:.4g}, "
              f"loop acc {stats['acc1']:.2f}%; checkpoints in {run_dir}/"
              + (f", NC of {len(results)} epoch{'s' * (len(results) != 1)} in {run_dir}/{rundir.INFO}" if results else ""))
    return run_dir


# The quantities of each measured epoch that metrics.jsonl repeats (info.pkl has them all).
IN_METRICS = ("NC1", "NC2", "NC3", "NC4", "train_acc1", "train_acc5", "test_acc1", "test_acc5")


def measure(measurement, epoch, log):
    """The epoch's NC result, measured now and stored; None, with a warning, if it cannot be computed."""
    result, reason = measurement.measure(epoch)
    if reason is not None:
        log(f"warning: epoch {epoch} not measured: {reason}")
        print(f"warning: epoch {epoch} not measured: {reason}", file=sys.stderr)
    return result


def run(parser, make_step, optimizers, argv=None):
    """Parse the command line and train; the entry point of both training scripts."""
    argv = sys.argv[1:] if argv is None else argv
    return main(parser.parse_args(argv), make_step, optimizers, explicit_args(parser, argv))
