"""Data sets of the paper, read once into uint8 arrays, and two ways of batching them.

torchvision is imported where it is used (reading MNIST/CIFAR-10 files, the DataLoader path): it
takes seconds to import, and neither the device path nor the scripts that only read run
directories need it. MNIST, resized to 32x32x3, is cached beside its files (see _read_cache), so
a start with the cache warm imports no torchvision at all.

- `DeviceLoader` (fast path): the whole split lives on the training device as uint8; shuffling is
  `randperm` on the device, crop/flip augmentation and normalisation are batched tensor ops.
- `make_dataset` (the authors' API): torchvision transforms per image in a DataLoader.
Both apply the same transforms with the same constants, so they give the same tensors.
"""
import dataclasses
import functools
import hashlib
import io
import math
import os
import pickle
import sys
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import numpy as np
import torch
from PIL import Image

from nclib.base import UserError, atomic_write, save_pickle

MNIST_STATS = ((0.1307,) * 3, (0.3081,) * 3)
MNIST_CLASSES = 10
CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))  # the authors' constants
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CROP_PADDING = 4  # --SOTA: RandomCrop(size, padding=4) + RandomHorizontalFlip on the training set
RANDOM_LABEL_SEED = 0  # cifar10_random: its labels are drawn once from this seed, then read from disk
MNIST_SAMPLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "mnist_sample.npz")
MNIST_SAMPLE_TRAIN_PER_CLASS = 400  # of the 500 per class; the last 100 are the test set
MINI_IMAGENET_TRAIN_PER_CLASS = 500  # of the 600 per class; the last 100 are the test set


@dataclass
class ImageData:
    """One data set as uint8 images (N, H, W, 3) and int64 labels, plus its preprocessing."""
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    num_classes: int
    mean: tuple
    std: tuple
    augment: bool  # crop/flip the training set (--SOTA on cifar10 and mini_imagenet)

    @property
    def nbytes(self):
        return self.train_images.nbytes + self.test_images.nbytes


# ---------------------------------------------------------------------------- reading from disk

MNIST_FILES = [f"MNIST/raw/{n}" for n in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                                          "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")]
CIFAR10_FILES = [f"cifar-10-batches-py/{n}" for n in
                 [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]]
MINI_IMAGENET_FILES = [f"mini-imagenet-cache-{s}.pkl" for s in ("train", "val", "test")]


def _short(e):
    return " ".join(str(e).split())[:200] or type(e).__name__


def _cifar10_checksum_failures(root):
    """The CIFAR-10 files under root whose md5 is not torchvision's record of the official release."""
    import torchvision
    cls = torchvision.datasets.CIFAR10
    listed = cls.train_list + cls.test_list + [(cls.meta["filename"], cls.meta["md5"])]
    return [f"{cls.base_folder}/{name}" for name, md5 in listed
            if not torchvision.datasets.utils.check_integrity(os.path.join(root, cls.base_folder, name), md5)]


def _torchvision_splits(cls, name, root, files, checksum_failures=lambda root: []):
    """Both splits of a torchvision data set: downloaded when missing, a one-line error when that fails."""
    missing = [f for f in files if not os.path.isfile(os.path.join(root, f))]
    if missing:
        try:
            cls(root, train=True, download=True)
        except Exception as e:
            raise UserError(f"{name} is not in {root} and could not be downloaded ({_short(e)}): place "
                            f"{', '.join(missing)} under {root}, or point --data_dir at a folder that has them")
    try:
        return cls(root, train=True, download=False), cls(root, train=False, download=False)
    except Exception as e:
        failed = checksum_failures(root)  # computed only now: torchvision has just checked them once
        if failed:
            raise UserError(f"{name} files {', '.join(failed)} under {root} fail torchvision's checksum (truncated, "
                            f"corrupt or not the official files): replace them there "
                            f"(or delete them to download again)")
        raise UserError(f"{name} files under {root} are truncated or corrupt ({_short(e)}): "
                        f"replace {', '.join(files)} there (or delete them to download again)")


