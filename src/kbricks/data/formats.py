"""Loaders for on-disk formats a user brings: CIFAR python batches, ImageFolder, .npz, MNIST IDX.

The CIFAR batches are pickles; they are read with a restricted unpickler that only rebuilds numpy arrays,
lists, dicts, strings and numbers, so a malicious file cannot run code.
"""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from ..core.io import first_line
from ..errors import DataError
from .base import ArrayDataset, DataSplits, splits_from_arrays, to_float_images, to_float_inputs
from .registry import DATASETS

# (module, name) pairs that a CIFAR batch legitimately references. Everything else is refused.
_SAFE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),  # protocol-2 pickles written by Python 3 encode bytes this way
}


class RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _SAFE_GLOBALS:
            raise DataError(
                f"refusing to unpickle {module}.{name}: only numpy arrays, lists, dicts and scalars "
                "are allowed in dataset files"
            )
        if module.startswith("numpy.core"):
            module = "numpy._core" + module[len("numpy.core"):]
        return super().find_class(module, name)


def safe_unpickle(path: Path) -> Any:
    try:
        with open(path, "rb") as f:
            return RestrictedUnpickler(f, encoding="bytes").load()
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{path} is not a readable pickle batch: {first_line(exc)}") from None


def _key(d: Dict[Any, Any], *names: str) -> Any:
    for n in names:
        for k in (n, n.encode()):
            if k in d:
                return d[k]
    raise DataError(f"pickle batch has none of the keys {names}; keys present: {list(d)[:10]}")


def _existing_dir(root: Optional[str], what: str) -> Path:
    if root is None:
        raise DataError(f"{what} needs data.root (a directory on disk); nothing is downloaded")
    p = Path(root).expanduser()
    if not p.exists():
        raise DataError(f"{what}: data path {str(p)!r} does not exist")
    return p


def _read_cifar_batches(files: List[Path], label_key: str, num_classes: int) -> tuple:
    xs, ys = [], []
    for f in files:
        batch = safe_unpickle(f)
        if not isinstance(batch, dict):
            raise DataError(f"{f} does not hold a dict batch")
        try:
            data = np.asarray(_key(batch, "data"), dtype=np.uint8)
            raw = np.asarray(_key(batch, label_key))
        except (TypeError, ValueError) as exc:
            raise DataError(f"{f}: 'data' or {label_key!r} is not an array of numbers ({first_line(exc)})") from None
        if data.ndim != 2 or data.shape[1] != 3072:
            raise DataError(f"{f}: 'data' must be N x 3072 uint8, got {data.shape}")
        if raw.ndim != 1 or len(raw) != len(data):
            raise DataError(f"{f}: {len(data)} images but {raw.size} {label_key!r} entries")
        if raw.size and not np.issubdtype(raw.dtype, np.integer) and not (np.issubdtype(raw.dtype, np.number) and np.all(np.mod(raw, 1) == 0)):
            raise DataError(f"{f}: {label_key!r} must hold integer class indices, got dtype {raw.dtype}")
        outside = raw[(raw < 0) | (raw >= num_classes)] if raw.size else raw
        if outside.size:
            raise DataError(f"{f}: label {outside[0].item()!r} in {label_key!r} is not a class index 0..{num_classes - 1}")
        xs.append(data.reshape(-1, 3, 32, 32))
        ys.append(raw.astype(np.int64))
    return np.concatenate(xs), np.concatenate(ys)


def _cifar_dir(root: Path, folder: str) -> Path:
    return root / folder if (root / folder).is_dir() else root


@DATASETS.register("cifar10")
def cifar10(root: Optional[str] = None) -> DataSplits:
    base = _cifar_dir(_existing_dir(root, "cifar10"), "cifar-10-batches-py")
    train_files = sorted(base.glob("data_batch_*"))
    if not train_files or not (base / "test_batch").exists():
        raise DataError(f"cifar10: expected data_batch_1..5 and test_batch in {base}")
    names = [f"class{i}" for i in range(10)]
    if (base / "batches.meta").exists():
        meta = safe_unpickle(base / "batches.meta")
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in _key(meta, "label_names")]
    xtr, ytr = _read_cifar_batches(train_files, "labels", len(names))
    xte, yte = _read_cifar_batches([base / "test_batch"], "labels", len(names))
    return DataSplits(
        ArrayDataset(torch.from_numpy(to_float_images(xtr)), torch.from_numpy(ytr), names),
        ArrayDataset(torch.from_numpy(to_float_images(xte)), torch.from_numpy(yte), names),
        name="cifar10",
    )


