"""experiments.py and nclib/runbook.py: the commands it lists for each figure (parsed by the scripts' own
parsers), what it skips and resumes, a failed run among others; and the runbook running for real:
several runs at once (--jobs), and SLURM submission through submitit's local executor. The paper's
runs of one figure are trained for one epoch on a tiny fake CIFAR-10; the commands go through tests/harness.py, which accepts those files."""
import os
import pickle
import re
import shlex
import shutil
import signal
import sys
import threading
import time

import pytest

import args as args_module
import experiments
import fake_data
import harness
from helpers import load_pickle, refused, same, write_run
from nclib import runbook, rundir, runs
from nclib.cli import run_main
import plot_dk_mse
import plot_etf_mse
import plot_k_rmse
import plot_M_rmse
import plot_optim_mse

FIGURE_SCRIPTS = {"optim": plot_optim_mse, "etf": plot_etf_mse, "dk": plot_dk_mse, "M": plot_M_rmse,
                  "k": plot_k_rmse}
WAIT = 120  # seconds before a wait for another process counts as hung (the machine may be slow)


@pytest.fixture
def tiny_runbook(tmp_path, monkeypatch):
    """argv prefix for experiments.main: the etf figure's four runs, one epoch on a fake CIFAR-10."""
    data = tmp_path / "cifar"
    fake_data.write_cifar10(str(data))  # 50 training and 20 test images
    monkeypatch.setattr(runbook, "command",
                        lambda script, arguments: harness.command(os.path.join(runbook.HERE, script), *arguments))
    monkeypatch.chdir(tmp_path)  # the plot scripts draw into ./figures/
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the same sums in every process, however many run at once
    return ["--figure", "etf", "--epochs", "1", "--data_dir", str(data), "--run"]


def write_done(run):
    """A run directory that the runbook takes as done: a complete info.pkl of one epoch."""
    os.makedirs(run)
    with open(run / rundir.INFO, "wb") as f:
        pickle.dump({"collapse_metric": [0.5], "epochs": [1]}, f)


def infos(root):
    return {uid: load_pickle(os.path.join(root, uid, rundir.INFO)) for uid in runs.figure_runs("etf").values()}


@pytest.mark.slow  # trains real runs in processes of their own
def test_two_runs_at_a_time_give_the_same_results_as_one(tiny_runbook, tmp_path, capsys):
    one, two = tmp_path / "one", tmp_path / "two"
    table = list(runs.figure_runs("etf").values())
    for uid in table[2:]:  # the one-at-a-time reference needs two runs only: the others count as done
        write_done(one / uid)
    write_done(two / table[3])  # three runs for two slots: the third waits for the first free one
    experiments.main(tiny_runbook + ["--root", str(one)])
    experiments.main(tiny_runbook + ["--root", str(two), "--jobs", "2"])
    out = capsys.readouterr().out
    assert same({uid: info for uid, info in infos(one).items() if uid in table[:2]},
                {uid: info for uid, info in infos(two).items() if uid in table[:2]})
    for uid in table[:3]:  # each run's output in its own log
        assert "trained epochs 1-1" in (two / uid / rundir.RUNBOOK_LOG).read_text()
        assert not (one / uid / rundir.RUNBOOK_LOG).exists()
    assert out.count("finished: python") == 2 + 3 and os.path.isfile(tmp_path / "figures" / "plot_etf_mse" / "NC1.png")
    # a rerun finds every run done: nothing is trained again
    experiments.main(tiny_runbook + ["--root", str(two), "--jobs", "2"])
    out = capsys.readouterr().out
    assert out.count("skipped, its info.pkl covers epochs 1-1") == 4 and "finished: python" not in out


@pytest.mark.slow  # trains real runs in processes of their own
def test_slurm_submission_through_submitits_local_executor(tiny_runbook, tmp_path, capsys):
    """The --slurm path with submitit's local executor: the two runs not done yet are submitted as
    two jobs, which train on this machine; their ids are written down."""
    root = tmp_path / "runs"
    table = list(runs.figure_runs("etf").values())
    for uid in table[:2]:  # two runs done already
        write_done(root / uid)
    argv = [a for a in tiny_runbook if a != "--run"] + ["--root", str(root), "--slurm", "--cluster", "local"]
    experiments.main(argv)
    out = capsys.readouterr().out
    ids = (root / "slurm_jobs.txt").read_text().splitlines()
    assert [line.split()[1] for line in ids] == [str(root / uid) for uid in table[2:]]
    for uid in table[2:]:
        assert load_pickle(root / uid / rundir.INFO)["epochs"] == [1]
    assert "submitted 2 jobs" in out and out.count(" done ") == 2


