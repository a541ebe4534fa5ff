"""Start-up and data path: the preprocessed-MNIST cache, and the DeviceLoader's normalisation.

(a) start-up + data load of a training script (its imports, load_data on the shipped sample, 5,000
    digits, then a model and its optimiser), in a fresh process: with the cache beside the sample
    removed first (cold: MNIST resized with PIL, torchvision imported) against the cache warm;
(b) one epoch of the DeviceLoader over the sample (shuffled, batch 128, no augmentation, as validation
    and an unaugmented training set are): the former normalisation (float conversion, then the layout
    copy and three float passes per batch, written below as the baseline) against the current one
    (layout changed on uint8; the split normalised once, then batches are its rows), plus the current
    per-batch path (what augmented batches take) and a lookup-table gather, an exact alternative;
(c) one training epoch of an MLP (width 64, depth 1, SGD) through the former and the current loader.

    python bench/startup.py [--rounds 5] [--device cpu] [--threads 1] [--skip_startup]

Variants alternate within each round (the machine is shared and noisy); medians are printed. Every
variant's batches are checked bitwise equal to the baseline's. The cache of (a) is made on a copy of
the sample in a temporary folder, so the repository's own cache is not touched. The last line is
`ratio: <(b) former / current epoch time>`.
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import datasets  # noqa: E402
import models  # noqa: E402

START = """
import sys, time
t0 = time.perf_counter()
sys.path.insert(0, {repo!r})
import train_1st_order  # the script's imports
import datasets
datasets.MNIST_SAMPLE = sys.argv[1]
datasets.load_data("mnist_sample")
import models, torch
# as a run goes on: its optimiser (the first imports torch._dynamo, which torchvision imports too)
torch.optim.SGD(models.MLP(hidden=64, depth=1, num_classes=10).parameters(), lr=0.01)
print(time.perf_counter() - t0, "torchvision" in sys.modules)
"""


class FormerDeviceLoader(datasets.DeviceLoader):
    """The DeviceLoader as it was: each batch converted to float in NHWC memory, normalised in three
    in-place passes, then copied into NCHW; no split normalised once."""

    def normalize(self, x):
        # (255 as a device tensor, as today: CUDA turns a division by a Python number into a product by
        # its reciprocal, which would make the former's numbers differ on a GPU, not only its speed)
        x = x.permute(0, 3, 1, 2).float().div_(self.max_value).sub_(self.mean).div_(self.std)
        return x if self.channels_last else x.contiguous()

    def normalised_fits(self):
        return False


class LookupDeviceLoader(FormerDeviceLoader):
    """Per batch, a gather from a per-channel table of the 256 normalised values (torchvision's float32
    operations on 0..255, computed once), indexed by the uint8 pixels in NCHW order."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        mean, std = self.mean.view(-1, 1).cpu(), self.std.view(-1, 1).cpu()
        table = (torch.arange(256, dtype=torch.float32).div(255) - mean) / std  # (3, 256)
        self.table = table.flatten().to(self.images.device)
        self.offset = (torch.arange(3, dtype=torch.int32) * 256).view(1, 3, 1, 1).to(self.images.device)

    def normalize(self, x):
        u = x.permute(0, 3, 1, 2).contiguous()
        return self.table.index_select(0, (u.int() + self.offset).view(-1)).view(u.shape)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--skip_startup", action="store_true", help="time (b) and (c) only")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads of (b) and (c) (default: torch's)")
    return p.parse_args(argv)


def start_once(script, sample, cold):
    """Seconds from the interpreter's start to the data being loaded (timed outside), and whether
    torchvision was imported."""
    if cold:
        cache = os.path.splitext(sample)[0] + datasets.CACHE_SUFFIX
        if os.path.exists(cache):
            os.remove(cache)
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, script, sample], capture_output=True, text=True, check=True)
    wall = time.perf_counter() - t0
    return wall, out.stdout.split()[1] == "True"


