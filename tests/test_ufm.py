"""The unconstrained feature model (ufm.py): the closed form against optimisers, the strict saddles
and the escape from one, the Hessian at the optimum, the run directory, a registered loss and measure, and bad input."""
import math
import os
import pickle

import pytest
import torch

from helpers import refused
from nclib import ufm
import ufm as ufm_script

SETTINGS = [  # (K, n, d, lambda_W, lambda_H, bias): c < 1; c < 1 unequal lambdas; no bias; c >= 1; d < K - 1
    (4, 5, 8, 0.01, 0.01, True),
    (3, 4, 5, 0.02, 0.005, True),
    (4, 3, 6, 0.01, 0.02, False),
    (4, 5, 8, 0.3, 0.3, True),
    (5, 3, 2, 0.01, 0.01, True),
]


@pytest.fixture(autouse=True)
def one_thread(single_thread):
    """Problems of a few hundred variables: a second thread only contends."""


# Everything here is float64. Against an optimiser's end point (LBFGS stops at a gradient of ~1e-13; the
# minimum is isolated up to rotations, with curvature >= lambda ~ 0.01), tolerances of 1e-8 (the value,
# quadratic in the distance) and 1e-5 (W, b) leave room for an early stop, not for rounding. Closed forms
# evaluated directly: sums of a few hundred terms, ~1e-14 (rel 1e-12 to 1e-14, abs 1e-10 to 1e-12 for
# zeros of quantities ~1).
@pytest.mark.parametrize("K, n, d, lW, lH, bias", SETTINGS)
def test_closed_form_matches_lbfgs(K, n, d, lW, lH, bias):
    model = ufm.UFM(K, n, d, lW, lH, bias=bias)
    form = ufm.closed_form(model)
    theta = ufm.minimise(model, seed=1)
    W, _, b = model.split(theta)
    assert model.f(theta).item() == pytest.approx(form["value"], rel=1e-8)
    if form["W_sq_norm"] > 0:
        assert W.pow(2).sum().item() == pytest.approx(form["W_sq_norm"], rel=1e-5)
    else:  # c >= 1: the minimiser is W = H = 0
        assert model.c >= 1 and W.pow(2).sum().item() < 1e-8
    if bias:
        torch.testing.assert_close(b, form["b"], atol=1e-5, rtol=0)


def test_closed_form_value_is_the_objective_at_its_point_which_is_critical():
    for K, n, d, lW, lH, bias in SETTINGS:
        model = ufm.UFM(K, n, d, lW, lH, bias=bias)
        form = ufm.closed_form(model)
        assert model.f(form["theta"]).item() == pytest.approx(form["value"], rel=1e-12)
        assert model.grad(form["theta"]).norm().item() < 1e-10
    # the derivation's formula: f* = (K-1)/(2K) c (2 - c) with a bias, c (2 - c)/2 without
    model = ufm.UFM(4, 5, 8, 0.01, 0.01)
    assert ufm.closed_form(model)["value"] == pytest.approx(3 / 8 * model.c * (2 - model.c), rel=1e-14)
    model = ufm.UFM(4, 5, 8, 0.01, 0.01, bias=False)
    assert ufm.closed_form(model)["value"] == pytest.approx(model.c * (2 - model.c) / 2, rel=1e-14)


@pytest.mark.parametrize("bias", [True, False])
def test_nc_metrics_at_the_closed_form_point(bias):
    model = ufm.UFM(4, 5, 8, 0.01, 0.02, bias=bias)
    form = ufm.closed_form(model)
    out = model.metrics(form["theta"])
    assert max(abs(out["NC1"]), out["NC2"], out["NC3"]) < 1e-10
    # NC4 = ||W mu_G + b|| is not 0 at the optimum: ||b*|| = 1/sqrt(K) with a bias, (1 - c)/sqrt(K) without
    assert out["NC4"] == pytest.approx(0.5 if bias else (1 - model.c) / 2, abs=1e-10)
    assert out["NC4"] == pytest.approx(form["expected_nc"]["NC4"], abs=1e-12)
    assert out["train_acc1"] == 100.0
    W, _, _ = model.split(form["theta"])
    T = torch.eye(4, dtype=torch.float64) - (0.25 if bias else 0.0)
    torch.testing.assert_close(W @ W.T, form["scale"] * T, atol=1e-12, rtol=0)


