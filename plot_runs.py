"""Plot the NC curves of any set of validated runs (run directories holding info.pkl).

    python plot_runs.py model_weights/run_a model_weights/run_b --labels "run A" "run B"

    python plot_runs.py model_weights/run_a --keys cdnv_metric ncc_train

Labels default to the run directory names; give --labels after the directories. --keys draws any
stored scalar key of info.pkl against epoch, one figure per key (e.g. those validate_NC.py
--measures adds); runs validated with --layers get their per-layer figures too. The figures
(NC1-NC4, accuracies, cosine margins, nuclear ratio; see nclib/plotting.py) go to --out_dir.
"""
import os

from nclib import plotting
from nclib.base import UserError
from nclib.cli import run_main


def main(argv=None):
    p = plotting.base_parser(__file__, __doc__.splitlines()[0], "\n".join(__doc__.splitlines()[1:]))
    p.set_defaults(root=".")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories, relative to --root or absolute")
    p.add_argument("--labels", nargs="+", default=None, metavar="LABEL", help="legend labels, one per run directory")
    p.add_argument("--keys", nargs="+", default=[], metavar="KEY", help="also draw these info.pkl keys against epoch")
    args = p.parse_args(argv)
    labels = args.labels or [os.path.basename(os.path.normpath(d)) for d in args.run_dirs]
    if len(labels) != len(args.run_dirs):
        raise UserError(f"{len(labels)} --labels for {len(args.run_dirs)} run directories; give one label per run")
    runs = [(label, plotting.resolve(args.root, d)) for label, d in zip(labels, args.run_dirs)]
    return plotting.plot_runs(runs, args.out_dir, args.markevery, args.margin_head, args.skip_missing,
                                 keys=args.keys)


if __name__ == "__main__":
    run_main(main)
