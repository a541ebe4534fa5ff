"""The device-resident data path gives what torchvision's transforms give, and trains the same.

Bit for bit, on every CPU: both paths make each pixel by the same correctly rounded float32 operations
(a division by 255, a subtraction, a division), which SIMD and scalar code round alike."""
import shutil

import numpy as np
import pytest
import torch
import torchvision
import torchvision.transforms as T

import datasets
import models
from nclib import training
from nclib.steps import first_order_step
from utils import make_criterion, make_optimizer
from nclib import steps

CPU = torch.device("cpu")


def device_batches(data, batch_size=7):
    loader = datasets.DeviceLoader(data.train_images, data.train_labels, batch_size, data.mean, data.std, CPU)
    return torch.cat([x for x, _ in loader]), torch.cat([y for _, y in loader])


def test_mnist_batches_equal_torchvisions_own_pipeline(fake_mnist):
    root, _ = fake_mnist
    data = datasets.load_data("mnist", root)
    x, y = device_batches(data)
    # The authors' pipeline, literally: torchvision's MNIST with Grayscale(3), Resize(32), ToTensor, Normalize.
    reference = torchvision.datasets.MNIST(root, train=True, transform=T.Compose(
        [T.Grayscale(3), T.Resize(32), T.ToTensor(), T.Normalize(0.1307, 0.3081)]))
    for i in range(len(reference)):
        image, label = reference[i]
        assert torch.equal(x[i], image)  # bitwise
        assert y[i].item() == label


def test_cifar10_batches_equal_torchvisions_transforms(fake_cifar10):
    root, _ = fake_cifar10
    data = datasets.load_data("cifar10", root)
    x, y = device_batches(data)
    transform = T.Compose([T.ToTensor(), T.Normalize(datasets.CIFAR10_STATS[0], datasets.CIFAR10_STATS[1])])
    for i in range(len(data.train_labels)):
        expected = transform(data.train_images[i])
        assert torch.equal(x[i], expected)
    assert torch.equal(y, torch.as_tensor(data.train_labels))


def test_the_two_loaders_give_the_same_test_batches():
    data = datasets.load_data("mnist_sample")
    fast, slow = (datasets.make_loaders(data, 64, CPU, kind, train=False, num_workers=0)[1] for kind in ("device", "torch"))
    for (xa, ya), (xb, yb) in zip(fast, slow):
        assert torch.equal(xa, xb)
        assert torch.equal(ya, yb)


def test_torch_loaders_pin_memory_for_a_gpu_run_only(monkeypatch):
    """On a machine with a GPU, a --device cpu run's DataLoaders leave memory unpinned (pinning serves
    copies to a GPU, and would start CUDA on GPU 0); a GPU run's pin it."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    data = datasets.load_data("mnist_sample", sample_size=2)
    for device, pinned in ((CPU, False), (torch.device("cuda"), True)):
        loaders = datasets.make_loaders(data, 8, device, "torch", num_workers=0)
        assert [loader.pin_memory for loader in loaders] == [pinned, pinned]


def every_value_images(n=40, size=8, seed=0):
    """uint8 (n, size, size, 3) images in which every channel takes all 256 values (and random ones)."""
    images = np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    images.reshape(-1, 3)[:256] = np.arange(256, dtype=np.uint8)[:, None]
    return images


def torchvision_normalised(images, mean, std):
    """ToTensor + Normalize of each uint8 (H, W, 3) image, torchvision's own code: (N, 3, H, W)."""
    transform = T.Compose([T.ToTensor(), T.Normalize(mean, std)])
    return torch.stack([transform(image) for image in images])


def epoch(loader):
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys)


STATS = [datasets.MNIST_STATS, datasets.CIFAR10_STATS, datasets.IMAGENET_STATS]


