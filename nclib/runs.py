"""The paper's runs: for each figure, its plot script and its runs by legend label and training
flags. The run names are derived from the flags the way the authors named their runs, so their
run directories are found under the same names. The runbook (nclib/runbook.py) and the five plot
scripts read this table; nothing else lists the runs.

Every run trains for 200 epochs with the training scripts' defaults for what the flags leave
out (weight decay 5e-4, StepLR every 40 epochs by 0.1, seed 6, batch 128) and is measured with
validation's batch of 1024. Two slips of the authors' own command list are mended: LBFGS runs through
train_2nd_order.py, and its run name says batch size 512, as their plot script expects.
"""
import shlex

from args import train_parser
from nclib.losses import get as get_loss

EPOCHS = 200

_CIFAR = "--dataset cifar10 --loss MSE"
_CIFAR_SGD = _CIFAR + " --optimizer SGD --lr 0.05"
_SOTA_SGD = _CIFAR_SGD + " --SOTA"
_MINI_RMSE = "--dataset mini_imagenet --SOTA --loss RescaledMSE --optimizer SGD --lr 0.01"

# figure -> (plot script, {legend label: training flags})
FIGURES = {
    "optim": ("plot_optim_mse.py", {  # CIFAR-10, plain ResNet-18, MSE
        "SGD": _CIFAR_SGD,
        "Adam": _CIFAR + " --optimizer Adam --lr 0.001",
        "LBFGS": _CIFAR + " --optimizer LBFGS --lr 0.1 --history_size 10 --batch_size 512",
    }),
    "etf": ("plot_etf_mse.py", {  # learned vs fixed simplex-ETF classifier, d = 512 vs d = K = 10
        "learned, $d=512$": _SOTA_SGD,
        "fixed ETF, $d=512$": _SOTA_SGD + " --ETF_fc",
        "learned, $d=10$": _SOTA_SGD + " --fixdim 10",
        "fixed ETF, $d=10$": _SOTA_SGD + " --ETF_fc --fixdim 10",
    }),
    "dk": ("plot_dk_mse.py", {  # feature dimension d against K = 10, learned classifier
        f"$d={d}$": f"{_SOTA_SGD} --fixdim {d}" for d in (5, 8, 9, 10, 512)
    }),
    "M": ("plot_M_rmse.py", {  # rescaled MSE, target M, k = 1 (mini-ImageNet)
        f"$M={M}$": f"{_MINI_RMSE} --M {M} --k 1" for M in (1, 3, 5, 7, 10)
    }),
    "k": ("plot_k_rmse.py", {  # rescaled MSE, weight alpha = k on the true class, M = 1
        rf"$\alpha={k}$": f"{_MINI_RMSE} --M 1 --k {k}" for k in (1, 5, 15, 20)
    }),
}


def parse(flags):
    """The training arguments (a Namespace, defaults filled in) of a flag string."""
    return train_parser().parse_args(shlex.split(flags))


def training_script(args):
    return "train_2nd_order.py" if args.optimizer == "LBFGS" else "train_1st_order.py"


def run_name(args):
    """The authors' name of a run, e.g. cifar10_MSE_SGD_bias_true_batchsize_128_ETFfc_false_fixdim_10_sota_true."""
    def flag(value):
        return str(bool(value)).lower()
    loss = get_loss(args.loss)
    name = (f"{args.dataset}_{loss.tag}_{args.optimizer}_bias_{flag(args.bias)}_batchsize_{args.batch_size}"
            f"_ETFfc_{flag(args.ETF_fc)}_fixdim_{args.fixdim or 'false'}_sota_{flag(args.SOTA)}")
    if loss.uses_M_k:
        name += f"_M_{args.M:g}_k_{args.k:g}"
    return name


def figure_runs(figure):
    """{legend label: run name} of a figure."""
    return {label: run_name(parse(flags)) for label, flags in FIGURES[figure][1].items()}
