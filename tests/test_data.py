"""examples/data.py: offline datasets, and MNIST / SVHN / CIFAR-10 read from tiny files in their native formats.

The tiny files go through the same code path as the real ones (torchvision's
dataset classes, then our tensors). torchvision verifies SVHN and CIFAR-10 files
by md5 against its table of the official files; the tests point that table at
the tiny files' own md5 (monkeypatch), so the integrity check still runs.
"""

from __future__ import annotations

import gzip
import hashlib
import pickle
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import data  # noqa: E402

torchvision = pytest.importorskip("torchvision")


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _idx(array: np.ndarray) -> bytes:
    """The IDX format of MNIST: magic (0, 0, 0x08 = ubyte, ndim), big-endian dims, raw bytes."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", s) for s in array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_mnist(root: Path, rng) -> dict:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    out = {}
    for prefix, n in (("train", 12), ("t10k", 5)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=(n,), dtype=np.uint8)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(_idx(images))
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(_idx(labels))
        out[prefix] = (images, labels)
    return out


def test_digits_shapes_split_and_normalisation():
    d = data.load("digits")
    assert (len(d.train), len(d.test)) == (1438, 359)
    assert d.in_shape == (1, 28, 28) and d.num_classes == 10
    x, y = next(iter(DataLoader(d.train, batch_size=len(d.train))))
    assert x.shape == (1438, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert abs(x.mean().item()) < 1e-3 and abs(x.std().item() - 1) < 1e-2
    assert set(y.tolist()) == set(range(10))
    # The split is fixed: a second load gives the same test set, disjoint from train.
    x2, y2 = next(iter(DataLoader(data.load("digits").test, batch_size=400)))
    x1, y1 = next(iter(DataLoader(d.test, batch_size=400)))
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not any(torch.equal(x1[0], xi) for xi in x[:200])


def test_synthetic_is_deterministic_and_balanced():
    a, b = data.load("synthetic"), data.load("synthetic")
    xa, ya = next(iter(DataLoader(a.train, batch_size=512)))
    xb, yb = next(iter(DataLoader(b.train, batch_size=512)))
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert torch.bincount(ya).tolist() == [52] * 2 + [51] * 8
    assert xa.shape == (512, 1, 28, 28) and len(a.test) == 256


def test_mnist_from_native_idx_files(tmp_path):
    written = _write_mnist(tmp_path, np.random.default_rng(0))
    d = data.load("mnist", data_dir=str(tmp_path))
    assert (len(d.train), len(d.test), d.in_shape) == (12, 5, (1, 28, 28))
    x, y = next(iter(DataLoader(d.train, batch_size=12)))
    images, labels = written["train"]
    assert y.tolist() == labels.tolist()
    expected = (torch.from_numpy(images).float()[:, None] / 255 - 0.1307) / 0.3081
    torch.testing.assert_close(x, expected)


def test_mnist_gzipped_only_is_reported_missing(tmp_path):
    # torchvision reads the decompressed idx files; .gz alone means "not extracted" -> clear error.
    _write_mnist(tmp_path, np.random.default_rng(0))
    for f in (tmp_path / "MNIST" / "raw").iterdir():
        f.with_suffix(".gz").write_bytes(gzip.compress(f.read_bytes()))
        f.unlink()
    with pytest.raises(data.DataNotFoundError, match="--download"):
        data.load("mnist", data_dir=str(tmp_path))


def test_svhn_from_native_mat_files(tmp_path, monkeypatch):
    scipy_io = pytest.importorskip("scipy.io")
    rng = np.random.default_rng(1)
    split_list = {}
    written = {}
    for split, n in (("train", 7), ("test", 4)):
        X = rng.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8)  # SVHN's (H, W, C, N)
        y = rng.integers(1, 11, size=(n, 1)).astype(np.uint8)  # labels 1..10, 10 meaning digit 0
        y[0, 0] = 10
        path = tmp_path / f"{split}_32x32.mat"
        scipy_io.savemat(path, {"X": X, "y": y})
        url, filename, _ = torchvision.datasets.SVHN.split_list[split]
        split_list[split] = [url, filename, _md5(path)]
        written[split] = (X, y)
    monkeypatch.setattr(torchvision.datasets.SVHN, "split_list", {**torchvision.datasets.SVHN.split_list, **split_list})
    d = data.load("svhn", data_dir=str(tmp_path))
    assert (len(d.train), len(d.test), d.in_shape) == (7, 4, (3, 32, 32))
    x, y = next(iter(DataLoader(d.train, batch_size=7)))
    X, labels = written["train"]
    assert y.tolist() == [int(v) % 10 for v in labels[:, 0]] and y[0] == 0
    raw = torch.from_numpy(X).permute(3, 2, 0, 1).float() / 255  # torchvision's (N, C, W, H) transpose
    mean, std = torch.tensor([0.4377, 0.4438, 0.4728]), torch.tensor([0.1980, 0.2010, 0.1970])
    torch.testing.assert_close(x, (raw - mean[:, None, None]) / std[:, None, None])


def test_svhn_wrong_checksum_is_a_clear_error(tmp_path):
    pytest.importorskip("scipy.io").savemat(tmp_path / "train_32x32.mat", {"X": np.zeros((32, 32, 3, 1), np.uint8), "y": np.ones((1, 1))})
    with pytest.raises(data.DataNotFoundError, match="train_32x32.mat"):
        data.load("svhn", data_dir=str(tmp_path))


def test_cifar10_from_native_pickle_batches(tmp_path, monkeypatch):
    rng = np.random.default_rng(2)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    cls = torchvision.datasets.CIFAR10
    batches = {}
    for name, _ in cls.train_list + cls.test_list:
        n = 3
        rows = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)  # each row: R plane, G plane, B plane
        labels = rng.integers(0, 10, size=n).tolist()
        with open(folder / name, "wb") as fh:
            pickle.dump({"batch_label": name, "data": rows, "labels": labels}, fh)
        batches[name] = (rows, labels)
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]}, fh)
    monkeypatch.setattr(cls, "train_list", [[n, _md5(folder / n)] for n, _ in cls.train_list])
    monkeypatch.setattr(cls, "test_list", [[n, _md5(folder / n)] for n, _ in cls.test_list])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": _md5(folder / "batches.meta")})
    d = data.load("cifar10", data_dir=str(tmp_path))
    assert (len(d.train), len(d.test), d.in_shape) == (15, 3, (3, 32, 32))
    x, y = next(iter(DataLoader(d.test, batch_size=3)))
    rows, labels = batches["test_batch"]
    assert y.tolist() == labels
    mean, std = torch.tensor([0.4914, 0.4822, 0.4465]), torch.tensor([0.2470, 0.2435, 0.2616])
    raw = torch.from_numpy(rows).reshape(3, 3, 32, 32).float() / 255
    torch.testing.assert_close(x, (raw - mean[:, None, None]) / std[:, None, None])


@pytest.mark.parametrize("name", ["mnist", "svhn", "cifar10"])
def test_missing_data_dir_says_how_to_download(tmp_path, name):
    with pytest.raises(data.DataNotFoundError, match=rf"--dataset {name} --data-dir .* --download"):
        data.load(name, data_dir=str(tmp_path / "nowhere"))
    with pytest.raises(data.DataNotFoundError, match="Expected"):
        data.load(name, data_dir=str(tmp_path))  # exists but empty
    with pytest.raises(ValueError, match="--data-dir"):
        data.load(name)


def test_unknown_dataset():
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'"):
        data.load("imagenet")
