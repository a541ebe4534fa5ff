"""The runbook of the paper's figures: train and validate every run that a plot script needs, then plot.

    python experiments.py --figure etf           # print the commands (a shell script)
    python experiments.py --figure etf --run     # run them in order, stopping at the first failure
    python experiments.py --figure all --epochs 2 --root /tmp/smoke --run   # a quick smoke test

The runs are those of runs.py. Each measures NC as it trains (--nc_every 1) and keeps every 50th
checkpoint; --every_checkpoint keeps them all and measures them afterwards with validate_NC.py, as
the authors did. A run whose info.pkl already covers epochs 1..--epochs is skipped. A run that is
trained but not validated gets only its validation command; one whose training stopped part-way is
continued with --resume. So the runbook can be stopped (Ctrl-C, or a kill
of this process, which stops the command it is running) and restarted at any point.
"""
import os
import shlex
import signal
import subprocess
import sys

import rundir
import runs
from args import VALIDATION_BATCH, Parser, path, positive_int
from utils import UserError, run_main

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ROOT = "model_weights"
# Checkpoints a run keeps by default: epochs 50, 100, 150, 200. A ResNet-18 run then takes about
# 0.55 GB (4 checkpoints of 45 MB, last.pth and previous.pth of 90 MB, 0.2 GB of NC results),
# against 9.3 GB with every checkpoint (--every_checkpoint).
SAVE_EVERY = 50


def plan(figures, root, epochs, gpu_id=None, data_dir=None, every_checkpoint=False):
    """The runbook as a list of ('#', comment) and (script, [arguments]) steps."""
    common = []
    if gpu_id is not None:
        common += ["--gpu_id", str(gpu_id)]
    if data_dir is not None:
        common += ["--data_dir", data_dir]
    # NC measured as the run trains, few checkpoints kept; or the authors' way: every checkpoint,
    # measured afterwards by validate_NC.py
    keeping = ["--nc_every", "0", "--save_every", "1"] if every_checkpoint else \
        ["--nc_every", "1", "--save_every", str(SAVE_EVERY)]
    default_root = os.path.normpath(root) == DEFAULT_ROOT
    steps, seen = [], set()
    for figure in figures:
        plot_script, table = runs.FIGURES[figure]
        steps.append(("#", f"figure {figure} ({plot_script}): {len(table)} runs"))
        for flags in table.values():
            uid = runs.run_name(runs.parse(flags))
            if uid in seen:
                steps.append(("#", f"{uid}: already above"))
                continue
            seen.add(uid)
            run_dir = os.path.join(root, uid)
            state = rundir.state(run_dir, epochs)
            if state == "done":
                steps.append(("#", f"{uid}: skipped, its info.pkl covers epochs 1-{epochs}"))
                continue
            if state == "trained":
                steps.append(("#", f"{uid}: trained; validation only"))
            else:
                train = ["--uid", uid] + shlex.split(flags)
                if not default_root:
                    train += ["--save_dir", root]
                if epochs != runs.EPOCHS:
                    train += ["--epochs", str(epochs)]
                if state == "partial":
                    steps.append(("#", f"{uid}: training started earlier; continued with --resume"))
                    train.append("--resume")
                steps.append((runs.training_script(runs.parse(flags)), train + keeping + common))
                if not every_checkpoint:
                    continue  # the run measures itself
            validate = ["--load_path", run_dir, "--batch_size", str(VALIDATION_BATCH)]
            if epochs != runs.EPOCHS:
                validate += ["--epochs", str(epochs)]
            steps.append(("validate_NC.py", validate + common))
        steps.append((plot_script, [] if default_root else ["--root", root]))
    return steps


def format_step(step):
    script, arguments = step
    return f"# {arguments}" if script == "#" else shlex.join(["python", script] + arguments)


def call(command):
    """Run a command to its end. SIGTERM, SIGHUP or Ctrl-C of this process are passed on to it and
    waited for, so that no training outlives the runbook (a restart would then train it twice)."""
    caught, child = [], None

    def forward(signum, _frame):
        caught.append(signum)
        if child is not None:
            child.send_signal(signum)
    handlers = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)}
    try:
        # In a session of its own, a Ctrl-C at the terminal reaches the command once, through us.
        child = subprocess.Popen(command, start_new_session=True)
        if caught:  # a signal came before the command existed
            child.send_signal(caught[0])
        code = child.wait()
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
    if caught:
        print(f"stopped by signal {caught[0]}: {shlex.join(command[1:])} was stopped too", file=sys.stderr)
        sys.exit(128 + caught[0])
    return code


def main(argv=None):
    p = Parser(description=__doc__.splitlines()[0],
               epilog="figures: " + ", ".join(f"{f} ({script})" for f, (script, _) in runs.FIGURES.items()) + ", all")
    p.add_argument("--figure", default="all", choices=list(runs.FIGURES) + ["all"],
                   help="the figure whose runs to list (default: %(default)s)")
    p.add_argument("--run", action="store_true", help="execute the commands in order, stopping at the first failure")
    p.add_argument("--root", type=path, default=DEFAULT_ROOT,
                   help="folder holding the run directories (training --save_dir; default: %(default)s)")
    p.add_argument("--gpu_id", type=int, default=None, help="passed to training and validation")
    p.add_argument("--data_dir", type=path, default=None, help="passed to training and validation")
    p.add_argument("--epochs", type=positive_int, default=runs.EPOCHS,
                   help="epochs per run (default: %(default)s, the paper's); fewer for a smoke test")
    p.add_argument("--every_checkpoint", action="store_true",
                   help=f"the authors' two steps: keep every epoch's checkpoint (a ResNet-18 run: about 9.3 GB), "
                        f"then measure them all with validate_NC.py; by default NC is measured as each run trains "
                        f"and every {SAVE_EVERY}th checkpoint is kept (about 0.55 GB)")
    args = p.parse_args(argv)
    figures = list(runs.FIGURES) if args.figure == "all" else [args.figure]
    steps = plan(figures, args.root, args.epochs, args.gpu_id, args.data_dir, args.every_checkpoint)
    for step in steps:
        print(format_step(step), flush=True)
        if args.run and step[0] != "#":
            script, arguments = step
            code = call([sys.executable, os.path.join(HERE, script)] + arguments)
            if code != 0:
                raise UserError(f"stopped: {format_step(step)} exited with status {code}")
    return steps


if __name__ == "__main__":
    run_main(main)
