"""The paper's theory, runnable: the unconstrained feature model (UFM), its closed-form global
minimiser, its strict saddles, and the Hessian at the optimum under MSE and rescaled MSE.

    python ufm.py --K 4 --n 10 --d 8 --lambda_W 5e-3 --lambda_H 5e-3 --optimizer LBFGS --out model_weights/ufm
    python plot_runs.py model_weights/ufm
    python ufm.py --saddle --K 4 --n 5 --d 8          # strict saddles and the escape from one
    python ufm.py --spectrum --K 3 --n 3 --d 4         # Hessian at the optimum vs M, k (matched lambdas)

The model, its closed form and the like-with-like comparison of the losses are described in
nclib/ufm.py, which does the work; this script parses the command line.
"""
import argparse
import os

import torch

from args import Parser, add_measures_arg, int_at_least, nonnegative_float, path, positive_float, positive_int, seed_int
from nclib.cli import run_main
from nclib.losses import LOSSES
from nclib.ufm import OPTIMIZERS, run, run_saddle, run_spectrum


def at_least_two(text):
    return int_at_least(text, 2, "an integer >= 2")


def parser():
    p = Parser(description=__doc__.split("\n\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--saddle", action="store_true", help="construct the strict saddles and escape from one (MSE)")
    mode.add_argument("--spectrum", action="store_true",
                      help="Hessian at the optimum of MSE and rescaled MSE, at matched lambdas (see the docstring)")
    p.add_argument("--K", type=at_least_two, default=4, help="classes, >= 2 (default: %(default)s)")
    p.add_argument("--n", type=positive_int, default=10, help="samples per class (default: %(default)s)")
    p.add_argument("--d", type=positive_int, default=8, help="feature dimension (default: %(default)s)")
    p.add_argument("--lambda_W", type=positive_float, default=5e-3)
    p.add_argument("--lambda_H", type=positive_float, default=5e-3)
    p.add_argument("--lambda_b", type=nonnegative_float, default=0.0, help="0: unregularised bias (the paper's case)")
    p.add_argument("--bias", action=argparse.BooleanOptionalAction, default=True, help="a bias b (--no-bias: none)")
    p.add_argument("--loss", choices=LOSSES, default="MSE")
    p.add_argument("--M", type=positive_float, default=1.0, help="rescaled MSE: the target value")
    p.add_argument("--k", type=positive_float, default=1.0, help="rescaled MSE: the weight of the true class")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="LBFGS")
    p.add_argument("--iters", type=positive_int, default=None,
                   help="iterations (default: 500; --saddle: at most 20000 of GD)")
    p.add_argument("--lr", type=positive_float, default=None, help="GD 0.5, SGD 0.1, Adam 0.01, LBFGS 1 by default")
    p.add_argument("--momentum", type=nonnegative_float, default=0.0)
    p.add_argument("--batch_size", type=positive_int, default=None, help="SGD's samples per step (default: N/4)")
    p.add_argument("--init_scale", type=positive_float, default=0.1, help="std of the random start")
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--log_every", type=positive_int, default=None,
                   help="iterations between logged points (default: about 200 points)")
    p.add_argument("--out", type=path, default=os.path.join("model_weights", "ufm"), help="run directory")
    add_measures_arg(p, "in each logged point's entry of info.pkl and its log line")
    p.add_argument("--eps", type=positive_float, default=1e-3, help="--saddle: size of the push along the eigenvector")
    p.add_argument("--Ms", type=positive_float, nargs="+", default=[1.0, 3.0, 5.0, 10.0], help="--spectrum: M values")
    p.add_argument("--ks", type=positive_float, nargs="+", default=[1.0, 5.0, 10.0, 20.0], help="--spectrum: k values")
    p.add_argument("--equal_lambdas", action="store_true",
                   help="--spectrum: the same lambdas for every M, k (unlike objectives) instead of matched ones")
    p.add_argument("--plot_dir", type=path, default=os.path.join("figures", "ufm_spectrum"),
                   help="--spectrum: where spectrum_M/k.png/pdf go ('' for none)")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    torch.set_num_threads(1)  # problems this small only lose time to a second thread
    if args.saddle:
        args.iters = args.iters or 20000
        return run_saddle(args)
    if args.spectrum:
        return run_spectrum(args)
    args.iters = args.iters or 500
    args.log_every = args.log_every or max(1, args.iters // 200)
    if args.optimizer == "SGD" and args.batch_size is None:
        args.batch_size = max(1, args.K * args.n // 4)
    return run(args)


if __name__ == "__main__":
    run_main(main)
