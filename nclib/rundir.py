"""A run directory, <save_dir>/<uid>/: the one module that knows its files.

    args.json        the training arguments; validation, plotting and --resume read them
    train_log.txt    one line per epoch (and a line per start, resume or stop)
    epoch_NNN.pth    the model's state_dict after epoch NNN (three digits or more, zero-padded)
    last.pth         everything needed to resume: model, optimizer, scheduler, epoch, arguments and
                     random states; previous.pth is the one before it, kept in case last.pth is damaged
    nc_results/      one pickle per validated checkpoint: its newest results, each keyed to everything
                     its numbers depend on (so validating on another copy of the data and back reuses them)
    info.pkl         the per-checkpoint results as lists in epoch order (the authors' format); rebuilt
                     from the results at hand, it keeps what it held that can be found nowhere else
    test_log.txt     one line of NC1-NC4 and accuracies per validated checkpoint
    metrics.jsonl    one JSON object per trained epoch (loss, the training loop's accuracies loop_acc1/5,
                     learning rate, seconds, and where measured NC1-NC4 and the measured accuracies
                     train_acc1/5, test_acc1/5), appended as each epoch ends: `tail -f` follows a run
    .lock, .validate.lock   held (flock) by the process that trains, or validates, the run, so that a
                     second one is refused; a start over (--force) holds both until the old run is gone.
                     The kernel drops a dead process's lock
    .results.lock    held, for the moment of a write, by whoever writes nc_results/, info.pkl or test_log.txt
                     (a validation and a training that measures as it goes take turns)

Every file is written to a temporary name beside it and renamed into place (nclib.base.atomic_write),
so a process killed at any instant leaves whole files only, plus at most one `.tmp_*` file, which
the next process that holds the lock of its kind removes.

A run is 'new' (nothing yet), 'partial' (args.json is there), 'trained' (the checkpoint of its
last epoch is there) or 'done' (info.pkl covers every epoch).
"""
import argparse
import errno
import fcntl
import fnmatch
import glob
import json
import os
import pickle
import re
from contextlib import contextmanager, nullcontext

import torch

import args
from nclib.base import UserError, atomic_write, first_line, load_json, save_json, save_pickle, save_torch

ARGS, TRAIN_LOG, LAST, PREVIOUS = "args.json", "train_log.txt", "last.pth", "previous.pth"
INFO, TEST_LOG, RESULTS, METRICS = "info.pkl", "test_log.txt", "nc_results", "metrics.jsonl"
RUNBOOK_LOG = "runbook.log"  # the output of the runbook's commands for this run (experiments.py --jobs)
TRAIN_LOCK, VALIDATE_LOCK, RESULTS_LOCK = ".lock", ".validate.lock", ".results.lock"
LOCKS = (TRAIN_LOCK, VALIDATE_LOCK, RESULTS_LOCK)
CHECKPOINT = re.compile(r"^epoch_(\d{3,})\.pth$")
RESULT = re.compile(r"^epoch_(\d{3,})\.pkl$")
# Results of one checkpoint kept under different keys (data, model flags, metric version): the newest.
RESULTS_PER_CHECKPOINT = 4
# What a process killed mid-save leaves behind: the temporary files of nclib.base.atomic_write, named
# .tmp_<file>.<random>. Those of the results are written under RESULTS_LOCK, the others by training.
STALE = (".tmp_*",)
STALE_RESULTS = (f".tmp_{INFO}.*", f".tmp_{TEST_LOG}.*", f"{RESULTS}/.tmp_*")
# Files of a run that --force removes before starting over (the locks stay: they are held).
RUN_FILES = ("epoch_*.pth", LAST, PREVIOUS, ARGS, TRAIN_LOG, INFO, TEST_LOG, METRICS, f"{RESULTS}/*.pkl", *STALE,
             f"{RESULTS}/.tmp_*")


def checkpoint_path(run_dir, epoch):
    return os.path.join(run_dir, f"epoch_{epoch:03d}.pth")


def list_checkpoints(run_dir, max_epoch=None):
    """[(epoch, path)] of the epoch_NNN.pth files, in epoch order. Only the names this repository
    writes count: epoch_1.pth beside epoch_001.pth is not a second epoch 1."""
    found = []
    for name in os.listdir(run_dir):
        m = CHECKPOINT.match(name)
        if m and name == os.path.basename(checkpoint_path(run_dir, int(m.group(1)))):
            found.append((int(m.group(1)), os.path.join(run_dir, name)))
    return sorted((e, p) for e, p in found if max_epoch is None or e <= max_epoch)


