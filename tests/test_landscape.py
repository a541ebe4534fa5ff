"""nclib/landscape.py through plot_landscape.py: its figures written, grids outside the range or too
large refused before anything is allocated, one colour scale for the three panels, titles from
the loss table."""
import os

import pytest

import plot_landscape
from helpers import refused
from nclib import landscape


@pytest.mark.slow
def test_plot_landscape_writes_its_figures(tmp_path):
    written = plot_landscape.main(["--points", "21", "--out_dir", str(tmp_path)])
    names = sorted(os.path.basename(p) for p in written)
    assert names == sorted(f"landscape_{loss}.{ext}" for loss in ("CrossEntropy", "MSE", "RescaledMSE")
                           for ext in ("png", "pdf"))
    assert all(os.path.getsize(p) > 0 for p in written)


@pytest.mark.parametrize("argv, what", [(["--points", "1"], "--points 1: the grid takes 2 to 1001"),
                                        (["--points", "100000"], "--points 100000: the grid takes 2 to 1001"),
                                        (["--points", "1001", "--K", "100"], "GiB")])
def test_plot_landscape_refuses_grids_outside_its_range_in_one_line(capsys, tmp_path, argv, what):
    line = refused(capsys, plot_landscape.main, argv + ["--out_dir", str(tmp_path)])
    assert what in line, line
    assert not os.listdir(tmp_path)


def test_plot_landscape_panels_share_one_colour_scale():
    import matplotlib.pyplot as plt
    args = plot_landscape.parser().parse_args(["--points", "11"])
    panels = landscape.panels(args)
    ranges = {loss: (landscape.log_loss(v).min(), landscape.log_loss(v).max())
              for loss, (_, _, v, _) in panels.items()}
    assert len(set(ranges.values())) == 3  # each panel alone would get a scale of its own
    limits = landscape.color_limits(panels)
    assert limits == (min(lo for lo, _ in ranges.values()), max(hi for _, hi in ranges.values()))
    for loss, panel in panels.items():
        fig = landscape.figure(loss, panel, args, limits)
        assert fig.axes[0].collections[0].get_clim() == limits, loss
        plt.close(fig)


def test_the_landscape_title_is_the_registered_loss_description(dummy_loss):
    import matplotlib.pyplot as plt
    args = plot_landscape.parser().parse_args(["--M", "2", "--points", "11"])
    for loss, title in (("Dummy", "dummy L1 (M=2), K=4"), ("RescaledMSE", "rescaled MSE (M=2, k=5), K=4"),
                        ("CrossEntropy", "cross-entropy, K=4"), ("MSE", "MSE, K=4")):
        panel = landscape.landscape(loss, args.K, args.M, args.k, points=args.points)
        fig = landscape.figure(loss, panel, args, landscape.color_limits({loss: panel}))
        assert fig.axes[0].get_title() == title
        plt.close(fig)