def test_the_data_terms_are_the_losses_of_losses_py():
    model = ufm.UFM(3, 4, 5, 0.01, 0.01)
    W, H, b = model.split(model.random_point(1.0, seed=3))
    z = (W @ H + b[:, None]).T
    assert model.data_term(W, H, b).item() == pytest.approx(((z.T - model.Y) ** 2).sum().item() / (2 * model.N), rel=1e-13)
    for loss, M, k in (("MSE", 1, 1), ("RescaledMSE", 3.0, 5.0), ("CrossEntropy", 1, 1)):
        model = ufm.UFM(3, 4, 5, 0.01, 0.01, loss=loss, M=M, k=k)
        expected = ufm.per_sample_loss(z, model.y, loss, M, k).mean().item()
        assert model.data_term(W, H, b).item() == pytest.approx(expected, rel=1e-13), loss


def test_strict_saddles_and_the_escape():
    K, n, d, lam = 4, 5, 8, 0.01
    model = ufm.UFM(K, n, d, lam, lam)
    form = ufm.closed_form(model)
    # each inactive direction bends down by (lW + lH)/2 - sqrt(((lW - lH)/2)^2 + 1/(K^2 n))
    expected = lam - 1 / (K * math.sqrt(n))
    for r in range(K - 1):
        p = ufm.saddle(model, r)
        assert p["grad_norm"] < 1e-10
        assert p["lambda_min"] == pytest.approx(expected, rel=1e-8) and p["lambda_min"] < 0
        assert p["negative"] == (K - 1 - r) * (d - r)  # one per (missing target, unused feature) direction pair
        assert p["value"] > form["value"]
        assert model.f(p["theta"]).item() == pytest.approx(p["value"], rel=1e-12)
    # NC2 measures the distance the last iterate has left (~|grad| / lambda), far above rounding
    assert check_escape(model, 214) == pytest.approx(2.2e-12, rel=0.05)


def check_escape(model, iterations):
    """The README's escape: GD from the saddle one direction short stops at |grad| <= 1e-12 after
    `iterations`, with f within one ulp of f*; returns NC2 there. The count is exact on every CPU:
    near the end |grad| falls by ~0.8 an iteration, and the last two iterations straddle 1e-12 by
    3% or more, while kernels that sum in another order change it by ~1e-13 relative (rounding,
    amplified no more than the 1e-3 push itself)."""
    last = []
    end = ufm.escape(model, ufm.saddle(model, model.K - 2), record=lambda it, theta, value, grad: last.append(it))
    assert last[-1] == iterations
    f_star = ufm.closed_form(model)["value"]
    assert abs(model.f(end).item() - f_star) <= math.ulp(f_star)
    return model.metrics(end)["NC2"]


def test_escape_for_K_3_n_4_d_3_takes_144_iterations():
    check_escape(ufm.UFM(3, 4, 3, 0.01, 0.01), 144)


def test_hessian_at_the_global_minimum_has_only_the_rotation_zeros():
    model = ufm.UFM(3, 3, 4, 0.01, 0.01)
    sp = ufm.spectrum(model, ufm.minimise(model))
    eig = sp["eigenvalues"]
    assert eig.min().item() > -1e-8 * eig.abs().max().item()  # no negative curvature beyond rounding
    # rotations W -> W Q^T, H -> Q H of the d = 4 dimensions, W of rank 2: 6 - 1 = 5 zero directions
    assert sp["orbit_dim"] == 5 == sp["near_zero"]
    assert sp["lambda_min_pos"] > 1e-3 and math.isfinite(sp["cond"])


def test_rescaled_mse_at_lambda_times_M_is_mse_with_rescaled_variables():
    # the identity behind --spectrum's matched lambdas (ufm.py's docstring), at a random point
    M, k, lam = 3.0, 5.0, 0.01
    theta = ufm.UFM(3, 2, 4, lam, lam).random_point(1.0, seed=2)
    W, H, b = ufm.UFM(3, 2, 4, lam, lam).split(theta)
    one = ufm.UFM(3, 2, 4, lam, lam, loss="RescaledMSE", M=1.0, k=k)
    scaled = ufm.UFM(3, 2, 4, M * lam, M * lam, loss="RescaledMSE", M=M, k=k)
    assert scaled.objective(math.sqrt(M) * W, math.sqrt(M) * H, M * b).item() == pytest.approx(
        M ** 2 * one.objective(W, H, b).item(), rel=1e-13)
    assert ufm.matched_lambdas(3, M, k, lam, lam, 0.0) == pytest.approx((M * 7 / 3 * lam, M * 7 / 3 * lam, 0.0))


