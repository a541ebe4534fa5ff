"""The data sets of the paper: how each is read, split, sampled, normalised and augmented, and how bad
files are refused; all from tiny copies written in the real on-disk formats; and the device-resident
data path against torchvision's transforms."""
import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest
import torch
import torchvision
import torchvision.transforms as T

import datasets
import fake_data
import harness
from helpers import REPO
import models
from nclib import steps
from nclib.base import UserError
from nclib.steps import first_order_step
from utils import make_criterion, make_optimizer

pytestmark = pytest.mark.usefixtures("single_thread")

MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def make(name, data_dir, batch_size=64, sample_size=None, SOTA=False):
    return datasets.make_dataset(name, data_dir, batch_size, sample_size=sample_size, SOTA=SOTA, num_workers=0)


def collect(loader):
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys)


def normalise(images_hwc, mean, std):
    """ToTensor + Normalize of uint8 (N, H, W, 3) images, by hand."""
    x = torch.as_tensor(images_hwc).permute(0, 3, 1, 2).float() / 255
    return (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)


def to_uint8(x, mean, std):
    """Undo Normalize + ToTensor: (N, 3, H, W) float -> (N, H, W, 3) uint8."""
    x = x * torch.tensor(std).view(1, -1, 1, 1) + torch.tensor(mean).view(1, -1, 1, 1)
    return (x * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def mnist_reference(images):
    """torchvision's MNIST pipeline of the paper: Grayscale(3), Resize(32), ToTensor, Normalize."""
    t = T.Compose([T.Grayscale(3), T.Resize(32), T.ToTensor(), T.Normalize(MNIST_MEAN, MNIST_STD)])
    return torch.stack([t(Image.fromarray(img)) for img in images])


def first_per_class(labels, n):
    return np.concatenate([np.flatnonzero(labels == k)[:n] for k in np.unique(labels)])


def transform_types(loader):
    transform = loader.dataset.transform
    steps = transform.transforms if isinstance(transform, T.Compose) else [transform]
    return steps


# Normalised pixels computed two ways in float32 ((x / 255 - mean) / std, ToTensor then Normalize) differ
# by a few ulps of |x| <= 2.8 (ulp 2.4e-7); a pixel of another image differs by >= 1/255/std ~ 0.01.
PIXEL_ATOL = 1e-5


def assert_same_rows(a, b, atol=PIXEL_ATOL):
    """a and b hold the same rows up to order (matched greedily, rows flattened)."""
    a, b = a.flatten(1), b.flatten(1)
    assert a.shape == b.shape
    free = torch.ones(len(b), dtype=torch.bool)
    for row in a:
        dist = (b - row).abs().amax(1)
        dist[~free] = float("inf")
        j = int(dist.argmin())
        assert dist[j] <= atol, "a loaded image matches no expected image"
        free[j] = False


# ---------------------------------------------------------------------------- MNIST

def test_mnist_shapes_normalisation_and_labels(fake_mnist):
    root, arrays = fake_mnist
    train, test, num_classes = make("mnist", root, batch_size=7)
    assert num_classes == 10
    x, y = next(iter(test))
    assert x.shape == (7, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    x, y = collect(test)  # the test set keeps its order
    assert len(y) == 20
    torch.testing.assert_close(x, mnist_reference(arrays["test_images"]), atol=PIXEL_ATOL, rtol=0)
    assert y.tolist() == arrays["test_labels"].tolist()
    x, y = collect(train)  # shuffled: compare as sets
    assert len(y) == 30 and sorted(y.tolist()) == sorted(arrays["train_labels"].tolist())
    ref = mnist_reference(arrays["train_images"])
    assert_same_rows(torch.cat([x.flatten(1), y[:, None].float()], 1),
                     torch.cat([ref.flatten(1), torch.as_tensor(arrays["train_labels"])[:, None].float()], 1))


def test_mnist_sample_size_takes_the_first_n_per_class(fake_mnist):
    root, arrays = fake_mnist
    train, test, num_classes = make("mnist", root, sample_size=2)
    x, y = collect(train)
    assert len(y) == 20 and np.bincount(y.numpy(), minlength=10).tolist() == [2] * 10
    keep = first_per_class(arrays["train_labels"], 2)
    ref = mnist_reference(arrays["train_images"][keep])
    assert_same_rows(torch.cat([x.flatten(1), y[:, None].float()], 1),
                     torch.cat([ref.flatten(1), torch.as_tensor(arrays["train_labels"][keep])[:, None].float()], 1))
    assert len(collect(test)[1]) == 20  # the test set is whole


def test_mnist_sample_ships_with_the_repository(tmp_path):
    train, test, num_classes = make("mnist_sample", str(tmp_path), batch_size=100, sample_size=3)
    assert num_classes == 10
    x, y = collect(train)
    assert x.shape == (30, 3, 32, 32) and np.bincount(y.numpy()).tolist() == [3] * 10
    x, y = next(iter(test))
    assert x.shape == (100, 3, 32, 32)
    # Normalize(0.1307, 0.3081): a black pixel maps to -0.1307 / 0.3081
    assert x.min().item() == pytest.approx(-0.1307 / 0.3081, abs=PIXEL_ATOL)


# ---------------------------------------------------------------------------- CIFAR-10

def test_cifar10_in_torchvision_format_loads(fake_cifar10):
    root, arrays = fake_cifar10
    train, test, num_classes = make("cifar10", root)
    assert num_classes == 10 and len(collect(test)[1]) == 20


def test_cifar10_shapes_normalisation_and_labels(fake_cifar10):
    root, arrays = fake_cifar10
    train, test, num_classes = make("cifar10", root, batch_size=8)
    assert num_classes == 10
    x, y = next(iter(train))
    assert x.shape == (8, 3, 32, 32) and y.shape == (8,)
    x, y = collect(test)
    torch.testing.assert_close(x, normalise(arrays["test_images"], CIFAR_MEAN, CIFAR_STD), atol=PIXEL_ATOL, rtol=0)
    assert y.tolist() == arrays["test_labels"].tolist()
    x, y = collect(train)
    assert len(y) == 50
    ids = fake_data.read_stamp(to_uint8(x, CIFAR_MEAN, CIFAR_STD))
    assert sorted(ids.tolist()) == list(range(50))  # every training image once, from all five batch files
    assert y.tolist() == arrays["train_labels"][ids].tolist()
    torch.testing.assert_close(x, normalise(arrays["train_images"][ids], CIFAR_MEAN, CIFAR_STD), atol=PIXEL_ATOL,
                               rtol=0)


def test_cifar10_sample_size(fake_cifar10):
    root, arrays = fake_cifar10
    x, y = collect(make("cifar10", root, sample_size=3)[0])
    ids = fake_data.read_stamp(to_uint8(x, CIFAR_MEAN, CIFAR_STD))
    assert sorted(ids.tolist()) == sorted(first_per_class(arrays["train_labels"], 3).tolist())
    assert y.tolist() == arrays["train_labels"][ids].tolist()


def test_cifar10_sota_augments_the_training_set_only(fake_cifar10):
    root, arrays = fake_cifar10
    train, test, _ = make("cifar10", root, SOTA=True)
    steps = transform_types(train)
    crops = [s for s in steps if isinstance(s, T.RandomCrop)]
    assert len(crops) == 1 and tuple(crops[0].size) == (32, 32) and crops[0].padding == 4
    assert any(isinstance(s, T.RandomHorizontalFlip) for s in steps)
    assert not any(isinstance(s, (T.RandomCrop, T.RandomHorizontalFlip)) for s in transform_types(test))
    x, y = collect(test)
    torch.testing.assert_close(x, normalise(arrays["test_images"], CIFAR_MEAN, CIFAR_STD), atol=PIXEL_ATOL, rtol=0)
    torch.manual_seed(0)
    x, y = collect(train)
    assert x.shape == (50, 3, 32, 32)
    plain = normalise(arrays["train_images"], CIFAR_MEAN, CIFAR_STD).flatten(1)
    untouched = sum(bool(((plain - row).abs().amax(1) < PIXEL_ATOL).any()) for row in x.flatten(1))
    assert untouched < 25  # each image stays as it was with probability 1/162


def test_mnist_is_not_augmented_by_sota(fake_mnist):
    root, arrays = fake_mnist
    train, _, _ = make("mnist", root, SOTA=True)
    assert not any(isinstance(s, (T.RandomCrop, T.RandomHorizontalFlip)) for s in transform_types(train))


# ---------------------------------------------------------------------------- CIFAR-10 with random labels

def random_label_view(root):
    """(stamp -> label of the training set, test labels in order, test images) of cifar10_random."""
    train, test, num_classes = make("cifar10_random", root)
    assert num_classes == 10
    x, y = collect(train)
    ids = fake_data.read_stamp(to_uint8(x, IMAGENET_MEAN, IMAGENET_STD))
    xt, yt = collect(test)
    return dict(zip(ids.tolist(), y.tolist())), yt.tolist(), xt


def test_cifar10_random_labels_balanced_stored_and_reused(fake_cifar10, monkeypatch):
    root, arrays = fake_cifar10
    train_labels, test_labels, xt = random_label_view(root)
    # ImageNet normalisation, same images as cifar10
    torch.testing.assert_close(xt, normalise(arrays["test_images"], IMAGENET_MEAN, IMAGENET_STD), atol=PIXEL_ATOL,
                               rtol=0)
    assert sorted(train_labels) == list(range(50))
    assert np.bincount(list(train_labels.values()), minlength=10).tolist() == [5] * 10
    assert np.bincount(test_labels, minlength=10).tolist() == [2] * 10
    assert [train_labels[i] for i in range(50)] != arrays["train_labels"].tolist()  # permuted
    folder = os.path.join(root, "cifar10_random_label")
    assert os.path.isdir(folder) and os.listdir(folder)
    stored = fake_data.snapshot_tree(folder)

    # A second load reads them back: same labels, files untouched, whatever the random state.
    monkeypatch.setattr(datasets, "RANDOM_LABEL_SEED", 12345, raising=False)
    np.random.seed(99)
    torch.manual_seed(99)
    again_train, again_test, _ = random_label_view(root)
    assert again_train == train_labels and again_test == test_labels
    assert fake_data.snapshot_tree(folder) == stored


def test_cifar10_random_labels_do_not_depend_on_the_global_seed(tmp_path, no_cifar10_checksums):
    labels = []
    for i, seed in enumerate((0, 1)):
        root = str(tmp_path / f"copy{i}")
        fake_data.write_cifar10(root)
        np.random.seed(seed)
        torch.manual_seed(seed)
        labels.append(random_label_view(root)[:2])
    assert labels[0] == labels[1]


def test_cifar10_random_sample_size_uses_the_random_labels(fake_cifar10):
    root, _ = fake_cifar10
    train_labels, _, _ = random_label_view(root)
    by_stamp = np.array([train_labels[i] for i in range(50)])
    x, y = collect(make("cifar10_random", root, sample_size=2)[0])
    ids = fake_data.read_stamp(to_uint8(x, IMAGENET_MEAN, IMAGENET_STD))
    assert sorted(ids.tolist()) == sorted(first_per_class(by_stamp, 2).tolist())
    assert y.tolist() == by_stamp[ids].tolist()


# ---------------------------------------------------------------------------- mini-ImageNet

def test_mini_imagenet_splits_labels_and_normalisation(fake_mini_imagenet):
    root, expected = fake_mini_imagenet
    train, test, num_classes = make("mini_imagenet", root, batch_size=400)
    assert num_classes == len(expected) == 4
    x, y = collect(test)  # in order: class by class, the last 100 of each
    assert x.shape == (400, 3, 84, 84)
    assert y.tolist() == [c for c in range(4) for _ in range(100)]
    ids = fake_data.read_stamp(to_uint8(x, IMAGENET_MEAN, IMAGENET_STD))
    want = np.concatenate([fake_data.read_stamp(images[500:]) for _, images in expected])
    assert ids.tolist() == want.tolist()
    torch.testing.assert_close(x[:3], normalise(expected[0][1][500:503], IMAGENET_MEAN, IMAGENET_STD),
                               atol=PIXEL_ATOL, rtol=0)
    x, y = collect(train)
    assert x.shape == (2000, 3, 84, 84)
    assert np.bincount(y.numpy()).tolist() == [500] * 4
    ids = fake_data.read_stamp(to_uint8(x, IMAGENET_MEAN, IMAGENET_STD))
    for c, (_, images) in enumerate(expected):
        assert sorted(ids[y.numpy() == c].tolist()) == sorted(fake_data.read_stamp(images[:500]).tolist())


def test_mini_imagenet_sample_size_and_sota(fake_mini_imagenet):
    root, expected = fake_mini_imagenet
    train, test, _ = make("mini_imagenet", root, sample_size=3, SOTA=True)
    crops = [s for s in transform_types(train) if isinstance(s, T.RandomCrop)]
    assert len(crops) == 1 and tuple(crops[0].size) == (84, 84) and crops[0].padding == 4
    assert any(isinstance(s, T.RandomHorizontalFlip) for s in transform_types(train))
    assert not any(isinstance(s, (T.RandomCrop, T.RandomHorizontalFlip)) for s in transform_types(test))
    x, y = collect(train)
    assert x.shape == (12, 3, 84, 84) and np.bincount(y.numpy()).tolist() == [3] * 4
    assert len(test.dataset) == 400


def test_mini_imagenet_with_too_few_images_per_class(tmp_path):
    root = str(tmp_path)
    fake_data.write_mini_imagenet(os.path.join(root, "mini_imagenet"), classes=(1, 1, 1), per_class=20)
    try:
        train, test, num_classes = make("mini_imagenet", root)
    except UserError:
        return  # refusing such a cache in one line is fine
    assert num_classes == 3 and len(train.dataset) == 60


# ---------------------------------------------------------------------------- missing and damaged files

def assert_untouched(root, before):
    files, dirs = fake_data.snapshot_tree(root)
    assert files == before[0]
    assert before[1] <= dirs


def test_unknown_dataset():
    with pytest.raises(UserError, match="imagenet21k"):
        make("imagenet21k", "/nonexistent")


def test_mnist_missing_files_named(tmp_path):
    root = str(tmp_path / "d")
    fake_data.write_mnist(root)
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        os.remove(os.path.join(root, "MNIST", "raw", name))
    before = fake_data.snapshot_tree(root)
    with pytest.raises(UserError) as e:
        make("mnist", root)
    message = str(e.value)
    assert "\n" not in message
    assert "t10k-images-idx3-ubyte" in message and "t10k-labels-idx1-ubyte" in message
    assert root in message
    assert_untouched(root, before)


def test_cifar10_missing_files_named(tmp_path, no_cifar10_checksums):
    root = str(tmp_path / "d")
    fake_data.write_cifar10(root)
    os.remove(os.path.join(root, "cifar-10-batches-py", "data_batch_4"))
    before = fake_data.snapshot_tree(root)
    with pytest.raises(UserError) as e:
        make("cifar10", root)
    message = str(e.value)
    assert "\n" not in message and "data_batch_4" in message and root in message
    assert_untouched(root, before)


def test_mini_imagenet_missing_files_named(tmp_path):
    root = str(tmp_path)
    with pytest.raises(UserError) as e:
        make("mini_imagenet", root)
    message = str(e.value)
    assert "\n" not in message and root in message
    for split in ("train", "val", "test"):
        assert f"mini-imagenet-cache-{split}.pkl" in message


def test_mnist_truncated_file(tmp_path):
    root = str(tmp_path / "d")
    fake_data.write_mnist(root)
    path = os.path.join(root, "MNIST", "raw", "train-images-idx3-ubyte")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 100)
    before = fake_data.snapshot_tree(root)
    with pytest.raises(UserError) as e:
        make("mnist", root)
    assert "\n" not in str(e.value) and "truncated" in str(e.value) and root in str(e.value)
    assert_untouched(root, before)


def test_cifar10_truncated_file(tmp_path, no_cifar10_checksums):
    root = str(tmp_path / "d")
    fake_data.write_cifar10(root)
    path = os.path.join(root, "cifar-10-batches-py", "data_batch_3")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    before = fake_data.snapshot_tree(root)
    with pytest.raises(UserError) as e:
        make("cifar10", root)
    assert "\n" not in str(e.value) and "truncated" in str(e.value) and root in str(e.value)
    assert_untouched(root, before)


def test_mini_imagenet_truncated_file(tmp_path):
    folder = str(tmp_path / "mini_imagenet")
    fake_data.write_mini_imagenet(folder, classes=(1, 1, 1), per_class=600)
    path = os.path.join(folder, "mini-imagenet-cache-val.pkl")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    before = fake_data.snapshot_tree(str(tmp_path))
    with pytest.raises(UserError) as e:
        make("mini_imagenet", str(tmp_path))
    assert "\n" not in str(e.value) and "mini-imagenet-cache-val.pkl" in str(e.value)
    assert_untouched(str(tmp_path), before)


def test_mini_imagenet_cache_without_its_keys(tmp_path):
    folder = tmp_path / "mini_imagenet"
    fake_data.write_mini_imagenet(str(folder), classes=(1, 1, 1), per_class=600)
    with open(folder / "mini-imagenet-cache-test.pkl", "wb") as f:
        pickle.dump({"images": np.zeros((1, 84, 84, 3), np.uint8)}, f)
    with pytest.raises(UserError, match="mini-imagenet-cache-test.pkl"):
        make("mini_imagenet", str(tmp_path))


def test_data_dir_with_a_tilde(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    fake_data.write_mnist(str(tmp_path / "d"))
    assert len(datasets.load_data("mnist", "~/d").train_labels) == 30


# ---------------------------------------------------------------------------- torchvision's CIFAR-10 checksums

def refused(name, root, *words):
    """The one-line UserError of load_data, which names every word in `words`; the files are left as they were."""
    before = fake_data.snapshot_tree(root)
    with pytest.raises(UserError) as e:
        datasets.load_data(name, root)
    message = str(e.value)
    assert "\n" not in message
    for word in words:
        assert str(word) in message
    assert_untouched(root, before)
    return message


@pytest.mark.parametrize("name", ["cifar10", "cifar10_random"])
def test_cifar10_checksums_stay_on_for_users(tmp_path, name):
    """Files that are not the official release (here the small fakes) are refused, each named."""
    root = str(tmp_path / "d")
    fake_data.write_cifar10(root)
    message = refused(name, root, root, "checksum", "replace", "delete", *fake_data.CIFAR10_BATCHES, "batches.meta")
    assert "download=True" not in message  # torchvision's advice to programmers is no use to a user
    assert not os.path.exists(os.path.join(root, "cifar10_random_label"))  # nothing drawn from refused data


@pytest.mark.slow
def test_subprocesses_can_read_the_fake_cifar10(tmp_path):
    """tests/harness.py runs a script, with its arguments, as `python script` would, accepting fake CIFAR-10."""
    root = str(tmp_path / "d")
    fake_data.write_cifar10(root)
    script = tmp_path / "count.py"
    script.write_text(f"import sys\nsys.path.insert(0, {REPO!r})\nimport datasets\n"
                      "print(__name__, sys.path[1] == sys.argv[0].rsplit('/', 1)[0],\n"
                      "      len(datasets.load_data('cifar10', sys.argv[1]).train_labels))\n")
    out = subprocess.run(harness.command(script, root), cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["__main__", "True", "50"]  # run as a script, from its own folder


# ---------------------------------------------------------------------------- labels that do not fit

MNIST_TRAIN_LABELS, MNIST_TEST_LABELS = "train-labels-idx1-ubyte", "t10k-labels-idx1-ubyte"


@pytest.mark.parametrize("split", ["train", "test"])
def test_mnist_label_outside_the_classes(fake_mnist, split):
    root, arrays = fake_mnist
    labels = arrays[f"{split}_labels"].copy()
    labels[4] = 12
    name = MNIST_TRAIN_LABELS if split == "train" else MNIST_TEST_LABELS
    fake_data.rewrite_mnist_labels(root, name, labels)
    refused("mnist", root, name, "label 12", "0..9", "replace")


@pytest.mark.parametrize("name", ["data_batch_3", "test_batch"])
def test_cifar10_label_outside_the_classes(fake_cifar10, name):
    root, arrays = fake_cifar10
    labels = arrays["test_labels"].copy() if name == "test_batch" else np.arange(10)
    labels[1] = 12
    fake_data.rewrite_cifar10_labels(root, name, labels)
    refused("cifar10", root, "data_batch_1..5" if name.startswith("data") else name, "label 12", "0..9", "replace")


@pytest.mark.parametrize("name, count", [(MNIST_TRAIN_LABELS, 25), (MNIST_TEST_LABELS, 21)])
def test_mnist_labels_must_count_the_images(fake_mnist, name, count):
    """The header of a labels file says how many labels it holds; torchvision does not compare that with the images."""
    root, arrays = fake_mnist
    images = 30 if name == MNIST_TRAIN_LABELS else 20
    fake_data.rewrite_mnist_labels(root, name, np.arange(count) % 10)
    refused("mnist", root, name, f"{images} images but {count} labels")


def test_cifar10_labels_must_count_the_images(fake_cifar10):
    root, _ = fake_cifar10
    fake_data.rewrite_cifar10_labels(root, "data_batch_2", np.arange(9))
    refused("cifar10", root, "data_batch_1..5", "50 images but 49 labels")


def test_a_class_without_training_images_is_refused(fake_mnist):
    """The number of classes is the data set's, not the largest label + 1; NC needs every class's mean."""
    root, arrays = fake_mnist
    labels = arrays["train_labels"].copy()
    labels[labels == 3] = 4
    fake_data.rewrite_mnist_labels(root, MNIST_TRAIN_LABELS, labels)
    refused("mnist", root, MNIST_TRAIN_LABELS, "no image of class 3", "10 classes")


def test_cifar10_with_its_last_class_missing_is_refused(tmp_path, no_cifar10_checksums):
    root = str(tmp_path / "d")
    fake_data.write_cifar10(root, num_classes=9)
    refused("cifar10", root, "no image of class 9", "data_batch_1..5")


def test_a_test_set_without_some_class_loads(fake_mnist):
    root, arrays = fake_mnist
    labels = arrays["test_labels"].copy()
    labels[labels == 9] = 0
    fake_data.rewrite_mnist_labels(root, MNIST_TEST_LABELS, labels)
    data = datasets.load_data("mnist", root)
    assert data.num_classes == 10 and data.test_labels.tolist() == labels.tolist()


def test_number_of_classes_is_the_data_sets(fake_mnist, fake_mini_imagenet):
    assert datasets.load_data("mnist", fake_mnist[0], sample_size=1).num_classes == 10
    assert datasets.load_data("mnist_sample", sample_size=1).num_classes == 10
    assert datasets.load_data("mini_imagenet", fake_mini_imagenet[0], sample_size=1).num_classes == 4


# ---------------------------------------------------------------------------- the stored cifar10_random labels

def pickled(obj):
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


GOOD_RANDOM_LABELS = {"train": np.arange(50) % 10, "test": np.arange(20) % 10}
BAD_RANDOM_LABELS = {
    "truncated": pickled(GOOD_RANDOM_LABELS)[:100],
    "not a pickle": b"labels: 3 1 4 1 5\n",
    "empty": b"",
    "a list": pickled([GOOD_RANDOM_LABELS["train"], GOOD_RANDOM_LABELS["test"]]),
    "no test key": pickled({"train": GOOD_RANDOM_LABELS["train"]}),
    "float labels": pickled({"train": np.arange(50) / 5.0, "test": np.arange(20) % 10}),
    "string labels": pickled({"train": ["cat"] * 50, "test": np.arange(20) % 10}),
    "ragged": pickled({"train": [[1, 2], [3]], "test": np.arange(20) % 10}),
    "2-D": pickled({"train": np.zeros((50, 1), np.int64), "test": np.arange(20) % 10}),
    "label 10": pickled({"train": np.arange(50) % 11, "test": np.arange(20) % 10}),
    "label -1": pickled({"train": np.arange(50) % 10, "test": np.arange(20) % 10 - 1}),
}


def write_random_labels(root, content):
    path = os.path.join(root, "cifar10_random_label", "labels.pkl")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(content)
    return path


@pytest.mark.parametrize("damage", list(BAD_RANDOM_LABELS))
def test_damaged_random_labels_file(fake_cifar10, damage):
    root, _ = fake_cifar10
    path = write_random_labels(root, BAD_RANDOM_LABELS[damage])
    refused("cifar10_random", root, path, "delete it to draw the labels again")


def test_random_labels_of_another_size(fake_cifar10):
    root, _ = fake_cifar10
    path = write_random_labels(root, pickled({"train": np.arange(49) % 10, "test": np.arange(20) % 10}))
    refused("cifar10_random", root, path, "49/20", "50/20", "delete it to draw new labels")


def test_good_random_labels_file_is_used(fake_cifar10):
    root, _ = fake_cifar10
    write_random_labels(root, pickled(GOOD_RANDOM_LABELS))
    data = datasets.load_data("cifar10_random", root)
    assert data.train_labels.tolist() == GOOD_RANDOM_LABELS["train"].tolist() and data.train_labels.dtype == np.int64
    assert data.test_labels.tolist() == GOOD_RANDOM_LABELS["test"].tolist()


# ---------------------------------------------------------------------------- preprocessed MNIST, cached beside its sources

SAMPLE_PER_CLASS, SAMPLE_TRAIN_PER_CLASS = 6, 4


@pytest.fixture
def small_sample(tmp_path, monkeypatch):
    """A small copy of the shipped sample (6 digits per class, 4 of them training) in a folder of its own,
    read instead of data/mnist_sample.npz; uncompressed, so rewriting pixels keeps its size."""
    with np.load(datasets.MNIST_SAMPLE) as f:
        images, labels = f["images"], f["labels"]
    keep = first_per_class(labels, SAMPLE_PER_CLASS)
    folder = tmp_path / "data"
    folder.mkdir()
    path = str(folder / "mnist_sample.npz")
    np.savez(path, images=images[keep], labels=labels[keep])
    monkeypatch.setattr(datasets, "MNIST_SAMPLE", path)
    monkeypatch.setattr(datasets, "MNIST_SAMPLE_TRAIN_PER_CLASS", SAMPLE_TRAIN_PER_CLASS)
    datasets._mnist_sample_32x32x3.cache_clear()
    yield path
    datasets._mnist_sample_32x32x3.cache_clear()


def sample_cache(path):
    return os.path.splitext(path)[0] + datasets.CACHE_SUFFIX


def expected_sample(path):
    """The sample's splits as _mnist_to_32x32x3 makes them, without the cache."""
    with np.load(path) as f:
        images, labels = datasets._mnist_to_32x32x3(f["images"]), f["labels"].astype(np.int64)
    train = np.concatenate([np.flatnonzero(labels == k)[:SAMPLE_TRAIN_PER_CLASS] for k in range(10)])
    test = np.setdiff1d(np.arange(len(labels)), train)
    train.sort()
    return images[train], labels[train], images[test], labels[test]


@pytest.fixture
def resizes(monkeypatch):
    """The number of times MNIST is resized (not read from a cache) from now on."""
    real, count = datasets._mnist_to_32x32x3, [0]

    def counted(images):
        count[0] += 1
        return real(images)
    monkeypatch.setattr(datasets, "_mnist_to_32x32x3", counted)
    return count


def load_sample_again():
    """A fresh start's load: no memo of this process."""
    datasets._mnist_sample_32x32x3.cache_clear()
    return datasets.load_mnist_sample()


def test_the_cached_sample_is_byte_identical_to_the_resize(small_sample, monkeypatch):
    from helpers import same
    expected = expected_sample(small_sample)
    assert same(load_sample_again(), expected) and os.path.isfile(sample_cache(small_sample))

    def no_resize(images):
        raise AssertionError("resized although the cache is warm")
    monkeypatch.setattr(datasets, "_mnist_to_32x32x3", no_resize)
    assert same(load_sample_again(), expected)
    data = datasets.load_data("mnist_sample")
    assert same((data.train_images, data.train_labels, data.test_images, data.test_labels), expected)


def rewrite_pixels(path, keep_mtime):
    """Invert every image of the sample in place: same size; the same mtime if asked."""
    st = os.stat(path)
    with np.load(path) as f:
        images, labels = f["images"], f["labels"]
    np.savez(path, images=255 - images, labels=labels)
    assert os.stat(path).st_size == st.st_size
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.mark.parametrize("change", ["touched", "rewritten", "rewritten_same_size_and_mtime"])
def test_a_changed_sample_is_resized_again(small_sample, resizes, change):
    from helpers import same
    load_sample_again()
    assert resizes[0] == 1
    if change == "touched":
        st = os.stat(small_sample)
        os.utime(small_sample, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    else:
        rewrite_pixels(small_sample, keep_mtime=change == "rewritten_same_size_and_mtime")
    assert same(load_sample_again(), expected_sample(small_sample))
    assert resizes[0] == 3  # 2: the load; 3: expected_sample
    load_sample_again()
    assert resizes[0] == 3  # the new cache serves the next start


def test_the_sample_s_split_is_part_of_the_key(small_sample, resizes, monkeypatch):
    load_sample_again()
    monkeypatch.setattr(datasets, "MNIST_SAMPLE_TRAIN_PER_CLASS", 5)
    x_train, _, x_test, _ = load_sample_again()
    assert resizes[0] == 2 and (len(x_train), len(x_test)) == (50, 10)


@pytest.mark.parametrize("damage", ["truncated", "empty", "byte_flipped", "garbage", "other_format", "wrong_shape"])
def test_a_damaged_cache_is_ignored_and_rewritten(small_sample, resizes, damage, monkeypatch):
    from helpers import same
    load_sample_again()
    cache = sample_cache(small_sample)
    with open(cache, "rb") as f:
        good = f.read()
    if damage == "truncated":
        bad = good[:len(good) // 2]
    elif damage == "empty":
        bad = b""
    elif damage == "byte_flipped":  # inside the image bytes: only zip's CRC-32 can tell
        i = len(good) // 2
        bad = good[:i] + bytes([good[i] ^ 0xFF]) + good[i + 1:]
    elif damage == "garbage":
        bad = os.urandom(len(good))
    else:  # a cache of another format version, or with arrays of another shape under the right key
        names = ["train_images", "train_labels", "test_images", "test_labels"]
        arrays = dict(zip(names, expected_sample(small_sample)))
        resizes[0] -= 1
        with np.load(cache) as f:
            key = f["key"].item()
        if damage == "other_format":
            with monkeypatch.context() as m:
                m.setattr(datasets, "PREPROCESSED_FORMAT", datasets.PREPROCESSED_FORMAT - 1)
                key = datasets._mnist_sample_key(small_sample)
        else:
            arrays["train_images"] = arrays["train_images"][:, :28]
        np.savez(cache, key=np.array(key), **arrays)
        bad = None
    if bad is not None:
        with open(cache, "wb") as f:
            f.write(bad)
    assert same(load_sample_again(), expected_sample(small_sample))
    assert resizes[0] == 3  # resized by the load (and by expected_sample), not served from the damaged file
    load_sample_again()
    assert resizes[0] == 3  # the cache was rewritten whole


def test_an_unwritable_folder_falls_back_to_memory(small_sample, resizes, monkeypatch, capsys):
    from helpers import same
    import tempfile
    folder = os.path.dirname(small_sample)
    os.chmod(folder, 0o555)
    try:
        if os.geteuid() == 0:  # root writes anywhere: refuse as a read-only folder does
            def read_only(*args, **kwargs):
                raise PermissionError(13, "Permission denied")
            monkeypatch.setattr(tempfile, "mkstemp", read_only)
        capsys.readouterr()
        first, second = load_sample_again(), load_sample_again()
        err = capsys.readouterr().err.strip().splitlines()
    finally:
        os.chmod(folder, 0o755)
    assert same(first, expected_sample(small_sample)) and same(second, first)
    assert resizes[0] == 3  # computed in memory at each start
    assert len(err) == 2 and all(line.startswith("note: ") and folder in line for line in err)  # a line a start
    assert os.listdir(folder) == ["mnist_sample.npz"]


def test_a_failed_write_keeps_the_old_cache_and_leaves_no_file(small_sample, monkeypatch, capsys):
    from helpers import same
    load_sample_again()
    cache = sample_cache(small_sample)
    with open(cache, "rb") as f:
        old = f.read()
    rewrite_pixels(small_sample, keep_mtime=False)

    def disk_full(f, **arrays):
        f.write(b"PK\x03\x04 half a zip")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(datasets.np, "savez", disk_full)
    assert same(load_sample_again(), expected_sample(small_sample))
    assert "No space left on device" in capsys.readouterr().err
    with open(cache, "rb") as f:
        assert f.read() == old  # not half a file; and it is stale, so it is not served:
    assert sorted(os.listdir(os.path.dirname(small_sample))) == ["mnist_sample.32x32x3.cache.npz", "mnist_sample.npz"]


def test_mnist_is_cached_beside_its_files_and_rekeyed_by_them(fake_mnist, monkeypatch):
    from helpers import same
    root, arrays = fake_mnist
    expected = (datasets._mnist_to_32x32x3(arrays["train_images"]), arrays["train_labels"].astype(np.int64),
                datasets._mnist_to_32x32x3(arrays["test_images"]), arrays["test_labels"].astype(np.int64))
    assert same(datasets.load_mnist(root), expected)
    assert os.path.isfile(os.path.join(root, "MNIST", "mnist.32x32x3.cache.npz"))
    import torchvision

    def no_torchvision(*args, **kwargs):
        raise AssertionError("torchvision read the files although the cache is warm")
    with monkeypatch.context() as m:
        m.setattr(torchvision.datasets, "MNIST", no_torchvision)
        m.setattr(datasets, "_mnist_to_32x32x3", no_torchvision)
        assert same(datasets.load_mnist(root), expected)
    labels = (arrays["test_labels"] + 1) % 10
    fake_data.rewrite_mnist_labels(root, "t10k-labels-idx1-ubyte", labels.astype(np.uint8))
    assert same(datasets.load_mnist(root), expected[:3] + (labels.astype(np.int64),))


WARM_START = """
import sys
sys.path.insert(0, {repo!r})
import train_1st_order  # everything the training script imports
import datasets
datasets.MNIST_SAMPLE, datasets.MNIST_SAMPLE_TRAIN_PER_CLASS = sys.argv[1], {per_class}
data = datasets.load_data("mnist_sample")
train, test = datasets.make_loaders(data, 16, datasets.torch.device("cpu"), "device")
next(iter(train)), next(iter(test))
print(len(data.train_labels), "torchvision" in sys.modules)
"""


@pytest.mark.slow
def test_a_warm_start_does_not_import_torchvision(small_sample, tmp_path):
    script = tmp_path / "warm.py"
    script.write_text(WARM_START.format(repo=REPO, per_class=SAMPLE_TRAIN_PER_CLASS))
    runs = [subprocess.run([sys.executable, str(script), small_sample], capture_output=True, text=True, timeout=300)
            for _ in range(2)]
    assert all(out.returncode == 0 for out in runs), runs[-1].stderr
    assert [out.stdout.split() for out in runs] == [["40", "True"], ["40", "False"]]  # cold, then warm


@pytest.mark.slow
def test_starts_killed_or_at_once_never_leave_a_cache_that_is_read_as_valid(small_sample, tmp_path):
    from helpers import same
    script = tmp_path / "load.py"
    script.write_text(WARM_START.format(repo=REPO, per_class=SAMPLE_TRAIN_PER_CLASS))
    killed = subprocess.run(harness.command(script, small_sample, kill="before_rename@1"), capture_output=True,
                            timeout=300)
    assert killed.returncode != 0 and not os.path.exists(sample_cache(small_sample))
    together = [subprocess.Popen([sys.executable, str(script), small_sample], stdout=subprocess.PIPE, text=True)
                for _ in range(2)]
    assert all(p.wait(timeout=300) == 0 and p.stdout.read().split()[0] == "40" for p in together)
    for p in together:
        p.stdout.close()
    arrays = datasets._read_cache(sample_cache(small_sample), datasets._mnist_sample_key(small_sample))
    assert arrays is not None and same(datasets._as_splits(arrays), expected_sample(small_sample))


# ---------------------------------------------------------------------------- the device-resident data path
# It gives what torchvision's transforms give, and trains the same. Bit for bit, on every CPU: both paths
# make each pixel by the same correctly rounded float32 operations (a division by 255, a subtraction, a
# division), which SIMD and scalar code round alike.

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
