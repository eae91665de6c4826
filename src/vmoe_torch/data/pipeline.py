"""Datasets behind one interface, deterministic step batches, augmentation.

Every dataset yields (uint8 image (3, H, W), label). `step_batches` gives the
batch of training step s as a pure function of (seed, s): epoch e visits the
examples in the permutation seeded by (seed, e), and each example's random
augmentation is seeded by (seed, s, index). Resuming at step s therefore
replays exactly the batches an uninterrupted run would have seen.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Iterator, Optional

import torch
from torch.utils.data import DataLoader, Dataset

from ..config.experiment import DataConfig
from ..utils.seeds import derive_seed
from .digits import make_cluttered_digits


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1] (the reference's value_range(-1, 1))."""
    return images.float().div_(127.5).sub_(1.0)


class ImageDataset(Dataset):
    """Wraps a source with `__getitem__(i) -> (image, label)` and an optional
    per-example transform (uint8 tensor -> uint8 tensor)."""

    def __init__(self, source: Any, num_classes: int, transform: Optional[Callable] = None,
                 seed: int = 0, name: str = "") -> None:
        self.source, self.num_classes, self.transform, self.seed = source, num_classes, transform, seed
        self.name = name

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, step = key if isinstance(key, tuple) else (key, -1)
        try:
            image, label = self.source[index]
        except (OSError, ValueError) as e:  # PIL: truncated or not an image
            raise ValueError(f"{self.name}: cannot read example {index}{_file_of(self.source, index)} "
                             f"({type(e).__name__}: {e}). Replace or remove that file, then rerun the same "
                             "command: the run resumes from its last checkpoint.") from e
        if self.transform is not None:
            if step >= 0:  # training: the augmentation is a function of (seed, step, index)
                torch.manual_seed(derive_seed(self.seed, step) * 1_000_033 + index)
            image = self.transform(image)
        return image, label


def _epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 10_007 + epoch))


class StepBatchSampler:
    """Yields [(index, step), ...] for steps start..stop-1 (see module doc)."""

    def __init__(self, n: int, batch_size: int, seed: int, start: int, stop: int,
                 rank: int = 0, world: int = 1) -> None:
        if n < 1:
            raise ValueError("The training set is empty.")
        if batch_size % world:
            raise ValueError(f"The batch size {batch_size} must be a multiple of the world size {world}.")
        self.n, self.batch_size, self.seed, self.start, self.stop = n, batch_size, seed, start, stop
        self.rank, self.world = rank, world

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        cache: dict[int, torch.Tensor] = {}
        for step in range(self.start, self.stop):
            first = step * self.batch_size
            batch = []
            for pos in range(first, first + self.batch_size):
                epoch, offset = divmod(pos, self.n)
                if epoch not in cache:
                    cache = {epoch: _epoch_order(self.n, self.seed, epoch)}
                batch.append((int(cache[epoch][offset]), step))
            share = self.batch_size // self.world   # rank r takes images [r*B/W, (r+1)*B/W)
            yield batch[self.rank * share:(self.rank + 1) * share]


def _collate(items: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.stack([torch.as_tensor(i) for i, _ in items])
    labels = torch.tensor([int(label) for _, label in items], dtype=torch.long)
    return images, labels


def step_batches(ds: ImageDataset, batch_size: int, seed: int, start: int, stop: int,
                 num_workers: int = 0, rank: int = 0, world: int = 1) -> DataLoader:
    """Training batches for steps [start, stop): (uint8 images, labels);
    with `world` > 1, this rank's share of each global batch."""
    sampler = StepBatchSampler(len(ds), batch_size, seed, start, stop, rank, world)
    return DataLoader(ds, batch_sampler=sampler, num_workers=num_workers, collate_fn=_collate,
                      persistent_workers=False)


def eval_batches(ds: Dataset, batch_size: int, num_workers: int = 0) -> DataLoader:
    """Evaluation batches in a fixed order with a fixed batch size (routing at
    low capacity depends on which images share a group)."""
    return DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      collate_fn=_collate)


# ------------------------------------------------------------------ builders
def _train_transform(cfg: DataConfig) -> Optional[Callable]:
    from torchvision.transforms import v2
    ops: list[Callable] = []
    if cfg.hflip:
        ops.append(v2.RandomHorizontalFlip())
    if cfg.randaugment:
        num_ops, magnitude = cfg.randaugment
        ops.append(v2.RandAugment(num_ops=num_ops, magnitude=magnitude))
    return v2.Compose(ops) if ops else None


def _pil_transform(size: int, train: bool) -> Callable:
    from torchvision.transforms import v2
    if train:
        ops = [v2.PILToTensor(), v2.RandomResizedCrop(size, antialias=True)]
    else:
        ops = [v2.PILToTensor(), v2.Resize(size, antialias=True), v2.CenterCrop(size)]
    return v2.Compose(ops + [v2.Lambda(lambda t: t.expand(3, -1, -1) if t.shape[0] == 1 else t[:3])])


