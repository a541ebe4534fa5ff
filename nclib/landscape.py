"""The loss of one feature h under a fixed simplex-ETF classifier, over its norm and its angle to its
class's classifier row: the grids and figures of plot_landscape.py (whose docstring says what is drawn)."""
import math
import os

import matplotlib

matplotlib.use("Agg")  # files only
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from models import simplex_etf  # noqa: E402
from nclib import ufm  # noqa: E402
from nclib.base import UserError, allowed_bytes  # noqa: E402
from nclib.losses import get as get_loss  # noqa: E402

PANELS = ("CrossEntropy", "MSE", "RescaledMSE")  # the paper's three losses, one panel each
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
    need, cap = GRID_ARRAYS * 8 * points ** 2 * K, allowed_bytes(GRID_MAX_BYTES)
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
