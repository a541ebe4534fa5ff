"""Tiny data sets in the on-disk formats that the real ones use, for tests that must run offline.

- MNIST: torchvision's raw idx files, <root>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte
- CIFAR-10: the python pickles, <root>/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}
- mini-ImageNet: the cache pickles mini-imagenet-cache-{train,val,test}.pkl, each a dict with
  'image_data' (N, 84, 84, 3) uint8 and 'class_dict' {wnid: [indices into image_data]}

Every writer returns the arrays it wrote, so a test can compare what a loader yields with them.
torchvision checks the CIFAR-10 files against the md5 sums of the real ones, which the small copies
cannot match: a test that reads them turns that check off with `skip_cifar10_checksums`.
Images carry a per-image stamp in their first pixels so that a test can tell them apart after a
shuffle (see `stamp` / `read_stamp`).
"""
import os
import pickle
import struct

import numpy as np

MNIST_RAW = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
CIFAR10_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)
CIFAR10_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
MINI_IMAGENET_SPLITS = ("train", "val", "test")


def balanced_labels(num_classes, per_class, rng):
    """per_class labels of each class in a shuffled order (so 'the first n per class' is not a prefix)."""
    return rng.permutation(np.repeat(np.arange(num_classes), per_class)).astype(np.int64)


def stamp(images, start):
    """Write the running number start, start+1, ... into pixel (0, 0) [and (0, 1)] of each image.

    images: (N, H, W) or (N, H, W, C) uint8, modified in place. The number is base 256 over two pixels.
    """
    ids = np.arange(start, start + len(images))
    images[:, 0, 0] = (ids // 256)[:, None] if images.ndim == 4 else ids // 256
    images[:, 0, 1] = (ids % 256)[:, None] if images.ndim == 4 else ids % 256
    return ids


def read_stamp(images_hwc):
    """Inverse of `stamp` for uint8 (N, H, W, C) images."""
    return images_hwc[:, 0, 0, 0].astype(np.int64) * 256 + images_hwc[:, 0, 1, 0].astype(np.int64)


# ---------------------------------------------------------------------------- MNIST

def _write_idx(path, array):
    """IDX format: big-endian magic (0, 0, type 0x08 = uint8, number of dims), the dims, the bytes."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    with open(path, "wb") as f:
        f.write(struct.pack(">BBBB", 0, 0, 0x08, array.ndim))
        f.write(struct.pack(f">{array.ndim}I", *array.shape))
        f.write(array.tobytes())


def write_mnist(root, train_per_class=3, test_per_class=2, num_classes=10, seed=0):
    """Raw MNIST files under <root>/MNIST/raw/. Returns a dict of the 28x28 uint8 images and labels."""
    rng = np.random.RandomState(seed)
    raw = os.path.join(root, "MNIST", "raw")
    os.makedirs(raw, exist_ok=True)
    out = {}
    for split, prefix, per_class in (("train", "train", train_per_class), ("test", "t10k", test_per_class)):
        labels = balanced_labels(num_classes, per_class, rng)
        images = rng.randint(0, 256, size=(len(labels), 28, 28), dtype=np.uint8)
        _write_idx(os.path.join(raw, f"{prefix}-images-idx3-ubyte"), images)
        _write_idx(os.path.join(raw, f"{prefix}-labels-idx1-ubyte"), labels.astype(np.uint8))
        out[f"{split}_images"], out[f"{split}_labels"] = images, labels
    return out


def rewrite_mnist_labels(root, name, labels):
    """Replace the labels file `name` (e.g. "train-labels-idx1-ubyte") with `labels`, header included."""
    _write_idx(os.path.join(root, "MNIST", "raw", name), np.asarray(labels))


# ---------------------------------------------------------------------------- CIFAR-10

def write_cifar10(root, per_class_per_batch=1, test_per_class=2, num_classes=10, seed=0):
    """The five training pickles, test_batch and batches.meta under <root>/cifar-10-batches-py/.

    Rows of 'data' are 3072 bytes: the red plane, then green, then blue (row-major 32x32 each), as in
    the real files. Returns a dict of the (N, 32, 32, 3) images and labels in file order; every image
    carries a unique stamp (see `stamp`)."""
    rng = np.random.RandomState(seed)
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    train_images, train_labels, count = [], [], 0
    test = None
    for name in CIFAR10_BATCHES:
        per_class = test_per_class if name == "test_batch" else per_class_per_batch
        labels = balanced_labels(num_classes, per_class, rng)
        images = rng.randint(0, 256, size=(len(labels), 32, 32, 3), dtype=np.uint8)
        stamp(images, count)
        count += len(labels)
        rows = images.transpose(0, 3, 1, 2).reshape(len(labels), 3072)
        entry = {"batch_label": f"fake {name}", "labels": [int(v) for v in labels], "data": rows,
                 "filenames": [f"img_{i}.png" for i in range(len(labels))]}
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(entry, f, protocol=2)
        if name == "test_batch":
            test = (images, labels)
        else:
            train_images.append(images)
            train_labels.append(labels)
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({"label_names": list(CIFAR10_NAMES[:num_classes]), "num_cases_per_batch": len(train_labels[0]),
                     "num_vis": 3072}, f, protocol=2)
    return {"train_images": np.concatenate(train_images), "train_labels": np.concatenate(train_labels),
            "test_images": test[0], "test_labels": test[1]}


def rewrite_cifar10_labels(root, name, labels):
    """Replace the labels in the pickle `name` (e.g. "test_batch"), leaving its images as they are."""
    path = os.path.join(root, "cifar-10-batches-py", name)
    with open(path, "rb") as f:
        entry = pickle.load(f)
    entry["labels"] = [int(v) for v in labels]
    with open(path, "wb") as f:
        pickle.dump(entry, f, protocol=2)


def skip_cifar10_checksums(set_attribute):
    """Make torchvision accept any CIFAR-10 file that exists, through `set_attribute`: monkeypatch.setattr,
    so that the check is back when the test ends, or setattr in a process of its own.

    The product keeps torchvision's md5 check, so users cannot train on a damaged download; tests
    need it off because their small files cannot carry the real checksums."""
    import torchvision.datasets.cifar
    import torchvision.datasets.utils

    def exists(path, md5=None):
        return os.path.isfile(path)
    # cifar imported its own reference to the function, and datasets.py calls the one in utils
    for module in (torchvision.datasets.utils, torchvision.datasets.cifar):
        set_attribute(module, "check_integrity", exists)


# ---------------------------------------------------------------------------- mini-ImageNet

def write_mini_imagenet(root, classes=(2, 1, 1), per_class=600, seed=0):
    """mini-imagenet-cache-{train,val,test}.pkl in `root`, `classes[s]` classes of `per_class` images each.

    Within a file the images of different classes are interleaved, so the loader must follow
    class_dict. Returns the expected class order (sorted wnids of train, then val, then test) as a
    list of (wnid, images (per_class, 84, 84, 3)) in each class's own index order."""
    rng = np.random.RandomState(seed)
    os.makedirs(root, exist_ok=True)
    base = rng.randint(0, 256, size=(84, 84, 3), dtype=np.uint8)  # one random picture, stamped per image
    expected, count = [], 0
    for split, n_classes in zip(MINI_IMAGENET_SPLITS, classes):
        n = n_classes * per_class
        data = np.broadcast_to(base, (n, 84, 84, 3)).copy()
        stamp(data, count)
        count += n
        # Class c owns indices c, c + n_classes, c + 2 n_classes, ... (interleaved);
        # wnids are named so that their sorted order is the reverse of their creation order.
        wnids = [f"n{split}{n_classes - c:02d}" for c in range(n_classes)]
        class_dict = {w: list(range(c, n, n_classes)) for c, w in enumerate(wnids)}
        with open(os.path.join(root, f"mini-imagenet-cache-{split}.pkl"), "wb") as f:
            pickle.dump({"image_data": data, "class_dict": class_dict}, f, protocol=pickle.HIGHEST_PROTOCOL)
        for w in sorted(class_dict):
            expected.append((w, data[np.asarray(class_dict[w])]))
    return expected


# ---------------------------------------------------------------------------- disk snapshots

def snapshot_tree(root):
    """{relative path: (bytes, mtime_ns)} of every file below root, and the set of directories."""
    files, dirs = {}, set()
    for folder, subdirs, names in os.walk(root):
        for d in subdirs:
            dirs.add(os.path.relpath(os.path.join(folder, d), root))
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, root)] = (f.read(), os.stat(path).st_mtime_ns)
    return files, dirs