def time_startup(args):
    with tempfile.TemporaryDirectory() as folder:
        sample = os.path.join(folder, "mnist_sample.npz")
        shutil.copyfile(datasets.MNIST_SAMPLE, sample)
        script = os.path.join(folder, "start.py")
        with open(script, "w") as f:
            f.write(START.format(repo=REPO))
        times = {"cold": [], "warm": []}
        for _ in range(args.rounds):
            for kind in times:
                wall, torchvision = start_once(script, sample, cold=kind == "cold")
                assert torchvision == (kind == "cold"), f"{kind} start imported torchvision: {torchvision}"
                times[kind].append(wall)
    cold, warm = (statistics.median(times[k]) for k in ("cold", "warm"))
    print(f"(a) start-up + data load + optimiser, median of {args.rounds}: cold cache {cold:.2f} s, warm {warm:.2f} s "
          f"(torchvision imported only when cold)")
    print(f"startup_ratio: {cold / warm:.2f}")


def epoch_seconds(loader, work=None):
    t0 = time.perf_counter()
    for x, y in loader:
        if work is not None:
            work(x, y)
    if loader.images.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def time_loaders(args):
    device = torch.device(args.device)
    data = datasets.load_data("mnist_sample")
    images = torch.cat([torch.as_tensor(data.train_images), torch.as_tensor(data.test_images)])
    labels = torch.cat([torch.as_tensor(data.train_labels), torch.as_tensor(data.test_labels)])

    def make(cls, seed=0):
        return cls(images, labels, args.batch_size, data.mean, data.std, device, shuffle=True,
                   generator=torch.Generator(device).manual_seed(seed))

    class PerBatch(datasets.DeviceLoader):
        def normalised_fits(self):
            return False

    kinds = {"former": FormerDeviceLoader, "current": datasets.DeviceLoader, "current_per_batch": PerBatch,
             "lookup_table": LookupDeviceLoader}
    loaders = {k: make(cls) for k, cls in kinds.items()}
    reference = [x for x, _ in make(FormerDeviceLoader)]
    for name, loader in loaders.items():  # the first epoch: also warms up (and normalises the split once)
        assert all(torch.equal(a, b) for (a, _), b in zip(loader, reference)), f"{name} differs from the former"
    times = {k: [] for k in [*kinds, "current_first_epoch"]}
    for _ in range(args.rounds):
        for name, loader in loaders.items():
            times[name].append(epoch_seconds(loader))
        times["current_first_epoch"].append(epoch_seconds(make(datasets.DeviceLoader)))  # normalises the split
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"(b) DeviceLoader epoch, {len(labels)} images, batch {args.batch_size}, {args.device}, median of "
          f"{args.rounds}: " + ", ".join(f"{k} {1000 * v:.1f} ms" for k, v in med.items()))

    def train_step(model, optimizer):
        def work(x, y):
            loss = F.mse_loss(model(x)[0], F.one_hot(y, 10).float())  # (logits, features)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return work

    steps = {}
    for name in ("former", "current"):
        torch.manual_seed(0)
        model = models.MLP(hidden=64, depth=1, num_classes=10).to(device)
        steps[name] = train_step(model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9))
        epoch_seconds(loaders[name], steps[name])  # warm-up
    train_times = {k: [] for k in steps}
    for _ in range(args.rounds):
        for name in steps:
            train_times[name].append(epoch_seconds(loaders[name], steps[name]))
    former, current = (statistics.median(train_times[k]) for k in ("former", "current"))
    print(f"(c) MLP 64x1 training epoch, median of {args.rounds}: former loader {1000 * former:.1f} ms, "
          f"current {1000 * current:.1f} ms; training_ratio: {former / current:.2f}")
    print(f"ratio: {med['former'] / med['current']:.2f}")


def main(argv=None):
    args = get_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.skip_startup:
        time_startup(args)
    time_loaders(args)


if __name__ == "__main__":
    main()