@pytest.mark.slow  # trains real runs in processes of their own
def test_slurm_dry_run_and_refusals(tmp_path, capsys, monkeypatch):
    experiments.main(["--figure", "optim", "--root", str(tmp_path), "--slurm", "--dry_run", "--partition", "gpu"])
    out = capsys.readouterr().out
    assert out.count("would submit cifar10_") == 3 and "slurm_partition gpu" in out and not os.listdir(tmp_path)
    monkeypatch.setattr(shutil, "which", lambda name: None)  # no scheduler on this machine
    assert "sbatch" in refused(capsys, experiments.main, ["--figure", "optim", "--root", str(tmp_path), "--slurm"])
    assert "one of them" in refused(capsys, experiments.main, ["--figure", "optim", "--slurm", "--run"])


UID = re.compile(r"^(cifar10|mini_imagenet)_(MSE|RMSE)_(SGD|Adam|LBFGS)_bias_(true|false)_batchsize_(\d+)"
                 r"_ETFfc_(true|false)_fixdim_(false|\d+)_sota_(true|false)(?:_M_(\d+)_k_(\d+))?$")


def expected_from_uid(uid):
    """The settings a run name spells out, as the training parser's attributes."""
    m = UID.match(uid)
    assert m, uid
    dataset, loss, opt, bias, bs, etf, fixdim, sota, M, k = m.groups()
    return {"dataset": dataset, "loss": {"MSE": "MSE", "RMSE": "RescaledMSE"}[loss], "optimizer": opt,
            "bias": bias == "true", "batch_size": int(bs), "ETF_fc": etf == "true",
            "fixdim": 0 if fixdim == "false" else int(fixdim), "SOTA": sota == "true",
            "M": float(M or 1), "k": float(k or 1), "uid": uid}


LR = {("cifar10", "SGD"): 0.05, ("cifar10", "Adam"): 0.001, ("cifar10", "LBFGS"): 0.1, ("mini_imagenet", "SGD"): 0.01}


def commands(argv, capsys):
    experiments.main(argv)
    lines = capsys.readouterr().out.splitlines()
    return [shlex.split(line) for line in lines if not line.startswith("#")], lines


@pytest.mark.parametrize("figure", list(FIGURE_SCRIPTS))
@pytest.mark.parametrize("every_checkpoint", [False, True])
def test_runbook_commands_parse(figure, every_checkpoint, tmp_path, capsys):
    module = FIGURE_SCRIPTS[figure]
    for root in ("model_weights", str(tmp_path / "runs")):
        cmds, _ = commands(["--figure", figure, "--root", root] + ["--every_checkpoint"] * every_checkpoint, capsys)
        trained, validated = [], []
        for cmd in cmds[:-1]:
            assert cmd[0] == "python"
            if cmd[1] == "validate_NC.py":
                v = args_module.validate_parser().parse_args(cmd[2:])
                assert v.batch_size == 1024 and os.path.dirname(v.load_path) == root
                validated.append(os.path.basename(v.load_path))
                continue
            assert cmd[1] in ("train_1st_order.py", "train_2nd_order.py")
            a = args_module.train_parser("LBFGS" if cmd[1] == "train_2nd_order.py" else "SGD").parse_args(cmd[2:])
            assert (a.optimizer == "LBFGS") == (cmd[1] == "train_2nd_order.py")
            for key, value in expected_from_uid(a.uid).items():
                assert getattr(a, key) == value, (a.uid, key)
            assert a.lr == LR[a.dataset, a.optimizer]
            assert (a.epochs, a.weight_decay, a.seed, a.patience, a.gamma) == (200, 5e-4, 6, 40, 0.1)
            assert a.save_dir == root and not a.resume
            if a.optimizer == "LBFGS":
                assert a.history_size == 10 and a.batch_size == 512
            # by default a run measures itself and keeps every 50th checkpoint; else the authors' two steps
            assert (a.nc_every, a.save_every) == ((0, 1) if every_checkpoint else (1, 50))
            trained.append(a.uid)
        assert trained == list(table(module).values())
        assert validated == (trained if every_checkpoint else [])
        last = cmds[-1]
        assert last[:2] == ["python", f"{module.__name__}.py"]
        assert last[2:] == ([] if root == "model_weights" else ["--root", root])


