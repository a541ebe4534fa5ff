"""Training throughput: the authors' pipeline against this repository's, same model, batch and device.

(a) the authors' pipeline: per-image PIL transforms in a DataLoader with 4 workers, a training step
    that waits for the loss every step, then a second, eval-mode forward pass for the logged accuracy;
(b) ours: the data set on the device as uint8, batched augmentation, the training forward pass's
    logits for the accuracy, channels_last and fused SGD on a GPU (training.train_one_epoch itself).

    python bench/train.py --model MLP --width 64 --depth 1            # CPU, mnist_sample
    python bench/train.py --model resnet18 --SOTA --dataset synthetic --device cuda [--amp bf16 --compile]
    python bench/train.py --model MLP --width 64 --depth 1 --optimizer LBFGS       # batch 512
    python bench/train.py --model resnet18 --SOTA --dataset synthetic_mini --device cuda

--optimizer LBFGS (history 10, strong-Wolfe line search, lr 0.1, as the paper's LBFGS runs) times
the authors' closure (forward, MSE against one-hot targets plus 0.5 * wd * ||p||^2 per parameter,
zero_grad, backward) with `optimizer.step(closure)`, `loss.item()` and the eval-mode forward pass
per step, against nclib.steps.make_lbfgs_step in training.train_one_epoch. Each side's pass is
then split into its closure evaluations (their number per pass times one evaluation, timed on its
own) and the rest: torch.optim.LBFGS's own vector work (the same on both sides), plus, for the
authors, the DataLoader and the second forward pass. The evaluations and LBFGS's work are the
authors' computation bit for bit, so they bound the ratio.

--dataset synthetic_mini: random 84x84x3 images of 100 classes, as mini-ImageNet, normalised with
the ImageNet statistics and (with --SOTA) randomly cropped with the repository's padding and flipped.

Each pipeline runs one warm-up pass, then --rounds timed passes over the same images, interleaved
(a b, b a, a b, ...); the DataLoader's workers persist, so their start is not timed. Each side's
images/s is reported as the median over rounds with its spread, and the last line is
`ratio: <median over rounds of (b) / (a)>` in images/s.

With --nc_every N, (b)'s model is then measured as training measures it (nclib.measure.evaluate over
the training images without augmentation and a test set a fifth of their number, as CIFAR-10's,
at validation's batch size), --rounds times after a warm-up, and the last line is
`nc_overhead: <median NC pass / N median training epochs>`, the share of an epoch's time that
measuring NC every N epochs adds.
"""
import argparse
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms as T

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import ROUNDS, SYNTHETIC, check_model_fits, interleaved, median, rate, spread, synthetic, timed  # noqa: E402
sys.path.insert(0, os.path.dirname(HERE))
import datasets  # noqa: E402
from args import add_model_args, positive_int  # noqa: E402
import models  # noqa: E402
from args import VALIDATION_BATCH  # noqa: E402
from nclib import training  # noqa: E402
from nclib.measure import evaluate as measure_model  # noqa: E402
from nclib.cli import run_main  # noqa: E402
from nclib.losses import make_criterion  # noqa: E402
from nclib.optimizers import make_optimizer  # noqa: E402
from nclib.steps import build_step, first_order_step, make_lbfgs_step, make_objective  # noqa: E402

