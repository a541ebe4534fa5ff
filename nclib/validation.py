"""validate_NC.py's work: measure every checkpoint of a run directory (through nclib.measure) and
write <run>/info.pkl and <run>/test_log.txt; under torchrun each rank measures its block of the data."""
import argparse
import os
import sys
import time
import warnings
from contextlib import nullcontext

from tqdm import tqdm

import datasets
import models
from args import MODEL_FLAGS, explicit_args, train_parser, validate_parser
from nclib import rundir
from nclib.base import UserError, get_device
from nclib.distributed import broadcast_from_rank_zero, is_rank_zero, process_group, rank_device, torchrun_env, world
from nclib.measure import (Measurement, epochs_text, load_checkpoint, parse_measures, select_layers, write_info,
                           format_line)


def run_arguments(cli, given):
    """The run's recorded training arguments, with this command's data and device options.
    A model or data-set flag given here that disagrees with the record is refused."""
    recorded = rundir.read_args(cli.load_path)
    if recorded is None:  # a run directory from elsewhere: trust the command line
        warnings.warn(f"{os.path.join(cli.load_path, rundir.ARGS)} not found: "
                      "the model and data set are taken from the command line")
        return argparse.Namespace(**vars(cli), sample_size=None)
    clash = [f"--{k} {given[k]} (the run has {recorded.get(k)})" for k in MODEL_FLAGS
             if k in given and given[k] != recorded.get(k)]
    if clash:
        raise UserError(f"{', '.join(clash)}: the checkpoints in {cli.load_path} were trained otherwise; "
                        "drop these flags (they are read from the run)")
    # options newer than the run take their defaults (args.RECORD_REQUIRED are there: read_args checked)
    merged = {**vars(train_parser().parse_args([])), **recorded}
    merged.update({k: getattr(cli, k) for k in ("batch_size", "gpu_id", "device", "loader", "num_workers")})
    if "data_dir" in given:
        merged["data_dir"] = cli.data_dir
    return argparse.Namespace(**merged)


def main(argv=None):
    """validate_NC.py's work. Under torchrun every rank evaluates its block of the data and the statistics
    are merged (see measure.evaluate); rank 0 alone holds the lock and writes."""
    if torchrun_env() is None:
        return main_one(argv)
    with process_group():
        return main_one(argv)


