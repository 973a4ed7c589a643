"""data.py: reading CIFAR folders, the missing-data message, the torchvision transform, the epoch plans and
both training loaders."""
import errno
import os
import pickle
import threading
import time
import urllib.error

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import augment
import data
from conftest import write_fake_cifar


def _known_row():
    """One CIFAR row (3072 bytes) whose every byte says where it is: row[c*1024 + y*32 + x] = (c*7 + y*3 + x) % 256."""
    c, y, x = np.meshgrid(np.arange(3), np.arange(32), np.arange(32), indexing="ij")
    return ((c * 7 + y * 3 + x) % 256).astype(np.uint8).reshape(-1), (c, y, x)


def _replace_first_image(folder, file, row, label, label_key=b"labels"):
    path = os.path.join(folder, file)
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    batch[b"data"][0] = row
    batch[label_key][0] = label
    with open(path, "wb") as f:
        pickle.dump(batch, f)


# ---------------------------------------------------------------------------------------------- reading

def test_load_cifar10_reads_shapes_types_classes_and_pixel_layout(tmp_path):
    folder = write_fake_cifar(str(tmp_path), "cifar10", train_per_batch=12, test=7)
    row, (c, y, x) = _known_row()
    _replace_first_image(folder, "data_batch_1", row, 3)
    # the first image of the second batch follows the 12 images of the first
    _replace_first_image(folder, "data_batch_2", np.full(3072, 201, np.uint8), 9)
    cifar = data.load_cifar("cifar10", str(tmp_path), download=False)
    assert cifar.train_images.shape == (60, 3, 32, 32) and cifar.train_images.dtype == torch.uint8
    assert cifar.test_images.shape == (7, 3, 32, 32) and cifar.test_images.dtype == torch.uint8
    assert cifar.train_labels.shape == (60,) and cifar.train_labels.dtype == torch.int64
    assert cifar.test_labels.dtype == torch.int64
    assert cifar.classes == [f"class{i}" for i in range(10)] and cifar.num_classes == 10
    image = cifar.train_images[0].numpy()
    # the first 1024 bytes are the red plane, row-major: image[c, y, x] = row[c*1024 + y*32 + x]
    np.testing.assert_array_equal(image, row.reshape(3, 32, 32))
    np.testing.assert_array_equal(image, (c * 7 + y * 3 + x) % 256)
    assert image[0, 0, 1] == 1 and image[0, 1, 0] == 3 and image[1, 0, 0] == 7 and image[2, 31, 31] == (14 + 93 + 31)
    assert int(cifar.train_labels[0]) == 3
    assert int(cifar.train_labels[12]) == 9 and (cifar.train_images[12] == 201).all()
    # the fake data's red plane encodes the class (conftest): labels stay with their images
    red = cifar.test_images[:, 0].flatten(1)
    assert torch.equal(red[:, 0].long(), cifar.test_labels * 25)


def test_load_cifar100_uses_fine_labels_and_names(tmp_path):
    folder = write_fake_cifar(str(tmp_path), "cifar100", train_per_batch=8, test=9)
    row, _ = _known_row()
    _replace_first_image(folder, "test", row, 87, label_key=b"fine_labels")
    cifar = data.load_cifar("cifar100", str(tmp_path), download=False)
    assert cifar.train_images.shape == (40, 3, 32, 32) and cifar.train_images.dtype == torch.uint8
    assert cifar.test_images.shape == (9, 3, 32, 32)
    assert cifar.train_labels.dtype == torch.int64 and cifar.num_classes == 100
    assert cifar.classes[0] == "class0" and cifar.classes[99] == "class99"
    np.testing.assert_array_equal(cifar.test_images[0].numpy(), row.reshape(3, 32, 32))
    assert int(cifar.test_labels[0]) == 87


def test_a_copy_re_pickled_with_str_keys_reads_as_the_official_one(tmp_path):
    """Python 3 re-pickles a loaded batch with str keys and names (the official files have bytes)."""
    official, repacked = str(tmp_path / "official"), str(tmp_path / "repacked")
    for root in (official, repacked):
        folder = write_fake_cifar(root)
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        batch = {key.decode(): ([v.decode() for v in value] if key == b"label_names" else value)
                 for key, value in batch.items()}
        with open(path, "wb") as f:
            pickle.dump(batch, f)
    expected, loaded = data.load_cifar("cifar10", official, download=False), data.load_cifar("cifar10", repacked,
                                                                                              download=False)
    assert loaded.classes == expected.classes == [f"class{i}" for i in range(10)]
    for field in ("train_images", "train_labels", "test_images", "test_labels"):
        assert torch.equal(getattr(loaded, field), getattr(expected, field)), field