def spectrum_rows(capsys, *flags):
    """{(M, k): row} of the README's --spectrum setting (K 3, n 3, d 4, lambdas 0.01)."""
    rows = ufm_script.main(["--spectrum", "--K", "3", "--n", "3", "--d", "4", "--lambda_W", "0.01", "--lambda_H", "0.01",
                     "--plot_dir", "", *flags])
    capsys.readouterr()
    for r in rows:  # the minimisers near the optimum are exactly the rotation orbit
        assert r["orbit_dim"] == r["near_zero"] and r["lambda_min_pos"] > 0
        assert r["grad_norm"] < 1e-13  # LBFGS, then Newton to rounding (the README says so)
    return {(r["M"], r["k"]): r for r in rows}


def is_printed(row, printed):
    """row's condition number is the README's `printed` one (4 significant digits): within half a
    unit of the last digit plus ufm.cond_rtol's bound on its error (an end point whose gradient is
    not exactly 0, and the eigensolver's rounding; derived in its docstring)."""
    half_digit = 0.5 * 10.0 ** (math.floor(math.log10(printed)) - 3)
    return abs(row["cond"] - printed) <= half_digit + row["cond_rtol"] * row["cond"]


def test_spectrum_matched_M_without_a_bias_is_the_same_problem(capsys):
    rows = spectrum_rows(capsys, "--no-bias", "--Ms", "1", "3", "--ks", "1")
    mse, rescaled = rows[1.0, 1.0], rows[3.0, 1.0]
    assert rescaled["lambda_W"] == pytest.approx(0.03)
    # the Hessian is 3 times MSE's: the condition numbers differ only by the two end points' errors
    assert abs(rescaled["cond"] - mse["cond"]) <= (rescaled["cond_rtol"] + mse["cond_rtol"]) * mse["cond"]
    assert rescaled["lambda_max"] == pytest.approx(3 * mse["lambda_max"], rel=1e-4)
    assert is_printed(mse, 38.49) and is_printed(rescaled, 38.49)


def test_spectrum_matched_and_equal_lambdas_with_a_bias(capsys):
    rows = spectrum_rows(capsys, "--Ms", "1", "3", "--ks", "1", "5")
    assert rows[1.0, 5.0]["lambda_W"] == pytest.approx(0.01 * 7 / 3)
    # the README's table: matched M lowers the condition number (the bias weighted against W, H), k raises it
    assert is_printed(rows[1.0, 1.0], 140.2) and is_printed(rows[3.0, 1.0], 80.92) and is_printed(rows[1.0, 5.0], 166.1)
    equal = spectrum_rows(capsys, "--equal_lambdas", "--Ms", "3", "--ks", "5")
    assert is_printed(equal[3.0, 1.0], 246.8) and is_printed(equal[1.0, 5.0], 393.0)


def test_hessian_modes_refuse_what_does_not_fit_before_allocating(capsys, monkeypatch):
    for mode in ("--spectrum", "--saddle"):
        line = refused(capsys, ufm_script.main, [mode, "--K", "100", "--n", "100", "--d", "100"])
        assert "1,010,100 variables" in line and "45,611.1 GiB" in line and "lower --K, --n or --d" in line, line
    need = ufm.HESSIAN_COPIES * 8 * ufm.variables(3, 3, 4, True) ** 2  # 51 variables
    monkeypatch.setattr(ufm, "HESSIAN_MAX_BYTES", need)
    ufm.check_hessian_fits(3, 3, 4, True, "--spectrum")  # exactly at the cap: allowed
    monkeypatch.setattr(ufm, "HESSIAN_MAX_BYTES", need - 1)
    with pytest.raises(ufm.UserError, match="51 variables"):
        ufm.check_hessian_fits(3, 3, 4, True, "--spectrum")


@pytest.mark.parametrize("optimizer", ["GD", "SGD", "Adam"])
def test_first_order_optimisers_decrease_the_objective(optimizer):
    model = ufm.UFM(3, 4, 5, 0.01, 0.01)
    start = model.random_point(0.1, seed=0)
    end = ufm.optimise(model, optimizer, iters=300, theta0=start, batch_size=3)
    assert model.f(end).item() < 0.5 * model.f(start).item()


