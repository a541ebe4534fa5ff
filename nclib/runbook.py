"""The runbook's work (experiments.py is its command line): the plan of a figure's runs, as commands,
from what each run directory holds; running them here, several at a time and signals passed on, or
as SLURM jobs through submitit; and the table of how each ended."""
import concurrent.futures
import os
import queue
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

from args import VALIDATION_BATCH
from nclib import rundir, runs, scales
from nclib.base import UserError, atomic_write

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository: where the scripts are
DEFAULT_ROOT = "model_weights"


# Checkpoints a run keeps by default: epochs 50, 100, 150, 200. A ResNet-18 run then takes about
# 0.55 GB (4 checkpoints of 45 MB, last.pth and previous.pth of 90 MB, 0.2 GB of NC results),
# against 9.3 GB with every checkpoint (--every_checkpoint).
SAVE_EVERY = 50


def plan(figures, root, epochs, gpu_id=None, data_dir=None, every_checkpoint=False, scale=None):
    """The runbook: a list of ('#', comment), ('run', run_dir, [steps]) and ('plot', [run dirs], step)
    items, a step being (script, [arguments]). scale: an nclib.scales.Scale other than the paper's
    (its own runs, epochs, and plot arguments), or None for runs.py's runs."""
    common = []
    if gpu_id is not None:
        common += ["--gpu_id", str(gpu_id)]
    if data_dir is not None:
        common += ["--data_dir", data_dir]
    # NC measured as the run trains, few checkpoints kept; or the authors' way: every checkpoint,
    # measured afterwards by validate_NC.py
    keeping = ["--nc_every", "0", "--save_every", "1"] if every_checkpoint else \
        ["--nc_every", "1", "--save_every", str(SAVE_EVERY)]
    if scale is not None and scale.keeping and not every_checkpoint:
        keeping = scale.keeping
    default_root = os.path.normpath(root) == DEFAULT_ROOT
    items, seen = [], set()
    for figure in figures:
        plot_script, table = scale.table(figure) if scale else runs.FIGURES[figure]
        items.append(("#", f"figure {figure} ({plot_script}): {len(table)} runs"))
        if scale:
            items.append(("#", scales.differences(figure)))
        run_dirs = []
        for flags in table.values():
            uid = scale.run_name(flags) if scale else runs.run_name(runs.parse(flags))
            run_epochs = scale.epochs(flags) if scale else epochs  # a scale's flags carry its epochs
            run_dir = os.path.join(root, uid)
            if os.path.lexists(run_dir) and not os.path.isdir(run_dir):
                raise UserError(f"{run_dir} is not a folder, yet the runbook keeps run {uid} there: "
                                "move it away or give another --root")
            run_dirs.append(run_dir)
            if uid in seen:
                items.append(("#", f"{uid}: already above"))
                continue
            seen.add(uid)
            state = rundir.state(run_dir, run_epochs)
            if state == "done":
                items.append(("#", f"{uid}: skipped, its info.pkl covers epochs 1-{run_epochs}"))
                continue
            if scale and scale.keeping and run_epochs in rundir.validated_epochs(run_dir):
                # measured every few epochs as it trained: its last epoch measured, it is finished
                items.append(("#", f"{uid}: skipped, its info.pkl has its last epoch, {run_epochs}"))
                continue
            steps = []
            if state == "trained":
                items.append(("#", f"{uid}: trained; validation only"))
            else:
                train = ["--uid", uid] + shlex.split(flags)
                if not default_root:
                    train += ["--save_dir", root]
                if run_epochs != runs.parse(flags).epochs:
                    train += ["--epochs", str(run_epochs)]
                if state == "partial":
                    items.append(("#", f"{uid}: training started earlier; continued with --resume"))
                    train.append("--resume")
                steps.append((runs.training_script(runs.parse(flags)), train + keeping + common))
            if state == "trained" or every_checkpoint:  # else the run measures itself
                validate = ["--load_path", run_dir, "--batch_size", str(VALIDATION_BATCH)]
                if run_epochs != runs.EPOCHS:
                    validate += ["--epochs", str(run_epochs)]
                steps.append(("validate_NC.py", validate + common))
            items.append(("run", run_dir, steps))
        plot_arguments = scale.plot_arguments(figure, root) if scale else [] if default_root else ["--root", root]
        items.append(("plot", run_dirs, (plot_script, plot_arguments)))
    return items