def test_runbook_all_lists_each_run_once(capsys):
    cmds, lines = commands(["--figure", "all"], capsys)
    uids = [c[c.index("--uid") + 1] for c in cmds if "--uid" in c]
    every = {name for module in FIGURE_SCRIPTS.values() for name in table(module).values()}
    assert sorted(uids) == sorted(every)
    assert len(every) == 3 + 4 + 4 + 5 + 3  # etf's learned d=10 is dk's d=10; M=1,k=1 is in both rescaled figures
    assert [c[1] for c in cmds if c[1].startswith("plot_")] == [f"{m.__name__}.py" for m in FIGURE_SCRIPTS.values()]


def test_runbook_skips_complete_and_resumes_partial(tmp_path, capsys):
    root = tmp_path / "runs"
    sgd, adam, lbfgs = table(plot_optim_mse).values()
    write_run(root, sgd, epochs=200)  # complete
    write_run(root, adam, epochs=30)  # validated part-way, training stopped at 30
    (root / adam / "args.json").write_text("{}")
    os.makedirs(root / lbfgs)
    (root / lbfgs / "args.json").write_text("{}")
    (root / lbfgs / "epoch_200.pth").write_bytes(b"")  # trained, not validated
    cmds, lines = commands(["--figure", "optim", "--root", str(root), "--gpu_id", "1", "--every_checkpoint"], capsys)
    assert any(line.startswith("#") and sgd in line and "skipped" in line for line in lines)
    assert not any(sgd in " ".join(c) for c in cmds)
    adam_train = [c for c in cmds if c[1] == "train_1st_order.py"]
    assert len(adam_train) == 1 and adam_train[0][adam_train[0].index("--uid") + 1] == adam
    a = args_module.train_parser().parse_args(adam_train[0][2:])
    assert a.resume and a.gpu_id == 1
    assert not any(c[1] == "train_2nd_order.py" for c in cmds)
    validated = [os.path.basename(c[c.index("--load_path") + 1]) for c in cmds if c[1] == "validate_NC.py"]
    assert validated == [adam, lbfgs]
    # by default the resumed run measures itself: only the run trained without measuring is validated
    cmds, _ = commands(["--figure", "optim", "--root", str(root)], capsys)
    validated = [os.path.basename(c[c.index("--load_path") + 1]) for c in cmds if c[1] == "validate_NC.py"]
    assert validated == [lbfgs] and sum(c[1] == "train_1st_order.py" for c in cmds) == 1


def test_runbook_smoke_epochs(tmp_path, capsys):
    root = tmp_path / "runs"
    write_run(root, table(plot_k_rmse)[r"$\alpha=5$"], epochs=2)  # complete for a 2-epoch smoke test
    cmds, _ = commands(["--figure", "k", "--root", str(root), "--epochs", "2", "--every_checkpoint"], capsys)
    train = [args_module.train_parser().parse_args(c[2:]) for c in cmds if c[1] == "train_1st_order.py"]
    valid = [args_module.validate_parser().parse_args(c[2:]) for c in cmds if c[1] == "validate_NC.py"]
    assert len(train) == len(valid) == 3 and all(a.epochs == 2 for a in train + valid)
    # the same run is not complete for the full 200 epochs: it is listed again
    cmds, _ = commands(["--figure", "k", "--root", str(root)], capsys)
    assert sum(c[1] == "train_1st_order.py" for c in cmds) == 4


def test_a_failed_run_does_not_stop_the_others(tmp_path, monkeypatch, capsys):
    calls = []

    def fake_run(self, cmd, log=None, env=None):
        calls.append(cmd)
        return 1 if len(calls) == 3 else 0  # the second run's training fails

    monkeypatch.setattr(runbook.Children, "run", fake_run)
    with pytest.raises(SystemExit) as e:
        run_main(experiments.main, ["--figure", "etf", "--root", str(tmp_path), "--run", "--every_checkpoint"])
    scripts = [os.path.basename(c[1]) for c in calls]
    # each run trains then validates; the failed one is not validated; the figure is not drawn
    assert scripts == ["train_1st_order.py", "validate_NC.py", "train_1st_order.py"] + \
        ["train_1st_order.py", "validate_NC.py"] * 2
    assert e.value.code == 2
    out, err = capsys.readouterr()
    assert "FAILED (exit 1)" in out and out.count("finished:") == 6
    table = out[out.index("run "):].splitlines()
    assert len(table) == 5 and sum("failed" in line for line in table) == 1
    assert err.startswith("error: 1 of 4 steps failed") and err.count("\n") == 1