def main_one(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = validate_parser()
    cli = parser.parse_args(argv)
    cli.load_path = run_dir = os.path.normpath(cli.load_path)
    if not os.path.isdir(run_dir):
        raise UserError(f"--load_path {run_dir} is not a directory; give a run directory such as model_weights/<uid>")
    if not rundir.list_checkpoints(run_dir, cli.epochs) and not rundir.result_epochs(run_dir):
        raise UserError(f"no checkpoints named epoch_NNN.pth in {run_dir}; train first, or check --load_path")
    measures = parse_measures(cli.measures)
    recorded = rundir.read_args(run_dir)
    args = run_arguments(cli, explicit_args(parser, argv))
    rundir.results_dir(run_dir)  # refuses a file in the way before any work
    distributed = torchrun_env() is not None
    if distributed and (measures or cli.layers is not None):
        raise UserError("--measures and --layers are measured by one process: run validate_NC.py without torchrun")
    device = rank_device(args.device) if distributed else get_device(args.gpu_id, args.device)
    lock = rundir.locked(run_dir, rundir.VALIDATE_LOCK, "validated",
                         fix="validation writes info.pkl and nc_results/ there: make it writable, or validate a copy "
                             "of it (--load_path)")
    with lock if is_rank_zero() else nullcontext():
        if is_rank_zero() and network(rundir.read_args(run_dir)) != network(recorded):  # read before the lock
            raise UserError(f"{run_dir} was started over with another model or data by another process as this "
                            "validation began: run it again")
        return validate(args, run_dir, rundir.list_checkpoints(run_dir, cli.epochs), device, cli.epochs,
                        measures, cli.layers)


def network(record):
    """What validation takes from a run's record to build its model and data."""
    return {k: (record or {}).get(k) for k in MODEL_FLAGS + ("sample_size",)}


def validate(args, run_dir, checkpoints, device, max_epoch=None, measures=(), layers=None):
    """layers: None (no per-layer measures), [] (every layer) or layer names."""
    data = datasets.load_data(args.dataset, args.data_dir, args.sample_size, args.SOTA)
    model, channels_last = models.build_on_device(args, data.num_classes, device)
    layers = () if layers is None else select_layers(model, layers)
    measurement = Measurement(run_dir, args, data, model, device, channels_last, args.batch_size, measures, layers)
    in_range = (lambda e: True) if max_epoch is None else (lambda e: e <= max_epoch)
    # Epochs measured during training whose checkpoints were not kept: their results are all there is
    # (without the extra measures, if they were measured without them: those entries are None).
    results, other, unreadable = {}, [], []
    for e in rundir.result_epochs(run_dir):
        if in_range(e) and not os.path.exists(rundir.checkpoint_path(run_dir, e)):
            r = measurement.stored(e) or measurement.stored_paper(e)
            if r is not None:
                results[e] = r
            else:
                (unreadable if rundir.stored_results(run_dir, e) is None else other).append(e)
    if other:
        warnings.warn(f"{rundir.INFO} leaves out {epochs_text(other)}: measured during training on other data or by "
                      "other code, without a kept checkpoint, so not measurable here (the results stay in "
                      f"{rundir.RESULTS}/)")
    skipped, computed, t0 = [], 0, time.time()
    # Under torchrun, rank 0 decides what is reused (its writes must not change another rank's answer)
    reuse = broadcast_from_rank_zero({e: measurement.stored(e) for e, _ in checkpoints} if is_rank_zero() else None) \
        if world()[1] > 1 else None
    quiet = {} if is_rank_zero() else {"disable": True}  # (passed only when set: TQDM_DISABLE still works)
    for epoch, path in tqdm(checkpoints, desc="validating", dynamic_ncols=True, **quiet):
        result = measurement.stored(epoch) if reuse is None else reuse[epoch]
        if result is None:
            reason = load_checkpoint(model, path, device)
            if reason is None:
                result, reason = measurement.measure(epoch)
            if reason is not None:
                warnings.warn(f"skipping {path}: {reason}")
                skipped.append(epoch)
                continue
            computed += 1
        results[epoch] = result
    if not results:  # info.pkl stays as it is
        raise UserError(f"none of the {len(checkpoints)} checkpoints in {run_dir} could be evaluated; "
                        "were they written by this repository for this model?")
    if not is_rank_zero():
        return None

    def keep(e):
        """Whether an earlier info.pkl's entry of an epoch not in results stays: all do but those of
        epochs without a checkpoint whose results nc_results/ holds under other keys (left out above)."""
        return not in_range(e) or e not in other
    info = write_info(run_dir, results, keep)
    epochs = info["epochs"]
    kept = [e for e in epochs if e not in results and in_range(e)]
    if kept:
        unmeasurable = [e for e in kept if e in skipped]
        damaged = [e for e in kept if e in unreadable]
        gone = [e for e in kept if e not in skipped + unreadable
                and not os.path.exists(rundir.checkpoint_path(run_dir, e))]
        why = [(unmeasurable, "their checkpoints cannot be measured"),
               (damaged, f"their files in {rundir.RESULTS}/ cannot be read, and their checkpoints are gone"),
               (gone, f"neither their checkpoints nor their results in {rundir.RESULTS}/ are left")]
        warnings.warn(f"{rundir.INFO} keeps its earlier results of "
                      + "; ".join(f"{epochs_text(es)} ({reason})" for es, reason in why if es))
    lost = [e for e in unreadable if e not in epochs]
    if lost:
        warnings.warn(f"{rundir.INFO} leaves out {epochs_text(lost)}: the files in {rundir.RESULTS}/ cannot be read, "
                      "and the checkpoints are gone")
    print(f"validated {len(results)} epochs ({computed} computed, {len(results) - computed} reused, "
          f"{len(skipped)} skipped) in {time.time() - t0:.1f} s; wrote {run_dir}/{rundir.INFO}"
          + (f" ({len(epochs)} epochs)" if len(epochs) != len(results) else ""))
    print("last " + format_line(epochs[-1], {k: v[-1] for k, v in info.items() if k != "epochs"}))
    return info