@DATASETS.register("cifar100")
def cifar100(root: Optional[str] = None, label: str = "fine") -> DataSplits:
    if label not in ("fine", "coarse"):
        raise DataError(f"cifar100 label must be 'fine' or 'coarse', got {label!r}")
    base = _cifar_dir(_existing_dir(root, "cifar100"), "cifar-100-python")
    if not (base / "train").exists() or not (base / "test").exists():
        raise DataError(f"cifar100: expected 'train' and 'test' files in {base}")
    n = 100 if label == "fine" else 20
    names = [f"class{i}" for i in range(n)]
    if (base / "meta").exists():
        meta = safe_unpickle(base / "meta")
        raw = _key(meta, f"{label}_label_names")
        names = [v.decode() if isinstance(v, bytes) else str(v) for v in raw]
    key = f"{label}_labels"
    if len(names) != n:
        raise DataError(f"cifar100: {base / 'meta'} lists {len(names)} {label} label names, expected {n}")
    xtr, ytr = _read_cifar_batches([base / "train"], key, n)
    xte, yte = _read_cifar_batches([base / "test"], key, n)
    return DataSplits(
        ArrayDataset(torch.from_numpy(to_float_images(xtr)), torch.from_numpy(ytr), names),
        ArrayDataset(torch.from_numpy(to_float_images(xte)), torch.from_numpy(yte), names),
        name=f"cifar100-{label}",
    )


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def _read_image_tree(root: Path, image_size: Optional[int], grayscale: bool, classes=None):
    try:
        from PIL import Image
    except ImportError as exc:  # pragma: no cover
        raise DataError("imagefolder needs Pillow: pip install 'kbricks[data]'") from exc
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir())
    if classes is None:
        classes = [d.name for d in class_dirs]
    if not classes:
        raise DataError(f"imagefolder: {root} has no class sub-directories")
    class_to_idx = {c: i for i, c in enumerate(classes)}
    images, labels = [], []
    for d in class_dirs:
        if d.name not in class_to_idx:
            raise DataError(f"imagefolder: class {d.name!r} in {root} is not among {classes}")
        for f in sorted(d.iterdir()):
            if f.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(f) as im:
                    im = im.convert("L" if grayscale else "RGB")
                    if image_size is not None:
                        im = im.resize((image_size, image_size), Image.BILINEAR)
                    arr = np.asarray(im, dtype=np.uint8)
            except Exception as exc:
                raise DataError(f"imagefolder: cannot decode {f}: {first_line(exc)}") from None
            if images and arr.shape != images[0].shape:
                raise DataError(
                    f"imagefolder: {f} has shape {arr.shape} but earlier images have {images[0].shape}; "
                    "set data.kwargs.image_size to resize"
                )
            images.append(arr)
            labels.append(class_to_idx[d.name])
    if not images:
        raise DataError(f"imagefolder: no images found under {root}")
    x = np.stack(images)
    x = to_float_images(x, layout="NHW" if grayscale else "NHWC")
    return x, np.asarray(labels, dtype=np.int64), classes


@DATASETS.register("imagefolder")
def imagefolder(
    root: Optional[str] = None,
    image_size: Optional[int] = None,
    grayscale: bool = False,
    test_fraction: float = 0.2,
    split_seed: int = 0,
) -> DataSplits:
    """``root/<class>/*.png`` (split with a seeded stratified split) or ``root/{train,test}/<class>/...``."""
    base = _existing_dir(root, "imagefolder")
    test_dir = next((base / n for n in ("test", "val") if (base / n).is_dir()), None)
    if (base / "train").is_dir() and test_dir is not None:
        xtr, ytr, classes = _read_image_tree(base / "train", image_size, grayscale)
        xte, yte, _ = _read_image_tree(test_dir, image_size, grayscale, classes)
        return DataSplits(
            ArrayDataset(torch.from_numpy(xtr), torch.from_numpy(ytr), classes),
            ArrayDataset(torch.from_numpy(xte), torch.from_numpy(yte), classes),
            name="imagefolder",
        )
    x, y, classes = _read_image_tree(base, image_size, grayscale)
    return splits_from_arrays("imagefolder", x, y, classes, test_fraction, split_seed, root=str(base))


NPZ_KEYS = (("x_train", "y_train", "x_test", "y_test"), ("X_train", "y_train", "X_test", "y_test"), ("x", "y"), ("X", "y"))


