"""Figure: the loss of one feature h under a fixed simplex-ETF classifier W, as a function of its
norm ||h|| and of its angle to w_k (its class's classifier row), for cross-entropy, MSE and
rescaled MSE: one heatmap per loss.

    python plot_landscape.py [--K 4] [--M 3 --k 5] [--out_dir figures/plot_landscape]

W = scale * models.simplex_etf(K, K) (unit rows, W W^T = K/(K-1) (I - 11^T/K)), b = 0, class k = 0.
h = ||h|| (cos(angle) w_0 + sin(angle) u), u the unit vector in the plane of w_0 and w_1 orthogonal
to w_0 and on w_1's side: turning h away from w_0 turns it towards a competitor, the hardest way.
The data term of one sample is ufm.per_sample_loss (MSE: 1/2 ||z - e_k||^2; rescaled MSE:
1/2 [k (z_k - M)^2 + sum_{j != k} z_j^2]); --lambda_H adds lambda_H/2 ||h||^2. The white line is the
best norm at each angle; the dashed line is where h stops being classified as class 0. The three
panels share one colour scale and one set of contour levels, so that how steeply the loss rises
can be compared across them.
"""
import math
import os

import matplotlib

matplotlib.use("Agg")  # files only
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from nclib import ufm  # noqa: E402
from args import Parser, nonnegative_float, path, positive_float, positive_int  # noqa: E402
from models import simplex_etf  # noqa: E402
from nclib.base import UserError  # noqa: E402
from nclib.cli import run_main  # noqa: E402
from nclib.losses import get as get_loss  # noqa: E402

PANELS = ("CrossEntropy", "MSE", "RescaledMSE")
LOG_FLOOR = 1e-12  # added before log10: an exact zero of the loss stays drawable
CONTOUR_LEVELS = 12
MIN_POINTS, MAX_POINTS = 2, 1001  # a 2 x 2 grid is the least a mesh and contours take
GRID_ARRAYS = 8  # landscape() holds about 6 (points^2, K) float64 arrays at its peak (measured)
GRID_MAX_BYTES = 2 * 2**30


def landscape(loss, K=4, M=3.0, k=5.0, scale=1.0, lambda_H=0.0, r_max=4.0, points=201):
    """(norms (R,), angles (A,) in degrees, loss values (A, R)) of one class-0 feature."""
    W = scale * simplex_etf(K, K).to(torch.float64)  # (K, K), unit rows times scale
    w0 = W[0] / W[0].norm()
    u = W[1] - (W[1] @ w0) * w0
    u = u / u.norm()
    norms = torch.linspace(0, r_max, points, dtype=torch.float64)
    angles = torch.linspace(0, math.pi, points, dtype=torch.float64)
    h = norms[None, :, None] * (torch.cos(angles)[:, None, None] * w0 + torch.sin(angles)[:, None, None] * u)  # (A, R, K)
    z = h.reshape(-1, K) @ W.T  # logits, b = 0
    y = torch.zeros(len(z), dtype=torch.int64)
    values = ufm.per_sample_loss(z, y, loss, M, k).reshape(points, points) + lambda_H / 2 * norms[None, :] ** 2
    correct = (z.argmax(1) == 0).reshape(points, points)
    return norms.numpy(), np.degrees(angles.numpy()), values.numpy(), correct.numpy()


def check_grid(points, K):
    """Refuse, before allocating, a grid outside [MIN_POINTS, MAX_POINTS] or too large in memory."""
    if not MIN_POINTS <= points <= MAX_POINTS:
        raise UserError(f"--points {points}: the grid takes {MIN_POINTS} to {MAX_POINTS} points per axis "
                        "(default 201)")
    need, cap = GRID_ARRAYS * 8 * points ** 2 * K, ufm.allowed_bytes(GRID_MAX_BYTES)
    if need > cap:
        raise UserError(f"--points {points} with --K {K}: the grid needs {need / 2**30:.1f} GiB "
                        f"({GRID_ARRAYS} arrays of points^2 x K float64), over the {cap / 2**30:.1f} GiB allowed: "
                        "lower --points or --K")