def _mnist_to_32x32x3(images):
    """MNIST's Grayscale(3) + Resize(32), done once with the same PIL calls torchvision makes."""
    import torchvision.transforms.functional as TF
    out = np.empty((len(images), 32, 32, 3), dtype=np.uint8)
    for i, img in enumerate(images):
        out[i] = np.asarray(TF.resize(Image.fromarray(img, mode="L"), 32))[..., None]
    return out


def _as_int64(labels):
    return np.asarray(labels, dtype=np.int64)


# ---------------------------------------------------------------------------- preprocessed MNIST, cached

# Resizing MNIST with PIL takes seconds at every start (and torchvision, seconds more to import), so the
# (N, 32, 32, 3) arrays are kept beside their source files. The cache is only ever a copy: any doubt
# about it (another source, another format, a damaged file, no right to write) means computing again.
PREPROCESSED_FORMAT = 1  # part of every cache key: bump it when _mnist_to_32x32x3 or the file layout changes
CACHE_SUFFIX = ".32x32x3.cache.npz"  # the sources' name, then this (.gitignore lists the shipped sample's)
MNIST_CACHE = os.path.join("MNIST", "mnist" + CACHE_SUFFIX)  # under --data_dir, beside MNIST/raw/
CACHED_SPLITS = ("train", "test")


def _source_key(paths, contents=None, how=""):
    """The cache key of these source files: format version, `how` they are split, then each file's name,
    size, mtime_ns and sha256 (of `contents`, the bytes already read, when given; hashing is cheap next
    to resizing)."""
    parts = [f"format {PREPROCESSED_FORMAT}{how}"]
    for i, path in enumerate(paths):
        st = os.stat(path)  # a change while the sources are read makes the next key differ, never match
        digest = hashlib.sha256()
        if contents is not None:
            digest.update(contents[i])
        else:
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
        parts.append(f"{os.path.basename(path)} {st.st_size} {st.st_mtime_ns} {digest.hexdigest()}")
    return "; ".join(parts)


def _valid_split(images, labels):
    return (images.dtype == np.uint8 and images.ndim == 4 and images.shape[1:] == (32, 32, 3)
            and labels.dtype == np.int64 and labels.shape == (len(images),))


def _read_cache(path, key):
    """{'train_images', 'train_labels', ...} from the cache at path if it was made from the sources of
    `key`; None when it is missing, stale, truncated, corrupt or of another layout."""
    try:
        with np.load(path, allow_pickle=False) as f:
            if f["key"].item() != key:
                return None
            arrays = {f"{s}_{a}": f[f"{s}_{a}"] for s in CACHED_SPLITS for a in ("images", "labels")}
    except Exception:  # zip's CRC-32 catches a damaged member as it is read
        return None
    ok = all(_valid_split(arrays[f"{s}_images"], arrays[f"{s}_labels"]) for s in CACHED_SPLITS)
    return arrays if ok else None


def _write_cache(path, key, arrays):
    """Written atomically (nclib.base.atomic_write), so readers and other writers see the old file or the whole
    new one. Where the folder is not writable, say so in one line and go on without the cache."""
    try:
        atomic_write(path, lambda f: np.savez(f, key=np.array(key), **arrays))
    except OSError as e:
        print(f"note: cannot cache preprocessed MNIST in {os.path.dirname(path)} ({_short(e)}); "
              f"it is recomputed at each start", file=sys.stderr)


def _accepted(arrays, num_classes):
    """Whether load_data will accept these splits: a refused data set leaves its folder as it was."""
    ok = all(len(arrays[f"{s}_images"]) == len(arrays[f"{s}_labels"]) and
             ((arrays[f"{s}_labels"] >= 0) & (arrays[f"{s}_labels"] < num_classes)).all() for s in CACHED_SPLITS)
    return ok and (np.bincount(arrays["train_labels"], minlength=num_classes) > 0).all()


def _split_arrays(train_images, train_labels, test_images, test_labels):
    return dict(train_images=train_images, train_labels=train_labels, test_images=test_images,
                test_labels=test_labels)


def _as_splits(arrays):
    return tuple(arrays[f"{s}_{a}"] for s in CACHED_SPLITS for a in ("images", "labels"))