def table(plot_module):
    """{legend label: run name} of a plot script's figure."""
    return runs.figure_runs(plot_module.FIGURE)


def test_the_runbook_leaves_its_thread_share_out_of_a_resumed_run(tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    envs = {}

    def run(self, command, log=None, env=None):
        envs[command[command.index("--uid") + 1]] = env
        return 0
    monkeypatch.setattr(runbook.Children, "run", run)
    items = [("run", str(tmp_path / uid), [("train_1st_order.py", ["--uid", uid, *flags])])
             for uid, flags in (("new", []), ("half_done", ["--resume"]))]
    runbook.execute(items, jobs=2)
    assert "OMP_NUM_THREADS" in envs["new"] and envs["half_done"] is None  # None: the runbook's own environment


def test_the_local_cluster_gets_the_time_limit_and_gpus(tmp_path, monkeypatch, capsys):
    """`--slurm --cluster local --time 600` stopped every job after about 90 s (submitit's local default)."""
    submitit = pytest.importorskip("submitit")
    seen = []

    class Job:
        job_id = "1"

        def result(self):
            return None

    def submit(executor, fn):
        seen.append(dict(executor._executor.parameters))
        return Job()
    monkeypatch.setattr(submitit.AutoExecutor, "submit", submit)
    experiments.main(["--figure", "optim", "--root", str(tmp_path), "--slurm", "--cluster", "local",
                      "--time", "600", "--gpus_per_job", "1"])
    assert len(seen) == 3 and all(p["timeout_min"] == 600 and p["gpus_per_node"] == 1 for p in seen)


def test_the_runbook_help_describes_it_in_a_whole_sentence(capsys):
    with pytest.raises(SystemExit) as e:
        experiments.main(["--help"])
    assert e.value.code == 0
    paragraphs = capsys.readouterr().out.split("\n\n")
    description = " ".join(paragraphs[1].split())  # the paragraph after the usage
    assert description[0].isupper() and description.endswith("."), description


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_a_signal_to_the_runbook_stops_its_command_and_waits_for_it(tmp_path, capsys, signum):
    """runbook.call, as `experiments.py --run` calls a training, in this process: the signal is
    sent to this process (as `kill -TERM <runbook>` would) once the command runs and call() listens."""
    pid_file = tmp_path / "child.pid"
    command = [sys.executable, "-c",
               f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"]
    default = signal.getsignal(signum)
    sent = []

    def send():
        deadline = time.time() + WAIT
        while time.time() < deadline:
            if signal.getsignal(signum) is not default and pid_file.exists() and pid_file.read_text():
                sent.append(time.time())
                os.kill(os.getpid(), signum)
                return
            time.sleep(0.01)
    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    with pytest.raises(SystemExit) as e:
        runbook.call(command)
    stopped = time.time()
    sender.join()
    assert sent and stopped - sent[0] < 10  # promptly, not after the command's 60 s
    assert e.value.code == 128 + signum
    with pytest.raises(ProcessLookupError):  # the command ended, and was waited for
        os.kill(int(pid_file.read_text()), 0)
    assert signal.getsignal(signum) is default
    assert "stopped by signal" in capsys.readouterr().err


@pytest.mark.parametrize("scale", ["paper", "laptop"])
def test_a_root_that_cannot_hold_runs_is_refused_in_one_line(tmp_path, capsys, scale):
    a_file = tmp_path / "afile"
    a_file.write_text("keep me")
    loop = tmp_path / "loop"
    os.symlink(loop, loop)
    for root, what in ((a_file, "is a file, not a folder"), (a_file / "sub", "lies under a file"),
                       (loop, "cannot be looked at (Too many levels of symbolic links)")):
        line = refused(capsys, experiments.main, ["--scale", scale, "--figure", "optim", "--root", str(root)])
        assert what in line, line
    assert a_file.read_text() == "keep me"


def test_a_run_directory_that_is_a_file_is_refused_in_one_line(tmp_path, capsys):
    name = runs.figure_runs("optim")["SGD"]
    (tmp_path / name).write_text("keep me")
    line = refused(capsys, experiments.main, ["--figure", "optim", "--root", str(tmp_path)])
    assert f"{tmp_path / name} is not a folder, yet the runbook keeps run {name} there" in line, line
    assert (tmp_path / name).read_text() == "keep me"