def has_run(run_dir):
    """Whether run_dir holds a run (a run killed while writing args.json left only a temporary file;
    the runbook's log is written before the run starts)."""
    return os.path.isdir(run_dir) and any(not name.startswith(".") and name != RUNBOOK_LOG
                                          for name in os.listdir(run_dir))


def check_is_dir_or_absent(path, flag):
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{flag} {path} is a file, not a folder; choose another {flag}")


def check_folder(path, flag, must_exist=False):
    """Refuse, in one line, a folder of runs that is a file, lies under a file, or cannot be looked
    at (a symlink loop, no permission); an absent one too where must_exist."""
    try:
        os.stat(path)
    except FileNotFoundError:
        if must_exist:
            raise UserError(f"{flag} {path}: no such folder; give the folder of the run directories")
        return
    except NotADirectoryError:
        raise UserError(f"{flag} {path} lies under a file, not a folder; choose another {flag}")
    except OSError as e:
        raise UserError(f"{flag} {path} cannot be looked at ({e.strerror}); choose another {flag}")
    check_is_dir_or_absent(path, flag)


# ---------------------------------------------------------------------------- arguments

# What args.json must hold: the options (args.train_parser's) that fix a run's numbers and that every
# run recorded. An option newer than a run (--nc_every, --cuda_graph, ...) or one that says where
# things are (--data_dir, --device, ...) takes its default when missing.
RECORD_REQUIRED = args.MODEL_FLAGS + ("sample_size", "batch_size", "seed", "epochs", "loss", "M", "k", "optimizer",
                                      "lr", "patience", "decay_type", "gamma", "weight_decay", "sep_decay",
                                      "feature_decay_rate", "history_size", "amp", "compile")


def record_problem(record):
    """Why a recorded value (args.json's) is not one its option could have given, as `KEY is VALUE,
    not ...`; None when every known key is fine (keys of no option are left alone)."""
    actions = {}
    for action in args.train_parser()._actions:
        actions.setdefault(action.dest, []).append(action)
    for key, value in record.items():
        if key not in actions:
            continue
        action = actions[key][0]
        expected = _expected(action, actions[key], value)
        if expected is not None:
            return f"{key} is {json.dumps(value)}, not {expected}"
    return None


def _expected(action, same_dest, value):
    """None if `value` fits the option, else what it should be (in words)."""
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse.BooleanOptionalAction)):
        return None if isinstance(value, bool) else "true or false"
    if isinstance(action, argparse._StoreConstAction):  # --cuda_graph / --no_cuda_graph and the default
        allowed = [action.default] + [a.const for a in same_dest]
        return None if any(value is a for a in allowed) else " or ".join(json.dumps(a) for a in allowed)
    if value is None and action.default is None:
        return None
    if action.nargs in ("+", "*"):  # --measures: a list of strings
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        return None if ok else "a list of strings"
    if action.choices is not None:
        return None if value in action.choices and isinstance(value, str) else \
            "one of " + ", ".join(map(str, action.choices))
    if action.type in (None, args.path, args.run_name):
        return None if isinstance(value, str) else "a string"
    kind = "an integer" if action.type in (int, args.positive_int, args.nonnegative_int, args.seed_int) else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return kind
    try:
        return None if action.type(str(value)) == value else kind
    except argparse.ArgumentTypeError as e:  # out of range: its own words, "must be a positive integer, got 0"
        return str(e).removeprefix("must be ").split(", got ")[0]
    except ValueError:
        return kind


def read_args(run_dir):
    """The recorded training arguments (a dict), or None when the run has no args.json."""
    path = os.path.join(run_dir, ARGS)
    if not os.path.exists(path):
        return None
    try:
        record = load_json(path)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path} ({' '.join(str(e).split())[:120]}): restore it, "
                        "or start the run again with --force")
    if not isinstance(record, dict):
        raise UserError(f"{path} is not a run's arguments (it holds a {type(record).__name__}): restore it, "
                        "or start the run again with --force")
    missing = [k for k in RECORD_REQUIRED if k not in record]
    if missing:
        raise UserError(f"{path} has no {', '.join(missing)}: restore it (or add the values the run was trained "
                        "with), or start the run again with --force")
    problem = record_problem(record)
    if problem:
        raise UserError(f"{path}: {problem}: correct it to the value the run was trained with, "
                        "or start the run again with --force")
    return record