def test_unknown_dataset_is_a_data_error(tmp_path):
    with pytest.raises(data.DataError, match="unknown dataset 'imagenet'"):
        data.load_cifar("imagenet", str(tmp_path))


def test_missing_folder_without_download_names_the_folder(tmp_path):
    with pytest.raises(data.DataError) as info:
        data.load_cifar("cifar10", str(tmp_path), download=False)
    assert os.path.join(str(tmp_path), "cifar-10-batches-py") in str(info.value)


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_data_dir_that_is_the_batches_folder_itself_names_its_parent(tmp_path, dataset, monkeypatch):
    monkeypatch.setattr(data, "_download", lambda *a: pytest.fail("a download was started"))
    inner = tmp_path / data.FOLDERS[dataset]
    inner.mkdir()
    with pytest.raises(data.DataError) as info:
        data.load_cifar(dataset, str(inner) + "/")
    assert str(info.value) == (f"--data-dir {inner}/ is the {data.FOLDERS[dataset]} folder itself: "
                               f"pass the folder that holds it, {tmp_path}")


class SlowDownload:
    """torchvision's dataset class as `_download` calls it: extracts a fake CIFAR-10 into root, file by file."""

    def __init__(self, seconds_per_file):
        self.seconds_per_file, self.calls = seconds_per_file, []

    def __call__(self, root, train=True, download=False, **kwargs):
        self.calls.append(root)
        if train:  # as an extraction would: the folder first, its files one by one
            unpacked = write_fake_cifar(os.path.join(root, ".unpacked"))
            folder = os.path.join(root, data.FOLDERS["cifar10"])
            os.makedirs(folder)
            for name in sorted(os.listdir(unpacked)):
                time.sleep(self.seconds_per_file)
                os.rename(os.path.join(unpacked, name), os.path.join(folder, name))


