"""Does it reproduce? The paper's claims checked on the runbook's runs, with a verdict each.

    python claims.py [--root DIR] [--out DIR] [--scale auto|paper|laptop] [--device cpu|cuda:N]

Reads the run directories of experiments.py (at paper scale under model_weights/, at laptop
scale under model_weights/laptop/), computes the UFM's part and dK-memory's footprint itself,
prints the table and writes claims.md and claims.json to --out. Exits 0 whatever the verdicts:
it is a report, not a test; 2 on bad input.
"""
import json
import os
import tempfile

from args import Parser, path
from nclib import claims, rundir, scales
from nclib.base import UserError, atomic_write_all, get_device
from nclib.cli import run_main

OUTPUTS = ("claims.md", "claims.json")


def check_out(out):
    """Refuse, before the minute of measuring, an --out that cannot take both files."""
    rundir.check_folder(out, "--out")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {out}: cannot create it ({e.strerror}); give another folder")
    for name in OUTPUTS:
        target = os.path.join(out, name)
        if os.path.lexists(target) and not os.path.isfile(target):
            raise UserError(f"--out {out}: {name} there is not a file; move it away or give another folder")
    try:  # os.access trusts permission bits that root and some file systems ignore: try a write
        fd, probe = tempfile.mkstemp(prefix=".tmp_probe.", dir=out)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise UserError(f"--out {out} cannot be written ({e.strerror}); give another folder")


def main(argv=None):
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=path, default=None,
                   help="folder of the run directories (default: the scale's, model_weights or model_weights/laptop)")
    p.add_argument("--out", type=path, default=os.path.join("figures", "claims"),
                   help="folder for claims.md and claims.json (default: %(default)s)")
    p.add_argument("--scale", default="auto", choices=("auto",) + scales.SCALES,
                   help="whose run names to look for; auto: laptop if any laptop run is under --root, or, without "
                        "--root, under model_weights/laptop and none of the paper's under model_weights (default)")
    p.add_argument("--device", default=None,
                   help="where dK-memory measures a training step ('cpu', 'cuda:0'; default: a GPU if there is one)")
    args = p.parse_args(argv)
    device = get_device(device=args.device)
    if args.root is None:
        paper, laptop = scales.Scale("paper"), scales.Scale("laptop")
        if args.scale == "auto":
            own = laptop.runs_under(laptop.root) and not paper.runs_under(paper.root)
            args.scale = "laptop" if own else "paper"
        args.root = scales.Scale(args.scale).root
    rundir.check_folder(args.root, "--root", must_exist=True)
    check_out(args.out)
    scale = claims.detect_scale(args.root) if args.scale == "auto" else args.scale
    rows = claims.evaluate(args.root, scale, device)
    table = claims.markdown(rows)
    print(f"claims at {scale} scale, runs under {args.root}:\n\n{table}")
    paths = [os.path.join(args.out, name) for name in OUTPUTS]
    contents = (table.encode(), json.dumps(rows, indent=1).encode())
    atomic_write_all((target, lambda f, data=data: f.write(data)) for target, data in zip(paths, contents))
    print(f"written: {', '.join(paths)}")
    return rows


if __name__ == "__main__":
    run_main(main)