def load_mnist(root):
    sources = [os.path.join(root, f) for f in MNIST_FILES]
    cache = os.path.join(root, MNIST_CACHE)
    key = _source_key(sources) if all(os.path.isfile(p) for p in sources) else None
    arrays = _read_cache(cache, key) if key is not None else None
    if arrays is None:  # only now torchvision: it reads (or downloads) and checks the files
        import torchvision
        train, test = _torchvision_splits(torchvision.datasets.MNIST, "MNIST", root, MNIST_FILES)
        key = key or _source_key(sources)  # the files were downloaded just now
        arrays = _split_arrays(_mnist_to_32x32x3(train.data.numpy()), _as_int64(train.targets),
                               _mnist_to_32x32x3(test.data.numpy()), _as_int64(test.targets))
        if _accepted(arrays, MNIST_CLASSES):
            _write_cache(cache, key, arrays)
    return _as_splits(arrays)


def _mnist_sample_split(labels):
    """Whether each image of the shipped sample is a training image: the first of each class are."""
    rank = np.empty_like(labels)  # position of each image within its class
    for k in np.unique(labels):
        rank[labels == k] = np.arange((labels == k).sum())
    return rank < MNIST_SAMPLE_TRAIN_PER_CLASS


def _mnist_sample_key(path, contents=None):
    return _source_key([path], None if contents is None else [contents],
                       how=f", {MNIST_SAMPLE_TRAIN_PER_CLASS} training images per class")


@functools.lru_cache(maxsize=1)
def _mnist_sample_32x32x3(path, size, mtime_ns):
    """The shipped sample's splits, from the cache beside it, else resized (once per process, and again
    should the file change) and cached there."""
    with open(path, "rb") as f:
        contents = f.read()
    key = _mnist_sample_key(path, contents)
    cache = os.path.splitext(path)[0] + CACHE_SUFFIX
    arrays = _read_cache(cache, key)
    if arrays is None:
        with np.load(io.BytesIO(contents), allow_pickle=False) as f:
            images, labels = _mnist_to_32x32x3(f["images"]), _as_int64(f["labels"])
        train = _mnist_sample_split(labels)
        arrays = _split_arrays(images[train], labels[train], images[~train], labels[~train])
        if _accepted(arrays, MNIST_CLASSES):
            _write_cache(cache, key, arrays)
    return _as_splits(arrays)


def load_mnist_sample(_root=None):
    st = os.stat(MNIST_SAMPLE)
    splits = _mnist_sample_32x32x3(MNIST_SAMPLE, st.st_size, st.st_mtime_ns)
    return tuple(a.copy() for a in splits)  # copies: the memo stays as it was


def load_cifar10(root):
    import torchvision
    train, test = _torchvision_splits(torchvision.datasets.CIFAR10, "CIFAR-10", root, CIFAR10_FILES,
                                      _cifar10_checksum_failures)
    return train.data, _as_int64(train.targets), test.data, _as_int64(test.targets)


RANDOM_LABELS = os.path.join("cifar10_random_label", "labels.pkl")  # under --data_dir


def _read_random_labels(path, n_train, n_test, num_classes):
    """The stored (train, test) labels, or a one-line error that says to delete the file."""
    again = "delete it to draw the labels again"
    try:
        with open(path, "rb") as f:
            stored = pickle.load(f)
    except Exception as e:
        raise UserError(f"{path} is truncated or not a pickle ({_short(e)}): {again}")
    try:
        labels = [np.asarray(stored[split]) for split in ("train", "test")]
        ok = isinstance(stored, dict) and all(y.ndim == 1 and np.issubdtype(y.dtype, np.integer) for y in labels)
    except Exception:  # not indexable by 'train'/'test', or ragged
        ok = False
    if not ok:
        raise UserError(f"{path} is not a dict of 'train' and 'test' integer label arrays: {again}")
    if (len(labels[0]), len(labels[1])) != (n_train, n_test):
        raise UserError(f"{path} holds labels for {len(labels[0])}/{len(labels[1])} images but the "
                        f"data set has {n_train}/{n_test}: delete it to draw new labels")
    for y in labels:
        bad = y[(y < 0) | (y >= num_classes)]
        if len(bad):
            raise UserError(f"{path} has label {bad[0]}, outside the classes 0..{num_classes - 1}: {again}")
    return labels[0].astype(np.int64), labels[1].astype(np.int64)