def test_ranks_that_start_together_download_once_and_never_read_a_half_written_folder(tmp_path, monkeypatch):
    """Two ranks of a torchrun (threads here) on one empty data folder: the second waits for the first's
    download instead of starting its own into the same files or reading a folder still being extracted."""
    download = SlowDownload(seconds_per_file=0.05)
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", download)
    data_dir, results = str(tmp_path / "data"), {}

    def rank(name, delay):
        time.sleep(delay)
        try:
            results[name] = data.load_cifar("cifar10", data_dir)
        except Exception as error:  # reported by the assertion below
            results[name] = error

    threads = [threading.Thread(target=rank, args=(name, delay)) for name, delay in (("first", 0), ("second", 0.1))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(isinstance(result, data.Cifar) for result in results.values()), results
    assert torch.equal(results["first"].train_images, results["second"].train_images)
    assert len(download.calls) == 2  # one download: its train and test calls
    assert sorted(os.listdir(data_dir)) == [".cifar10-download.lock", "cifar-10-batches-py"]


def test_ranks_on_a_filesystem_without_locks_both_end_with_the_data(tmp_path, monkeypatch):
    """No lock (ENOLCK on some network mounts): both ranks download, and the one that renames second uses the
    first's folder instead of failing."""
    import checkpoint

    def no_locks(file, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
    monkeypatch.setattr(checkpoint.fcntl, "flock", no_locks)
    download = SlowDownload(seconds_per_file=0.05)
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", download)
    data_dir, results = str(tmp_path / "data"), []
    threads = [threading.Thread(target=lambda: results.append(data.load_cifar("cifar10", data_dir)))
               for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(download.calls) == 4 and len(results) == 2  # two downloads, and both ranks have the data
    assert sorted(os.listdir(data_dir)) == [".cifar10-download.lock", "cifar-10-batches-py"]


def test_a_failed_download_leaves_no_folder_to_read_next_time(tmp_path, monkeypatch):
    def broken(root, train=True, download=False, **kwargs):  # extraction stops half-way
        folder = write_fake_cifar(root)
        os.remove(os.path.join(folder, "batches.meta"))
        raise RuntimeError("File not found or corrupted.")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", broken)
    data_dir = str(tmp_path / "data")
    with pytest.raises(data.DataError, match=r"could not download cifar10 .*\(RuntimeError: File not found"):
        data.load_cifar("cifar10", data_dir)
    assert not os.path.exists(os.path.join(data_dir, "cifar-10-batches-py"))
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", SlowDownload(seconds_per_file=0))
    assert data.load_cifar("cifar10", data_dir).num_classes == 10  # the next run downloads again


@pytest.mark.parametrize("dataset, folder, error, existed", [
    ("cifar10", "cifar-10-batches-py", urllib.error.URLError("[Errno -3] Temporary failure in name resolution"), False),
    ("cifar100", "cifar-100-python", OSError(101, "Network is unreachable"), True),
])
def test_missing_folder_when_download_fails_gives_a_one_line_fix(tmp_path, monkeypatch, dataset, folder, error,
                                                                 existed):
    calls = []

    def offline(root, train=True, download=False, **kwargs):
        calls.append((root, train, download))
        raise error

    # no real network access: both dataset classes fail as they would offline
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    monkeypatch.setattr(torchvision.datasets, "CIFAR100", offline)
    data_dir = str(tmp_path / "nowhere")
    if existed:
        os.mkdir(data_dir)
    with pytest.raises(data.DataError) as info:
        data.load_cifar(dataset, data_dir)
    message = str(info.value)
    assert calls and os.path.dirname(calls[0][0]) == data_dir and calls[0][2] is True  # its private folder
    if existed:  # nothing half-written left behind; the ranks' lock file stays
        assert os.listdir(data_dir) == [f".{dataset}-download.lock"]
    else:  # a folder the run made (a mistyped --data-dir, say) is not left behind
        assert not os.path.exists(data_dir)
    assert "\n" not in message
    assert os.path.join(data_dir, folder) in message  # which folder is missing
    assert "--data-dir" in message and "offline" in message  # how to fix it
    assert type(error).__name__ in message
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_partial_folder_names_the_missing_file(tmp_path):
    folder = write_fake_cifar(str(tmp_path), train_per_batch=2, test=2)
    os.remove(os.path.join(folder, "data_batch_3"))
    with pytest.raises(data.DataError, match="data_batch_3 is missing"):
        data.load_cifar("cifar10", str(tmp_path))


# ---------------------------------------------------------------------------------------------- transforms

def test_torchvision_transform_and_normalize_match_torchvision():
    from torchvision import transforms

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    torch.manual_seed(0)
    augmented = data.torchvision_train_transform()(image)
    assert augmented.shape == (3, 32, 32) and augmented.dtype == torch.uint8
    normalized = data.normalize(augmented[None])[0]
    assert normalized.dtype == torch.float32 and normalized.shape == (3, 32, 32)
    recipe_mean, recipe_std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)  # the reference's, written out
    assert (data.MEAN, data.STD) == (recipe_mean, recipe_std)
    reference = transforms.Compose([transforms.ToTensor(), transforms.Normalize(recipe_mean, recipe_std)])
    # normalize on the raw image and on the augmented one, against ToTensor + Normalize of the same pixels
    torch.testing.assert_close(data.normalize(transforms.PILToTensor()(image)[None])[0], reference(image),
                               rtol=0, atol=1e-6)
    augmented_pil = Image.fromarray(augmented.permute(1, 2, 0).numpy())
    torch.testing.assert_close(normalized, reference(augmented_pil), rtol=0, atol=1e-6)
    assert data.normalize(augmented[None], torch.bfloat16).dtype == torch.bfloat16


def test_torchvision_transform_is_the_reference_recipe():
    """Crop with 4-pixel zero padding, flip, AutoAugment's CIFAR-10 policy with grey fill: the same output as
    that pipeline built here, seed by seed (another policy, padding or fill gives other pixels)."""
    from torchvision import transforms

    recipe = transforms.Compose([
        transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
        transforms.AutoAugment(transforms.AutoAugmentPolicy.CIFAR10, fill=[128, 128, 128]), transforms.PILToTensor()])
    ours = data.torchvision_train_transform()
    images = [Image.fromarray(np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8)) for i in range(4)]
    for seed in range(30):
        for image in images:
            torch.manual_seed(seed)
            expected = recipe(image)
            torch.manual_seed(seed)
            assert torch.equal(ours(image), expected), seed


# ---------------------------------------------------------------------------------------------- epoch plans

def test_epoch_batches_is_a_permutation_with_the_last_partial_batch_kept():
    plan = data.EpochBatches(50, 16, seed=0, epoch=1)
    batches = list(plan)
    assert [len(b) for b in batches] == [16, 16, 16, 2] and len(plan) == 4
    assert sorted(i for b in batches for i in b) == list(range(50))
    assert plan.indices().tolist() == [i for b in batches for i in b]
    assert plan.indices().tolist() != list(range(50))  # shuffled


def test_epoch_batches_differ_between_epochs_and_repeat_for_the_same_seed_and_epoch():
    orders = {epoch: data.EpochBatches(50, 16, seed=3, epoch=epoch).indices().tolist() for epoch in (1, 2, 3)}
    assert orders[1] != orders[2] != orders[3] != orders[1]
    assert data.EpochBatches(50, 16, seed=3, epoch=2).indices().tolist() == orders[2]
    assert data.EpochBatches(50, 16, seed=4, epoch=2).indices().tolist() != orders[2]


@pytest.mark.parametrize("num_samples, batch_size", [(50, 16), (64, 8), (7, 4)])
def test_epoch_batches_shards_are_disjoint_and_cover_everything(num_samples, batch_size):
    whole = data.EpochBatches(num_samples, batch_size, seed=0, epoch=5)
    ranks = [data.EpochBatches(num_samples, batch_size, seed=0, epoch=5, rank=r, world=2) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(whole)  # every rank takes the same number of steps
    shards = [set(r.indices().tolist()) for r in ranks]
    assert not shards[0] & shards[1]
    assert shards[0] | shards[1] == set(range(num_samples))
    for step, batch in enumerate(whole.batches):  # each global batch is split between the ranks
        assert torch.equal(torch.cat([ranks[0].batches[step], ranks[1].batches[step]]), batch)


# ---------------------------------------------------------------------------------------------- loaders

def _label_coded(n):
    """Images whose every pixel is the image's label, so a batch shows whether labels follow their images."""
    labels = torch.arange(n, dtype=torch.int64)
    images = labels.to(torch.uint8).view(n, 1, 1, 1).expand(n, 3, 32, 32).contiguous()
    return images, labels


def test_device_train_loader_keeps_labels_with_images_and_is_deterministic():
    images, labels = _label_coded(50)
    loader = data.DeviceTrainLoader(images, labels, 16, seed=0, device="cpu", augment=False)
    assert loader.steps() == 4
    batches = list(loader.epoch(1))
    assert [len(y) for _, y in batches] == [16, 16, 16, 2]
    for x, y in batches:
        assert x.dtype == torch.uint8 and x.shape[1:] == (3, 32, 32) and y.dtype == torch.int64
        assert torch.equal(x.long(), y.view(-1, 1, 1, 1).expand_as(x))
    seen = torch.cat([y for _, y in batches])
    assert sorted(seen.tolist()) == list(range(50))
    assert torch.equal(seen, data.EpochBatches(50, 16, 0, 1).indices())
    again = torch.cat([y for _, y in data.DeviceTrainLoader(images, labels, 16, 0, "cpu", augment=False).epoch(1)])
    assert torch.equal(again, seen)
    assert not torch.equal(torch.cat([y for _, y in loader.epoch(2)]), seen)


def test_device_train_loader_augments_deterministically_per_seed_and_epoch():
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8, generator=generator)
    labels = torch.arange(20)

    def epoch(seed, number):
        loader = data.DeviceTrainLoader(images, labels, 8, seed=seed, device="cpu", chunk=7)
        batches = list(loader.epoch(number))
        return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])

    x, y = epoch(0, 1)
    assert x.dtype == torch.uint8 and x.shape == (20, 3, 32, 32)
    assert not torch.equal(x, images[y])  # augmented
    x2, y2 = epoch(0, 1)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    x3, _ = epoch(0, 2)
    assert not torch.equal(x3, x)
    # the recipe's augmentation with grey fill, drawn chunk by chunk from the epoch's seed
    generator = torch.Generator().manual_seed(data.epoch_seed(0, 1, rank=0))
    expected = torch.cat([augment.train_augment(part, generator=generator, fill=128) for part in images[y].split(7)])
    assert torch.equal(x, expected)
    # rank 1 of 2 augments its own share with its own stream, not rank 0's
    shard = list(data.DeviceTrainLoader(images, labels, 8, seed=0, device="cpu", chunk=7, rank=1, world=2).epoch(1))
    x1, y1 = torch.cat([x for x, _ in shard]), torch.cat([y for _, y in shard])
    generator = torch.Generator().manual_seed(data.epoch_seed(0, 1, rank=1))
    expected = torch.cat([augment.train_augment(part, generator=generator) for part in images[y1].split(7)])
    assert torch.equal(x1, expected)


@pytest.mark.parametrize("workers", [0, 2])
def test_torchvision_train_loader_yields_every_sample_deterministically(workers):
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8, generator=generator)
    labels = torch.arange(20)

    def epoch(number):
        loader = data.TorchvisionTrainLoader(images, labels, 8, seed=0, workers=workers, pin_memory=False)
        assert loader.steps() == 3
        batches = list(loader.epoch(number))
        assert [len(y) for _, y in batches] == [8, 8, 4]
        return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])

    x, y = epoch(1)
    assert x.dtype == torch.uint8 and x.shape == (20, 3, 32, 32)
    assert torch.equal(y, data.EpochBatches(20, 8, 0, 1).indices())  # every sample once, in the plan's order
    x2, y2 = epoch(1)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    x3, y3 = epoch(2)
    assert not torch.equal(y3, y) and not torch.equal(x3, x)