def write_args(run_dir, record):
    save_json(record, os.path.join(run_dir, ARGS))


# ---------------------------------------------------------------------------- resume state

def save_state(run_dir, state):
    """last.pth <- state; the former last.pth becomes previous.pth."""
    last = os.path.join(run_dir, LAST)
    if os.path.exists(last):
        os.replace(last, os.path.join(run_dir, PREVIOUS))
    save_torch(state, last)


def load_state(run_dir, warn=print):
    """The newest of last.pth / previous.pth that loads and whose epoch checkpoint, if the epoch kept
    one, is intact (None when neither is). A missing or damaged epoch checkpoint makes its state
    unusable: that epoch is redone."""
    for name in (LAST, PREVIOUS):
        path = os.path.join(run_dir, name)
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)  # RNG states must stay on the CPU
            if state.get("checkpoint_kept", True):
                torch.load(checkpoint_path(run_dir, state["epoch"]), map_location="cpu", weights_only=True)
            if name == PREVIOUS:
                # The unusable last.pth would otherwise become previous.pth at the next save, leaving
                # no usable state at all should the run be killed before last.pth is written again.
                os.replace(path, os.path.join(run_dir, LAST))
            return state
        except Exception as e:
            if os.path.exists(path):
                warn(f"warning: cannot resume from {path} ({first_line(e, 120)}); trying an older state")
    return None


def finished_epoch(run_dir):
    """The last epoch the run finished: its resume state's (last.pth, or previous.pth when that cannot
    be read) or its newest checkpoint's, whichever is later; 0 for none. With --save_every the
    newest checkpoint may be epochs older than the state. Reads no weights (the files are mapped)."""
    done = max((e for e, _ in list_checkpoints(run_dir)), default=0)
    for name in (LAST, PREVIOUS):
        try:
            state = torch.load(os.path.join(run_dir, name), map_location="cpu", weights_only=False, mmap=True)
            return max(done, int(state["epoch"]))
        except Exception:
            continue
    return done


def append_metrics(run_dir, record):
    with open(os.path.join(run_dir, METRICS), "a") as f:
        f.write(json.dumps(record) + "\n")


# Files written before the training loop's accuracies were named loop_acc1/5 held them under the
# names that now mean the measured accuracies, as in info.pkl: such a record (no loop_acc1) is read
# with its keys renamed.
FORMER_LOOP_KEYS = {"train_acc1": "loop_acc1", "train_acc5": "loop_acc5"}


def read_metrics(run_dir):
    """The records of metrics.jsonl, one per epoch (the last record of an epoch trained twice);
    a line cut short by a kill is left out. A former file's loop accuracies come under their names."""
    records = {}
    try:
        with open(os.path.join(run_dir, METRICS)) as f:
            for line in f:
                try:
                    record = json.loads(line)
                    if "loop_acc1" not in record:
                        record = {FORMER_LOOP_KEYS.get(key, key): value for key, value in record.items()}
                    records[int(record["epoch"])] = record
                except (ValueError, KeyError, TypeError):
                    continue
    except FileNotFoundError:
        pass
    return [records[e] for e in sorted(records)]


def truncate_metrics(run_dir, last_epoch):
    """Keep the records of epochs up to last_epoch (a resumed run trains the later ones again)."""
    path = os.path.join(run_dir, METRICS)
    if os.path.exists(path):
        kept = "".join(json.dumps(r) + "\n" for r in read_metrics(run_dir) if r["epoch"] <= last_epoch)
        with open(path) as f:
            if f.read() == kept:  # nothing to cut: the file stays as it is
                return
        atomic_write(path, lambda f: f.write(kept.encode()))


def clear(run_dir, patterns=RUN_FILES):
    for pattern in patterns:
        for path in glob.glob(os.path.join(run_dir, pattern)):
            os.remove(path)


# ---------------------------------------------------------------------------- per-checkpoint results

def results_dir(run_dir):
    path = os.path.join(run_dir, RESULTS)
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{path} is a file, but validation keeps its results in a folder of that name: "
                        "move the file away")
    return path