def random_labels(root, n_train, n_test, num_classes=10):
    """Class-balanced random labels, drawn once from RANDOM_LABEL_SEED and kept under root."""
    path = os.path.join(root, RANDOM_LABELS)
    if os.path.isfile(path):
        return _read_random_labels(path, n_train, n_test, num_classes)
    rng = np.random.RandomState(RANDOM_LABEL_SEED)
    labels = {split: rng.permutation(np.arange(n) % num_classes).astype(np.int64)
              for split, n in (("train", n_train), ("test", n_test))}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_pickle(labels, path)
    return labels["train"], labels["test"]


def load_cifar10_random(root):
    x_train, _, x_test, _ = load_cifar10(root)
    y_train, y_test = random_labels(root, len(x_train), len(x_test))
    return x_train, y_train, x_test, y_test


def load_mini_imagenet(root):
    """100 classes x 600 images of 84x84 from the three cache pickles; per class 500 train, 100 test."""
    folder = next((f for f in (os.path.join(root, "mini_imagenet"), root)
                   if all(os.path.isfile(os.path.join(f, n)) for n in MINI_IMAGENET_FILES)), None)
    if folder is None:
        raise UserError(f"mini-ImageNet is not in {root}: place {', '.join(MINI_IMAGENET_FILES)} "
                        f"under {os.path.join(root, 'mini_imagenet')} (it cannot be downloaded automatically)")
    images, labels = [], []
    for name in MINI_IMAGENET_FILES:
        try:
            with open(os.path.join(folder, name), "rb") as f:
                cache = pickle.load(f)
            data, class_dict = cache["image_data"], cache["class_dict"]
            for wnid in sorted(class_dict):
                images.append(np.asarray(data[np.asarray(class_dict[wnid])], dtype=np.uint8))
                labels.append(np.full(len(class_dict[wnid]), len(labels), dtype=np.int64))
        except Exception as e:
            raise UserError(f"{os.path.join(folder, name)} is truncated or not a mini-ImageNet cache "
                            f"({_short(e)}): replace it")
    per_class = MINI_IMAGENET_TRAIN_PER_CLASS
    short = [i for i, x in enumerate(images) if len(x) <= per_class]
    if short:
        raise UserError(f"mini-ImageNet caches in {folder} have classes with {per_class} images or fewer "
                        f"(class {short[0]}: {len(images[short[0]])}); the split needs 600 per class: replace them")
    return (np.concatenate([x[:per_class] for x in images]), np.concatenate([y[:per_class] for y in labels]),
            np.concatenate([x[per_class:] for x in images]), np.concatenate([y[per_class:] for y in labels]))


class DataSet(NamedTuple):
    read: Callable  # root -> (train images, train labels, test images, test labels)
    stats: tuple  # (mean, std) of Normalize
    augmentable: bool  # whether --SOTA crops and flips its training set
    num_classes: Optional[int]  # K; None: as many as the files define (mini-ImageNet: 100 in the real caches)
    label_files: tuple  # where the (training, test) labels come from, under --data_dir: for error messages
    fix: str  # what a user should do about a bad label file


DATASETS = {
    "mnist": DataSet(load_mnist, MNIST_STATS, False, MNIST_CLASSES,
                     ("MNIST/raw/train-labels-idx1-ubyte", "MNIST/raw/t10k-labels-idx1-ubyte"),
                     "replace the MNIST files there (or delete them to download them again)"),
    "mnist_sample": DataSet(load_mnist_sample, MNIST_STATS, False, MNIST_CLASSES, (MNIST_SAMPLE, MNIST_SAMPLE),
                            "restore it from the repository (git checkout data/mnist_sample.npz)"),
    "cifar10": DataSet(load_cifar10, CIFAR10_STATS, True, 10,
                       ("cifar-10-batches-py/data_batch_1..5", "cifar-10-batches-py/test_batch"),
                       "replace the CIFAR-10 files there (or delete them to download them again)"),
    "cifar10_random": DataSet(load_cifar10_random, IMAGENET_STATS, False, 10, (RANDOM_LABELS, RANDOM_LABELS),
                              "delete it to draw the labels again"),
    "mini_imagenet": DataSet(load_mini_imagenet, IMAGENET_STATS, True, None,
                             ("mini_imagenet/mini-imagenet-cache-*.pkl",) * 2,
                             "replace the mini-ImageNet caches"),
}


