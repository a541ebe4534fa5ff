"""The runbook of the paper's figures: the training and validation commands of every run a plot
script needs (RUNS.md), then the plot command.

    python experiments.py --figure etf           # print the commands (a shell script)
    python experiments.py --figure etf --run     # run them in order, stopping at the first failure
    python experiments.py --figure all --epochs 2 --root /tmp/smoke --run   # a quick smoke test

A run whose info.pkl already covers epochs 1..--epochs is skipped. A run that is trained but not
validated gets only its validation command; one whose training stopped part-way is continued
with --resume. All runs use the training scripts' defaults for what RUNS.md leaves implicit:
200 epochs, weight decay 5e-4, StepLR every 40 epochs by 0.1, seed 6, batch 128.
"""
import os
import pickle
import shlex
import subprocess
import sys

from args import Parser, positive_int
from utils import UserError, run_main

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ROOT = "model_weights"
DEFAULT_EPOCHS = 200

SGD_1ST = "train_1st_order.py"
LBFGS_2ND = "train_2nd_order.py"
CIFAR_SGD = "--dataset cifar10 --loss MSE --optimizer SGD --lr 0.05"
CIFAR_SOTA = CIFAR_SGD + " --SOTA"
MINI_RMSE = "--dataset mini_imagenet --SOTA --loss RescaledMSE --optimizer SGD --lr 0.01"
RMSE_RUN = "mini_imagenet_RMSE_SGD_bias_true_batchsize_128_ETFfc_false_fixdim_false_sota_true_M_{M}_k_{k}"


def rmse(M, k):
    return RMSE_RUN.format(M=M, k=k), SGD_1ST, f"{MINI_RMSE} --M {M} --k {k}"


# figure -> (plot script, [(run name, training script, training flags)]), as in RUNS.md
FIGURES = {
    "optim": ("plot_optim_mse.py", [
        ("cifar10_MSE_SGD_bias_true_batchsize_128_ETFfc_false_fixdim_false_sota_false", SGD_1ST, CIFAR_SGD),
        ("cifar10_MSE_Adam_bias_true_batchsize_128_ETFfc_false_fixdim_false_sota_false", SGD_1ST,
         "--dataset cifar10 --loss MSE --optimizer Adam --lr 0.001"),
        ("cifar10_MSE_LBFGS_bias_true_batchsize_512_ETFfc_false_fixdim_false_sota_false", LBFGS_2ND,
         "--dataset cifar10 --loss MSE --optimizer LBFGS --lr 0.1 --history_size 10 --batch_size 512"),
    ]),
    "etf": ("plot_etf_mse.py", [
        ("cifar10_MSE_SGD_bias_true_batchsize_128_ETFfc_false_fixdim_false_sota_true", SGD_1ST, CIFAR_SOTA),
        ("cifar10_MSE_SGD_bias_true_batchsize_128_ETFfc_true_fixdim_false_sota_true", SGD_1ST,
         CIFAR_SOTA + " --ETF_fc"),
        ("cifar10_MSE_SGD_bias_true_batchsize_128_ETFfc_false_fixdim_10_sota_true", SGD_1ST,
         CIFAR_SOTA + " --fixdim 10"),
        ("cifar10_MSE_SGD_bias_true_batchsize_128_ETFfc_true_fixdim_10_sota_true", SGD_1ST,
         CIFAR_SOTA + " --ETF_fc --fixdim 10"),
    ]),
    "dk": ("plot_dk_mse.py", [
        (f"cifar10_MSE_SGD_bias_true_batchsize_128_ETFfc_false_fixdim_{d}_sota_true", SGD_1ST,
         f"{CIFAR_SOTA} --fixdim {d}") for d in (5, 8, 9, 10, 512)
    ]),
    "M": ("plot_M_rmse.py", [rmse(M, 1) for M in (1, 3, 5, 7, 10)]),
    "k": ("plot_k_rmse.py", [rmse(1, k) for k in (1, 5, 15, 20)]),
}


def validated_epochs(run_dir):
    """The epochs that <run_dir>/info.pkl covers (empty when it is missing or unreadable)."""
    try:
        with open(os.path.join(run_dir, "info.pkl"), "rb") as f:
            info = pickle.load(f)
        if "epochs" in info:
            return {int(e) for e in info["epochs"]}
        return set(range(1, len(info["collapse_metric"]) + 1))
    except Exception:
        return set()