def format_step(step):
    script, arguments = step
    return shlex.join(["python", script] + arguments)


def format_plan(items):
    lines = []
    for item in items:
        if item[0] == "#":
            lines.append(f"# {item[1]}")
        elif item[0] == "run":
            lines += [format_step(step) for step in item[2]]
        else:
            lines.append(format_step(item[2]))
    return lines


class Children:
    """The commands the runbook runs now. A SIGTERM, SIGHUP or Ctrl-C of the runbook is passed on to
    each of them and waited for, and no new one starts, so that no training outlives the runbook (a
    restart would then train it twice). Each command runs in a session of its own, so a Ctrl-C at
    the terminal reaches it once, through the runbook."""
    SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)

    def __init__(self):
        self.live, self.lock, self.caught = set(), threading.Lock(), None

    def run(self, command, log=None, env=None):
        """Run a command to its end (its output to the file `log`, if given); its exit status."""
        with self.lock:
            if self.caught:
                return 128 + self.caught
            out = open(log, "a") if log else None
            child = subprocess.Popen(command, start_new_session=True, env=env, stdout=out,
                                     stderr=subprocess.STDOUT if out else None)
            self.live.add(child)
        try:
            return child.wait()
        finally:
            with self.lock:
                self.live.discard(child)
            if out:
                out.close()

    def _forward(self, signum, _frame):
        self.caught = self.caught or signum
        with self.lock:
            for child in self.live:
                child.send_signal(signum)

    @contextmanager
    def listening(self):
        """Forward signals while the body runs (in the main thread); exit 128 + signal if one came."""
        handlers = {s: signal.signal(s, self._forward) for s in self.SIGNALS}
        try:
            yield
        finally:
            for s, handler in handlers.items():
                signal.signal(s, handler)
        if self.caught:
            print(f"stopped by signal {self.caught}: the commands it was running were stopped too", file=sys.stderr)
            sys.exit(128 + self.caught)


def call(command, log=None):
    """Run one command as the runbook does, signals passed on."""
    children = Children()
    with children.listening():
        return children.run(command, log)


def command(script, arguments):
    return [sys.executable, os.path.join(HERE, script)] + arguments


def execute(items, jobs=1, gpus=None):
    """Run the plan: each run's steps in order, up to `jobs` runs at a time, each on the next of
    `gpus` (several runs may share one); a failed run does not stop the others. Then each figure's
    plot, if all its runs succeeded. Returns {run_dir: (state, seconds)}."""
    children, slots = Children(), queue.SimpleQueue()
    for i in range(jobs):
        slots.put(gpus[i % len(gpus)] if gpus else None)
    env = None
    if jobs > 1 and not gpus and "OMP_NUM_THREADS" not in os.environ:  # share the CPU's cores
        env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // jobs)))

    def run_steps(run_dir, steps):
        gpu, t = slots.get(), time.time()
        try:
            for script, arguments in steps:
                arguments = arguments + (["--gpu_id", str(gpu)] if gpu is not None else [])
                log = None
                if jobs > 1:  # one run's output per file: interleaved on a console it is unreadable
                    os.makedirs(run_dir, exist_ok=True)
                    log = os.path.join(run_dir, rundir.RUNBOOK_LOG)
                # A resumed run goes on with the CPU threads it started with (training pins them unless
                # OMP_NUM_THREADS asks otherwise), so that its numbers are an uninterrupted run's: the
                # runbook's share of the cores is left out of its environment.
                code = children.run(command(script, arguments), log, None if "--resume" in arguments else env)
                print(f"{'finished' if code == 0 else f'FAILED (exit {code})'}: {format_step((script, arguments))}"
                      + (f" (log: {log})" if log else ""), flush=True)
                if code != 0:
                    return f"failed: {script} exit {code}", time.time() - t
            return "done", time.time() - t
        finally:
            slots.put(gpu)

    outcome = {}
    with children.listening():
        with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
            futures = {pool.submit(run_steps, item[1], item[2]): item[1] for item in items if item[0] == "run"}
            for future in concurrent.futures.as_completed(futures):
                outcome[futures[future]] = future.result()
        for item in items:
            if item[0] == "plot" and all(outcome.get(d, ("done",))[0] == "done" for d in item[1]):
                if children.run(command(*item[2])) != 0:
                    outcome[item[2][0]] = ("failed", 0.0)
    return outcome


