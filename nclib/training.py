"""The training loop that both training scripts share; they differ only in the step they pass
(nclib.steps). A run flows: checks (nclib.checks) -> data (datasets) -> model (models) -> optimiser ->
each epoch: steps, then its checkpoint, its NC measurement (nclib.measure) and its resume state, all
written through nclib.rundir, in an order that a kill at any line can resume from.

train() reads as its steps: build, start_or_resume, announce, in_run_measurement, then per epoch
train_one_epoch and end_epoch, and summary.
"""
import os
import sys
import time
from contextlib import ExitStack, contextmanager

import torch
from tqdm import tqdm

import datasets
import models
from args import VALIDATION_BATCH, explicit_args
from nclib import distributed, measure, nc, rundir
from nclib.base import WRITE_FIX, Log, UserError, all_finite, get_device, naming, rng_state, save_torch, set_rng_state, set_seed
from nclib.checks import (check_fits, check_run_dir, check_same_data, checked, keep_threads, recorded,
                          start_lock)
from nclib.distributed import broadcast_from_rank_zero, is_rank_zero, rank_device, torchrun_env, world
from nclib.losses import make_criterion
from nclib.nc import topk_hits
from nclib.optimizers import make_optimizer, make_scheduler, match_parameter_layout
from nclib.steps import build_step, make_objective

LOG_EVERY = 50  # steps between progress-bar updates (each one waits for the device)


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
            first_bad = distributed.max_over_ranks(first_bad)  # every rank stops together, and logs the global loss
            if first_bad.item() >= 0:
                raise TrainingDiverged(f"the loss became non-finite at epoch {epoch}, batch {first_bad.item() + 1}; "
                                       f"checkpoints of earlier epochs are kept: {hint}")
            bar.set_postfix(loss=f"{sums[0].item() / n:.4g}", acc=f"{100 * sums[1].item() / n:.1f}")
    if distributed.is_distributed():  # every rank's samples: rank 0 logs the global mean
        sums = distributed.sum_over_ranks(sums)
        n = distributed.sum_over_ranks(torch.tensor(float(n), dtype=torch.float64, device=device)).item()
    loss, top1, top5 = (sums / n).tolist()
    return {"loss": loss, "acc1": 100 * top1, "acc5": 100 * top5}


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


def run(parser, make_step, optimizers, argv=None):
    """Parse the command line and train; the entry point of both training scripts."""
    argv = sys.argv[1:] if argv is None else argv
    return main(parser.parse_args(argv), make_step, optimizers, explicit_args(parser, argv))


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


def main_torchrun(args, make_step, optimizers, given):
    """One run trained by every process torchrun started, with DistributedDataParallel. Rank 0
    decides whether the run may start, holds the run directory's lock and writes every file; it
    sends the others its decision (the arguments to train with, or why not)."""
    with distributed.process_group(), ExitStack() as lock, ExitStack() as starting:
        def decide():
            checked_args = checked(args, optimizers, given)
            distributed.check_torchrun(checked_args, world()[1])
            check_fits(checked_args, rank_device(checked_args.device))  # refuses a bad --device here, once
            run_dir = os.path.join(checked_args.save_dir, checked_args.uid)
            lock.enter_context(rundir.locked(run_dir, rundir.TRAIN_LOCK, "trained"))
            verdict = check_run_dir(checked_args, dict(given))
            starting.enter_context(start_lock(verdict, run_dir))
            return verdict
        args = distributed.decided_on_rank_zero(decide)
        device = rank_device(args.device)
        step, note = build_step(args, make_step, device, distributed=True)
        run_dir = os.path.join(args.save_dir, args.uid)
        with attempt(args, run_dir):
            return train(args, step, device, run_dir, note, started=starting.close)


# ---------------------------------------------------------------------------- train() and its steps

