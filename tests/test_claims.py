"""claims.py and nclib/claims.py: each claim's criterion on small synthetic run directories built to
hold and to fail, `not run` for missing or half-trained runs, and the refusals of bad --root/--out.
dK-memory's measurement is tested in test_footprint.py, the laptop scale in test_scales.py."""
import json
import math
import os
import pickle
import shutil

import pytest
import torch

import claims as claims_script
from helpers import LAPTOP, flags_of, refused, write_laptop_run
from nclib import claims, nc, rundir, runs

@pytest.fixture
def root(tmp_path):
    """A laptop root where every run ended with END: the run-based claims (but rescaled-trend) hold."""
    path = tmp_path / "laptop"
    for figure in runs.FIGURES:
        for flags in LAPTOP.table(figure)[1].values():
            write_laptop_run(str(path), flags)
    for d in (5, 8):  # d < K - 1 cannot reach NC2 ~ 0: give them a possible value
        write_laptop_run(str(path), flags_of("dk", f"$d={d}$"), {"ETF_metric": 0.8})
    write_laptop_run(str(path), flags_of("M", "$M=5$"), {"collapse_metric": 0.004})  # tuning M helps
    return str(path)




def verdict(root, id):
    c = next(c for c in claims.CLAIMS if c["id"] == id)
    try:
        return c["check"](claims.Runs(root, LAPTOP))[1]
    except claims.NotRun:
        return "not run"


# ---------------------------------------------------------------------------- the run-based criteria

@pytest.mark.parametrize("id, figure, label, end", [
    ("optim-nc", "optim", "Adam", {"train_acc1": 98.0}),  # does not fit the training set
    ("optim-nc", "optim", "LBFGS", {"collapse_metric": 0.6}),  # NC1 does not fall to half its peak
    ("optim-nc", "optim", "SGD", {"Wh_b_relation_metric": 1.5}),  # NC4 moves away from 1/sqrt(K)
    ("etf-nc", "etf", "fixed ETF, $d=10$", {"WH_relation_metric": 0.2}),  # NC3 > 2 x 0.05 + 0.01
    ("etf-nc", "etf", "fixed ETF, $d=512$", {"train_acc1": 90.0}),
    ("etf-accuracy", "etf", "fixed ETF, $d=512$", {"test_acc1": 94.9}),  # seeds agree: no loss allowed
    ("dk-collapse", "dk", "$d=9$", {"ETF_metric": 0.17}),  # just above half of d = 8's floor 0.338
    ("dk-collapse", "dk", "$d=8$", {"ETF_metric": 0.1}),  # below the floor: impossible, and caught
    ("rescaled-trend", "M", "$M=5$", {"collapse_metric": 0.0051}),  # just above half of M = k = 1's 0.01
])
def test_each_criterion_holds_then_fails_when_one_run_is_changed(root, id, figure, label, end):
    assert verdict(root, id) == "holds"
    write_laptop_run(root, flags_of(figure, label), end)  # info.pkl rewritten: the verdict follows it
    assert verdict(root, id) == "fails"


def test_the_seed_spread_is_the_accuracy_tolerance(root):
    write_laptop_run(root, flags_of("etf", "fixed ETF, $d=10$"), {"test_acc1": 93.5})
    assert verdict(root, "etf-accuracy") == "fails"
    write_laptop_run(root, LAPTOP.second_seed("etf", "learned, $d=10$"), {"test_acc1": 93.0})  # spread 2 points
    assert verdict(root, "etf-accuracy") == "holds"


@pytest.mark.parametrize("id, figure, label", [("optim-nc", "optim", "LBFGS"), ("etf-nc", "etf", "fixed ETF, $d=10$"),
                                               ("dk-collapse", "dk", "$d=5$"), ("rescaled-trend", "k", r"$\alpha=20$")])
