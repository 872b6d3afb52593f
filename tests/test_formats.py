"""On-disk formats, tested on small fixtures written in the exact real layouts."""

import gzip
import os
import pickle
import struct

import numpy as np
import pytest
import torch

from kbricks.data import load_dataset
from kbricks.data.formats import read_idx, safe_unpickle
from kbricks.errors import DataError


def write_pickle(path, obj, protocol=2):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)


def make_cifar10(root, n_per_batch=6, rng=np.random.default_rng(0)):
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    expected = {}
    for i in range(1, 6):
        data = rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, n_per_batch).tolist()
        # the real files are Python-2 pickles with byte keys; protocol 2 from Python 3 is the closest match
        write_pickle(d / f"data_batch_{i}", {b"batch_label": b"training batch", b"labels": labels, b"data": data, b"filenames": [b"x.png"] * n_per_batch})
        expected[i] = (data, labels)
    test = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
    write_pickle(d / "test_batch", {b"labels": [0, 1, 2, 3], b"data": test})
    write_pickle(d / "batches.meta", {b"label_names": [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]})
    return expected, test


def test_cifar10_batches_load_in_order_and_chw(tmp_path):
    expected, test = make_cifar10(tmp_path)
    d = load_dataset("cifar10", root=str(tmp_path))
    assert d.train.x.shape == (30, 3, 32, 32) and d.test.x.shape == (4, 3, 32, 32)
    assert d.train.classes[0] == "airplane" and d.test.y.tolist() == [0, 1, 2, 3]
    first = expected[1][0][0].reshape(3, 32, 32).astype(np.float32) / 255
    assert np.allclose(d.train.x[0].numpy(), first)
    assert d.train.y[:6].tolist() == expected[1][1]
    # the folder itself or its parent both work
    assert len(load_dataset("cifar10", root=str(tmp_path / "cifar-10-batches-py")).train) == 30


def test_cifar100_fine_and_coarse(tmp_path):
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    rng = np.random.default_rng(1)
    for split, n in (("train", 8), ("test", 4)):
        write_pickle(d / split, {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"fine_labels": list(range(n)), b"coarse_labels": [i % 3 for i in range(n)]}, protocol=4)
    write_pickle(d / "meta", {b"fine_label_names": [f"f{i}".encode() for i in range(100)], b"coarse_label_names": [f"c{i}".encode() for i in range(20)]})
    fine = load_dataset("cifar100", root=str(tmp_path))
    coarse = load_dataset("cifar100", root=str(tmp_path), label="coarse")
    assert fine.train.y.tolist() == list(range(8)) and fine.train.num_classes == 100
    assert coarse.train.y.tolist() == [i % 3 for i in range(8)] and coarse.train.classes[1] == "c1"
    with pytest.raises(DataError, match="'fine' or 'coarse'"):
        load_dataset("cifar100", root=str(tmp_path), label="both")


class Evil:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_without_running_code(tmp_path):
    marker = tmp_path / "pwned"
    Evil.marker = marker
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    write_pickle(d / "data_batch_1", {b"data": Evil(), b"labels": [0]})
    write_pickle(d / "test_batch", {b"data": np.zeros((1, 3072), np.uint8), b"labels": [0]})
    with pytest.raises(DataError, match="refusing to unpickle (posix|os).system"):
        load_dataset("cifar10", root=str(tmp_path))
    assert not marker.exists()


def test_restricted_unpickler_refuses_other_globals(tmp_path):
    p = tmp_path / "x.pkl"
    write_pickle(p, {"f": print})
    with pytest.raises(DataError, match=r"refusing to unpickle (__builtin__|builtins)\.print"):
        safe_unpickle(p)
    p.write_bytes(b"not a pickle at all")
    with pytest.raises(DataError, match="not a readable pickle"):
        safe_unpickle(p)


