"""--write-interval: metrics.csv every epoch; results.png, last.pt and best.pt after the first and last epochs
and when the interval has passed; an improvement made between writes reaches best.pt later, or best_epoch_N.pt
when an error stops the run first."""
import errno
import os

import pytest
import torch

import checkpoint
import main
import plots
import trainer
from conftest import TINY_MODEL, one_line_error


@pytest.fixture
def recorded(monkeypatch):
    """Every checkpoint save (name, epoch) and every results.png drawing (rows), in order."""
    saves, plotted = [], []
    real_save, real_plot = checkpoint.save, plots.plot_results

    def save(state, path):
        saves.append((os.path.basename(path), state["epoch"]))
        real_save(state, path)

    def plot(history, path, compare=None):
        plotted.append(len(history))
        real_plot(history, path, compare)

    monkeypatch.setattr(checkpoint, "save", save)
    monkeypatch.setattr(plots, "plot_results", plot)
    return saves, plotted


def run(fake_cifar10, out_dir, *flags):
    return main.main(["--data-dir", fake_cifar10, "--out-dir", str(out_dir), "--epochs", "4", "--warmup-epochs", "1",
                      "--batch-size", "40", "--device", "cpu", *TINY_MODEL, *flags])


def scripted_accuracies(monkeypatch, accuracies):
    """Test accuracy per epoch as given (a nan: a non-finite test loss); the real evaluation for the report."""
    real = trainer.Trainer.evaluate
    calls = iter(accuracies)

    def evaluate(self, images, labels, sharded=True):
        loss, _, predictions = real(self, images, labels, sharded)
        acc = next(calls, 0.0)
        return (float("nan") if acc != acc else loss), acc, predictions

    monkeypatch.setattr(trainer.Trainer, "evaluate", evaluate)


def test_long_interval_writes_after_the_first_and_last_epochs(fake_cifar10, tmp_path, recorded, monkeypatch):
    saves, plotted = recorded
    scripted_accuracies(monkeypatch, [10.0, 30.0, 20.0, 15.0])
    assert run(fake_cifar10, tmp_path, "--write-interval", "1000", "--save-every", "2") == 0
    # epoch 2's improvement waits in memory and reaches best.pt at the next write (epoch 4, the last), before the
    # last.pt that names it; --save-every 2 writes epochs 2 and 4 whatever the interval
    assert saves == [("best.pt", 1), ("last.pt", 1), ("epoch_2.pt", 2), ("best.pt", 2), ("last.pt", 4),
                     ("epoch_4.pt", 4)]
    assert plotted == [1, 4]
    assert len(open(tmp_path / "metrics.csv").read().splitlines()) == 5  # header + every epoch
    best = checkpoint.load(str(tmp_path / "checkpoints" / "best.pt"))
    assert best["epoch"] == 2 and best["best_acc"] == 30.0 and len(best["history"]) == 2
    last = checkpoint.load(str(tmp_path / "checkpoints" / "last.pt"))
    assert not torch.equal(best["model"]["head.weight"], last["model"]["head.weight"])  # a snapshot, not the live weights


def test_zero_interval_writes_every_epoch(fake_cifar10, tmp_path, recorded, monkeypatch):
    saves, plotted = recorded
    scripted_accuracies(monkeypatch, [10.0, 30.0, 20.0, 40.0])
    assert run(fake_cifar10, tmp_path, "--write-interval", "0") == 0
    assert saves == [("best.pt", 1), ("last.pt", 1), ("best.pt", 2), ("last.pt", 2), ("last.pt", 3),
                     ("best.pt", 4), ("last.pt", 4)]
    assert plotted == [1, 2, 3, 4]


def test_a_run_that_never_improves_on_0_percent_still_has_a_best_pt_and_a_tie_is_no_improvement(
        fake_cifar10, tmp_path, recorded, monkeypatch):
    saves, _ = recorded
    scripted_accuracies(monkeypatch, [0.0, 0.0, 0.0, 0.0])
    assert run(fake_cifar10, tmp_path, "--write-interval", "0") == 0
    assert saves == [("best.pt", 1), ("last.pt", 1), ("last.pt", 2), ("last.pt", 3), ("last.pt", 4)]
    assert checkpoint.load(str(tmp_path / "checkpoints" / "last.pt"))["best_epoch"] == 1


def test_an_error_stop_keeps_its_deferred_best_apart_from_the_best_pt_that_last_pt_names(
        fake_cifar10, tmp_path, recorded, monkeypatch, capsys):
    """Epoch 2's improvement waits in memory; epoch 3's test loss is NaN, so last.pt stays at epoch 1, which names
    epoch 1's best.pt: the waiting best goes to best_epoch_2.pt, and best.pt stays the one a resume goes on with."""
    saves, plotted = recorded
    scripted_accuracies(monkeypatch, [10.0, 30.0, float("nan")])
    assert run(fake_cifar10, tmp_path, "--write-interval", "1000") == 1
    out, err = capsys.readouterr()
    one_line_error(err, "non-finite test loss after the update at epoch 3")
    folder = tmp_path / "checkpoints"
    assert f"saved {folder / 'best_epoch_2.pt'}: the best model since the last checkpoint (epoch 2, 30.00%)" in out
    assert saves == [("best.pt", 1), ("last.pt", 1), ("best_epoch_2.pt", 2)]
    assert plotted == [1, 2]
    last, best, aside = (checkpoint.load(str(folder / name)) for name in ("last.pt", "best.pt", "best_epoch_2.pt"))
    assert (last["epoch"], last["best_epoch"], best["epoch"]) == (1, 1, 1)
    assert (aside["epoch"], aside["best_acc"]) == (2, 30.0)


def test_an_error_stop_that_cannot_save_its_deferred_best_says_so_and_still_draws(fake_cifar10, tmp_path, recorded,
                                                                                   monkeypatch, capsys):
    saves, plotted = recorded
    scripted_accuracies(monkeypatch, [10.0, 30.0, float("nan")])
    recording_save = checkpoint.save

    def disk_full_for_the_deferred_best(state, path):
        if os.path.basename(path) == "best_epoch_2.pt":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        recording_save(state, path)
    monkeypatch.setattr(checkpoint, "save", disk_full_for_the_deferred_best)
    assert run(fake_cifar10, tmp_path, "--write-interval", "1000") == 1
    out, err = capsys.readouterr()
    one_line_error(err, "non-finite test loss after the update at epoch 3")
    path = tmp_path / "checkpoints" / "best_epoch_2.pt"
    assert (f"could not save the best model since the last checkpoint (epoch 2, 30.00%) as {path} "
            f"(No space left on device)") in out
    assert saves == [("best.pt", 1), ("last.pt", 1)] and plotted == [1, 2] and not path.exists()
