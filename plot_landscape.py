"""Figure: the loss of one feature h under a fixed simplex-ETF classifier W, as a function of its
norm ||h|| and of its angle to w_k (its class's classifier row), for cross-entropy, MSE and
rescaled MSE: one heatmap per loss.

    python plot_landscape.py [--K 4] [--M 3 --k 5] [--out_dir figures/plot_landscape]

W = scale * models.simplex_etf(K, K) (unit rows, W W^T = K/(K-1) (I - 11^T/K)), b = 0, class k = 0.
h = ||h|| (cos(angle) w_0 + sin(angle) u), u the unit vector in the plane of w_0 and w_1 orthogonal
to w_0 and on w_1's side: turning h away from w_0 turns it towards a competitor, the hardest way.
The data term of one sample is nclib.ufm.per_sample_loss (MSE: 1/2 ||z - e_k||^2; rescaled MSE:
1/2 [k (z_k - M)^2 + sum_{j != k} z_j^2]); --lambda_H adds lambda_H/2 ||h||^2. The white line is the
best norm at each angle; the dashed line is where h stops being classified as class 0. The three
panels share one colour scale and one set of contour levels, so that how steeply the loss rises
can be compared across them.
"""
import os

from args import Parser, nonnegative_float, path, positive_float, positive_int
from nclib.base import UserError
from nclib.cli import run_main
from nclib.landscape import MAX_POINTS, MIN_POINTS, PANELS, check_grid, color_limits, draw, panels


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
