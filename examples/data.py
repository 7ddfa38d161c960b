"""Data sets as in-memory NumPy arrays, and a deterministic, resumable batch order.

Nothing downloads. `digits` is scikit-learn's bundled 8x8 handwritten digits; `mnist`,
`fashion_mnist` and `cifar10` read the standard files from `--data-dir`:

- MNIST / Fashion-MNIST: the four IDX files (`train-images-idx3-ubyte`, `train-labels-idx1-ubyte`,
  `t10k-images-idx3-ubyte`, `t10k-labels-idx1-ubyte`), gzipped (`.gz`) or not.
- CIFAR-10: the *binary* version (`data_batch_1.bin` ... `data_batch_5.bin`, `test_batch.bin`,
  fixed 3073-byte records). The "python version" of CIFAR-10 is a pickle, and unpickling a file
  can run arbitrary code, so it is not read.

Images come out as float32 `(N, H, W, C)` standardised with the training set's per-channel mean
and std; labels as int32 `(N,)`. Batches are gathered with one NumPy index array per step.
"""

from __future__ import annotations

import gzip
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DATASETS = ("digits", "mnist", "fashion_mnist", "cifar10")

_IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_HOW_TO_GET = {
    "mnist": "download the four IDX files from https://yann.lecun.com/exdb/mnist/ (or a mirror) "
    "into `--data-dir`; keep the original names, gzipped or not",
    "fashion_mnist": "download the four IDX files from "
    "https://github.com/zalandoresearch/fashion-mnist (data/fashion) into `--data-dir`; keep the "
    "original names, gzipped or not",
    "cifar10": "download the CIFAR-10 *binary version* (cifar-10-binary.tar.gz) from "
    "https://www.cs.toronto.edu/~kriz/cifar.html and extract it so that `--data-dir` (or its "
    "`cifar-10-batches-bin/` subfolder) holds data_batch_1.bin ... data_batch_5.bin and "
    "test_batch.bin; the python (pickle) version is not read because unpickling can run code",
}
_CIFAR_RECORD = 1 + 32 * 32 * 3


class DataError(ValueError):
    """A data file is missing or does not have the expected format."""


@dataclass(frozen=True)
class Dataset:
    """A train/test split held in host memory."""

    name: str
    x_train: np.ndarray  # float32 (N, H, W, C), standardised
    y_train: np.ndarray  # int32 (N,)
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])  # type: ignore[return-value]


def load(name: str, data_dir: str | Path | None = None) -> Dataset:
    """Load data set `name` (one of `DATASETS`); real files are read from `data_dir`."""
    if name == "digits":
        return _digits()
    if name not in DATASETS:
        raise DataError(f"`--dataset` must be one of {DATASETS}, got {name!r}.")
    if data_dir is None:
        raise DataError(f"`--dataset {name}` needs `--data-dir`: {_HOW_TO_GET[name]}.")
    root = Path(data_dir)
    if name == "cifar10":
        return _cifar10(root)
    arrays = {key: read_idx(_find(root, stem, name)) for key, stem in _IDX_FILES.items()}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(
                f"{name} {split} files disagree: images have shape {images.shape} and labels "
                f"{labels.shape}; expected (N, rows, cols) images and (N,) labels."
            )
    return _finish(
        name,
        arrays["train_images"][..., None],
        arrays["train_labels"],
        arrays["test_images"][..., None],
        arrays["test_labels"],
    )


