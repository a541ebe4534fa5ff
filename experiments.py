"""The runbook of the paper's figures: train and validate every run that a plot script needs, then plot.

    python experiments.py --figure etf           # print the commands (a shell script)
    python experiments.py --figure etf --run     # run them in order, stopping at the first failure
    python experiments.py --figure all --epochs 2 --root /tmp/smoke --run   # a quick smoke test
    python experiments.py --scale laptop --run --jobs 2   # every figure on the MNIST sample (nclib/scales.py)

The runs are those of nclib/runs.py (--scale laptop: nclib/scales.py's, each measuring NC every
3rd epoch and keeping its last checkpoint); the work is nclib/runbook.py's. Each paper run measures
NC as it trains (--nc_every 1) and keeps every 50th checkpoint; --every_checkpoint keeps them all
and measures them afterwards with validate_NC.py, as the authors did. A run whose info.pkl already
covers epochs 1..--epochs is skipped. A run that is trained but not validated gets only its
validation command; one whose training stopped part-way is continued with --resume. So the
runbook can be stopped (Ctrl-C, or a kill of this process, which stops the command it is running)
and restarted at any point.
"""
import argparse

from args import Parser, path, positive_int
from nclib import rundir, runbook, runs, scales
from nclib.cli import run_main
from nclib.runbook import DEFAULT_ROOT, SAVE_EVERY


def gpu_list(text):
    """--gpus 0,1,...: the GPUs that exist."""
    try:
        gpus = [int(g) for g in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected GPU ids such as 0,1, got {text!r}")
    import torch
    missing = [g for g in gpus if not 0 <= g < torch.cuda.device_count()]
    if missing:
        raise argparse.ArgumentTypeError(f"GPU {missing[0]} does not exist (this machine has "
                                         f"{torch.cuda.device_count()}); leave --gpus out to run on the CPU")
    return gpus


def main(argv=None):
    p = Parser(description=__doc__.splitlines()[0],
               epilog="figures: " + ", ".join(f"{f} ({script})" for f, (script, _) in runs.FIGURES.items()) + ", all")
    p.add_argument("--figure", default="all", choices=list(runs.FIGURES) + ["all"],
                   help="the figure whose runs to list (default: %(default)s)")
    p.add_argument("--run", action="store_true",
                   help="execute the commands: each run's in order; a failed run does not stop the others")
    p.add_argument("--jobs", type=positive_int, default=1,
                   help="runs at a time with --run (default: 1); each run's output then goes to "
                        f"<run>/{rundir.RUNBOOK_LOG}")
    p.add_argument("--gpus", type=gpu_list, default=None,
                   help="with --run: spread the runs over these GPUs, e.g. 0,1 (several runs may share one)")
    p.add_argument("--scale", default="paper", choices=scales.SCALES,
                   help="paper: the paper's runs; laptop: the same figures on the MNIST sample in data/, "
                        f"about 21 minutes on a 2-core CPU, under {scales.LAPTOP_ROOT} (default: %(default)s)")
    p.add_argument("--root", type=path, default=None,
                   help=f"folder holding the run directories (training --save_dir; default: {DEFAULT_ROOT}, "
                        f"or {scales.LAPTOP_ROOT} for --scale laptop)")
    p.add_argument("--gpu_id", type=int, default=None, help="passed to training and validation")
    p.add_argument("--data_dir", type=path, default=None, help="passed to training and validation")
    p.add_argument("--epochs", type=positive_int, default=runs.EPOCHS,
                   help="epochs per run (default: %(default)s, the paper's); fewer for a smoke test")
    p.add_argument("--every_checkpoint", action="store_true",
                   help=f"the authors' two steps: keep every epoch's checkpoint (a ResNet-18 run: about 9.3 GB), "
                        f"then measure them all with validate_NC.py; by default NC is measured as each run trains "
                        f"and every {SAVE_EVERY}th checkpoint is kept (about 0.55 GB)")
    g = p.add_argument_group("SLURM, through submitit")
    g.add_argument("--slurm", action="store_true", help="submit one job per run (its training, then any validation)")
    g.add_argument("--dry_run", action="store_true", help="with --slurm: print the jobs, submit nothing")
    g.add_argument("--cluster", default="slurm", choices=["slurm", "local"],
                   help="local: submitit runs the jobs on this machine, and the runbook waits (to try the path)")
    g.add_argument("--partition", default=None, help="SLURM partition")
    g.add_argument("--time", type=positive_int, default=24 * 60, help="minutes per job (default: %(default)s)")
    g.add_argument("--gpus_per_job", type=int, default=1, help="default: %(default)s")
    g.add_argument("--cpus", type=positive_int, default=8, help="CPUs per job (default: %(default)s)")
    g.add_argument("--mem", type=positive_int, default=32, help="GB of memory per job (default: %(default)s)")
    return runbook.run(p.parse_args(argv))

if __name__ == "__main__":
    run_main(main)
