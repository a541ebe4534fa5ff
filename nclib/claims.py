"""The paper's claims as checks on the runbook's runs (claims.py is the script).

Each claim has a criterion, with its thresholds, fixed before the runs that test it, and a verdict:
`holds`, `fails`, or `not run` when a run it needs is missing or stopped before its last epoch
(never `holds`). A claim that is a conjunction fails as soon as a part measured without those
runs fails. The runs are found by their names at a scale (nclib/scales.py) under a root; the UFM
claims compute what they need in seconds with ufm.py.
"""
import math
import numbers
import os

from nclib import rundir, scales

VERDICTS = ("holds", "fails", "not run")
NC_KEYS = {"NC1": "collapse_metric", "NC2": "ETF_metric", "NC3": "WH_relation_metric", "NC4": "Wh_b_relation_metric"}
K = 10  # the classes of the runs the network claims read at both scales (optim, etf, dk: CIFAR-10; the MNIST sample)
ACCURACIES = ("train_acc1", "test_acc1")  # percentages: a value outside [0, 100] is a damaged record


class NotRun(Exception):
    """A run a claim needs is missing, unreadable, not measured at its last epoch, or holds a value
    that is no measurement (missing, not a finite number, an accuracy outside [0, 100])."""


class Entry(dict):
    """One epoch's info.pkl entry, knowing whose it is, so that a damaged value names its run."""

    def __init__(self, values, run, epoch):
        super().__init__(values)
        self.run, self.epoch = run, epoch


class Runs:
    """The runs of one scale under one root, and the device dK-memory measures on."""

    def __init__(self, root, scale, device="cpu"):
        self.root, self.scale, self.device = root, scale, device

    def _read(self, flags):
        name = self.scale.run_name(flags)
        epochs = self.scale.epochs(flags)
        try:
            entries = rundir.info_entries(os.path.join(self.root, name))
        except Exception:  # a damaged info.pkl is no measurement
            entries = {}
        if not entries or max(entries) < epochs:
            raise NotRun(f"{name} (needs epoch {epochs}, has {max(entries) if entries else 'none'})")
        return {e: Entry(entries[e], name, e) for e in sorted(entries) if e <= epochs}

    def curve(self, figure, label):
        """{epoch: info entry} of a figure's run by its label, up to its last epoch."""
        return self._read(self.scale.table(figure)[1][label])

    def final(self, figure, label):
        curve = self.curve(figure, label)
        return curve[max(curve)]

    def second_seed_final(self, figure, label):
        curve = self._read(self.scale.second_seed(figure, label))
        return curve[max(curve)]


def value(entry, name):
    """A measured number of an entry; NotRun when it is missing or is no measurement, so that a
    damaged record can never make a claim hold (an inf spread would accept any accuracy)."""
    key = NC_KEYS.get(name, name)
    v = entry.get(key)
    where = f"{entry.run}: {key} at epoch {entry.epoch}"
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise NotRun(f"{where} is {'missing' if key not in entry else repr(v)[:40]}, not a number")
    v = float(v)
    if not math.isfinite(v) or (key in ACCURACIES and not 0 <= v <= 100):
        raise NotRun(f"{where} is {v}, no measurement")
    return v


# ---------------------------------------------------------------------------- the claims

CLAIMS = []


def claim(id, text, source, criterion):
    """Register a check: fn(runs) -> (measured text, verdict)."""
    def register(fn):
        CLAIMS.append({"id": id, "claim": text, "source": source, "criterion": criterion, "check": fn})
        return fn
    return register


def fmt(x):
    return f"{x:.3g}"


def verdict(ok):
    return "holds" if ok else "fails"


# optim-nc ----------------------------------------------------------------------------------------
FIT_ACC = 99.0  # percent of training images: "fits the training set"
FALL = 0.5  # NC1-NC3 at the end at most half their largest measured value


def nc4_at_the_optimum(num_classes=K):
    """NC4 of the MSE UFM's global minimiser with a bias (ufm.closed_form's; 1/sqrt(K))."""
    from nclib import ufm
    return ufm.closed_form(ufm.UFM(num_classes, 1, num_classes, 1e-3, 1e-3))["expected_nc"]["NC4"]


NC4_TARGET = nc4_at_the_optimum()