def _check_labels(name, split, images, labels, num_classes, path, fix):
    """One label per image, each a class of the data set; else a one-line error naming the file."""
    if len(labels) != len(images):
        raise UserError(f"{name} {split} set has {len(images)} images but {len(labels)} labels ({path}): {fix}")
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if len(bad):
        raise UserError(f"{path} has label {bad[0]}, outside the classes 0..{num_classes - 1} of {name}: {fix}")


def first_per_class(labels, n):
    """Indices of the first n samples of each class, in data-set order (from labels alone)."""
    keep = np.zeros(len(labels), dtype=bool)
    for k in np.unique(labels):
        keep[np.flatnonzero(labels == k)[:n]] = True
    return np.flatnonzero(keep)


def load_data(dataset_name, data_dir="~/data", sample_size=None, SOTA=False):
    if dataset_name not in DATASETS:
        raise UserError(f"unknown dataset {dataset_name!r}; choose one of {', '.join(DATASETS)}")
    spec = DATASETS[dataset_name]
    root = os.path.expanduser(data_dir)
    x_train, y_train, x_test, y_test = spec.read(root)
    # mini-ImageNet's reader numbers the classes of its caches 0..C-1, each with training images
    K = spec.num_classes or len(np.unique(y_train))
    train_file, test_file = (os.path.join(root, f) for f in spec.label_files)
    _check_labels(dataset_name, "training", x_train, y_train, K, train_file, spec.fix)
    _check_labels(dataset_name, "test", x_test, y_test, K, test_file, spec.fix)
    # NC metrics need every class mean; a test set may lack a class (accuracy is still defined)
    empty = np.flatnonzero(np.bincount(y_train, minlength=K) == 0)
    if len(empty):
        raise UserError(f"{dataset_name} training set has no image of class {', '.join(map(str, empty))} "
                        f"(it has {K} classes, 0..{K - 1}; labels in {train_file}): {spec.fix}")
    if sample_size is not None:
        keep = first_per_class(y_train, sample_size)
        x_train, y_train = x_train[keep], y_train[keep]
    mean, std = spec.stats
    return ImageData(x_train, y_train, x_test, y_test, K, mean, std, augment=SOTA and spec.augmentable)


# ---------------------------------------------------------------------------- the torchvision path