def test_cifar_missing_and_malformed(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("cifar10", root=str(tmp_path / "nope"))
    with pytest.raises(DataError, match="expected data_batch_1..5 and test_batch"):
        load_dataset("cifar10", root=str(tmp_path))
    write_pickle(tmp_path / "data_batch_1", {b"data": np.zeros((2, 10), np.uint8), b"labels": [0, 1]})
    write_pickle(tmp_path / "test_batch", {b"data": np.zeros((2, 10), np.uint8), b"labels": [0, 1]})
    with pytest.raises(DataError, match="N x 3072"):
        load_dataset("cifar10", root=str(tmp_path))
    with pytest.raises(DataError, match="needs data.root"):
        load_dataset("cifar10")


def make_image_tree(root, classes=("cat", "dog", "eel"), n=5, size=8, mode="RGB"):
    from PIL import Image

    rng = np.random.default_rng(2)
    arrays = {}
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(n):
            shape = (size, size, 3) if mode == "RGB" else (size, size)
            a = rng.integers(0, 256, shape, dtype=np.uint8)
            Image.fromarray(a, mode=mode).save(root / c / f"{i}.png")
            arrays[(c, i)] = a
    (root / "cat" / "notes.txt").write_text("not an image")
    return arrays


def test_imagefolder_split_and_pixels(tmp_path):
    arrays = make_image_tree(tmp_path)
    d = load_dataset("imagefolder", root=str(tmp_path), test_fraction=0.4)
    assert d.train.classes == ["cat", "dog", "eel"]
    assert len(d.train) == 9 and len(d.test) == 6 and d.train.x.shape[1:] == (3, 8, 8)
    # every loaded image equals one of the written PNGs of its class (lossless)
    for x, y in zip(d.train.x, d.train.y):
        cls = d.train.classes[y]
        hwc = (x.permute(1, 2, 0) * 255).round().byte().numpy()
        assert any(np.array_equal(hwc, arrays[(cls, i)]) for i in range(5))


def test_imagefolder_train_test_layout_grayscale_and_resize(tmp_path):
    make_image_tree(tmp_path / "train", size=10, mode="L")
    make_image_tree(tmp_path / "test", n=2, size=10, mode="L")
    d = load_dataset("imagefolder", root=str(tmp_path), grayscale=True, image_size=6)
    assert d.train.x.shape == (15, 1, 6, 6) and d.test.x.shape == (6, 1, 6, 6)


def test_imagefolder_errors(tmp_path):
    from PIL import Image

    make_image_tree(tmp_path, n=2)
    Image.fromarray(np.zeros((5, 5, 3), np.uint8)).save(tmp_path / "dog" / "small.png")
    with pytest.raises(DataError, match="set data.kwargs.image_size"):
        load_dataset("imagefolder", root=str(tmp_path))
    (tmp_path / "dog" / "broken.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(DataError, match="cannot decode"):
        load_dataset("imagefolder", root=str(tmp_path), image_size=8)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no class sub-directories"):
        load_dataset("imagefolder", root=str(empty))


def test_npz_keras_convention_nhwc(tmp_path):
    rng = np.random.default_rng(3)
    xtr = rng.integers(0, 256, (6, 5, 5, 3), dtype=np.uint8)
    p = tmp_path / "d.npz"
    np.savez(p, x_train=xtr, y_train=np.arange(6) % 3, x_test=xtr[:2], y_test=np.array([0, 2]))
    d = load_dataset("npz", root=str(p))
    assert d.train.x.shape == (6, 3, 5, 5) and d.train.num_classes == 3
    assert np.allclose(d.train.x[1].permute(1, 2, 0).numpy(), xtr[1] / 255.0)


def test_npz_xy_split_and_pickle_refused(tmp_path):
    p = tmp_path / "xy.npz"
    np.savez(p, x=np.random.rand(20, 4, 4).astype(np.float32), y=np.arange(20) % 2)
    d = load_dataset("npz", root=str(p), test_fraction=0.5)
    assert len(d.train) == 10 and d.train.x.shape[1:] == (1, 4, 4)
    bad = tmp_path / "obj.npz"
    np.savez(bad, x=np.array([{"a": 1}], dtype=object), y=np.array([0]))
    with pytest.raises(DataError, match="without pickle"):
        load_dataset("npz", root=str(bad))
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, images=np.zeros((2, 2, 2)))
    with pytest.raises(DataError, match="needs keys"):
        load_dataset("npz", root=str(wrong))


def write_idx(path, arr, gz=False):
    header = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    raw = header + arr.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)


def test_mnist_idx_plain_and_gzip(tmp_path):
    rng = np.random.default_rng(4)
    tr = rng.integers(0, 256, (7, 28, 28), dtype=np.uint8)
    te = rng.integers(0, 256, (3, 28, 28), dtype=np.uint8)
    write_idx(tmp_path / "train-images-idx3-ubyte", tr)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.arange(7) % 10, gz=True)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", te, gz=True)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([9, 8, 7]))
    d = load_dataset("mnist_idx", root=str(tmp_path))
    assert d.train.x.shape == (7, 1, 28, 28) and d.test.y.tolist() == [9, 8, 7]
    assert torch.allclose(d.test.x[0, 0], torch.from_numpy(te[0]).float() / 255)
    assert np.array_equal(read_idx(tmp_path / "t10k-images-idx3-ubyte.gz"), te)


def test_idx_errors(tmp_path):
    p = tmp_path / "bad"
    p.write_bytes(b"\x01\x02\x08\x01")
    with pytest.raises(DataError, match="bad magic"):
        read_idx(p)
    write_idx(p, np.zeros((4, 2), np.uint8))
    p.write_bytes(p.read_bytes()[:-3])
    with pytest.raises(DataError, match="truncated"):
        read_idx(p)
    with pytest.raises(DataError, match="missing train-images-idx3-ubyte"):
        load_dataset("mnist_idx", root=str(tmp_path))
