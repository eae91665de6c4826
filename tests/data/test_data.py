"""Datasets: the bundled digits, ImageFolder, CIFAR files, deterministic batches."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from vmoe_torch.config.experiment import DataConfig
from vmoe_torch.data import build_datasets, make_cluttered_digits, step_batches
from vmoe_torch.data.pipeline import ImageDataset


def test_digits_deterministic_and_split_by_source():
    a_tr, a_te = make_cluttered_digits(seed=3, train_renders=1, test_renders=2)
    b_tr, _ = make_cluttered_digits(seed=3, train_renders=1, test_renders=2)
    c_tr, _ = make_cluttered_digits(seed=4, train_renders=1, test_renders=2)
    assert torch.equal(a_tr.images, b_tr.images)
    assert not torch.equal(a_tr.images, c_tr.images)
    assert set(a_tr.source.tolist()).isdisjoint(a_te.source.tolist())
    assert len(set(a_tr.source.tolist()) | set(a_te.source.tolist())) == 1797
    assert a_te.images.shape == (2 * 539, 3, 32, 32) and a_te.images.dtype == torch.uint8
    # The digit occupies a minority of the 4x4 patches: most patches are background/clutter.
    patches = a_tr.images[:200, 0].float().unfold(1, 8, 8).unfold(2, 8, 8).mean((-1, -2))
    assert float((patches > 40).float().mean()) < 0.6


def test_step_batches_are_a_function_of_the_step():
    tr, _ = make_cluttered_digits(train_renders=1, test_renders=1)
    from torchvision.transforms import v2
    ds = ImageDataset(tr, 10, v2.RandAugment(2, 9), seed=1)
    full = [b for b in step_batches(ds, 8, seed=5, start=0, stop=6)]
    tail = [b for b in step_batches(ds, 8, seed=5, start=3, stop=6)]
    for (xa, ya), (xb, yb) in zip(full[3:], tail):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # Every example is seen once per epoch.
    n = len(ds)
    seen = [i for b in step_batches(ImageDataset(tr, 10), 7, 0, 0, n // 7) for i in b[1].tolist()]
    assert len(seen) == (n // 7) * 7


def test_imagefolder(tmp_path):
    from PIL import Image
    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            d = tmp_path / split / cls
            d.mkdir(parents=True)
            for i in range(3):
                Image.fromarray(np.random.randint(0, 255, (20, 24, 3), np.uint8)).save(d / f"{i}.png")
    tr, te = build_datasets(DataConfig(name="imagefolder", path=str(tmp_path), image_size=16))
    assert tr.num_classes == 2 and len(tr) == 6 and len(te) == 6
    x, y = te[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.uint8 and y == 0


def test_cifar_files(tmp_path, monkeypatch):
    import torchvision.datasets as tvd
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(root / name, "wb") as f:
            pickle.dump({"data": rng.integers(0, 255, (4, 3072), dtype=np.uint8),
                         "labels": rng.integers(0, 10, 4).tolist()}, f)
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [str(i) for i in range(10)]}, f)
    # Real archives carry md5 sums that torchvision checks; these test files do not.
    import torchvision.datasets.cifar as cifar_mod
    monkeypatch.setattr(tvd.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(cifar_mod, "check_integrity", lambda *a, **k: True)
    tr, te = build_datasets(DataConfig(name="cifar10", path=str(tmp_path), image_size=32))
    assert len(tr) == 20 and len(te) == 4 and tr.num_classes == 10
    assert tr[0][0].shape == (3, 32, 32)


def test_missing_dataset_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_datasets(DataConfig(name="cifar10", path=str(tmp_path / "none")))
    with pytest.raises(FileNotFoundError, match="train/"):
        build_datasets(DataConfig(name="imagefolder", path=str(tmp_path)))


def test_huggingface_dataset_from_disk(tmp_path):
    hf = pytest.importorskip("datasets")
    from PIL import Image
    rng = np.random.default_rng(0)
    def split(n):
        return hf.Dataset.from_dict(
            {"image": [Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)) for _ in range(n)],
             "label": [i % 3 for i in range(n)]},
            features=hf.Features({"image": hf.Image(), "label": hf.ClassLabel(num_classes=3)}))
    hf.DatasetDict({"train": split(6), "test": split(4)}).save_to_disk(str(tmp_path / "ds"))
    tr, te = build_datasets(DataConfig(name="hf", path=str(tmp_path / "ds"), image_size=16))
    assert tr.num_classes == 3 and len(tr) == 6 and len(te) == 4
    x, y = te[1]
    assert x.shape == (3, 16, 16) and x.dtype == torch.uint8 and y == 1


def test_the_bundled_digits_are_scikit_learns_without_importing_it():
    """The digits are read from the file scikit-learn ships, as its
    load_digits reads it: the same arrays, and no scikit-learn import (about
    a second for every training process)."""
    import subprocess
    import sys

    import numpy as np
    from sklearn.datasets import load_digits

    from vmoe_torch.data.digits import _load_digits
    images, labels = _load_digits()
    reference = load_digits()
    assert np.array_equal(images, reference.images.astype(np.float32) / 16.0)
    assert np.array_equal(labels, reference.target)
    code = ("import sys; from vmoe_torch.data.digits import _load_digits; _load_digits(); "
            "print('sklearn' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
