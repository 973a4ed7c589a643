"""CIFAR-10 / CIFAR-100 as uint8 tensors, and the two training pipelines that feed them.

- `load_cifar(name, data_dir)` reads the standard extracted folder (`cifar-10-batches-py`,
  `cifar-100-python`) when it is there, without checking the official archive's checksums, so
  copies such as ../shared/data work; otherwise torchvision downloads and verifies it.
- `EpochBatches` decides, for one epoch, which images each step sees: one permutation per epoch
  (shared by all ranks), cut into global batches (the last, partial one kept, as a DataLoader
  with drop_last=False does), each split evenly across the ranks of a distributed run.
- `torchvision` pipeline (the reference): PIL images through RandomCrop(32, 4), horizontal flip
  and torchvision's AutoAugment (CIFAR-10 policy, grey fill), in DataLoader worker processes.
- `device` pipeline (the default): the whole training set stays on the training device and every
  epoch is augmented there in large batches with per-image randomness (augment.py).
Both hand the trainer uint8 image batches; `normalize` turns them into model inputs on the device.
"""
import contextlib
import os
import pickle
import shutil
import tempfile
from dataclasses import dataclass

import numpy as np
import torch

from augment import FILL, train_augment
from checkpoint import hold_lock

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
NUM_CLASSES = {"cifar10": 10, "cifar100": 100}
DATASETS = tuple(NUM_CLASSES)
PIPELINES = ("device", "torchvision")

FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
_URLS = {"cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
         "cifar100": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"}


class DataError(Exception):
    """Missing or malformed data; the message says what is wrong and how to fix it."""


@dataclass
class Cifar:
    train_images: torch.Tensor  # uint8 [N, 3, 32, 32]
    train_labels: torch.Tensor  # int64 [N]
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: list

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def load_cifar(name: str, data_dir: str, download: bool = True) -> Cifar:
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")
    folder = os.path.join(data_dir, FOLDERS[name])
    if not os.path.isdir(folder):
        if os.path.basename(os.path.normpath(data_dir)) == FOLDERS[name]:  # a download would nest a second copy
            raise DataError(f"--data-dir {data_dir} is the {FOLDERS[name]} folder itself: pass the folder that "
                            f"holds it, {os.path.dirname(os.path.normpath(data_dir)) or '.'}")
        if not download:
            raise DataError(f"{folder} does not exist: put the extracted {FOLDERS[name]} folder there")
        _download(name, data_dir)
    return _read_folder(name, folder)


def _download(name: str, data_dir: str) -> None:
    """torchvision downloads and extracts into a private folder, renamed into place when complete: a data folder
    is never seen half-written. The ranks of a torchrun take turns on a lock file in data_dir, so the first
    downloads and the others, started with it, find the folder there when their turn comes. A data_dir this call
    made is removed again if the download fails and nothing else was put there (a mistyped --data-dir)."""
    import torchvision
    dataset_class = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    folder = os.path.join(data_dir, FOLDERS[name])
    lock, made = os.path.join(data_dir, f".{name}-download.lock"), not os.path.isdir(data_dir)
    try:
        os.makedirs(data_dir, exist_ok=True)
        with hold_lock(lock):
            if os.path.isdir(folder):  # another rank's download
                return
            staging = tempfile.mkdtemp(prefix=f".{name}-download-", dir=data_dir)
            try:
                for train in (True, False):
                    dataset_class(staging, train=train, download=True)
                try:
                    os.rename(os.path.join(staging, FOLDERS[name]), folder)
                except OSError:
                    if not os.path.isdir(folder):
                        raise  # else another rank, unlocked (a filesystem without locks), renamed its copy first
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    except Exception as error:  # urllib/socket/SSL errors differ by platform; all mean "no data"
        if made:
            with contextlib.suppress(OSError):  # another rank's files, or its removal first: the folder stays
                if os.listdir(data_dir) == [os.path.basename(lock)]:
                    os.remove(lock)
                os.rmdir(data_dir)
        raise DataError(f"could not download {name} into {data_dir} ({type(error).__name__}: {error}); "
                        f"when offline, download {_URLS[name]} elsewhere and extract it so that "
                        f"{folder} exists, or pass --data-dir DIR where DIR holds {FOLDERS[name]}/") from None


def _read_folder(name: str, folder: str) -> Cifar:
    if name == "cifar10":
        train_files = [f"data_batch_{i}" for i in range(1, 6)]
        test_files, meta_file, label_key, names_key = ["test_batch"], "batches.meta", b"labels", b"label_names"
    else:
        train_files, test_files = ["train"], ["test"]
        meta_file, label_key, names_key = "meta", b"fine_labels", b"fine_label_names"
    meta = _unpickle(folder, meta_file)
    try:
        classes = [c if isinstance(c, str) else c.decode() for c in meta[names_key]]
    except (KeyError, TypeError, AttributeError, UnicodeDecodeError):
        raise DataError(f"{os.path.join(folder, meta_file)} has no list of class names under {names_key!r}: "
                        f"replace it with the file from the official archive") from None
    train_images, train_labels = _read_batches(folder, train_files, label_key, len(classes))
    test_images, test_labels = _read_batches(folder, test_files, label_key, len(classes))
    if not len(train_images) or not len(test_images):
        raise DataError(f"{folder} holds {len(train_images)} training and {len(test_images)} test images: "
                        f"both must be non-empty")
    return Cifar(train_images, train_labels, test_images, test_labels, classes)


def _unpickle(folder: str, file: str) -> dict:
    path = os.path.join(folder, file)
    if not os.path.isfile(path):
        raise DataError(f"{path} is missing: the data folder is incomplete, extract the full archive again "
                        f"or delete {folder} so it is downloaded")
    try:
        with open(path, "rb") as f:
            loaded = _ArrayUnpickler(f, encoding="bytes").load()
        if isinstance(loaded, dict):  # a copy re-pickled by Python 3 has str keys, the official one bytes
            loaded = {key.encode() if isinstance(key, str) else key: value for key, value in loaded.items()}
        return loaded
    except _RefusedPickle as error:
        raise DataError(f"{path} is not a CIFAR batch ({error}); nothing in it was run: "
                        f"replace it with the file from the official archive") from None
    except pickle.UnpicklingError as error:
        raise DataError(f"{path} is not a CIFAR batch ({error}): "
                        f"replace it with the file from the official archive") from None
    except Exception as error:
        raise DataError(f"{path} is not a readable CIFAR batch ({type(error).__name__}): "
                        f"replace it with the file from the official archive") from None


class _RefusedPickle(pickle.UnpicklingError):
    """A pickle that names code to import."""


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles CIFAR batches (dicts, lists, numpy arrays) and refuses every other class or function,
    so a tampered batch file cannot run code when it is read."""
    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")} | {
        (module, name) for module in ("numpy.core.multiarray", "numpy._core.multiarray")
        for name in ("_reconstruct", "scalar")} | {
        (module, "_frombuffer") for module in ("numpy.core.numeric", "numpy._core.numeric")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise _RefusedPickle(f"it would import {module}.{name}, which a CIFAR batch never needs")
        return super().find_class(module, name)


def _read_batches(folder: str, files: list, label_key: bytes, num_classes: int):
    images, labels = [], []
    for file in files:
        batch = _unpickle(folder, file)
        path = os.path.join(folder, file)
        if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
            raise DataError(f"{path} has no {b'data'!r} or {label_key!r} entry: not a CIFAR batch file")
        data = np.asarray(batch[b"data"])
        try:
            batch_labels = np.asarray(batch[label_key]).reshape(-1)
            integers = not batch_labels.size or batch_labels.dtype.kind in "iu"  # 5.5 or "cat" or 2**64: not
        except ValueError:  # a ragged list
            integers = False
        if not integers:
            raise DataError(f"{path}: its {label_key!r} are not integer class labels")
        batch_labels = batch_labels.astype(np.int64)  # a uint64 too large for it turns negative: out of range below
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(batch_labels):
            raise DataError(f"{path} holds data of shape {data.shape} and dtype {data.dtype} with "
                            f"{len(batch_labels)} labels; expected uint8 [N, 3072] with N labels")
        if len(batch_labels) and (batch_labels.min() < 0 or batch_labels.max() >= num_classes):
            raise DataError(f"{path} has labels outside 0..{num_classes - 1} "
                            f"(found {batch_labels.min()}..{batch_labels.max()})")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(batch_labels)
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


def normalize(images: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """uint8 [N, 3, H, W] -> (x/255 - mean) / std, the same as ToTensor() + Normalize(MEAN, STD)."""
    mean = torch.tensor(MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=images.device).view(1, 3, 1, 1)
    return ((images.float() / 255 - mean) / std).to(dtype)


def epoch_seed(seed: int, epoch: int, rank: int = -1) -> int:
    """A seed for one epoch (rank -1: shared by all ranks). Everything random about an epoch's data
    derives from it, so a resumed run sees exactly the data an uninterrupted one would have."""
    return (seed * 1_000_003 + epoch * 1_009 + rank + 1) % (2 ** 63)


def steps_per_epoch(num_samples: int, batch_size: int) -> int:
    """Full batches and the last partial one, which is kept (as the reference's DataLoader keeps it)."""
    return -(-num_samples // batch_size)


class EpochBatches:
    """The per-step index lists of one epoch for one rank."""

    def __init__(self, num_samples: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world: int = 1):
        generator = torch.Generator().manual_seed(epoch_seed(seed, epoch))
        order = torch.randperm(num_samples, generator=generator)
        self.batches = [torch.tensor_split(order[i:i + batch_size], world)[rank]
                        for i in range(0, num_samples, batch_size)]

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        return iter(b.tolist() for b in self.batches)

    def indices(self) -> torch.Tensor:
        return torch.cat(self.batches)


class DeviceTrainLoader:
    """The training set as uint8 tensors on `device`; each epoch augmented there in one pass."""

    def __init__(self, images, labels, batch_size, seed, device, augment=True, rank=0, world=1, chunk=10_000):
        self.images = images.to(device)
        self.labels = labels.to(device)
        self.num_samples = len(images)
        self.batch_size, self.seed, self.device = batch_size, seed, torch.device(device)
        self.augment, self.rank, self.world, self.chunk = augment, rank, world, chunk

    def steps(self) -> int:
        return steps_per_epoch(self.num_samples, self.batch_size)

    def epoch(self, epoch: int):
        """Yields (uint8 images, labels) batches of this rank for `epoch`."""
        plan = EpochBatches(len(self.images), self.batch_size, self.seed, epoch, self.rank, self.world)
        order = plan.indices().to(self.device)
        images, labels = self.images[order], self.labels[order]
        if self.augment:
            generator = torch.Generator(self.device).manual_seed(epoch_seed(self.seed, epoch, self.rank))
            # Chunks bound augment.py's temporary tensors. Draws are made chunk by chunk, so another chunk
            # size gives a seed other augmentations.
            images = torch.cat([train_augment(part, generator=generator)
                                for part in images.split(self.chunk)])
        start = 0
        for batch in plan.batches:
            yield images[start:start + len(batch)], labels[start:start + len(batch)]
            start += len(batch)


def torchvision_train_transform():
    """The reference's per-image pipeline, on PIL images; ends in a uint8 tensor (see `normalize`)."""
    from torchvision import transforms
    return transforms.Compose([
        transforms.RandomCrop(32, padding=4),
        transforms.RandomHorizontalFlip(),
        transforms.AutoAugment(transforms.AutoAugmentPolicy.CIFAR10, fill=[FILL] * 3),
        transforms.PILToTensor(),
    ])


class _PILDataset(torch.utils.data.Dataset):
    def __init__(self, images, labels, transform):
        self.images = images.permute(0, 2, 3, 1).contiguous().numpy()  # HWC for PIL
        self.labels = labels
        self.transform = transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        from PIL import Image
        return self.transform(Image.fromarray(self.images[index])), self.labels[index]


def _collate(samples):
    """default_collate, and the empty batch of a rank whose share of a last partial global batch is empty."""
    if not samples:
        return torch.zeros(0, 3, 32, 32, dtype=torch.uint8), torch.zeros(0, dtype=torch.int64)
    return torch.utils.data.default_collate(samples)


class TorchvisionTrainLoader:
    """The reference pipeline: a DataLoader with worker processes running `torchvision_train_transform`."""

    def __init__(self, images, labels, batch_size, seed, workers, pin_memory, rank=0, world=1):
        self.dataset = _PILDataset(images, labels, torchvision_train_transform())
        self.num_samples, self.batch_size, self.seed = len(images), batch_size, seed
        self.workers, self.pin_memory, self.rank, self.world = workers, pin_memory, rank, world

    def steps(self) -> int:
        return steps_per_epoch(self.num_samples, self.batch_size)

    def epoch(self, epoch: int):
        plan = EpochBatches(self.num_samples, self.batch_size, self.seed, epoch, self.rank, self.world)
        seed = epoch_seed(self.seed, epoch, self.rank)
        # The generator seeds each worker process; with no workers the transforms draw in this process instead.
        loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=plan, num_workers=self.workers,
                                             pin_memory=self.pin_memory, generator=torch.Generator().manual_seed(seed),
                                             collate_fn=_collate)
        yield from (loader if self.workers else self._drawn_apart(loader, seed))

    @staticmethod
    def _drawn_apart(loader, seed):
        """The batches of a loader without workers, whose transforms draw from the global CPU RNG, each fetched
        on an RNG state of its own (seeded per epoch): dropout, which draws from that RNG too, then neither
        changes the augmentation nor is changed by it, so a resume that skips steps repeats both."""
        state, batches = torch.Generator().manual_seed(seed).get_state(), iter(loader)
        while True:
            with torch.random.fork_rng(devices=[]):
                torch.set_rng_state(state)
                batch = next(batches, None)
                state = torch.get_rng_state()
            if batch is None:
                return
            yield batch


def default_workers() -> int:
    return max(0, min(8, (os.cpu_count() or 1) - 1))