def _digits() -> Dataset:
    x, y = _digits_arrays()
    x = x.astype(np.float32).reshape(-1, 8, 8, 1)
    order = np.random.default_rng(0).permutation(len(y))  # fixed split, whatever --seed is
    test, train = order[:360], order[360:]
    return _finish("digits", x[train], y[train], x[test], y[test])


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 digits (1797 images, 64 pixels and a label per row), read
    from its CSV without importing scikit-learn (2 s of imports, half of a short run's time);
    through `load_digits` where that file is not found."""
    spec = importlib.util.find_spec("sklearn")
    path = spec and spec.origin and Path(spec.origin).parent / "datasets/data/digits.csv.gz"
    if not (path and path.is_file()):
        from sklearn.datasets import load_digits

        digits = load_digits()
        return digits.data, digits.target
    with gzip.open(path, "rt") as f:
        rows = np.loadtxt(f, delimiter=",")
    return rows[:, :-1], rows[:, -1].astype(np.int64)


def _finish(name: str, x_train, y_train, x_test, y_test) -> Dataset:
    x_train = x_train.astype(np.float32)
    mean = x_train.mean(axis=(0, 1, 2), dtype=np.float64)
    std = x_train.std(axis=(0, 1, 2), dtype=np.float64) + 1e-6
    scale = lambda x: ((x.astype(np.float32) - mean) / std).astype(np.float32)
    y_train, y_test = y_train.astype(np.int32), y_test.astype(np.int32)
    num_classes = int(max(y_train.max(), y_test.max())) + 1
    return Dataset(name, scale(x_train), y_train, scale(x_test), y_test, num_classes)


# ----------------------------------------------------------------------------- file formats


def _find(root: Path, stem: str, name: str) -> Path:
    for candidate in (root / stem, root / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise DataError(
        f"Missing {name} file `{stem}` (or `{stem}.gz`) in {root}: {_HOW_TO_GET[name]}."
    )


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzipped if its name ends in `.gz`.

    Header: two zero bytes, a type byte (0x08 = unsigned byte), the number of dimensions, then
    each dimension as a big-endian uint32; the data follows in row-major order.
    """
    path = Path(path)
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"Cannot read IDX file {path}: {e}.") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or not 1 <= raw[3] <= 4:
        raise DataError(
            f"{path} is not an unsigned-byte IDX file: expected the header 00 00 08 <ndim>, got "
            f"{raw[:4].hex(' ') or 'an empty file'}."
        )
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is truncated: its IDX header needs {header} bytes.")
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", ndim, offset=4))
    expected = header + int(np.prod(shape))
    if len(raw) != expected:
        raise DataError(
            f"{path} has {len(raw)} bytes but its header declares shape {shape}, which needs "
            f"{expected}; the file is truncated or not an IDX file."
        )
    return np.frombuffer(raw, np.uint8, offset=header).reshape(shape)


def read_cifar_binary(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR-10 binary batch: records of 1 label byte + 3072 pixel bytes (R, G, B planes).

    Returns uint8 images `(N, 32, 32, 3)` and uint8 labels `(N,)`.
    """
    path = Path(path)
    raw = np.fromfile(path, np.uint8)
    if raw.size == 0 or raw.size % _CIFAR_RECORD:
        raise DataError(
            f"{path} has {raw.size} bytes, not a positive multiple of the CIFAR-10 binary record "
            f"size {_CIFAR_RECORD} (1 label byte + 32*32*3 pixels)."
        )
    records = raw.reshape(-1, _CIFAR_RECORD)
    labels = records[:, 0]
    if labels.max() > 9:
        raise DataError(f"{path} holds label {labels.max()}; CIFAR-10 labels are 0..9.")
    images = records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return images, labels


def _cifar10(root: Path) -> Dataset:
    folder = root / "cifar-10-batches-bin" if (root / "cifar-10-batches-bin").is_dir() else root
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
    for file in names:
        if not (folder / file).is_file():
            raise DataError(
                f"Missing CIFAR-10 file `{file}` in {folder}: {_HOW_TO_GET['cifar10']}."
            )
    batches = [read_cifar_binary(folder / file) for file in names]
    x_train = np.concatenate([b[0] for b in batches[:5]])
    y_train = np.concatenate([b[1] for b in batches[:5]])
    return _finish("cifar10", x_train, y_train, *batches[5])


# ----------------------------------------------------------------------------- batches


class BatchOrder:
    """Which examples form the batch at each step: a pure function of `(seed, step)`.

    Each epoch is a fresh permutation drawn from `numpy.random.default_rng([seed, epoch])`; the
    last incomplete batch of an epoch is dropped. Because nothing else is stateful, the data-order
    state of a checkpoint is just its step, and a resumed run sees exactly the same batches.
    """

    def __init__(self, num_examples: int, batch_size: int, seed: int):
        if batch_size > num_examples:
            raise DataError(
                f"`--batch-size` {batch_size} exceeds the {num_examples} training examples."
            )
        self.num_examples, self.batch_size, self.seed = num_examples, batch_size, seed
        self.batches_per_epoch = num_examples // batch_size
        self._epoch, self._perm = -1, np.empty(0, np.int64)

    def indices(self, step: int) -> np.ndarray:
        epoch, i = divmod(step, self.batches_per_epoch)
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
        return self._perm[i * self.batch_size : (i + 1) * self.batch_size]

    def state(self, step: int) -> dict[str, int]:
        """The data-order state stored in checkpoints (enough to rebuild the order exactly)."""
        epoch, position = divmod(step, self.batches_per_epoch)
        return {
            "seed": self.seed,
            "batch_size": self.batch_size,
            "epoch": epoch,
            "position": position,
        }


def batch(data: Dataset, order: BatchOrder, step: int) -> tuple[np.ndarray, np.ndarray]:
    """The `(images, labels)` batch for `step`: one fancy-indexing gather, no Python loop."""
    idx = order.indices(step)
    return data.x_train[idx], data.y_train[idx]