@claim("optim-nc", "Under MSE, NC emerges with each of SGD, Adam and LBFGS: the network fits the training set "
       "and NC1-NC4 fall over the terminal phase", "paper, experiments: NC across optimisers (plot_optim_mse.py)",
       f"each of SGD, Adam, LBFGS: final train accuracy >= {FIT_ACC}%; final NC1, NC2, NC3 <= {FALL} x their "
       "largest measured value; |NC4 - 1/sqrt(K)| (NC4's value at the UFM optimum with a bias, ufm.closed_form) "
       "at the end <= at the first measured epoch")
def optim_nc(runs):
    parts, ok = [], True
    for label in ("SGD", "Adam", "LBFGS"):
        curve = runs.curve("optim", label)
        first, last = curve[min(curve)], curve[max(curve)]
        fits = value(last, "train_acc1") >= FIT_ACC
        no_fall = [n for n in ("NC1", "NC2", "NC3")
                   if value(last, n) > FALL * max(value(e, n) for e in curve.values())]
        nc4 = abs(value(last, "NC4") - NC4_TARGET) <= abs(value(first, "NC4") - NC4_TARGET)
        ok &= fits and not no_fall and nc4
        failed = [w for w, f in (("no fit", fits), (" and ".join(no_fall) + " no fall", not no_fall),
                                 ("NC4 off", nc4)) if not f]
        parts.append(f"{label}: acc {value(last, 'train_acc1'):.1f}%, NC1 {fmt(value(last, 'NC1'))}, "
                     f"NC2 {fmt(value(last, 'NC2'))}, NC3 {fmt(value(last, 'NC3'))}, NC4 {fmt(value(last, 'NC4'))}"
                     + (f" ({', '.join(failed)})" if failed else ""))
    return "; ".join(parts), verdict(ok)


# etf-nc ------------------------------------------------------------------------------------------
ETF_FACTOR, ETF_SLACK = 2.0, 0.01  # "collapses as a learned one does": within 2x (+0.01 near zero)
D_PAIRS = {"512": ("learned, $d=512$", "fixed ETF, $d=512$"), "K": ("learned, $d=10$", "fixed ETF, $d=10$")}


@claim("etf-nc", "A classifier fixed as a simplex ETF collapses as a learned one does, at d = 512 and at d = K",
       "paper, experiments: fixed ETF classifier and d = K (plot_etf_mse.py)",
       f"at d = 512 and d = K: the fixed-ETF run's final train accuracy >= {FIT_ACC}% and its final NC1, NC2, NC3 "
       f"each <= {ETF_FACTOR:g} x the learned run's + {ETF_SLACK}")
def etf_nc(runs):
    parts, ok = [], True
    for d, (learned, fixed) in D_PAIRS.items():
        a, b = runs.final("etf", learned), runs.final("etf", fixed)
        failed = ([f"train acc < {FIT_ACC:g}%"] if value(b, "train_acc1") < FIT_ACC else []) + [
            f"{n} above" for n in ("NC1", "NC2", "NC3") if value(b, n) > ETF_FACTOR * value(a, n) + ETF_SLACK]
        ok &= not failed
        parts.append(f"d={d}: " + ", ".join(f"{n} {fmt(value(b, n))} vs {fmt(value(a, n))}" for n in ("NC1", "NC2", "NC3"))
                     + f", train acc {value(b, 'train_acc1'):.1f}% (ETF vs learned)"
                     + (f" ({', '.join(failed)})" if failed else ""))
    return "; ".join(parts), verdict(ok)


# etf-accuracy ------------------------------------------------------------------------------------
def seed_spread(runs, label):
    """(test accuracy of the reference run, |its difference from the second seed's|) in percent."""
    a = value(runs.final("etf", label), "test_acc1")
    return a, abs(a - value(runs.second_seed_final("etf", label), "test_acc1"))


@claim("etf-accuracy", "A classifier fixed as a simplex ETF loses no test accuracy, at d = 512 and at d = K",
       "paper, experiments: fixed ETF classifier and d = K (plot_etf_mse.py)",
       f"at d = 512 and d = K: the fixed-ETF run's final test accuracy >= the learned run's minus the spread of "
       f"the learned run's two seeds ({scales.PAPER_SEED}, {scales.SECOND_SEED})")