class ArrayDataset(torch.utils.data.Dataset):
    """uint8 images as PIL images through torchvision transforms, as torchvision's own data sets do."""

    def __init__(self, images, labels, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def torchvision_transform(data, train):
    import torchvision.transforms as T
    steps = [T.RandomCrop(data.train_images.shape[1], padding=CROP_PADDING), T.RandomHorizontalFlip()] \
        if train and data.augment else []
    return T.Compose(steps + [T.ToTensor(), T.Normalize(data.mean, data.std)])


def torch_loader(data, train, batch_size, shuffle, num_workers=4, generator=None, augment=None, drop_last=False,
                 pin_memory=None):
    """A DataLoader of per-image torchvision transforms. pin_memory: for a CUDA device (default: whether
    there is one, as the authors' loaders did)."""
    images, labels = (data.train_images, data.train_labels) if train else (data.test_images, data.test_labels)
    transform = torchvision_transform(data, train and augment is not False)
    # Workers are not kept between epochs: fresh ones draw their seeds from `generator`, so a
    # resumed run augments exactly as an uninterrupted one.
    return torch.utils.data.DataLoader(ArrayDataset(images, labels, transform), batch_size=batch_size,
                                       shuffle=shuffle, num_workers=num_workers, generator=generator,
                                       pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
                                       drop_last=drop_last)


def make_dataset(dataset_name, data_dir, batch_size, sample_size=None, SOTA=False, num_workers=4):
    """The authors' API: (trainloader, testloader, num_classes) of torchvision DataLoaders."""
    data = load_data(dataset_name, data_dir, sample_size, SOTA)
    return (torch_loader(data, True, batch_size, shuffle=True, num_workers=num_workers),
            torch_loader(data, False, batch_size, shuffle=False, num_workers=num_workers),
            data.num_classes)


# ---------------------------------------------------------------------------- the device path

def random_crop_flip(x, padding, generator):
    """Per-sample RandomCrop(size, padding) then RandomHorizontalFlip of uint8 images (B, H, W, C)."""
    B, H, W, C = x.shape
    padded = x.new_zeros(B, H + 2 * padding, W + 2 * padding, C)
    padded[:, padding:padding + H, padding:padding + W] = x
    dy, dx = torch.randint(0, 2 * padding + 1, (2, B), device=x.device, generator=generator)
    flip = torch.rand(B, device=x.device, generator=generator) < 0.5
    ar_h, ar_w = torch.arange(H, device=x.device), torch.arange(W, device=x.device)
    rows = dy[:, None] + ar_h  # (B, H)
    cols = dx[:, None] + torch.where(flip[:, None], W - 1 - ar_w, ar_w)  # (B, W), mirrored when flipped
    return padded[torch.arange(B, device=x.device)[:, None, None], rows[:, :, None], cols[:, None, :]]


NORMALISED_CPU_CAP = 1 << 30  # bytes of a split normalised once in host memory (CIFAR-10's training set: 0.6 GB)
NORMALISED_SHARE_OF_FREE = 0.25  # on CUDA, of the free memory: the model and its activations need the rest
NORMALISE_CHUNK_BYTES = 1 << 21  # of float32 temporaries at a time when a whole split is normalised: in cache


class DeviceLoader:
    """Batches of one split, kept whole on `device` as uint8.

    Yields (x, y): x float (B, 3, H, W), normalised as torchvision's ToTensor + Normalize would,
    in channels_last layout when asked; y int64 (B,). Its `generator` (on the device) draws the
    order and the augmentation, so saving its state makes the data order resumable.
    Without augmentation the whole split is normalised once, at the first epoch, where it fits
    (NORMALISED_CPU_CAP, NORMALISED_SHARE_OF_FREE); batches are then rows of it (slices when in
    order: views, so a caller must not write into x).
    """

    def __init__(self, images, labels, batch_size, mean, std, device, shuffle=False, augment=False,
                 generator=None, channels_last=False, drop_last=False, share=None):
        self.images = torch.as_tensor(images).to(device)  # (N, H, W, 3) uint8
        self.labels = torch.as_tensor(labels, dtype=torch.int64).to(device)  # (N,)
        # Normalize's own float32 constants; 255 as a tensor too: CUDA divides by a Python scalar as a
        # multiplication by its reciprocal, which is not always ToTensor's division
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.max_value = torch.full((1, 1, 1, 1), 255.0, device=device)
        self.batch_size, self.shuffle, self.augment = batch_size, shuffle, augment
        self.generator = generator if generator is not None else torch.Generator(device)
        self.channels_last, self.drop_last = channels_last, drop_last
        # share = (rank, world size): every rank draws the same order and augmentation (the same
        # generator state) for each global batch of batch_size, then keeps its block of it
        self.share = share
        self.normalised = None  # (N, H, W, 3) or (N, 3, H, W) float, as batches are laid out; see _rows()

    @property
    def num_samples(self):
        return len(self.labels)

    def __len__(self):
        return (self.num_samples // self.batch_size if self.drop_last else
                math.ceil(self.num_samples / self.batch_size))

    def normalize(self, x, out=None):
        """uint8 (B, H, W, 3) -> ToTensor + Normalize, float (B, 3, H, W): the layout changes while the
        bytes are uint8, then torchvision's three float32 operations in its order, so bitwise its result.
        `out`: where to write it (laid out as the result would be)."""
        x = x.permute(0, 3, 1, 2)  # NHWC memory: channels_last as it is
        if not self.channels_last:
            x = x.contiguous()
        return torch.div(x, self.max_value, out=out).sub_(self.mean).div_(self.std)  # keeps the layout of x

    def normalised_fits(self):
        n_bytes = self.images.numel() * 4  # float32
        device = self.images.device
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            return n_bytes <= NORMALISED_SHARE_OF_FREE * free
        return n_bytes <= NORMALISED_CPU_CAP

    def _normalise_split(self):
        with torch.inference_mode(False):  # an inference tensor could not be trained on later
            out = torch.empty(self.images.shape if self.channels_last else self.images.permute(0, 3, 1, 2).shape,
                              dtype=torch.float32, device=self.images.device)  # rows laid out as batches are
            chunk = max(1, NORMALISE_CHUNK_BYTES // (4 * self.images[0].numel()))  # images
            for start in range(0, self.num_samples, chunk):
                rows = out[start:start + chunk]
                self.normalize(self.images[start:start + chunk],
                               rows.permute(0, 3, 1, 2) if self.channels_last else rows)
        return out

    def _rows(self, idx):
        x = self.normalised[idx]
        return x.permute(0, 3, 1, 2) if self.channels_last else x

    def __iter__(self):
        n, device = self.num_samples, self.labels.device
        if self.normalised is None and not self.augment and self.normalised_fits():
            self.normalised = self._normalise_split()
        order = torch.randperm(n, device=device, generator=self.generator) if self.shuffle else None
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            idx = order[start:start + self.batch_size] if order is not None else slice(start, start + self.batch_size)
            cached = self.normalised is not None and not self.augment
            x = self._rows(idx) if cached else self.images[idx]
            y = self.labels[idx]
            if self.augment:
                x = random_crop_flip(x, CROP_PADDING, self.generator)
            if self.share is not None:
                rank, size = self.share
                x, y = x.tensor_split(size)[rank], y.tensor_split(size)[rank]
            yield (x if cached else self.normalize(x)), y


def num_samples(loader):
    """Images in a DeviceLoader or a DataLoader."""
    return loader.num_samples if isinstance(loader, DeviceLoader) else len(loader.dataset)


def fits_on_device(data, device):
    if device.type != "cuda":
        return True  # the arrays are in host memory already
    free, _ = torch.cuda.mem_get_info(device)
    return data.nbytes < 0.5 * free  # leave room for the model and activations


def shard(data, rank, size):
    """The rank-th of `size` contiguous blocks of each split (for measuring under torchrun)."""
    def block(a):
        return np.array_split(a, size)[rank]
    return dataclasses.replace(data, train_images=block(data.train_images), train_labels=block(data.train_labels),
                               test_images=block(data.test_images), test_labels=block(data.test_labels))


def make_loaders(data, batch_size, device, loader="auto", train=True, seed=0, num_workers=4, channels_last=False,
                 share=None):
    """(train_loader, test_loader). train=True: shuffled and augmented as the run asks, and a last
    batch of a single image dropped (BatchNorm cannot normalise one sample); else the training set
    in order without augmentation, as NC is measured. share=(rank, world size) (training under
    torchrun): the training loader yields this rank's block of each global batch of batch_size; a
    last batch that does not split into equal blocks of two or more is dropped (DDP averages the
    ranks' gradients with equal weights, and per-rank BatchNorm needs two samples)."""
    use_device = loader == "device" or (loader == "auto" and fits_on_device(data, device))
    drop_last = train and len(data.train_labels) % batch_size == 1
    if share is not None:
        if not use_device:
            raise UserError("under torchrun the training data must be on the device: use --loader device "
                            "(--loader torch has no per-rank sampler here)")
        last, size = len(data.train_labels) % batch_size, share[1]
        drop_last = train and last > 0 and bool(last % size or last // size < 2)
    if use_device:
        generator = torch.Generator(device).manual_seed(seed)
        kw = dict(batch_size=batch_size, mean=data.mean, std=data.std, device=device, channels_last=channels_last)
        return (DeviceLoader(data.train_images, data.train_labels, shuffle=train, augment=train and data.augment,
                             generator=generator, drop_last=drop_last, share=share, **kw),
                DeviceLoader(data.test_images, data.test_labels, **kw))
    generator = torch.Generator().manual_seed(seed)
    pin = device.type == "cuda"  # pinned host memory serves copies to a GPU only (and would start CUDA on GPU 0)
    return (torch_loader(data, True, batch_size, shuffle=train, num_workers=num_workers, generator=generator,
                         augment=train, drop_last=drop_last, pin_memory=pin),
            torch_loader(data, False, batch_size, shuffle=False, num_workers=num_workers, pin_memory=pin))