def test_the_script_writes_a_run_directory(tmp_path, capsys):
    out = tmp_path / "ufm_run"
    ufm_script.main(["--K", "3", "--n", "4", "--d", "4", "--lambda_W", "0.01", "--lambda_H", "0.01", "--iters", "60",
              "--log_every", "5", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "closed form" in printed and "f - f*" in printed
    with open(out / "info.pkl", "rb") as f:
        info = pickle.load(f)
    for key in ("collapse_metric", "ETF_metric", "WH_relation_metric", "Wh_b_relation_metric", "train_acc1",
                "objective", "grad_norm"):
        assert len(info[key]) == len(info["epochs"]), key
    assert info["epochs"][0] == 0 and info["epochs"] == sorted(info["epochs"])
    assert info["train_acc1"][-1] == 100.0 and info["collapse_metric"][-1] < 1e-8
    assert os.path.exists(out / "args.json") and os.path.exists(out / "test_log.txt")


@pytest.mark.slow
def test_plot_runs_draws_a_ufm_run(tmp_path):
    import plot_runs
    out = tmp_path / "ufm_run"
    ufm_script.main(["--K", "3", "--n", "3", "--d", "3", "--optimizer", "GD", "--iters", "40", "--out", str(out)])
    written = plot_runs.main([str(out), "--out_dir", str(tmp_path / "figs")])
    assert any(p.endswith("NC1.png") for p in written) and all(os.path.exists(p) for p in written)


@pytest.mark.parametrize("argv", [
    ["--lambda_W", "0"], ["--lambda_H", "-1"], ["--lambda_b", "-0.1"], ["--K", "1"], ["--n", "0"],
    ["--loss", "Hinge"], ["--optimizer", "RMSprop"], ["--d", "0"],
])
def test_bad_input_is_refused_in_one_line(capsys, argv):
    refused(capsys, ufm_script.main, argv)


def test_bad_values_through_the_api():
    for kwargs in ({"K": 1}, {"n": 0}, {"lambda_W": 0.0}, {"lambda_b": -1.0}, {"loss": "Hinge"}):
        args = {**dict(K=3, n=2, d=3, lambda_W=0.01, lambda_H=0.01), **kwargs}
        with pytest.raises(ufm.UserError):
            ufm.UFM(**args)
    with pytest.raises(ufm.UserError, match="optimizer"):
        ufm.optimise(ufm.UFM(3, 2, 3, 0.01, 0.01), "Newton")


@pytest.mark.parametrize("extra, what", [(["--d", "2", "--K", "4"], "d = 2 < K - 1"),
                                         (["--no-bias", "--d", "3", "--K", "4"], "d = 3 < K"),
                                         (["--lambda_b", "0.01"], "lambda_b")])
def test_failed_assumptions_run_with_one_warning(tmp_path, capsys, extra, what):
    ufm_script.main(["--n", "2", "--iters", "5", "--out", str(tmp_path / "run")] + extra)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: ") and what in err[0], err


def test_the_script_runs_a_registered_loss_whose_data_term_is_the_mean_of_its_per_sample(dummy_loss, tmp_path, capsys):
    out = tmp_path / "ufm_dummy"
    theta, results = ufm_script.main(["--loss", "Dummy", "--K", "3", "--n", "4", "--d", "4", "--optimizer", "GD",
                                      "--iters", "20", "--log_every", "5", "--out", str(out)])
    assert "closed form: only for MSE (this run: Dummy)" in capsys.readouterr().out
    assert os.path.exists(out / "info.pkl") and max(results) == 20
    model = ufm.UFM(3, 4, 4, 5e-3, 5e-3, loss="Dummy")
    W, H, b = model.split(theta)
    logits = (W @ H + b[:, None]).T
    assert model.data_term(W, H, b).item() == pytest.approx(dummy_loss.per_sample(logits, model.y).mean().item(),
                                                            rel=1e-12)


def test_the_script_writes_a_registered_measure_in_info_pkl_and_its_log(dummy_measure, tmp_path):
    out = tmp_path / "ufm_measured"
    ufm_script.main(["--K", "3", "--n", "4", "--d", "4", "--iters", "10", "--log_every", "5", "--measures", "dummy",
                     "--out", str(out)])
    with open(out / "info.pkl", "rb") as f:
        info = pickle.load(f)
    assert info["epochs"] == [0, 5, 10] and info["dummy_metric"] == [0.75, 0.75, 0.75]  # K / 4
    logged = (out / "test_log.txt").read_text().strip().splitlines()
    assert len(logged) == 3 and all(line.endswith(" | dummy_metric 0.75") for line in logged), logged