def test_a_missing_or_half_trained_run_is_not_run(root, id, figure, label):
    run_dir = write_laptop_run(root, flags_of(figure, label), last_epoch=LAPTOP.epochs(flags_of(figure, label)) // 2)
    assert verdict(root, id) == "not run"
    shutil.rmtree(run_dir)
    assert verdict(root, id) == "not run"
    os.makedirs(run_dir)
    with open(os.path.join(run_dir, rundir.INFO), "wb") as f:
        f.write(b"damaged")
    assert verdict(root, id) == "not run"


def test_etf_accuracy_without_the_second_seed_is_not_run(root):
    shutil.rmtree(os.path.join(root, LAPTOP.run_name(LAPTOP.second_seed("etf", "learned, $d=512$"))))
    assert verdict(root, "etf-accuracy") == "not run"


def test_nc2_floor_is_the_least_nc2_of_a_rank_d_classifier():
    g = torch.Generator().manual_seed(0)
    for d in (5, 8):
        floor = claims.nc2_floor(d)
        W = torch.randn(10, d, generator=g, dtype=torch.float64)
        assert nc.NC2(W).item() >= floor
        # attained: d of the simplex's orthonormal directions, equally weighted
        Q, _ = torch.linalg.qr(torch.eye(10, dtype=torch.float64) - 0.1)
        assert nc.NC2(Q[:, :d]).item() == pytest.approx(floor, abs=1e-12)
    assert claims.DK_NEAR_ZERO == pytest.approx(0.5 * math.sqrt(2 - 2 * math.sqrt(8 / 9)))
    assert claims.NC4_TARGET == pytest.approx(10 ** -0.5, abs=1e-15)  # ||W mu_G + b|| = ||b*|| = ||1/K||
    assert [claims.simplex_reachable(d) for d in claims.DIMS] == [False, False, True, True, True]


# ---------------------------------------------------------------------------- dK-memory

FAKE_MEMORY = {K: ({"learned, d=512": {"params": 100, "trainable": 100, "peak_step_bytes": 1000, "device": "cpu"},
                    "fixed ETF, d=K": {"params": 79, "trainable": 79, "peak_step_bytes": peak, "device": "cpu"}},
                   {"params": -21.0, "trainable": -21.0, "optimizer_state_bytes": -21.0,
                    "peak_step_bytes": peak / 10 - 100}) for K, peak in ((10, 700), (100, 850))}


def test_dk_memory_needs_the_memory_cut_and_the_accuracy(root, monkeypatch):
    monkeypatch.setattr(claims, "memory", lambda device: (FAKE_MEMORY, 5120))
    assert verdict(root, "dK-memory") == "holds"  # -30% peak memory, accuracy kept
    write_laptop_run(root, flags_of("etf", "fixed ETF, $d=10$"), {"test_acc1": 90.0})
    assert verdict(root, "dK-memory") == "fails"
    write_laptop_run(root, flags_of("etf", "fixed ETF, $d=10$"))
    small = {**FAKE_MEMORY, 10: (FAKE_MEMORY[10][0], {**FAKE_MEMORY[10][1], "peak_step_bytes": -15.0})}
    monkeypatch.setattr(claims, "memory", lambda device: (small, 5120))
    assert verdict(root, "dK-memory") == "fails"
    shutil.rmtree(os.path.join(root, LAPTOP.run_name(flags_of("etf", "fixed ETF, $d=10$"))))
    assert verdict(root, "dK-memory") == "fails"  # a part measured without the runs failed already
    monkeypatch.setattr(claims, "memory", lambda device: (FAKE_MEMORY, 5120))
    assert verdict(root, "dK-memory") == "not run"


# ---------------------------------------------------------------------------- the UFM claims

def test_ufm_global_on_chosen_end_points(monkeypatch):
    from nclib import ufm
    model = claims.ufm_model()
    minimiser = ufm.closed_form(model)["theta"]
    monkeypatch.setattr(claims, "end_points", lambda m: [("LBFGS", 0, minimiser)])
    assert claims.ufm_global(None)[1] == "holds"
    saddle, _ = ufm.critical_point(model, 1)  # converged (gradient 0) but not at f*
    monkeypatch.setattr(claims, "end_points", lambda m: [("LBFGS", 0, minimiser), ("GD", 0, saddle)])
    assert claims.ufm_global(None)[1] == "fails"
    monkeypatch.setattr(claims, "end_points", lambda m: [("GD", 0, minimiser + 1e-3)])  # none converged
    assert claims.ufm_global(None)[1] == "fails"


@pytest.mark.slow
def test_ufm_global_from_random_starts():
    measured, v = claims.ufm_global(None)
    assert v == "holds" and measured.startswith("14 of 14 starts converged")


def test_ufm_saddles(monkeypatch):
    from nclib import ufm
    measured, v = claims.ufm_saddles(None)
    assert v == "holds" and measured.count("least eigenvalue -0.1") == 3
    real = ufm.saddle
    monkeypatch.setattr(ufm, "saddle", lambda m, r: {**real(m, r), "negative": 0})  # no escape direction
    assert claims.ufm_saddles(None)[1] == "fails"


# ---------------------------------------------------------------------------- claims.py

def test_claims_py_writes_the_table(root, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(claims, "memory", lambda device: (FAKE_MEMORY, 5120))
    monkeypatch.setattr(claims, "end_points", lambda m: [])  # none converged: fails, in no time
    out = tmp_path / "out"
    shutil.rmtree(os.path.join(root, LAPTOP.run_name(flags_of("optim", "Adam"))))
    claims_script.main(["--root", root, "--out", str(out)])
    printed = capsys.readouterr().out
    rows = json.loads((out / "claims.json").read_text())
    assert [r["id"] for r in rows] == ["optim-nc", "etf-nc", "etf-accuracy", "dK-memory", "dk-collapse",
                                       "rescaled-trend", "ufm-global", "ufm-saddles"]
    assert all(set(r) == {"id", "claim", "source", "criterion", "measured", "verdict"} for r in rows)
    assert [r["verdict"] for r in rows] == ["not run", "holds", "holds", "holds", "holds", "holds", "fails", "holds"]
    assert "| claim | source | criterion | measured | verdict |" in printed and "laptop scale" in printed
    assert (out / "claims.md").read_text().count("\n") == 2 + 8


def test_bad_root_or_out_is_refused_in_one_line(tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("")
    assert "no such folder" in refused(capsys, claims_script.main, ["--root", str(tmp_path / "nothing")])
    assert "is a file" in refused(capsys, claims_script.main, ["--root", str(a_file)])
    assert "is a file" in refused(capsys, claims_script.main, ["--root", str(tmp_path), "--out", str(a_file)])
    assert "lies under a file" in refused(capsys, claims_script.main,
                                          ["--root", str(tmp_path), "--out", str(a_file / "x")])
    loop = tmp_path / "loop"
    os.symlink(loop, loop)
    for flag in ("--root", "--out"):
        argv = ["--root", str(tmp_path), flag, str(loop)]
        assert "cannot be looked at (Too many levels of symbolic links)" in refused(capsys, claims_script.main, argv)
    out = tmp_path / "out"
    (out / "claims.json").mkdir(parents=True)
    line = refused(capsys, claims_script.main, ["--root", str(tmp_path), "--out", str(out)])
    assert "claims.json there is not a file" in line, line
    assert os.listdir(out) == ["claims.json"]


def test_an_out_that_cannot_be_written_is_refused_before_measuring(tmp_path, capsys, monkeypatch):
    def denied(*args, **kwargs):  # what a read-only folder gives, even where os.access says yes (root)
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(claims_script.tempfile, "mkstemp", denied)
    monkeypatch.setattr(claims, "evaluate", lambda *a: pytest.fail("measured before refusing"))
    line = refused(capsys, claims_script.main, ["--root", str(tmp_path), "--out", str(tmp_path / "out")])
    assert "cannot be written (Permission denied)" in line, line


def test_both_files_change_together(root, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(claims, "memory", lambda device: (FAKE_MEMORY, 5120))
    monkeypatch.setattr(claims, "end_points", lambda m: [])
    out = tmp_path / "out"
    out.mkdir()
    for name in ("claims.md", "claims.json"):
        (out / name).write_text("old")
    real = os.replace

    def replace(src, dst):  # the disk fills as the first rename is about to happen
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError):
        claims_script.main(["--root", root, "--out", str(out)])
    monkeypatch.setattr(os, "replace", real)
    assert sorted(os.listdir(out)) == ["claims.json", "claims.md"]  # no temporary file left
    assert all((out / name).read_text() == "old" for name in ("claims.json", "claims.md"))


def test_without_root_each_scale_reads_its_own_folder(root, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(claims, "memory", lambda device: (FAKE_MEMORY, 5120))
    monkeypatch.setattr(claims, "end_points", lambda m: [])
    monkeypatch.chdir(tmp_path)
    os.makedirs("model_weights")
    shutil.move(root, os.path.join("model_weights", "laptop"))
    for argv in ([], ["--scale", "laptop"]):
        rows = claims_script.main(argv + ["--out", "out"])
        assert "runs under model_weights/laptop" in capsys.readouterr().out
        assert [r["verdict"] for r in rows][:3] == ["holds", "holds", "holds"]
    rows = claims_script.main(["--scale", "paper", "--out", "out"])
    assert "runs under model_weights:" in capsys.readouterr().out
    assert {r["verdict"] for r in rows[:6]} == {"not run"}


# ---------------------------------------------------------------------------- damaged values

@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), None, "x", [0.1, 0.2], 1e6, -1.0])
def test_a_value_that_is_no_measurement_makes_the_claim_not_run(root, bad):
    """Never `holds` from a damaged record: an inf spread of the second seed once accepted any
    accuracy, an inf NC1 of M = k = 1 any rescaled run."""
    write_laptop_run(root, flags_of("etf", "fixed ETF, $d=512$"), {"test_acc1": 50.0})
    assert verdict(root, "etf-accuracy") == "fails"
    second = LAPTOP.second_seed("etf", "learned, $d=512$")
    write_laptop_run(root, second)
    with_bad_final(root, second, "test_acc1", bad)
    assert verdict(root, "etf-accuracy") == "not run"
    for label in ("$M=1$", "$M=5$"):
        write_laptop_run(root, flags_of("M", label), {"collapse_metric": 5.0})
    if bad != 1e6 and bad != -1.0:  # accuracies only are bounded
        with_bad_final(root, flags_of("M", "$M=1$"), "collapse_metric", bad)
        assert verdict(root, "rescaled-trend") == "not run"


def test_a_missing_or_malformed_column_makes_the_claim_not_run(root):
    run_dir = os.path.join(root, LAPTOP.run_name(flags_of("optim", "SGD")))
    info = rundir.read_info(run_dir)
    for damage in ({"ETF_metric": None}, {"ETF_metric": 0.3}, {"collapse_metric": "x"}):
        damaged = {k: v for k, v in {**info, **damage}.items() if v is not None}
        with open(os.path.join(run_dir, rundir.INFO), "wb") as f:
            pickle.dump(damaged, f)
        assert verdict(root, "optim-nc") == "not run", damage


def with_bad_final(root, flags, key, bad):
    """Replace the last epoch's `key` in a run's info.pkl with `bad`."""
    run_dir = os.path.join(root, LAPTOP.run_name(flags))
    info = rundir.read_info(run_dir)
    info[key] = list(info[key])[:-1] + [bad]
    with open(os.path.join(run_dir, rundir.INFO), "wb") as f:
        pickle.dump(info, f)