def log_loss(values):
    return np.log10(values + LOG_FLOOR)


def color_limits(panels):
    """(vmin, vmax) of log10 loss over all panels: the one colour scale they share."""
    logs = [log_loss(values) for _, _, values, _ in panels.values()]
    return min(v.min() for v in logs), max(v.max() for v in logs)


def figure(loss, panel, args, limits):
    """One panel's figure, coloured on the shared scale `limits`."""
    norms, angles, values, correct = panel
    fig, ax = plt.subplots(figsize=(7, 5.5))
    # rasterized: a vector PDF of a 1001 x 1001 mesh would take tens of MB
    mesh = ax.pcolormesh(norms, angles, log_loss(values), shading="auto", cmap="viridis", vmin=limits[0],
                         vmax=limits[1], rasterized=True)
    fig.colorbar(mesh, ax=ax, label="log10 loss (one scale for all panels)")
    levels = np.linspace(*limits, CONTOUR_LEVELS + 2)[1:-1]
    ax.contour(norms, angles, log_loss(values), levels=levels, colors="k", linewidths=0.5, alpha=0.5)
    ax.plot(norms[values.argmin(1)], angles, color="white", linewidth=2, label="best norm")
    edge = angles[np.argmax(~correct[:, -1])] if (~correct[:, -1]).any() else None
    if edge is not None:
        ax.axhline(edge, color="red", linestyle="--", linewidth=1.5, label="misclassified beyond")
    ax.set_title(f"{get_loss(loss).describe(args.M, args.k)}, K={args.K}")
    ax.set_xlabel(r"$\|h\|$")
    ax.set_ylabel(r"angle between $h$ and $w_k$ (degrees)")
    ax.legend(loc="lower right", fontsize=9)
    return fig


def draw(loss, panel, args, limits):
    fig = figure(loss, panel, args, limits)
    paths = []
    for ext in ("png", "pdf"):
        p = os.path.join(args.out_dir, f"landscape_{loss}.{ext}")
        fig.savefig(p, bbox_inches="tight", dpi=100, metadata={"CreationDate": None} if ext == "pdf" else None)
        paths.append(p)
    plt.close(fig)
    return paths


def panels(args):
    return {loss: landscape(loss, args.K, args.M, args.k, args.scale, args.lambda_H, args.r_max, args.points)
            for loss in PANELS}


def parser():
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--K", type=positive_int, default=4, help="classes (default: %(default)s)")
    p.add_argument("--M", type=positive_float, default=3.0, help="rescaled MSE's target (default: %(default)s)")
    p.add_argument("--k", type=positive_float, default=5.0, help="rescaled MSE's true-class weight (default: %(default)s)")
    p.add_argument("--scale", type=positive_float, default=1.0, help="norm of each row of W (default: %(default)s)")
    p.add_argument("--lambda_H", type=nonnegative_float, default=0.0, help="feature penalty (default: %(default)s)")
    p.add_argument("--r_max", type=positive_float, default=4.0, help="largest ||h|| drawn (default: %(default)s)")
    p.add_argument("--points", type=positive_int, default=201,
                   help=f"grid points per axis, {MIN_POINTS} to {MAX_POINTS} (default: %(default)s)")
    p.add_argument("--out_dir", type=path, default=os.path.join("figures", "plot_landscape"),
                   help="where the .png and .pdf files go (default: %(default)s)")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    if args.K < 2:
        raise UserError(f"--K {args.K}: a simplex ETF needs at least 2 classes")
    check_grid(args.points, args.K)
    try:
        os.makedirs(args.out_dir, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write figures to --out_dir {args.out_dir} ({e.strerror}): choose another folder")
    data = panels(args)
    limits = color_limits(data)
    written = [q for loss in PANELS for q in draw(loss, data[loss], args, limits)]
    print(f"wrote {len(written) // 2} figures (png and pdf) to {args.out_dir}/")
    return written


if __name__ == "__main__":
    run_main(main)