def etf_accuracy(runs):
    parts, ok = [], True
    for d, (learned, fixed) in D_PAIRS.items():
        reference, spread = seed_spread(runs, learned)
        acc = value(runs.final("etf", fixed), "test_acc1")
        ok &= acc >= reference - spread
        parts.append(f"d={d}: ETF {acc:.1f}% vs learned {reference:.1f}% (seed spread {spread:.1f})")
    return "; ".join(parts), verdict(ok)


# dK-memory ---------------------------------------------------------------------------------------
MEMORY_CUT = 20.0  # percent: "cuts memory by more than 20%"


def memory(device):
    """{K: footprint.compare(K)} for K = 10 and 100 (about 10 s each on a CPU), and the weights the
    ETF freezes at d = 512, K = 10."""
    from nclib import footprint
    from tqdm import tqdm
    out = {K: footprint.compare(K, device=device) for K in tqdm((10, 100), desc="dK-memory: training steps",
                                                                  leave=False)}
    learned = footprint.build(10, ETF_fc=False, fixdim=0)
    etf = footprint.build(10, ETF_fc=True, fixdim=0)
    frozen = sum(p.numel() for p in learned.parameters()) - sum(p.numel() for p in etf.parameters() if p.requires_grad)
    return out, frozen


@claim("dK-memory", "d = K with a fixed ETF classifier cuts ResNet-18's memory by more than 20% without losing "
       "test accuracy", "the authors' README (the sentence is from Zhu et al., 2021)",
       f"ResNet-18, 3x32x32, K = 10, batch 128, SGD: the peak memory of a training step (fixed ETF d = K against "
       f"learned d = 512) falls by more than {MEMORY_CUT:g}%, and the fixed ETF d = K run's final test accuracy >= "
       f"the learned d = 512 run's minus the spread of its two seeds; parameters, trainable parameters, optimiser "
       f"state and K = 100 reported")
def dK_memory(runs):
    by_K, frozen = memory(runs.device)
    (rows, cuts), (_, cuts100) = by_K[10], by_K[100]
    mem_ok = -cuts["peak_step_bytes"] > MEMORY_CUT
    a, b = rows["learned, d=512"], rows["fixed ETF, d=K"]
    measured = (f"K=10: params {a['params']:,} -> {b['params']:,} ({cuts['params']:+.1f}%), trainable "
                f"{a['trainable']:,} -> {b['trainable']:,}, SGD state {cuts['optimizer_state_bytes']:+.1f}%, "
                f"peak step memory {a['peak_step_bytes'] / 2**20:.0f} -> {b['peak_step_bytes'] / 2**20:.0f} MiB "
                f"({cuts['peak_step_bytes']:+.1f}%, {a['device']}); the ETF alone freezes {frozen:,} weights; "
                f"K=100: params {cuts100['params']:+.1f}%, peak {cuts100['peak_step_bytes']:+.1f}%")
    try:
        reference, spread = seed_spread(runs, "learned, $d=512$")
        acc = value(runs.final("etf", "fixed ETF, $d=10$"), "test_acc1")
    except NotRun:
        if not mem_ok:
            return measured + "; accuracy: not run", "fails"
        raise
    measured += f"; test acc ETF d=K {acc:.1f}% vs learned d=512 {reference:.1f}% (seed spread {spread:.1f})"
    return measured, verdict(mem_ok and acc >= reference - spread)


# dk-collapse -------------------------------------------------------------------------------------
DIMS = (5, 8, 9, 10, 512)


def simplex_reachable(d, num_classes=K):
    """Whether the UFM's optimum with a bias is a simplex ETF at feature dimension d (ufm.py's
    closed form: it needs d >= K - 1)."""
    from nclib import ufm
    model = ufm.UFM(num_classes, 1, d, 1e-3, 1e-3)
    return ufm.closed_form(model)["expected_nc"] is not None


def nc2_floor(d, num_classes=K):
    """The least NC2 any K x d classifier can have, d < K - 1: NC2^2 = 2 - 2 <G, P> for the unit-norm
    centred Gram G (rank <= d) and P (K - 1 equal eigenvalues 1/sqrt(K - 1)), and <G, P> is at most
    sqrt(d / (K - 1)) (the eigenvalues of G spread evenly over d of P's directions)."""
    return math.sqrt(max(0.0, 2 - 2 * math.sqrt(min(d, num_classes - 1) / (num_classes - 1))))


