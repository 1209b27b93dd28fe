"""CIFAR-10 from a local directory in the standard python-pickle format (numpy only).

The batch-size sweeps never download anything. CIFAR-10 is read from the files of the
official ``cifar-10-python.tar.gz`` (https://www.cs.toronto.edu/~kriz/cifar.html), extracted
anywhere: ``data_batch_1`` ... ``data_batch_5`` and ``test_batch``, each a pickled dict with
``b"data"`` (uint8, N x 3072, channel-major 32 x 32 planes) and ``b"labels"`` (N ints).
``--data-dir DIR`` may point at the folder holding those files or at its parent that
contains ``cifar-10-batches-py/``.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
SUBDIR = "cifar-10-batches-py"
IMAGE_SHAPE = (3, 32, 32)


def find_batches_dir(data_dir: str | Path) -> Path:
    """The folder holding the six pickle files: ``data_dir`` itself or its ``SUBDIR``.

    Raises FileNotFoundError naming the missing files and where to put them.
    """
    root = Path(data_dir).expanduser()
    for candidate in (root, root / SUBDIR):
        if all((candidate / name).is_file() for name in (*TRAIN_FILES, TEST_FILE)):
            return candidate
    missing = [n for n in (*TRAIN_FILES, TEST_FILE) if not (root / SUBDIR / n).is_file()]
    raise FileNotFoundError(
        f"CIFAR-10 not found under {root}: missing {', '.join(missing)}.\n"
        "fastdp never downloads data. On a machine with network, fetch cifar-10-python.tar.gz "
        "from https://www.cs.toronto.edu/~kriz/cifar.html, then extract it with "
        f"'tar xzf cifar-10-python.tar.gz -C {root}' so that "
        f"{root / SUBDIR / 'data_batch_1'} exists (the files data_batch_1..5 and test_batch "
        "may also sit directly in the directory given to --data-dir)."
    )


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as handle:
        entry = pickle.load(handle, encoding="bytes")
    data = entry.get(b"data", entry.get("data"))
    labels = entry.get(b"labels", entry.get("labels"))
    if data is None or labels is None:
        raise ValueError(f"{path} is not a CIFAR-10 python batch (no data/labels keys)")
    images = np.asarray(data, dtype=np.uint8).reshape(-1, *IMAGE_SHAPE)
    targets = np.asarray(labels, dtype=np.int64)
    if len(images) != len(targets):
        raise ValueError(f"{path}: {len(images)} images but {len(targets)} labels")
    return images, targets


def load_cifar10(data_dir: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test): float32 N x 3 x 32 x 32 images scaled to [0, 1]
    and standardised per channel with the training set's mean and std; int64 labels."""
    folder = find_batches_dir(data_dir)
    parts = [_read_batch(folder / name) for name in TRAIN_FILES]
    x_train = np.concatenate([p[0] for p in parts]).astype(np.float32) / 255.0
    y_train = np.concatenate([p[1] for p in parts])
    x_test, y_test = _read_batch(folder / TEST_FILE)
    x_test = x_test.astype(np.float32) / 255.0
    mean = x_train.mean(axis=(0, 2, 3), keepdims=True)
    std = x_train.std(axis=(0, 2, 3), keepdims=True) + 1e-8
    return (x_train - mean) / std, y_train, (x_test - mean) / std, y_test