SGD_LR = 0.05  # the paper's SGD runs
LBFGS_LR, LBFGS_HISTORY = 0.1, 10  # the paper's LBFGS run
WEIGHT_DECAY = 5e-4
DEFAULT_BATCH = {"SGD": 128, "LBFGS": 512}  # the paper's batch for each


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(p)  # the training scripts' model flags
    p.set_defaults(model="MLP")
    p.add_argument("--dataset", default="mnist_sample", choices=["mnist_sample", *SYNTHETIC],
                   help="mnist_sample (real MNIST digits, 28x28 grey), synthetic (CIFAR-shaped images) or "
                        "synthetic_mini (mini-ImageNet-shaped: 84x84, 100 classes)")
    p.add_argument("--num_samples", type=positive_int, default=None,
                   help="images per timed pass (default: all 5000 of mnist_sample, 25600 synthetic or 10000 synthetic_mini)")
    p.add_argument("--optimizer", default="SGD", choices=list(DEFAULT_BATCH),
                   help="SGD (momentum 0.9, lr 0.05) or LBFGS (history 10, strong Wolfe, lr 0.1)")
    p.add_argument("--batch_size", type=positive_int, default=None, help="default: 128 (SGD) or 512 (LBFGS)")
    p.add_argument("--num_workers", type=int, default=4)
    p.add_argument("--amp", default="none", choices=["none", "bf16"])
    p.add_argument("--compile", action="store_true")
    graph = p.add_mutually_exclusive_group()  # as the training scripts: (b) graphs on a GPU unless told not to
    graph.add_argument("--cuda_graph", dest="cuda_graph", action="store_const", const=True, default=None,
                       help="(b) insists on CUDA graphs (the default on a GPU)")
    graph.add_argument("--no_cuda_graph", dest="cuda_graph", action="store_const", const=False,
                       help="(b) eager steps, even on a GPU")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--rounds", type=positive_int, default=ROUNDS, help="timed passes of each pipeline, interleaved")
    p.add_argument("--nc_every", type=int, default=0, help="also time the NC pass of training with --nc_every N")
    args = p.parse_args(argv)
    if args.batch_size is None:
        args.batch_size = DEFAULT_BATCH[args.optimizer]
    return args


def num_classes(args):
    return SYNTHETIC[args.dataset][1] if args.dataset in SYNTHETIC else 10


def get_data(args):
    """(raw images for the authors' transforms, the same images as our uint8 HxWx3 arrays, labels,
    the authors' transform, normalisation, whether to augment)."""
    check_model_fits(args.model, args.dataset)
    if args.dataset == "mnist_sample":
        with np.load(datasets.MNIST_SAMPLE) as f:
            raw, labels = f["images"], f["labels"].astype(np.int64)
        n = args.num_samples or len(labels)
        even = np.arange(n) * len(labels) // n  # the file is sorted by class: every class, evenly
        raw, labels = raw[even], labels[even]
        mean, std = datasets.MNIST_STATS
        transform = T.Compose([T.Grayscale(3), T.Resize(32), T.ToTensor(), T.Normalize(0.1307, 0.3081)])
        return raw, datasets._mnist_to_32x32x3(raw), labels, transform, (mean, std), False
    default_n = 25600 if args.dataset == "synthetic" else 10000
    images, labels, (mean, std), _ = synthetic(args.dataset, args.num_samples or default_n)
    size = images.shape[1]
    steps = [T.RandomCrop(size, padding=datasets.CROP_PADDING), T.RandomHorizontalFlip()] if args.SOTA else []
    transform = T.Compose(steps + [T.ToTensor(), T.Normalize(mean, std)])
    return images, images, labels, transform, (mean, std), args.SOTA


def build(args, device):
    """(the training options, a model for the data set's classes), the same initial model for each call."""
    lbfgs = getattr(args, "optimizer", "SGD") == "LBFGS"
    margs = argparse.Namespace(**{**vars(args), "optimizer": "LBFGS" if lbfgs else "SGD",
                                  "lr": LBFGS_LR if lbfgs else SGD_LR, "history_size": LBFGS_HISTORY,
                                  "weight_decay": WEIGHT_DECAY, "sep_decay": False, "loss": "MSE"})
    torch.manual_seed(0)
    return margs, models.build_model(margs, num_classes(args)).to(device)


def authors_epoch(model, loader, device, update):
    """A pass as the authors' trainers make it: per batch `update(x, y)` (their step, which returns
    the loss), the loss fetched for the log, then a second, eval-mode forward pass for the accuracy."""
    correct = 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        model.train()
        _ = update(x, y).item()  # logged every step
        model.eval()
        with torch.no_grad():
            logits, _ = model(x)
        correct += (logits.argmax(1) == y).sum().item()
    return correct


def authors_sgd_update(model, optimizer, num_classes):
    criterion = torch.nn.MSELoss()

    def update(x, y):
        logits, _ = model(x)
        loss = criterion(logits, F.one_hot(y, num_classes).float())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss
    return update


