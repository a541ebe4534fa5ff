"""Does it reproduce? The paper's claims checked on the runbook's runs, with a verdict each.

    python claims.py [--root DIR] [--out DIR] [--scale auto|paper|laptop]

Reads the run directories of experiments.py (at paper scale under model_weights/, at laptop
scale under model_weights/laptop/), computes the UFM's part itself, prints the table and writes
claims.md and claims.json to --out. Exits 0 whatever the verdicts: it is a report, not a test.
"""
import json
import os

from args import Parser, path
from nclib import claims
from nclib.base import UserError, atomic_write
from nclib.cli import run_main


def main(argv=None):
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=path, default="model_weights", help="folder of the run directories (default: %(default)s)")
    p.add_argument("--out", type=path, default=os.path.join("figures", "claims"),
                   help="folder for claims.md and claims.json (default: %(default)s)")
    p.add_argument("--scale", default="auto", choices=["auto", "paper", "laptop"],
                   help="whose run names to look for; auto: laptop if any laptop run is under --root (default)")
    args = p.parse_args(argv)
    if not os.path.isdir(args.root):
        raise UserError(f"--root {args.root}: {'is a file' if os.path.exists(args.root) else 'no such folder'}; "
                        "give the folder of the run directories (experiments.py --root)")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UserError(f"--out {args.out} is a file: give a folder")
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {args.out}: cannot create it ({e.strerror})")
    if not os.access(args.out, os.W_OK | os.X_OK):
        raise UserError(f"--out {args.out} is not writable: give another folder")
    scale = claims.detect_scale(args.root) if args.scale == "auto" else args.scale
    rows = claims.evaluate(args.root, scale)
    table = claims.markdown(rows)
    print(f"claims at {scale} scale, runs under {args.root}:\n\n{table}")
    atomic_write(os.path.join(args.out, "claims.md"), lambda f: f.write(table.encode()))
    atomic_write(os.path.join(args.out, "claims.json"), lambda f: f.write(json.dumps(rows, indent=1).encode()))
    print(f"written: {os.path.join(args.out, 'claims.md')}, {os.path.join(args.out, 'claims.json')}")
    return rows


if __name__ == "__main__":
    run_main(main)