def checkpoint_id(path):
    """What identifies a checkpoint file's contents without reading it: size and modification time."""
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def result_epochs(run_dir):
    """The epochs with a stored results file, in order."""
    folder = os.path.join(run_dir, RESULTS)
    names = os.listdir(folder) if os.path.isdir(folder) else []
    return sorted(int(m.group(1)) for m in map(RESULT.match, names) if m)


def results_path(run_dir, epoch):
    return os.path.join(run_dir, RESULTS, f"epoch_{epoch:03d}.pkl")


def stored_results(run_dir, epoch):
    """[(key, result)] stored for a checkpoint, newest first: [] without a file, None when it cannot be read."""
    try:
        with open(results_path(run_dir, epoch), "rb") as f:
            saved = pickle.load(f)
        return [(entry["key"], entry["result"]) for entry in saved["results"]]
    except FileNotFoundError:
        return []
    except Exception:
        return None


def _without(key, field):
    return {k: v for k, v in key.items() if k != field} if isinstance(key, dict) else key


def read_result(run_dir, epoch, key, ignoring=None):
    """The stored result of a checkpoint, if it was computed under exactly `key` (None otherwise);
    with ignoring=FIELD, under a key that equals `key` but for that field."""
    same = (lambda k: k == key) if ignoring is None else (lambda k: _without(k, ignoring) == _without(key, ignoring))
    return next((result for k, result in stored_results(run_dir, epoch) or [] if same(k)), None)


def write_result(run_dir, epoch, key, result):
    """Store a checkpoint's result under `key`, beside the newest results under other keys (the
    same checkpoint measured on another copy of the data, say), so that going back to them reuses them."""
    folder = results_dir(run_dir)
    os.makedirs(folder, exist_ok=True)
    with results_locked(run_dir):
        kept = [(key, result)] + [(k, r) for k, r in stored_results(run_dir, epoch) or [] if k != key]
        save_pickle({"results": [{"key": k, "result": r} for k, r in kept[:RESULTS_PER_CHECKPOINT]]},
                    results_path(run_dir, epoch))


def write_info(run_dir, results, info_keys, format_line):
    """info.pkl (each of `info_keys` as a list in epoch order, plus `epochs`) and test_log.txt,
    from results = {epoch: result dict}."""
    epochs = sorted(results)
    info = {key: [results[e][key] for e in epochs] for key in info_keys}
    info["epochs"] = epochs
    save_pickle(info, os.path.join(run_dir, INFO))
    lines = "".join(format_line(e, results[e]) + "\n" for e in epochs)
    atomic_write(os.path.join(run_dir, TEST_LOG), lambda f: f.write(lines.encode()))
    return info


def read_info(run_dir):
    """The info dict of info.pkl. Raises OSError/pickle errors when it cannot be read, and
    ValueError when it is not an info dict of equally long lists."""
    with open(os.path.join(run_dir, INFO), "rb") as f:
        info = pickle.load(f)
    if not isinstance(info, dict):
        raise ValueError(f"it holds a {type(info).__name__}, not a dict")
    lengths = {k: len(v) for k, v in info.items() if isinstance(v, (list, tuple))}
    if len(set(lengths.values())) > 1:
        raise ValueError("its lists differ in length (" +
                         ", ".join(f"{k} {n}" for k, n in sorted(lengths.items())) + ")")
    return info


def info_entries(run_dir):
    """{epoch: its entry} of the info.pkl there now (the epoch's item of each list); {} without one.
    Raises as read_info does when it cannot be read."""
    if not os.path.exists(os.path.join(run_dir, INFO)):
        return {}
    info = read_info(run_dir)
    lists = {k: v for k, v in info.items() if k != "epochs" and isinstance(v, (list, tuple))}
    return {e: {k: v[i] for k, v in lists.items()} for i, e in enumerate(info_epochs(info))}


def info_epochs(info):
    """The epoch of each entry; info.pkl files without an `epochs` key count 1, 2, ..."""
    if "epochs" in info:
        return [int(e) for e in info["epochs"]]
    n = max((len(v) for v in info.values() if isinstance(v, (list, tuple))), default=0)
    return list(range(1, n + 1))


def validated_epochs(run_dir):
    """The epochs that info.pkl covers (empty when it is missing or unreadable)."""
    try:
        return set(info_epochs(read_info(run_dir)))
    except Exception:
        return set()