def closure_evaluations(optimizer):
    """Closure evaluations an LBFGS optimiser has made so far (its own count: graph replays included).
    They decide most of a step's time, so both sides report theirs: different batches may end a
    step's iterations at different counts."""
    return optimizer.state[optimizer.param_groups[0]["params"][0]]["func_evals"]


def authors_lbfgs_closure(model, optimizer, num_classes, x, y, weight_decay=WEIGHT_DECAY):
    """The authors' LBFGS closure on the batch (x, y): the loss with its weight-decay penalty, and
    its gradients."""
    criterion = torch.nn.MSELoss()

    def closure():
        logits, _ = model(x)
        loss = criterion(logits, F.one_hot(y, num_classes).float())
        penalty = 0
        for p in model.parameters():
            penalty += 0.5 * weight_decay * torch.norm(p) ** 2
        loss = loss + penalty
        optimizer.zero_grad()
        loss.backward()
        return loss
    return closure


def authors_lbfgs_update(model, optimizer, num_classes, weight_decay=WEIGHT_DECAY):
    """The authors' second-order step: the closure re-evaluates the loss at each point of the line search."""
    def update(x, y):
        closure = authors_lbfgs_closure(model, optimizer, num_classes, x, y, weight_decay)
        return optimizer.step(closure)  # the loss at the step's first evaluation
    return update


def our_evaluation(step, optimizer, objective, x, y):
    """One evaluation of (b)'s closure: the captured graph's replay where the step has one."""
    captured = getattr(step, "captured", None)
    eager = getattr(step, "step", step)  # a graph step that trained eagerly (its capture failed) holds the eager one
    return captured.replay if captured is not None else lambda: eager.evaluate(optimizer, objective, x, y)


def evaluation_seconds(evaluate, device, repeats=10):
    """Seconds of one closure evaluation (median of `repeats`): the forward pass, penalty and backward
    pass that LBFGS repeats ~20 times a step, and that both sides compute alike, bit for bit."""
    evaluate()
    return median([timed(evaluate, device)[1] for _ in range(repeats)])


def our_step(margs, device):
    """The step training.main builds for these options (on a GPU a CUDA graph unless --no_cuda_graph)."""
    make_step = make_lbfgs_step if margs.optimizer == "LBFGS" else (lambda a: first_order_step)
    step, note = build_step(margs, make_step, device)
    if note:
        print(note)
    return step


def with_autotuner(on, run):
    """run, switching cuDNN's autotuner on or off first: a process-wide switch, and the sides differ."""
    def run_with():
        torch.backends.cudnn.benchmark = on
        return run()
    return run_with


def graph_mode(args, device):
    return {True: "asked", False: "off"}.get(args.cuda_graph, "auto (on)" if device.type == "cuda" else "auto (off: CPU)")