@pytest.mark.parametrize("stats", STATS, ids=["mnist", "cifar10", "imagenet"])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("whole_split", [True, False], ids=["normalised_once", "per_batch"])
def test_every_pixel_value_is_bitwise_torchvisions(stats, channels_last, whole_split, monkeypatch):
    if not whole_split:
        monkeypatch.setattr(datasets, "NORMALISED_CPU_CAP", 0)
    images = every_value_images()
    loader = datasets.DeviceLoader(images, np.arange(len(images)) % 10, 16, *stats, CPU, channels_last=channels_last)
    x, _ = epoch(loader)
    assert (loader.normalised is not None) == whole_split
    assert x.dtype == torch.float32 and torch.equal(x, torchvision_normalised(images, *stats))
    for batch, _ in loader:
        assert batch.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@pytest.mark.parametrize("channels_last", [False, True])
def test_augmented_batches_are_torchvisions_normalisation_of_the_crops(channels_last):
    images = every_value_images(n=30, size=12)
    mean, std = datasets.CIFAR10_STATS
    loader = datasets.DeviceLoader(images, np.zeros(30), 8, mean, std, CPU, shuffle=True, augment=True,
                                   generator=torch.Generator().manual_seed(3), channels_last=channels_last)
    replay = torch.Generator().manual_seed(3)  # draws what the loader draws, in its order
    order = torch.randperm(30, generator=replay)
    for start, (x, _) in zip(range(0, 30, 8), loader):
        batch = torch.from_numpy(images)[order[start:start + 8]]
        crops = datasets.random_crop_flip(batch, datasets.CROP_PADDING, replay)
        assert loader.normalised is None  # augmented batches are never served from a normalised split
        assert torch.equal(x, torchvision_normalised(crops.numpy(), mean, std))
        assert x.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("share", [None, (1, 2)])
def test_the_normalised_split_gives_the_per_batch_path_s_batches(channels_last, share, monkeypatch):
    images, labels = every_value_images(n=45), np.arange(45) % 10

    def batches(cap):
        monkeypatch.setattr(datasets, "NORMALISED_CPU_CAP", cap)
        loader = datasets.DeviceLoader(images, labels, 8, *datasets.CIFAR10_STATS, CPU, shuffle=True,
                                       generator=torch.Generator().manual_seed(1), channels_last=channels_last,
                                       drop_last=True, share=share)
        out = [b for _ in range(2) for b in loader]  # two epochs: two orders
        return out, loader

    (once, loader), (per_batch, _) = batches(1 << 30), batches(0)
    assert loader.normalised is not None and len(once) == len(per_batch) == 10
    for (xa, ya), (xb, yb) in zip(once, per_batch):
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and xa.stride() == xb.stride()
    assert not torch.equal(once[0][1], once[5][1])  # the second epoch is shuffled anew


def test_a_split_over_the_cap_is_normalised_per_batch(monkeypatch):
    images = every_value_images(n=10)
    monkeypatch.setattr(datasets, "NORMALISED_CPU_CAP", images.size * 4 - 1)  # one byte short of float32
    loader = datasets.DeviceLoader(images, np.zeros(10), 4, *datasets.MNIST_STATS, CPU)
    x, _ = epoch(loader)
    assert loader.normalised is None and torch.equal(x, torchvision_normalised(images, *datasets.MNIST_STATS))
    monkeypatch.setattr(datasets, "NORMALISED_CPU_CAP", images.size * 4)
    epoch(loader)
    assert loader.normalised is not None


def test_a_split_normalised_under_inference_mode_can_be_trained_on():
    images = every_value_images(n=10)
    loader = datasets.DeviceLoader(images, np.zeros(10), 5, *datasets.MNIST_STATS, CPU)
    with torch.inference_mode():
        epoch(loader)
    model = torch.nn.Linear(3 * 8 * 8, 2)
    x, _ = next(iter(loader))
    model(x.flatten(1)).sum().backward()  # an inference tensor could not be saved for backward
    assert model.weight.grad is not None


@pytest.mark.parametrize("augment", [False, True])
def test_the_generator_state_replays_an_epoch(augment):
    images = every_value_images(n=30)
    loader = datasets.DeviceLoader(images, np.arange(30), 8, *datasets.CIFAR10_STATS, CPU, shuffle=True,
                                   augment=augment, generator=torch.Generator().manual_seed(0))
    epoch(loader)
    state = loader.generator.get_state()
    first = epoch(loader)
    loader.generator.set_state(state)
    again = epoch(loader)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