def submit(items, args):
    """--slurm: one job per run, through submitit; each job runs the run's steps in order. The job
    ids go to <root>/slurm_jobs.txt. With --cluster local the jobs run on this machine and the
    runbook waits for them (a way to try the path without a cluster)."""
    jobs = [(item[1], " && ".join(shlex.join(command(*step)) for step in item[2]))
            for item in items if item[0] == "run"]
    resources = dict(timeout_min=args.time, gpus_per_node=args.gpus_per_job, cpus_per_task=args.cpus,
                     mem_gb=args.mem, slurm_partition=args.partition)
    if args.dry_run:
        for run_dir, line in jobs:
            print(f"would submit {os.path.basename(run_dir)} ({', '.join(f'{k} {v}' for k, v in resources.items())}): {line}")
        print(f"would submit {len(jobs)} jobs")
        return {}
    try:
        import submitit
    except ImportError:
        raise UserError("--slurm needs submitit: pip install submitit")
    if args.cluster == "slurm" and shutil.which("sbatch") is None:
        raise UserError("--slurm: no SLURM scheduler here (sbatch is not on PATH); run the runbook on a node "
                        "that submits jobs, or --cluster local to try the path on this machine")
    executor = submitit.AutoExecutor(folder=os.path.join(args.root, "slurm_logs", "%j"), cluster=args.cluster)
    # The local executor takes the time limit and GPUs too: left to its defaults, it stops each job after
    # 90 s and hides every GPU from it. (What it cannot use, the partition, CPUs and memory, it ignores.)
    executor.update_parameters(**{k: v for k, v in resources.items() if v is not None})
    submitted = []
    for run_dir, line in jobs:
        executor.update_parameters(name=os.path.basename(run_dir)[:64])
        job = executor.submit(submitit.helpers.CommandFunction(["bash", "-c", line], cwd=os.getcwd()))
        submitted.append((run_dir, job))
    ids = "".join(f"{job.job_id} {run_dir}\n" for run_dir, job in submitted)
    os.makedirs(args.root, exist_ok=True)
    atomic_write(os.path.join(args.root, "slurm_jobs.txt"), lambda f: f.write(ids.encode()))
    print(f"submitted {len(submitted)} jobs; their ids are in {os.path.join(args.root, 'slurm_jobs.txt')}")
    if args.cluster == "slurm":
        return {}
    outcome = {}
    for run_dir, job in submitted:
        t = time.time()
        try:
            job.result()
            outcome[run_dir] = ("done", time.time() - t)
        except Exception as e:  # the job's command failed: submitit re-raises it here
            outcome[run_dir] = (f"failed: {' '.join(str(e).split())[:80]}", time.time() - t)
    return outcome


def summary(outcome):
    width = max(len(os.path.basename(k)) for k in outcome)
    return [f"{'run':<{width}}  state  seconds"] + \
        [f"{os.path.basename(k):<{width}}  {state}  {seconds:.0f}" for k, (state, seconds) in outcome.items()]


def run(args):
    """experiments.py's work once its arguments are parsed: print the plan, then run or submit it."""
    if args.slurm and args.run:
        raise UserError("--slurm submits the runs and --run runs them here: give one of them")
    if args.gpus and args.gpu_id is not None:
        raise UserError("--gpus and --gpu_id both say where runs go: give one of them")
    scale = scales.Scale(args.scale) if args.scale != "paper" else None
    if scale and args.epochs != runs.EPOCHS:
        raise UserError(f"--scale {args.scale} sets each run's epochs itself: leave --epochs out")
    args.root = args.root or (scale.root if scale else DEFAULT_ROOT)
    rundir.check_folder(args.root, "--root")
    scales.check_own_root(args.root, args.scale)
    figures = list(runs.FIGURES) if args.figure == "all" else [args.figure]
    items = plan(figures, args.root, args.epochs, args.gpu_id, args.data_dir, args.every_checkpoint, scale)
    for line in format_plan(items):
        print(line, flush=True)
    if args.run or args.slurm:
        outcome = submit(items, args) if args.slurm else execute(items, args.jobs, args.gpus)
        if outcome:
            print("\n".join(summary(outcome)))
        failed = [k for k, (state, _) in outcome.items() if state != "done"]
        if failed:
            raise UserError(f"{len(failed)} of {len(outcome)} steps failed ({os.path.basename(failed[0])} first "
                            "listed); see the table above and their logs; a rerun continues where they stopped")
    return items
