# (not named concurrent.py: that would hide the standard library's concurrent package from this folder)
"""Several training runs at once on one device, as `experiments.py --run --jobs N` runs them:
aggregate images/s of N concurrent runs against one run alone, same model, batch and device.

    python bench/jobs.py --model MLP --width 64 --depth 1                 # CPU, mnist_sample
    python bench/jobs.py --model resnet18 --SOTA --dataset synthetic --device cuda --jobs 2 4 8

Each run is this repository's training loop (bench/train.py's pipeline (b)) in a process of its
own. The runs warm up, wait for each other, then time --passes passes together, so their timed
parts overlap. On the CPU each run gets an equal share of the cores, as the runbook gives it. The
last line is `ratio: <aggregate images/s of the largest N / images/s of one run>`.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import train as train_bench  # noqa: E402  (bench/train.py: the data and the pipeline)
sys.path.insert(0, os.path.dirname(HERE))
import datasets  # noqa: E402
from nclib import steps, training  # noqa: E402
from nclib.losses import make_criterion  # noqa: E402
from nclib.optimizers import make_optimizer  # noqa: E402


def child(args):
    """One run: warm up, say so, wait for the start, time the passes, print its images/s."""
    device = torch.device(args.device)
    _, images, labels, _, (mean, std), augment = train_bench.get_data(args)
    margs, model = train_bench.build(args, device)
    channels_last = device.type == "cuda" and args.model != "MLP"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True
    optimizer = make_optimizer(margs, model)
    objective = steps.make_objective(margs, model, make_criterion(margs, train_bench.num_classes(args)))
    loader = datasets.DeviceLoader(images, labels, args.batch_size, mean, std, device, shuffle=True, augment=augment,
                                   generator=torch.Generator(device).manual_seed(0), channels_last=channels_last)
    step = train_bench.our_step(margs, device)  # as the training scripts step: CUDA graphs by default on a GPU
    run = lambda: training.train_one_epoch(model, loader, step, optimizer, objective, 1, device)
    run()
    open(args.ready, "w").close()
    while not os.path.exists(args.go):
        time.sleep(0.01)
    t = time.perf_counter()
    for _ in range(args.passes):
        run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    print(f"rate {args.passes * len(labels) / (time.perf_counter() - t)}")


def together(n, argv, device):
    """Aggregate images/s of n runs at once."""
    folder = tempfile.mkdtemp()
    env = dict(os.environ)
    if device == "cpu":
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // n))
    procs = [subprocess.Popen([sys.executable, __file__, "--child", "--ready", os.path.join(folder, f"ready{i}"),
                               "--go", os.path.join(folder, "go")] + argv, stdout=subprocess.PIPE, text=True, env=env)
             for i in range(n)]
    while not all(os.path.exists(os.path.join(folder, f"ready{i}")) for i in range(n)):
        if any(p.poll() not in (None, 0) for p in procs):
            for p in procs:  # the others would wait for the start for ever, holding the device
                p.kill()
            raise SystemExit("a run failed before it was ready")
        time.sleep(0.05)
    open(os.path.join(folder, "go"), "w").close()
    rates = [float(p.communicate()[0].split("rate ")[-1]) for p in procs]
    return sum(rates)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, nargs="+", default=[2, 4], help="numbers of concurrent runs to time")
    p.add_argument("--passes", type=int, default=2, help="timed passes per run")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--ready", help=argparse.SUPPRESS)
    p.add_argument("--go", help=argparse.SUPPRESS)
    own, rest = p.parse_known_args(argv)
    args = train_bench.get_args(rest)
    if own.child:
        return child(argparse.Namespace(**vars(args), **{k: v for k, v in vars(own).items() if k != "jobs"}))
    rest += ["--passes", str(own.passes)]
    single = together(1, rest, args.device)
    print(f"1 run: {single:,.0f} images/s ({args.model}, batch {args.batch_size}, {args.device})")
    aggregate = single
    for n in own.jobs:
        aggregate = together(n, rest, args.device)
        print(f"{n} runs: {aggregate:,.0f} images/s together, {aggregate / single:.2f} x one run")
    print(f"ratio: {aggregate / single:.2f}")


if __name__ == "__main__":
    main()