def run_state(run_dir, epochs):
    """'done' (info.pkl covers 1..epochs), 'trained' (epoch_<epochs>.pth is there),
    'partial' (training started: args.json is there) or 'new'."""
    if set(range(1, epochs + 1)) <= validated_epochs(run_dir):
        return "done"
    if os.path.isfile(os.path.join(run_dir, f"epoch_{epochs:03d}.pth")):
        return "trained"
    if os.path.isfile(os.path.join(run_dir, "args.json")):
        return "partial"
    return "new"


def plan(figures, root, epochs, gpu_id=None, data_dir=None):
    """The runbook as a list of ('#', comment) and (script, [arguments]) steps."""
    common = []
    if gpu_id is not None:
        common += ["--gpu_id", str(gpu_id)]
    if data_dir is not None:
        common += ["--data_dir", data_dir]
    default_root = os.path.normpath(root) == DEFAULT_ROOT
    steps, seen = [], set()
    for figure in figures:
        plot_script, runs = FIGURES[figure]
        steps.append(("#", f"figure {figure} ({plot_script}): {len(runs)} runs"))
        for uid, script, flags in runs:
            if uid in seen:
                steps.append(("#", f"{uid}: already above"))
                continue
            seen.add(uid)
            run_dir = os.path.join(root, uid)
            state = run_state(run_dir, epochs)
            if state == "done":
                steps.append(("#", f"{uid}: skipped, its info.pkl covers epochs 1-{epochs}"))
                continue
            if state == "trained":
                steps.append(("#", f"{uid}: trained; validation only"))
            else:
                train = ["--uid", uid] + shlex.split(flags)
                if not default_root:
                    train += ["--save_dir", root]
                if epochs != DEFAULT_EPOCHS:
                    train += ["--epochs", str(epochs)]
                if state == "partial":
                    steps.append(("#", f"{uid}: training started earlier; continued with --resume"))
                    train.append("--resume")
                steps.append((script, train + common))
            validate = ["--load_path", run_dir, "--batch_size", "1024"]
            if epochs != DEFAULT_EPOCHS:
                validate += ["--epochs", str(epochs)]
            steps.append(("validate_NC.py", validate + common))
        steps.append((plot_script, [] if default_root else ["--root", root]))
    return steps


def format_step(step):
    script, arguments = step
    return f"# {arguments}" if script == "#" else shlex.join(["python", script] + arguments)


def main(argv=None):
    p = Parser(description=__doc__.splitlines()[0],
               epilog="figures: optim (plot_optim_mse.py), etf (plot_etf_mse.py), dk (plot_dk_mse.py), "
                      "M (plot_M_rmse.py), k (plot_k_rmse.py), all")
    p.add_argument("--figure", default="all", choices=list(FIGURES) + ["all"],
                   help="the figure whose runs to list (default: %(default)s)")
    p.add_argument("--run", action="store_true", help="execute the commands in order, stopping at the first failure")
    p.add_argument("--root", default=DEFAULT_ROOT,
                   help="folder holding the run directories (training --save_dir; default: %(default)s)")
    p.add_argument("--gpu_id", type=int, default=None, help="passed to training and validation")
    p.add_argument("--data_dir", default=None, help="passed to training and validation")
    p.add_argument("--epochs", type=positive_int, default=DEFAULT_EPOCHS,
                   help="epochs per run (default: %(default)s, the paper's); fewer for a smoke test")
    args = p.parse_args(argv)
    figures = list(FIGURES) if args.figure == "all" else [args.figure]
    steps = plan(figures, args.root, args.epochs, args.gpu_id, args.data_dir)
    for step in steps:
        print(format_step(step), flush=True)
        if args.run and step[0] != "#":
            script, arguments = step
            code = subprocess.run([sys.executable, os.path.join(HERE, script)] + arguments).returncode
            if code != 0:
                raise UserError(f"stopped: {format_step(step)} exited with status {code}")
    return steps


if __name__ == "__main__":
    run_main(main)