def train(args, step, device, run_dir, note=None, started=lambda: None):
    """Train the run in run_dir with `step`; `note` (build_step's) goes to stdout and the run's log;
    `started()` is called once the run directory is ready to be validated (see checks.start_lock)."""
    set_seed(args.seed)
    data = datasets.load_data(args.dataset, args.data_dir, args.sample_size, args.SOTA)
    check_same_data(args, measure.data_key(data))
    threads_note = keep_threads(args, device)
    run = build(args, data, device)
    writer = is_rank_zero()  # the one process that writes the run's files
    start, changed, order_note = start_or_resume(args, run_dir, run, writer)
    started()
    log, say = announce(args, run_dir, run, device, start, changed, (note, order_note, threads_note), writer)
    measurement, results = in_run_measurement(args, run_dir, run, device, start, log, say)

    t0, stats, hint = time.time(), None, divergence_hint(args)
    epochs = tqdm(range(start + 1, args.epochs + 1), desc="training", initial=start, total=args.epochs,
                  dynamic_ncols=True, **({} if writer else {"disable": True}))  # TQDM_DISABLE still works
    for epoch in epochs:
        t, lr = time.time(), run.optimizer.param_groups[0]["lr"]
        try:
            stats = train_one_epoch(run.model, run.train_loader, step, run.optimizer, run.objective, epoch, device, hint)
            distributed.broadcast_buffers(run.model)
            if not all_finite(run.model.state_dict()):
                raise TrainingDiverged(f"the weights became non-finite in epoch {epoch} and were not saved; "
                                       f"checkpoints of earlier epochs are kept: {hint}")
        except TrainingDiverged as e:
            log(f"stopped: {e}")
            raise
        run.scheduler.step()
        record = end_epoch(args, run_dir, run, epoch, stats, lr, time.time() - t, measurement, results, log, writer)
        epochs.set_postfix(loss=f"{stats['loss']:.4g}", acc=f"{stats['acc1']:.1f}",
                           **({"NC1": f"{record['NC1']:.3g}"} if "NC1" in record else {}))
    epochs.close()
    say(summary(args, run_dir, start, stats, results, time.time() - t0))
    return run_dir


class Run:
    """What training holds of a run: the model (the plain module, whose state_dict the files hold), its
    optimiser, schedule, objective and training loader, and the data set and layout they were made for."""

    def __init__(self, **parts):
        self.__dict__.update(parts)


def build(args, data, device):
    """The run's model, optimiser, schedule, objective and training loader. Under torchrun the forward
    pass runs through DDP (distributed.wrap); `model` stays the plain module."""
    model, channels_last = models.build_on_device(args, data.num_classes, device)
    model, net = distributed.wrap(model, device, getattr(args, "sync_bn", False))
    optimizer = make_optimizer(args, model)
    rank, size = world()
    return Run(data=data, model=model, channels_last=channels_last, optimizer=optimizer,
               scheduler=make_scheduler(args, optimizer),
               objective=make_objective(args, model, make_criterion(args, data.num_classes), net),
               train_loader=datasets.make_loaders(
                   data, args.batch_size, device, args.loader, train=True, seed=args.seed,
                   num_workers=args.num_workers, channels_last=channels_last,
                   share=(rank, size) if distributed.is_distributed() else None)[0])


def start_or_resume(args, run_dir, run, writer):
    """A new run: its directory emptied and args.json written. A resumed one: what a killed process
    left cleared, the arguments that changed recorded, and the model, optimiser, schedule and random
    states loaded from the last complete epoch. Returns (the epoch to start after, [what changed],
    a note on the data order or None)."""
    if not args.resume:
        if writer:
            rundir.start_over(run_dir)
            rundir.write_args(run_dir, recorded(args))
        return 0, [], None
    start, order_note = 0, None
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
        run.model.load_state_dict(state["model"])
        run.optimizer.load_state_dict(state["optimizer"])
        match_parameter_layout(run.optimizer)
        run.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        start = state["epoch"]
        order_note = resume_data_order(run.train_loader.generator, state["loader_rng"], args.seed + start)
    if writer:
        rundir.truncate_metrics(run_dir, start)  # the epochs after it are trained again
    return start, changed, order_note


def announce(args, run_dir, run, device, start, changed, notes, writer):
    """The run's first lines, in its log and on stdout. Returns (log, say): the run's log and print,
    both silent on every rank but 0."""
    log = Log(os.path.join(run_dir, rundir.TRAIN_LOG)) if writer else (lambda line: None)
    size = world()[1]
    log(f"{'resumed after epoch ' + str(start) if args.resume else 'started'} on {device}"
        + (f" with {', '.join(changed)}" if changed else "")
        + (f" and {size - 1} more ranks (torchrun{', --sync_bn' if getattr(args, 'sync_bn', False) else ''})"
           if distributed.is_distributed() else ""))
    n_params = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
    say = print if writer else (lambda *a, **k: None)
    for line in filter(None, notes):
        log(line)
        say(line)
    say(f"run {run_dir}: {args.model} on {args.dataset} ({len(run.data.train_labels)} training images, "
        f"{run.data.num_classes} classes), {n_params:,} trainable parameters, {args.optimizer}, {device}")
    return log, say


