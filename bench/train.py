"""Training throughput: the authors' pipeline against this repository's, same model, batch and device.

(a) the authors' pipeline: per-image PIL transforms in a DataLoader with 4 workers, a training step
    that waits for the loss every step, then a second, eval-mode forward pass for the logged accuracy;
(b) ours: the data set on the device as uint8, batched augmentation, the training forward pass's
    logits for the accuracy, channels_last and fused SGD on a GPU (training.train_one_epoch itself).

    python bench/train.py --model MLP --width 64 --depth 1            # CPU, mnist_sample
    python bench/train.py --model resnet18 --SOTA --dataset synthetic --device cuda [--amp bf16 --compile]

Each pipeline runs one warm-up pass, then a timed pass over the same images (the DataLoader's
workers persist, so their start is not timed). The last line is `ratio: <(b) / (a)>` in images/s.

With --nc_every N, (b)'s model is then measured as training measures it (validate_NC.evaluate over
the training images without augmentation and a test set a fifth of their number, as CIFAR-10's,
at validation's batch size), and the last line is `nc_overhead: <NC pass / N training epochs>`,
the share of an epoch's time that measuring NC every N epochs adds.
"""
import argparse
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms as T

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import datasets  # noqa: E402
from args import add_model_args  # noqa: E402
import models  # noqa: E402
import training  # noqa: E402
import validate_NC  # noqa: E402
from args import VALIDATION_BATCH  # noqa: E402
from train_1st_order import first_order_step  # noqa: E402
from utils import make_criterion, make_optimizer  # noqa: E402


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(p)  # the training scripts' model flags
    p.set_defaults(model="MLP")
    p.add_argument("--dataset", default="mnist_sample", choices=["mnist_sample", "synthetic"],
                   help="mnist_sample (real MNIST digits, 28x28 grey) or synthetic CIFAR-shaped images")
    p.add_argument("--num_samples", type=int, default=None, help="images per timed pass (default: 4000 or 25600)")
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--num_workers", type=int, default=4)
    p.add_argument("--amp", default="none", choices=["none", "bf16"])
    p.add_argument("--compile", action="store_true")
    p.add_argument("--cuda_graph", action="store_true", help="(b) replays each step as one CUDA graph")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--nc_every", type=int, default=0, help="also time the NC pass of training with --nc_every N")
    return p.parse_args(argv)


def get_data(args):
    """(raw images for the authors' transforms, the same images as our uint8 32x32x3 arrays, labels,
    the authors' transform, normalisation, whether to augment)."""
    if args.dataset == "mnist_sample":
        with np.load(datasets.MNIST_SAMPLE) as f:
            raw, labels = f["images"], f["labels"].astype(np.int64)
        n = args.num_samples or len(labels)
        spread = np.arange(n) * len(labels) // n  # the file is sorted by class: every class, evenly
        raw, labels = raw[spread], labels[spread]
        mean, std = datasets.MNIST_STATS
        transform = T.Compose([T.Grayscale(3), T.Resize(32), T.ToTensor(), T.Normalize(0.1307, 0.3081)])
        return raw, datasets._mnist_to_32x32x3(raw), labels, transform, (mean, std), False
    n = args.num_samples or 25600
    g = np.random.default_rng(0)
    images, labels = g.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), np.arange(n) % 10
    mean, std = datasets.CIFAR10_STATS
    steps = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if args.SOTA else []
    transform = T.Compose(steps + [T.ToTensor(), T.Normalize(mean, std)])
    return images, images, labels, transform, (mean, std), args.SOTA


def build(args, device):
    margs = argparse.Namespace(**vars(args), optimizer="SGD", lr=0.05, weight_decay=5e-4, sep_decay=False, loss="MSE")
    torch.manual_seed(0)
    return margs, models.build_model(margs, 10).to(device)


def authors_epoch(model, loader, optimizer, device, num_classes=10):
    """A step as the authors' trainer makes it, then a second forward pass for the accuracy."""
    criterion = torch.nn.MSELoss()
    correct = 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        model.train()
        logits, _ = model(x)
        loss = criterion(logits, F.one_hot(y, num_classes).float())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        _ = loss.item()  # logged every step
        model.eval()
        with torch.no_grad():
            logits, _ = model(x)
        correct += (logits.argmax(1) == y).sum().item()
    return correct


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t


def main(argv=None):
    args = get_args(argv)
    device = torch.device(args.device)
    raw, images, labels, transform, (mean, std), augment = get_data(args)
    n = len(labels)
    print(f"{args.model}{' --SOTA' if args.SOTA else ''}, batch {args.batch_size}, {n} {args.dataset} images per pass, "
          f"amp {args.amp}, compile {args.compile}, CUDA graph {args.cuda_graph}, {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    # (a) the authors' pipeline
    margs, model = build(args, device)
    loader = torch.utils.data.DataLoader(datasets.ArrayDataset(raw, labels, transform), batch_size=args.batch_size,
                                         shuffle=True, num_workers=args.num_workers, pin_memory=device.type == "cuda",
                                         persistent_workers=args.num_workers > 0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    authors_epoch(model, loader, optimizer, device)
    t_a = timed(lambda: authors_epoch(model, loader, optimizer, device), device)

    # (b) ours (the authors' code leaves cuDNN's autotuner off; training.main turns it on)
    torch.backends.cudnn.benchmark = device.type == "cuda"
    margs, model = build(args, device)
    channels_last = device.type == "cuda" and args.model != "MLP"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(margs, model)
    objective = training.make_objective(margs, model, make_criterion(margs, 10))
    fast = datasets.DeviceLoader(images, labels, args.batch_size, mean, std, device, shuffle=True, augment=augment,
                                 generator=torch.Generator(device).manual_seed(0), channels_last=channels_last)
    step = training.CUDAGraphStep(first_order_step) if args.cuda_graph else first_order_step
    run = lambda: training.train_one_epoch(model, fast, step, optimizer, objective, 1, device)
    t_warm = timed(run, device)
    t_b = timed(run, device)

    a, b = n / t_a, n / t_b
    print(f"(a) authors' pipeline: {a:10,.0f} images/s")
    print(f"(b) this repository:   {b:10,.0f} images/s (warm-up pass, with any compilation: {t_warm:.1f} s)")
    print(f"ratio: {b / a:.2f}")
    if args.nc_every > 0:
        kw = dict(batch_size=VALIDATION_BATCH, mean=mean, std=std, device=device, channels_last=channels_last)
        train_eval = datasets.DeviceLoader(images, labels, **kw)
        test = datasets.DeviceLoader(images[::5], labels[::5], **kw)
        n_test = test.num_samples
        measure = lambda: validate_NC.evaluate(model, train_eval, test, model.fc.out_features)
        measure()  # warm-up
        t_nc = timed(measure, device)
        print(f"NC pass: {t_nc:.2f} s over {n} + {n_test} images; a training epoch: {t_b:.2f} s")
        print(f"nc_overhead: {t_nc / args.nc_every / t_b:.3f}")


if __name__ == "__main__":
    main()