@DATASETS.register("npz")
def npz(root: Optional[str] = None, test_fraction: float = 0.2, split_seed: int = 0, scale: Optional[float] = None,
        layout: str = "auto") -> DataSplits:
    """A ``.npz`` with ``x_train, y_train, x_test, y_test`` (keras convention; ``X_...`` too) or ``x, y`` / ``X, y``.

    Inputs are images ([N, H, W], [N, C, H, W] or [N, H, W, C]) or feature vectors [N, D]. uint8 values are divided
    by 255; other values must lie in [0, 1] unless ``scale`` is given (they are divided by it; ``scale: 1`` keeps
    them as they are); NaN or infinite values are refused. ``layout`` is ``auto`` (channels-last when the last axis has
    1, 3 or 4 entries and the second does not, converted with a warning; a shape where both could be the channels is
    refused), ``NCHW`` or ``NHWC`` (see :func:`kbricks.data.base.to_nchw`)."""
    if layout not in ("auto", "NCHW", "NHWC"):
        raise DataError(f"npz: layout must be auto, NCHW or NHWC, got {layout!r}")
    path = _existing_dir(root, "npz")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except Exception as exc:
        raise DataError(f"npz: cannot read {path} without pickle: {first_line(exc)}") from None

    def classes_for(*ys: np.ndarray) -> List[str]:
        return [str(i) for i in range(int(max(int(y.max()) for y in ys)) + 1)]

    def inputs(key: str) -> np.ndarray:
        a = arrays[key]
        return to_float_inputs(a, layout, scale, f"npz {path.name}: {key}")

    def labels(key: str) -> np.ndarray:
        y = arrays[key]
        integral = np.issubdtype(y.dtype, np.integer) or (np.issubdtype(y.dtype, np.number) and bool(np.all(np.mod(y, 1) == 0)))
        if y.ndim != 1 or not integral:  # astype would truncate 2.7 to 2 silently; the range is checked with the splits
            raise DataError(f"npz {path.name}: {key} must hold one integer class id per sample, got {y.dtype} of shape {y.shape}")
        if len(y) == 0:
            raise DataError(f"npz {path.name}: {key} holds 0 samples")
        return y.astype(np.int64)

    keys = next((k for k in NPZ_KEYS if set(k) <= arrays.keys()), None)
    if keys is None:
        raise DataError(f"npz: {path} needs keys x_train/y_train/x_test/y_test or x/y (X for x is accepted); found {sorted(arrays)}")
    if len(keys) == 4:
        xtr, xte = inputs(keys[0]), inputs(keys[2])
        ytr, yte = labels(keys[1]), labels(keys[3])
        classes = classes_for(ytr, yte)
        return DataSplits(
            ArrayDataset(torch.from_numpy(xtr), torch.from_numpy(ytr), classes),
            ArrayDataset(torch.from_numpy(xte), torch.from_numpy(yte), classes),
            name="npz",
        )
    x, y = inputs(keys[0]), labels(keys[1])
    if len(x) != len(y):
        raise DataError(f"npz {path.name}: {keys[0]} has {len(x)} samples but {keys[1]} has {len(y)}")
    return splits_from_arrays("npz", x, y, classes_for(y), test_fraction, split_seed)


def read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (MNIST format), optionally gzip-compressed."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path} is not an IDX file (bad magic number)")
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if raw[2] not in dtypes:
        raise DataError(f"{path}: unknown IDX element type 0x{raw[2]:02x}")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4).astype(int).tolist()
    data = np.frombuffer(raw, dtype=dtypes[raw[2]], offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataError(f"{path}: header says {dims} but holds {data.size} values (truncated?)")
    return data.reshape(dims)


def _find(base: Path, stem: str) -> Path:
    for cand in (base / stem, base / (stem + ".gz")):
        if cand.exists():
            return cand
    raise DataError(f"mnist_idx: missing {stem}[.gz] in {base}")


@DATASETS.register("mnist_idx")
def mnist_idx(root: Optional[str] = None) -> DataSplits:
    """The four MNIST/Fashion-MNIST IDX files (``train-images-idx3-ubyte`` ... , optionally ``.gz``)."""
    base = _existing_dir(root, "mnist_idx")
    parts = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        x = read_idx(_find(base, f"{prefix}-images-idx3-ubyte"))
        y = read_idx(_find(base, f"{prefix}-labels-idx1-ubyte")).astype(np.int64)
        if x.shape[0] != y.shape[0]:
            raise DataError(f"mnist_idx: {split} has {x.shape[0]} images but {y.shape[0]} labels")
        parts[split] = (x, y)
    classes = [str(i) for i in range(int(max(parts["train"][1].max(), parts["test"][1].max())) + 1)]
    return DataSplits(
        *(
            ArrayDataset(torch.from_numpy(to_float_images(x)), torch.from_numpy(y), classes)
            for x, y in (parts["train"], parts["test"])
        ),
        name="mnist_idx",
    )


__all__ = ["RestrictedUnpickler", "safe_unpickle", "read_idx"]