def in_run_measurement(args, run_dir, run, device, start, log, say):
    """(measurement, {epoch: result} so far) for --nc_every, measured exactly as validate_NC.py measures,
    with its batch size and the --measures asked for; (None, {}) without it."""
    if not args.nc_every:
        return None, {}
    measures = measure.parse_measures(getattr(args, "measures", None))
    measurement = measure.Measurement(run_dir, args, run.data, run.model, device, run.channels_last,
                                      VALIDATION_BATCH, measures)
    results = measurement.stored_results(max_epoch=start)
    # info.pkl keeps these when it is rewritten (measure.write_info); a validation measures again
    # those that have checkpoints
    only_in_info = [e for e in sorted(rundir.validated_epochs(run_dir) - set(results))
                    if not rundir.stored_results(run_dir, e)]
    if only_in_info:
        line = (f"note: {rundir.INFO} holds {measure.epochs_text(only_in_info)} without a result in "
                f"{rundir.RESULTS}/ (removed?): it keeps them as they are")
        log(line)
        say(line)
    return measurement, results


def end_epoch(args, run_dir, run, epoch, stats, lr, seconds, measurement, results, log, writer):
    """Everything about a trained epoch, written before its resume state: its checkpoint (if kept), its
    NC result (if measured), its line of metrics.jsonl and train_log.txt. A run killed before the resume
    state lands does the epoch again, measurement included, and loses nothing. Returns its record."""
    t = time.time()
    # loop_acc: the training loop's accuracies, in train mode on augmented batches while the weights
    # move; train_acc (where measured) is the measured one, as in info.pkl
    record = {"epoch": epoch, "loss": stats["loss"], "loop_acc1": stats["acc1"], "loop_acc5": stats["acc5"],
              "lr": lr, "seconds": round(seconds, 3)}
    last = epoch == args.epochs
    kept = epoch % args.save_every == 0 or last
    if kept and writer:
        save_torch(run.model.state_dict(), rundir.checkpoint_path(run_dir, epoch))
    if measurement is not None and (epoch % args.nc_every == 0 or last):
        result = measure_epoch(measurement, epoch, log)
        if result is not None:
            results[epoch] = result
            if writer:
                measure.write_info(run_dir, results)
            record.update({name: result[key] for name, key in nc.INFO_KEYS.items() if name in IN_METRICS})
            record["nc_seconds"] = round(time.time() - t, 3)
    if not writer:
        return record
    with naming(os.path.join(run_dir, rundir.METRICS)):
        rundir.append_metrics(run_dir, record)
    rundir.save_state(run_dir, {
        "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(), "epoch": epoch, "checkpoint_kept": kept, "args": recorded(args),
        "rng": rng_state(), "loader_rng": run.train_loader.generator.get_state()})
    log(f"epoch {epoch:3d} | loss {stats['loss']:.6f} | loop acc1 {stats['acc1']:.2f} acc5 {stats['acc5']:.2f}"
        f" | lr {lr:.3g} | {seconds:.1f} s | {len(run.data.train_labels) / seconds:,.0f} img/s"
        + (f" | NC1 {record['NC1']:.4g}" if "NC1" in record else ""))
    return record


def summary(args, run_dir, start, stats, results, seconds):
    """The run's last line on stdout."""
    if stats is None:
        return f"nothing to do: {run_dir} has all {args.epochs} epochs"
    return (f"trained epochs {start + 1}-{args.epochs} in {seconds:.1f} s: last loss {stats['loss']:.4g}, "
            f"loop acc {stats['acc1']:.2f}%; checkpoints in {run_dir}/"
            + (f", NC of {len(results)} epoch{'s' * (len(results) != 1)} in {run_dir}/{rundir.INFO}" if results else ""))


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


# The quantities of each measured epoch that metrics.jsonl repeats (info.pkl has them all).
IN_METRICS = ("NC1", "NC2", "NC3", "NC4", "train_acc1", "train_acc5", "test_acc1", "test_acc5")


def measure_epoch(measurement, epoch, log):
    """The epoch's NC result, measured now and stored; None, with a warning, if it cannot be computed."""
    result, reason = measurement.measure(epoch)
    if reason is not None:
        log(f"warning: epoch {epoch} not measured: {reason}")
        print(f"warning: epoch {epoch} not measured: {reason}", file=sys.stderr)
    return result