def state(run_dir, epochs):
    """'done', 'trained', 'partial' or 'new' (see the module docstring)."""
    if set(range(1, epochs + 1)) <= validated_epochs(run_dir):
        return "done"
    if os.path.isfile(checkpoint_path(run_dir, epochs)):
        return "trained"
    if os.path.isfile(os.path.join(run_dir, ARGS)):
        return "partial"
    return "new"


# ---------------------------------------------------------------------------- ownership

def _open_lock(run_dir, lock_name, fix):
    """The open lock file run_dir/lock_name (a file descriptor); a folder in its way, or a run directory
    where no file can be created, is a UserError naming it (and `fix`, what to do about the latter)."""
    path = os.path.join(run_dir, lock_name)
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        if os.path.isdir(path):
            raise UserError(f"{path} is a folder, where the run keeps a lock file: move it away, then run again")
        raise UserError(f"cannot write in the run directory {run_dir} ({e.strerror}): {fix}")


@contextmanager
def locked(run_dir, lock_name=TRAIN_LOCK, what="trained", fix="choose a writable --save_dir"):
    """Hold run_dir's lock for the body, creating run_dir if needed; the lock file says who holds it
    (its pid) and `what` is being done. Another process holding it is refused in one line, which
    names them. The lock is an flock, so a killed process never leaves it stuck; should the body
    refuse to start, a run directory created here is removed again. `fix` says what to do when no
    lock file can be created there."""
    created, folder = [], os.path.abspath(run_dir)  # the folders made here, deepest first
    while not os.path.exists(folder):
        created.append(folder)
        folder = os.path.dirname(folder)
    try:
        os.makedirs(run_dir, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the run directory {run_dir} ({e.strerror}): choose a writable --save_dir")
    fd = _open_lock(run_dir, lock_name, fix)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            # the holder's pid and what it does (a start over holds validation's lock too)
            pid, _, doing = os.read(fd, 128).decode(errors="replace").partition("\n")
            raise UserError(f"{run_dir} is being {doing.strip() or what} by another process "
                            f"(pid {pid.strip() or '?'}); wait for it to finish, or stop it first")
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n{what}\n".encode())
        try:
            yield
        except UserError:
            names = os.listdir(run_dir)
            if created and set(names) <= set(LOCKS):  # nothing but locks: the folder goes again
                for name in names:
                    os.remove(os.path.join(run_dir, name))
                for folder in created:
                    os.rmdir(folder)
            raise
    finally:
        os.close(fd)  # releases the flock


@contextmanager
def results_locked(run_dir):
    """Hold the lock of the run's results (nc_results/, info.pkl, test_log.txt) for a read and a write:
    every process that writes them waits for it, so a validation and a training that measures as it
    goes take turns and never lose each other's results. Nobody writes results without it, so a
    temporary file of results found on taking it was left by a killed writer: it is removed."""
    fd = _open_lock(run_dir, RESULTS_LOCK, "make it writable")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        clear(run_dir, STALE_RESULTS)
        yield
    finally:
        os.close(fd)


def clear_stale_training(run_dir):
    """Remove the temporary files of training's own files (checkpoints, resume state, args.json,
    metrics.jsonl) that a killed training left; for the holder of TRAIN_LOCK. The results' are
    left to results_locked: a validation may be writing them now."""
    results = [os.path.basename(p) for p in STALE_RESULTS if "/" not in p]
    for path in glob.glob(os.path.join(run_dir, ".tmp_*")):
        if not any(fnmatch.fnmatch(os.path.basename(path), p) for p in results):
            os.remove(path)


def clear_stale_results(run_dir):
    """Remove the temporary files of results that a killed writer left, if there are any (taking the
    results' lock: one may belong to a live writer, which is then waited for)."""
    if any(glob.glob(os.path.join(run_dir, pattern)) for pattern in STALE_RESULTS):
        with results_locked(run_dir):
            pass


def start_over(run_dir):
    """Remove every file of a run (RUN_FILES) before it starts: for --force, the caller holds TRAIN_LOCK
    and VALIDATE_LOCK, so that no validation reads the old run meanwhile or writes its results after.
    A new run has nothing to guard (nor any lock but TRAIN_LOCK yet)."""
    with results_locked(run_dir) if has_run(run_dir) else nullcontext():
        clear(run_dir)
