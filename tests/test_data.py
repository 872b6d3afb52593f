import numpy as np
import pytest
import torch

from kbricks.data import (
    ArrayDataset,
    BatchAugment,
    build_tasks,
    class_partition,
    latent_tasks,
    load_dataset,
    random_crop,
    random_hflip,
    split_classes,
)
from kbricks.data.dsprites import LATENT_NAMES, render
from kbricks.errors import DataError


def test_digits_split_is_fixed_stratified_and_disjoint():
    a, b = load_dataset("digits"), load_dataset("digits")
    assert len(a.train) + len(a.test) == 1797
    assert a.train.x.shape[1:] == (1, 8, 8) and 0.0 <= a.train.x.min() and a.train.x.max() <= 1.0
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.test.y, b.test.y)
    counts = torch.bincount(a.test.y, minlength=10).float()
    assert counts.min() >= 34 and counts.max() <= 38  # ~20% of ~180 per class
    train_rows = {tuple(r.tolist()) for r in a.train.x.flatten(1)}
    overlap = sum(tuple(r.tolist()) in train_rows for r in a.test.x.flatten(1))
    assert overlap <= 2  # the UCI set holds a couple of exact duplicate images; the split itself is disjoint
    other = load_dataset("digits", split_seed=1)
    assert not torch.equal(other.test.y, a.test.y)


def test_mnist5k_is_shuffled_and_complete():
    d = load_dataset("mnist5k")
    assert len(d.train) == 4000 and len(d.test) == 1000
    assert d.train.x.shape[1:] == (1, 28, 28) and d.train.x.max() <= 1.0
    assert torch.bincount(d.test.y, minlength=10).tolist() == [100] * 10
    # it ships sorted by class: the first 100 training labels must not be one class
    assert len(set(d.train.y[:100].tolist())) == 10


def test_dsprites_tiny_has_latents_and_binary_images():
    d = load_dataset("dsprites", n_samples=200, image_size=32, num_orientations=8, num_positions=8)
    assert len(d.train) + len(d.test) == 200
    assert d.train.x.shape[1:] == (1, 32, 32)
    assert set(torch.unique(d.train.x).tolist()) == {0.0, 1.0}
    assert d.train.latent_names == LATENT_NAMES and d.train.latent_sizes == [3, 6, 8, 8, 8]
    assert torch.equal(d.train.y, d.train.latents[:, 0])
    assert (d.train.latents.max(0).values < torch.tensor(d.train.latent_sizes)).all()
    again = load_dataset("dsprites", n_samples=200, image_size=32, num_orientations=8, num_positions=8)
    assert torch.equal(d.train.x, again.train.x)


def test_dsprites_render_follows_each_factor():
    base = torch.tensor([[1.0, 1.0, 0.0, 0.5, 0.5]])  # ellipse, full scale, centred

    def img(**change):
        v = base.clone()
        for k, val in change.items():
            v[0, LATENT_NAMES.index(k)] = val
        return render(v, 64)[0, 0]

    centre = img()
    assert img(scale=0.5).sum() < 0.4 * centre.sum()  # area scales with scale^2
    assert not torch.equal(img(orientation=np.pi / 2), centre)  # an ellipse changes when rotated
    assert torch.equal(img(orientation=np.pi), centre) or (img(orientation=np.pi) != centre).sum() < 10
    shifted = img(pos_x=1.0)
    cols = lambda im: (im.sum(0) > 0).nonzero().float().mean()
    assert cols(shifted) > cols(centre) + 10
    rows = lambda im: (im.sum(1) > 0).nonzero().float().mean()
    assert rows(img(pos_y=1.0)) > rows(centre) + 10
    shapes = [img(shape=s) for s in (0, 1, 2)]
    assert all(s.sum() > 20 for s in shapes)
    assert not torch.equal(shapes[0], shapes[1]) and not torch.equal(shapes[1], shapes[2])


def test_dsprites_argument_errors():
    with pytest.raises(DataError, match="n_samples"):
        load_dataset("dsprites", n_samples=1)


def _toy(n=20, classes=10):
    return ArrayDataset(torch.rand(n, 1, 4, 4), torch.arange(n) % classes, [str(i) for i in range(classes)])


def test_class_tasks_select_and_relabel():
    ds = _toy()
    t0, t1 = split_classes(10, 2)
    assert t0.classes == (0, 1, 2, 3, 4) and t1.classes == (5, 6, 7, 8, 9)
    sub = t1.select(ds)
    assert len(sub) == 10 and sub.y.tolist() == [0, 1, 2, 3, 4] * 2 and sub.classes == ["5", "6", "7", "8", "9"]
    assert t1.local_labels(torch.tensor([5, 9, 0])).tolist() == [0, 4, -1]
    assert [t.classes for t in split_classes(10, 3)] == [(0, 1, 2), (3, 4, 5, 6), (7, 8, 9)]


def test_class_partition_errors():
    with pytest.raises(DataError, match="more than one task"):
        class_partition([[0, 1], [1, 2]], 10)
    with pytest.raises(DataError, match="outside 0..9"):
        class_partition([[0, 12]], 10)
    with pytest.raises(DataError, match="cannot split"):
        split_classes(3, 5)


def test_latent_tasks_and_default_task():
    ds = load_dataset("dsprites", n_samples=50, image_size=16, num_orientations=4, num_positions=4).train
    tasks = latent_tasks(ds, ["shape", "pos_x"])
    assert [t.num_classes for t in tasks] == [3, 4]
    assert torch.equal(tasks[1].local_labels(ds.y, ds.latents), ds.latents[:, 3])
    with pytest.raises(DataError, match="unknown latent 'colour'"):
        latent_tasks(ds, ["colour"])
    with pytest.raises(DataError, match="need a dataset with latent factors"):
        latent_tasks(_toy(), ["shape"])
    (only,) = build_tasks(None, _toy())
    assert only.num_classes == 10 and only.classes == tuple(range(10))


def test_random_crop_shifts_content_and_keeps_shape():
    x = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).view(2, 3, 5, 5)
    g = torch.Generator().manual_seed(0)
    out = random_crop(x, 2, g)
    assert out.shape == x.shape
    assert torch.equal(random_crop(x, 0, g), x)
    # every crop is a window of the zero-padded image
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(2):
        assert any(
            torch.equal(out[i], padded[i, :, dy:dy + 5, dx:dx + 5]) for dy in range(5) for dx in range(5)
        )


def test_flip_and_normalize():
    x = torch.rand(64, 1, 3, 3)
    g = torch.Generator().manual_seed(0)
    out = random_hflip(x, g)
    flipped = [(torch.equal(o, xi.flip(-1)) and not torch.equal(o, xi)) for o, xi in zip(out, x)]
    assert 10 < sum(flipped) < 54
    aug = BatchAugment(mean=[0.5], std=[0.25])
    assert torch.allclose(aug(torch.full((1, 1, 2, 2), 0.75), train=False), torch.ones(1, 1, 2, 2))


def test_arraydataset_shape_checks():
    with pytest.raises(DataError, match=r"\[N, C, H, W\] or feature vectors \[N, D\]"):
        ArrayDataset(torch.rand(3, 4, 5), torch.zeros(3), ["a"])  # [N, H, W] needs its channel axis
    with pytest.raises(DataError, match="labels must have shape"):
        ArrayDataset(torch.rand(3, 1, 2, 2), torch.zeros(4), ["a"])