def crops_of(image, padding):
    """Every crop (and its mirror) that RandomCrop(padding) + RandomHorizontalFlip can make of one image."""
    H, W, C = image.shape
    padded = np.zeros((H + 2 * padding, W + 2 * padding, C), dtype=image.dtype)
    padded[padding:padding + H, padding:padding + W] = image
    for dy in range(2 * padding + 1):
        for dx in range(2 * padding + 1):
            crop = padded[dy:dy + H, dx:dx + W]
            yield (dy, dx, False), crop
            yield (dy, dx, True), crop[:, ::-1]


def test_random_crops_lie_inside_the_padded_image_and_flip_about_half_the_time():
    rng = np.random.default_rng(0)
    images = rng.integers(1, 256, (300, 12, 12, 3), dtype=np.uint8)  # no zeros: padding is recognisable
    out = datasets.random_crop_flip(torch.from_numpy(images), 4, torch.Generator().manual_seed(0)).numpy()
    flips, offsets = 0, set()
    for image, crop in zip(images, out):
        matches = [key for key, candidate in crops_of(image, 4) if np.array_equal(candidate, crop)]
        assert matches, "a crop that RandomCrop(padding=4) + flip cannot produce"
        flips += matches[0][2]
        offsets.add(matches[0][:2])
    assert 0.4 < flips / len(images) < 0.6  # 300 fair coins: std 0.029, so 0.1 is 3.5 of it (seeded: no flake)
    assert len(offsets) > 60  # of the 81 offsets: all of them are drawn, not a few


def test_two_epochs_see_different_crops():
    data = datasets.load_data("mnist_sample", sample_size=20)
    loader = datasets.DeviceLoader(data.train_images, data.train_labels, 50, data.mean, data.std, CPU,
                                   shuffle=False, augment=True, generator=torch.Generator().manual_seed(0))
    first, second = (torch.cat([x for x, _ in loader]) for _ in range(2))
    assert first.shape == second.shape and not torch.equal(first, second)


def tiny_setup(seed=0):
    torch.manual_seed(seed)
    args = type("Args", (), dict(optimizer="SGD", lr=0.05, weight_decay=5e-4, sep_decay=False, loss="MSE",
                                 amp="none", compile=False))()
    model = models.MLP(hidden=32, depth=1, num_classes=10)
    return model, make_optimizer(args, model), steps.make_objective(args, model, make_criterion(args, 10))


def test_sgd_gives_the_same_losses_through_both_paths():
    data = datasets.load_data("mnist_sample", sample_size=40)
    losses = []
    for kind in ("device", "torch"):
        model, optimizer, objective = tiny_setup()
        loader, _ = datasets.make_loaders(data, 50, CPU, kind, train=False, num_workers=0)  # fixed order
        model.train()
        losses.append([first_order_step(optimizer, objective, x, y)[0].item() for x, y in loader])
    assert len(losses[0]) == 8
    # the same batches bit for bit (above), the same steps on the same shapes: equal; rtol only as a margin
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-6)


def test_bf16_autocast_run_finishes(tiny_argv):
    import train_1st_order
    run_dir = train_1st_order.main(tiny_argv("bf16", "--amp", "bf16", "--epochs", "1"))
    state = torch.load(f"{run_dir}/epoch_001.pth")
    assert all(t.dtype != torch.bfloat16 for t in state.values())  # the weights stay fp32


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                    reason="torch.compile on the CPU needs a C compiler, and none is on PATH")
@pytest.mark.slow
def test_compiled_run_finishes(tiny_argv):
    import train_1st_order
    run_dir = train_1st_order.main(tiny_argv("compiled", "--compile", "--epochs", "1"))
    state = torch.load(f"{run_dir}/epoch_001.pth")
    assert not any(k.startswith("_orig_mod") for k in state)  # the plain model's names, loadable anywhere
    models.MLP(hidden=32, depth=1, num_classes=10).load_state_dict(state)


def test_cuda_graph_needs_a_gpu(tiny_argv, capsys):
    import train_1st_order
    from nclib.cli import run_main
    with pytest.raises(SystemExit):
        run_main(train_1st_order.main, tiny_argv("graph", "--cuda_graph", "--device", "cpu"))
    assert "--cuda_graph needs a CUDA device" in capsys.readouterr().err