# "near 0": below half the least NC2 that any d < K - 1 of the figure can reach
DK_NEAR_ZERO = 0.5 * min(nc2_floor(d) for d in DIMS if not simplex_reachable(d))


@claim("dk-collapse", "With a bias the UFM's optimum needs d >= K - 1 for a simplex ETF: runs with d below that "
       "do not reach NC2 near 0, the others do", "paper, experiments: feature dimension d against K = 10 "
       "(plot_dk_mse.py), and the UFM theorem's d >= K - 1",
       f"final NC2 <= {DK_NEAR_ZERO:.3f} (half the least NC2 possible at d = 8, {nc2_floor(8):.3f}) for every d >= K - 1 "
       f"in {{9, 10, 512}}, and > {DK_NEAR_ZERO:.3f} for d in {{5, 8}}")
def dk_collapse(runs):
    parts, ok = [], True
    for d in DIMS:
        nc2 = value(runs.final("dk", f"$d={d}$"), "NC2")
        near = nc2 <= DK_NEAR_ZERO
        ok &= near == simplex_reachable(d)
        parts.append(f"d={d}: NC2 {fmt(nc2)}")
    return ", ".join(parts), verdict(ok)


# rescaled-trend ----------------------------------------------------------------------------------
RESCALED_GAIN = 0.5  # "improved": some (M, k) other than (1, 1) ends with at most half of (1, 1)'s NC1
M_VALUES, K_VALUES = (1, 3, 5, 7, 10), (1, 5, 15, 20)


def trend(values):
    """'rises', 'falls' or 'mixed': the sign pattern of successive differences."""
    steps = [b - a for a, b in zip(values, values[1:])]
    return "rises" if all(s > 0 for s in steps) else "falls" if all(s < 0 for s in steps) else "mixed"


@claim("rescaled-trend", "The landscape around the NC solutions can be improved by tuning the rescaling "
       "hyperparameters (M, and k = alpha) of the rescaled MSE", "paper, rescaled MSE (plot_M_rmse.py, plot_k_rmse.py)",
       f"some run with M > 1 or k > 1 ends with NC1 <= {RESCALED_GAIN} x the M = k = 1 run's; the end-of-training "
       "NC1, NC2 and test accuracy and their trend in M and in k reported (test accuracy is not judged: these runs "
       "have one seed)")
def rescaled_trend(runs):
    by_M = {M: runs.final("M", f"$M={M}$") for M in M_VALUES}
    by_k = {k: runs.final("k", rf"$\alpha={k}$") for k in K_VALUES}
    reference = value(by_M[1], "NC1")
    others = [value(e, "NC1") for M, e in by_M.items() if M != 1] + [value(e, "NC1") for k, e in by_k.items() if k != 1]
    parts = []
    for name, table in (("M", by_M), ("k", by_k)):
        cells = ", ".join(f"{name}={v}: NC1 {fmt(value(e, 'NC1'))} acc {value(e, 'test_acc1'):.1f}%" for v, e in table.items())
        trends = ", ".join(f"{n} {trend([value(e, n) for e in table.values()])}" for n in ("NC1", "NC2", "test_acc1"))
        parts.append(f"{cells} (in {name}: {trends})")
    return "; ".join(parts), verdict(min(others) <= RESCALED_GAIN * reference)


# ufm-global --------------------------------------------------------------------------------------
# A small UFM with a bias: K = 4 classes, n = 5 samples each, d = 6, lambda_W = lambda_H = 5e-3
# (c = K sqrt(n lW lH) = 0.045 < 1, so the theorem's optimum is a simplex ETF).
UFM_SIZE = dict(K=4, n=5, d=6, lambda_W=5e-3, lambda_H=5e-3)
STARTS = {"LBFGS": 10, "Adam": 3, "GD": 1}  # random starts per optimiser (seeds 0, 1, ...)
CONVERGED = 1e-7  # gradient norm of a converged end point
F_TOL, NC_TOL = 1e-9, 1e-4  # |f - f*| and NC1-NC3 at a converged end point


def ufm_model():
    from nclib import ufm
    return ufm.UFM(**UFM_SIZE)