def _file_of(source: Any, index: int) -> str:
    """", file PATH" for sources that read files (torchvision's ImageFolder)."""
    while source is not None and not hasattr(source, "samples"):
        source = getattr(source, "source", None)
    return f", file {source.samples[index][0]!r}" if source is not None else ""


class _Mapped:
    def __init__(self, source: Any, fn: Callable) -> None:
        self.source, self.fn = source, fn

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int):
        image, label = self.source[i]
        return self.fn(image), label


def _require_dir(path: Optional[str], what: str) -> str:
    if not path or not os.path.isdir(path):
        raise FileNotFoundError(f"{what}: dataset directory {path!r} does not exist. Set data.path "
                                "to a directory on local disk (nothing is downloaded).")
    return path


def build_datasets(cfg: DataConfig) -> tuple[ImageDataset, ImageDataset]:
    """(train, test) datasets of uint8 (3, S, S) images for `cfg`."""
    train_tf = _train_transform(cfg)
    if cfg.name == "digits":
        train, test = make_cluttered_digits(cfg.seed, cfg.image_size, cfg.train_renders,
                                            cfg.test_renders, cfg.clutter, cfg.test_fraction)
        return (ImageDataset(train, 10, train_tf, cfg.seed, "digits/train"),
                ImageDataset(test, 10, None, cfg.seed, "digits/test"))
    if cfg.name == "imagefolder":
        from torchvision.datasets import ImageFolder
        root = _require_dir(cfg.path, "imagefolder")
        test_dir = next((os.path.join(root, d) for d in ("test", "val", "validation")
                         if os.path.isdir(os.path.join(root, d))), None)
        if not os.path.isdir(os.path.join(root, "train")) or test_dir is None:
            raise FileNotFoundError(f"imagefolder: {root!r} must contain train/ and test/ (or val/) "
                                    "folders with one subfolder per class.")
        tr = ImageFolder(os.path.join(root, "train"))
        te = ImageFolder(test_dir)
        if tr.classes != te.classes:
            raise ValueError(f"imagefolder: train classes {tr.classes} differ from test classes {te.classes}.")
        return (ImageDataset(_Mapped(tr, _pil_transform(cfg.image_size, True)), len(tr.classes), train_tf,
                             cfg.seed, "imagefolder/train"),
                ImageDataset(_Mapped(te, _pil_transform(cfg.image_size, False)), len(te.classes), None,
                             cfg.seed, "imagefolder/test"))
    if cfg.name in ("cifar10", "cifar100"):
        from torchvision import datasets as tvd
        root = _require_dir(cfg.path, cfg.name)
        cls = tvd.CIFAR10 if cfg.name == "cifar10" else tvd.CIFAR100
        try:
            tr, te = cls(root, train=True, download=False), cls(root, train=False, download=False)
        except RuntimeError as e:  # torchvision's message suggests download=True, which does not apply here
            folder = "cifar-10-batches-py" if cfg.name == "cifar10" else "cifar-100-python"
            raise FileNotFoundError(f"{cfg.name}: no valid dataset files under {root!r}: expected the "
                                    f"extracted python-version archive, {root}/{folder}/. Nothing is "
                                    "downloaded.") from e
        n = 10 if cfg.name == "cifar10" else 100
        return (ImageDataset(_Mapped(tr, _pil_transform(cfg.image_size, True)), n, train_tf, cfg.seed,
                             f"{cfg.name}/train"),
                ImageDataset(_Mapped(te, _pil_transform(cfg.image_size, False)), n, None, cfg.seed,
                             f"{cfg.name}/test"))
    if cfg.name == "hf":
        return _hf_datasets(cfg, train_tf)
    raise ValueError(f"Unknown data.name {cfg.name!r}.")


def _hf_datasets(cfg: DataConfig, train_tf: Optional[Callable]) -> tuple[ImageDataset, ImageDataset]:
    try:
        import datasets as hf
    except ImportError as e:
        raise ImportError("data.name='hf' needs the Hugging Face `datasets` package: "
                          "pip install 'vmoe-torch[hf]'.") from e
    root = _require_dir(cfg.path, "hf")
    dd = hf.load_from_disk(root)
    for split in (cfg.train_split, cfg.test_split):
        if split not in dd:
            raise ValueError(f"hf: split {split!r} not in {list(dd)}; set data.train_split/test_split.")
    feat = dd[cfg.train_split].features[cfg.label_key]
    n = getattr(feat, "num_classes", None) or int(max(dd[cfg.train_split][cfg.label_key])) + 1

    def wrap(split: str, train: bool):
        tf = _pil_transform(cfg.image_size, train)
        ds = dd[split]

        class Src:
            def __len__(self):
                return len(ds)

            def __getitem__(self, i):
                row = ds[int(i)]
                return tf(row[cfg.image_key].convert("RGB")), int(row[cfg.label_key])
        return Src()

    return (ImageDataset(wrap(cfg.train_split, True), n, train_tf, cfg.seed, "hf/train"),
            ImageDataset(wrap(cfg.test_split, False), n, None, cfg.seed, "hf/test"))