def main(argv=None):
    args = get_args(argv)
    device = torch.device(args.device)
    raw, images, labels, transform, (mean, std), augment = get_data(args)
    n, K = len(labels), num_classes(args)
    print(f"{args.model}{' --SOTA' if args.SOTA else ''}, {args.optimizer}, batch {args.batch_size}, "
          f"{n} {args.dataset} images per pass, {K} classes, amp {args.amp}, compile {args.compile}, "
          f"CUDA graph {graph_mode(args, device)}, {args.rounds} interleaved round{'s' * (args.rounds != 1)}, {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    # (a) the authors' pipeline
    margs, model_a = build(args, device)
    loader = torch.utils.data.DataLoader(datasets.ArrayDataset(raw, labels, transform), batch_size=args.batch_size,
                                         shuffle=True, num_workers=args.num_workers, pin_memory=device.type == "cuda",
                                         persistent_workers=args.num_workers > 0)
    if margs.optimizer == "LBFGS":
        optimizer_a = torch.optim.LBFGS(model_a.parameters(), lr=LBFGS_LR, history_size=LBFGS_HISTORY,
                                        line_search_fn="strong_wolfe")
        update_a = authors_lbfgs_update(model_a, optimizer_a, K)
    else:
        optimizer_a = torch.optim.SGD(model_a.parameters(), lr=SGD_LR, momentum=0.9, weight_decay=WEIGHT_DECAY)
        update_a = authors_sgd_update(model_a, optimizer_a, K)

    # the authors' code leaves cuDNN's autotuner off
    run_a = with_autotuner(False, lambda: authors_epoch(model_a, loader, device, update_a))

    # (b) ours, with the autotuner on a GPU, as training.main sets it
    margs, model = build(args, device)
    channels_last = device.type == "cuda" and args.model != "MLP"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(margs, model)
    objective = make_objective(margs, model, make_criterion(margs, K))
    fast = datasets.DeviceLoader(images, labels, args.batch_size, mean, std, device, shuffle=True, augment=augment,
                                 generator=torch.Generator(device).manual_seed(0), channels_last=channels_last)
    step = our_step(margs, device)
    run_b = with_autotuner(device.type == "cuda",
                           lambda: training.train_one_epoch(model, fast, step, optimizer, objective, 1, device))
    run_a()  # the warm-ups: (a)'s starts its workers, (b)'s compiles (when asked), reported on its own
    _, t_warm = timed(run_b, device)

    seconds, _ = interleaved({"a": run_a, "b": run_b}, args.rounds, device, warmup=False)
    rates = {side: [n / t for t in seconds[side]] for side in seconds}
    ratios = [b / a for a, b in zip(rates["a"], rates["b"])]
    print(f"(a) authors' pipeline: {spread(rates['a'], rate)} images/s (median, min-max over rounds)")
    print(f"(b) this repository:   {spread(rates['b'], rate)} images/s (warm-up pass, with any "
          f"compilation: {t_warm:.1f} s)")
    print(f"per-round ratios (b)/(a): {', '.join(f'{r:.2f}' for r in ratios)}; median {spread(ratios, '{:.2f}')}")
    if margs.optimizer == "LBFGS":
        steps = (1 + args.rounds) * len(fast)  # passes since the warm-ups began, batches per pass
        calls = {"a": closure_evaluations(optimizer_a), "b": closure_evaluations(optimizer)}
        print(f"closure evaluations per step: (a) {calls['a'] / steps:.1f}, (b) {calls['b'] / steps:.1f}")
        model_a.train(), model.train()  # as in a step (the authors' pass ends in eval mode)
        x, y = next(iter(fast))
        lbfgs_split(seconds, calls, 1 + args.rounds, device, {  # each side in its own layout and cuDNN setting
            "a": with_autotuner(False, authors_lbfgs_closure(model_a, optimizer_a, K, x.contiguous(), y)),
            "b": with_autotuner(device.type == "cuda", our_evaluation(step, optimizer, objective, x, y))})
    print(f"ratio: {median(ratios):.2f}")
    if args.nc_every > 0:
        kw = dict(batch_size=VALIDATION_BATCH, mean=mean, std=std, device=device, channels_last=channels_last)
        train_eval = datasets.DeviceLoader(images, labels, **kw)
        test = datasets.DeviceLoader(images[::5], labels[::5], **kw)
        n_test = test.num_samples
        measure = lambda: measure_model(model, train_eval, test, model.fc.out_features)
        t_nc = interleaved({"nc": measure}, args.rounds, device)[0]["nc"]
        t_b = median(seconds["b"])
        print(f"NC pass: {spread(t_nc)} s over {n} + {n_test} images; a training epoch: {t_b:.3g} s (medians)")
        print(f"nc_overhead: {median(t_nc) / args.nc_every / t_b:.3f}")


def lbfgs_split(seconds, calls, passes, device, evaluations):
    """Print each side's pass split into closure evaluations (calls per pass x the seconds of one,
    timed apart on one batch) and the rest: torch.optim.LBFGS's own vector work, the same on both
    sides, and what only the authors' pipeline adds (its DataLoader, the second forward pass). The
    evaluations and LBFGS's work bound the ratio: they are the authors' computation, bit for bit."""
    parts = []
    for side, evaluate in evaluations.items():
        t_pass, t_one = median(seconds[side]), evaluation_seconds(evaluate, device)
        evaluating = calls[side] / passes * t_one
        parts.append(f"({side}) {t_pass:.3g} s = {evaluating:.3g} s evaluating ({t_one * 1e3:.3g} ms each) "
                     f"+ {t_pass - evaluating:.3g} s besides")
    print("per pass: " + "; ".join(parts))


if __name__ == "__main__":
    run_main(main)