def end_points(model):
    """[(optimiser, seed, theta)] from every random start (about 8 s)."""
    from nclib import ufm
    from tqdm import tqdm
    starts = [(o, s) for o, n in STARTS.items() for s in range(n)]
    out = []
    for o, s in tqdm(starts, desc="ufm-global: random starts", leave=False):
        theta = ufm.minimise(model, seed=s) if o == "LBFGS" else \
            ufm.optimise(model, o, iters=5000, seed=s, tol_grad=CONVERGED / 10)
        out.append((o, s, theta))
    return out


@claim("ufm-global", "In the UFM every global minimiser is an NC solution: from many random starts every optimiser "
       "that converges reaches f* with NC1-NC3 ~ 0", "paper, main theorem (global optimality, UFM)",
       f"UFM K=4, n=5, d=6, lambda_W = lambda_H = 5e-3, bias; {sum(STARTS.values())} random starts "
       f"({', '.join(f'{o} {n}' for o, n in STARTS.items())}): at least one converges (gradient norm <= {CONVERGED:g}) "
       f"and every converged end point has |f - f*| <= {F_TOL:g} (f* from ufm.closed_form) and NC1, NC2, NC3 <= {NC_TOL:g}")
def ufm_global(_runs):
    from nclib import ufm
    model = ufm_model()
    f_star = ufm.closed_form(model)["value"]
    converged = bad = 0
    worst_f = worst_nc = 0.0
    for _, _, theta in end_points(model):
        if model.grad(theta).norm().item() > CONVERGED:
            continue
        converged += 1
        m = model.metrics(theta)
        gap, nc_max = abs(model.f(theta).item() - f_star), max(float(m[n]) for n in ("NC1", "NC2", "NC3"))
        worst_f, worst_nc = max(worst_f, gap), max(worst_nc, nc_max)
        bad += gap > F_TOL or nc_max > NC_TOL
    measured = (f"{converged} of {sum(STARTS.values())} starts converged; largest |f - f*| {worst_f:.1e}, "
                f"largest NC1-NC3 {worst_nc:.1e}; {bad} converged elsewhere")
    return measured, verdict(converged > 0 and bad == 0)


# ufm-saddles -------------------------------------------------------------------------------------
SADDLE_GRAD = 1e-10  # a critical point's gradient norm


@claim("ufm-saddles", "In the UFM every critical point other than the global minimisers is a strict saddle",
       "paper, main theorem (benign landscape, UFM)",
       f"same UFM: each closed-form critical point using r < K - 1 = 3 of the simplex's directions has gradient norm "
       f"<= {SADDLE_GRAD:g} and a negative Hessian eigenvalue; the one with r = 3 (the minimiser) has none")
def ufm_saddles(_runs):
    from nclib import ufm
    model = ufm_model()
    m = model.K - 1
    parts, ok = [], True
    for r in range(m + 1):
        point = ufm.saddle(model, r)
        strict = point["negative"] > 0
        ok &= point["grad_norm"] <= SADDLE_GRAD and strict == (r < m)
        parts.append(f"r={r}: |grad| {point['grad_norm']:.0e}, least eigenvalue {point['lambda_min']:.3g}")
    return "; ".join(parts), verdict(ok)


# ---------------------------------------------------------------------------- the report

def detect_scale(root):
    """The scale whose run names are found under root: laptop if any of its runs is there, else paper."""
    return "laptop" if scales.Scale("laptop").runs_under(root) else "paper"


def evaluate(root, scale_name, device="cpu"):
    """[{id, claim, source, criterion, measured, verdict}] of every claim on the runs under root."""
    runs = Runs(root, scales.Scale(scale_name), device)
    rows = []
    for c in CLAIMS:
        try:
            measured, v = c["check"](runs)
        except NotRun as e:
            measured, v = f"missing or incomplete: {e}", "not run"
        rows.append({k: c[k] for k in ("id", "claim", "source", "criterion")} | {"measured": measured, "verdict": v})
    return rows


def markdown(rows):
    """The table: claim | source | criterion | measured | verdict."""
    def cell(text):
        return str(text).replace("|", "\\|").replace("\n", " ")
    lines = ["| claim | source | criterion | measured | verdict |", "|---|---|---|---|---|"]
    lines += [f"| **{r['id']}**: {cell(r['claim'])} | {cell(r['source'])} | {cell(r['criterion'])} | "
              f"{cell(r['measured'])} | **{r['verdict']}** |" for r in rows]
    return "\n".join(lines) + "\n"
