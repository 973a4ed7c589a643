"""Runs that survive: killed runs, full disks and hostile inputs.

- Checkpoints are written atomically (a failure mid-write, or SIGKILL while saving, leaves the previous
  file loadable and resuming works).
- SIGTERM / SIGINT finish the step, save last.pt mid-epoch, say how to resume and exit 128+signum; a
  second signal exits at once; SIGHUP is ignored. A resumed run is bit-identical to an uninterrupted one.
- Non-finite losses, unwritable out-dirs and full disks stop the run with one clear line and keep the
  last good checkpoint; hostile checkpoints, data folders and flags are refused with one clear line,
  before any training, and without touching the run's files.

Most cases call main.main() in this process (fast); the signal tests run main.py as a subprocess.
"""
import contextlib
import dataclasses
import errno
import hashlib
import io
import os
import pickle
import queue
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from conftest import (ROOT, TINY_MODEL, assert_same_run, assert_same_tensors, metric_rows, one_line_error,
                      one_torch_thread, run_main, usage_error, wait_until, write_fake_cifar)

import checkpoint
import data
import main
import trainer
import visualize
from cli import first_line, nonempty_path, run_script
from models import ViTConfig, VisionTransformer

TINY = [*TINY_MODEL, "--patch-size", "8", "--device", "cpu", "--eval-batch-size", "100"]
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # 2 shared cores: threads only contend


# ---------------------------------------------------------------------------------------------- helpers

@pytest.fixture(autouse=True)
def in_one_torch_thread():
    with one_torch_thread():
        yield


def train_args(data_dir, out_dir, *extra, epochs=1, batch_size=16):
    return [*TINY, "--data-dir", str(data_dir), "--out-dir", str(out_dir), "--epochs", str(epochs),
            "--warmup-epochs", "0", "--batch-size", str(batch_size), *extra]


def snapshot(folder):
    """{relative path: sha256} of every file under folder."""
    files = {}
    for base, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(base, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return files


def temp_files(folder):
    return [os.path.join(base, name) for base, _, names in os.walk(folder) for name in names
            if name.startswith(".tmp-")]


def disk_fills_halfway(real_save):
    """A torch.save that writes half the file, then fails as a full disk does."""
    def save(obj, f, *args, **kwargs):
        buffer = io.BytesIO()
        real_save(obj, buffer)
        f.write(buffer.getvalue()[:len(buffer.getvalue()) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return save


def model_of(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


@pytest.fixture
def cli(capsys, monkeypatch):
    """main.main(argv) in this process -> (exit status, stdout, stderr); the end-of-run figures are skipped."""
    monkeypatch.setattr(trainer.Trainer, "write_report", lambda self, *args, **kwargs: None)

    def run(argv):
        try:
            status = main.main(argv)
        except SystemExit as exit_:  # argparse errors
            status = exit_.code
        out, err = capsys.readouterr()
        return status, out, err
    return run


@pytest.fixture
def no_training(monkeypatch):
    """Fails the test if training starts: errors must come before any long work."""
    def refuse(*args, **kwargs):
        raise AssertionError("training started although the input should have been refused")
    monkeypatch.setattr(trainer.Trainer, "train_epoch", refuse)


def no_data_patch(monkeypatch):
    """Fails the test if the data set is read (or downloaded): checkpoint and out-dir errors come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("the data set was read although the run should have stopped before")
    monkeypatch.setattr(data, "load_cifar", refuse)


@pytest.fixture
def no_data(monkeypatch):
    no_data_patch(monkeypatch)


@pytest.fixture(scope="module")
def fake_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    write_fake_cifar(str(folder))  # 200 train / 50 test
    return str(folder)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, fake_data):
    """A finished 1-epoch run (metrics.csv, checkpoints/last.pt and best.pt); copy it before changing it."""
    out_dir = str(tmp_path_factory.mktemp("trained") / "run")
    log = io.StringIO()
    with one_torch_thread(), pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(log), \
            contextlib.redirect_stderr(log):
        patch.setattr(trainer.Trainer, "write_report", lambda self, *args, **kwargs: None)
        status = main.main(train_args(fake_data, out_dir))
    assert status == 0, log.getvalue()
    return out_dir


@pytest.fixture
def run_dir(tmp_path, trained_run):
    out_dir = str(tmp_path / "run")
    shutil.copytree(trained_run, out_dir)
    return out_dir


# ---------------------------------------------------------------------------------------------- atomic saves

def test_failure_mid_write_leaves_previous_checkpoint(run_dir, monkeypatch):
    last = os.path.join(run_dir, "checkpoints", "last.pt")
    before = snapshot(run_dir)
    state = checkpoint.load(last)
    state["epoch"] = 99
    monkeypatch.setattr(torch, "save", disk_fills_halfway(torch.save))
    with pytest.raises(OSError):
        checkpoint.save(state, last)
    monkeypatch.undo()

    assert snapshot(run_dir) == before  # same bytes, and no temp file left behind
    assert checkpoint.load(last)["epoch"] == 1


SAVE_LOOP = """
import sys
sys.path.insert(0, {root!r})
import torch, checkpoint
state = checkpoint.load({path!r})
state["padding"] = torch.ones(4_000_000)  # 16 MB: the kill often lands inside a write
i = 0
while True:
    i += 1
    state["padding"].fill_(i)
    checkpoint.save(state, {path!r})
    print("saved", i, flush=True)
"""


def test_sigkill_while_saving_leaves_a_loadable_checkpoint_and_resume_works(run_dir, fake_data, cli):
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    last = os.path.join(ckpt_dir, "last.pt")
    weights = model_of(last)
    code = SAVE_LOOP.format(root=ROOT, path=last)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, **ONE_THREAD})
    try:
        for _ in range(3):
            assert proc.stdout.readline().startswith("saved"), "the save loop died"
    finally:
        proc.kill()  # SIGKILL: no handler, no cleanup
        proc.wait()
    assert proc.returncode == -signal.SIGKILL

    state = checkpoint.load(last)  # whichever save won, it is whole
    assert state["epoch"] == 1
    assert_same_tensors(state["model"], weights)
    # A torn temp file (what a kill inside a write leaves) must not disturb --resume auto.
    with open(os.path.join(ckpt_dir, ".tmp-last.pt-killed"), "wb") as f:
        f.write(b"PK\x03\x04 half a checkpoint")
    for name in (".tmp-metrics.csv-killed", ".tmp-results.png-killed", ".tmp-someone-elses",
                 *[f".tmp-{report}-killed" for report in visualize.REPORT_FILES]):
        with open(os.path.join(run_dir, name), "w") as f:
            f.write("half a file")

    status, out, err = cli(train_args(fake_data, run_dir, "--resume", "auto", epochs=3))
    assert status == 0, err
    assert f"resuming from {last}" in out
    assert [row["epoch"] for row in metric_rows(run_dir)] == ["1", "2", "3"]
    assert checkpoint.load(last)["epoch"] == 3
    # leftovers of the killed writes were cleared at start; a file that is not this project's stays
    assert temp_files(run_dir) == [os.path.join(run_dir, ".tmp-someone-elses")]


# ---------------------------------------------------------------------------------------------- signals

@pytest.fixture(scope="module")
def signal_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("signal_data")
    write_fake_cifar(str(folder), train_per_batch=80)  # 400 images: 50 steps of 8 per epoch
    return str(folder)


class Run:
    """main.py in a subprocess whose stdout is read line by line."""

    def __init__(self, args):
        self.proc = subprocess.Popen([sys.executable, "-u", os.path.join(ROOT, "main.py"), *args], cwd=ROOT,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, **ONE_THREAD})
        self.lines, self.stdout_lines, self.stderr_chunks = queue.Queue(), [], []
        threading.Thread(target=self._read, daemon=True).start()
        self.stderr_reader = threading.Thread(target=lambda: self.stderr_chunks.append(self.proc.stderr.read()),
                                              daemon=True)
        self.stderr_reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def wait_for(self, text, timeout=120):
        deadline = time.monotonic() + timeout
        while True:
            line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            if line is None:
                raise AssertionError(f"main.py ended before printing {text!r}: {''.join(self.stdout_lines)}"
                                     f"{self.stderr()}")
            self.stdout_lines.append(line)
            if text in line:
                return line

    def finish(self, timeout=180):
        self.proc.wait(timeout=timeout)
        while (line := self.lines.get(timeout=30)) is not None:
            self.stdout_lines.append(line)
        return self.proc.returncode, "".join(self.stdout_lines), self.stderr()

    def stderr(self):
        self.stderr_reader.join(timeout=30 if self.proc.poll() is not None else 0)
        return "".join(self.stderr_chunks)


@pytest.mark.parametrize("dropout, at_epoch, at_step, pipeline", [
    ("0.0", 2, 5, "device"),       # mid-epoch, deterministic model: the data order and augmentation must match
    ("0.1", 2, 5, "device"),       # dropout draws from the global RNG: its state must be restored too
    ("0.1", 1, 13, "device"),      # the signal in the last step of an epoch: the resumed run skips the whole epoch
    ("0.1", 3, 1, "device"),       # after the first step of the last epoch
    ("0.1", 2, 5, "torchvision"),  # no workers: the PIL transforms draw in this process, beside dropout
])
def test_signal_at_a_given_step_then_resume_is_bit_identical(tmp_path, fake_data, cli, monkeypatch, dropout,
                                                               at_epoch, at_step, pipeline):
    """In this process, SIGTERM is sent to itself while step `at_step` of epoch `at_epoch` runs."""
    common = train_args(fake_data, tmp_path, "--dropout", dropout, "--warmup-epochs", "1", "--data-pipeline",
                        pipeline, "--workers", "0", epochs=3)
    straight_dir, resumed_dir = str(tmp_path / "straight"), str(tmp_path / "resumed")
    status, out, err = cli([*common, "--out-dir", straight_dir])
    assert status == 0, err

    loader_class = data.DeviceTrainLoader if pipeline == "device" else data.TorchvisionTrainLoader
    real_epoch = loader_class.epoch

    def epoch_with_signal(self, epoch):
        for step, batch in enumerate(real_epoch(self, epoch), start=1):
            if (epoch, step) == (at_epoch, at_step):
                os.kill(os.getpid(), signal.SIGTERM)
            yield batch
    monkeypatch.setattr(loader_class, "epoch", epoch_with_signal)
    status, out, err = cli([*common, "--out-dir", resumed_dir])
    monkeypatch.setattr(loader_class, "epoch", real_epoch)
    assert status == 128 + signal.SIGTERM
    one_line_error(err, f"stopped by SIGTERM at epoch {at_epoch}, step {at_step}; saved ", "--resume auto")
    assert "received SIGTERM" in out

    status, out, err = cli([*common, "--out-dir", resumed_dir, "--resume", "auto"])
    assert status == 0, err
    assert f"(epoch {at_epoch - 1} done, stopped at step {at_step} of the next)" in out
    assert_same_run(straight_dir, resumed_dir)
    assert all(float(row["images_per_second"]) > 0 for row in metric_rows(resumed_dir))  # also after the last step


def stop_by_signal_at(monkeypatch, at_epoch, at_step):
    """The device loader sends SIGTERM to this process while step `at_step` of epoch `at_epoch` runs."""
    real_epoch = data.DeviceTrainLoader.epoch

    def epoch_with_signal(self, epoch):
        for step, batch in enumerate(real_epoch(self, epoch), start=1):
            if (epoch, step) == (at_epoch, at_step):
                os.kill(os.getpid(), signal.SIGTERM)
            yield batch
    monkeypatch.setattr(data.DeviceTrainLoader, "epoch", epoch_with_signal)


@pytest.mark.parametrize("write_interval, signal_at", [("0", None), ("1000", (3, 2))])
def test_last_pt_never_names_a_best_model_that_best_pt_lacks(tmp_path, fake_data, cli, monkeypatch, write_interval,
                                                             signal_at):
    """After every checkpoint write, best.pt holds the epoch that last.pt names as the best, or a later one: a
    process ended between two writes (a second signal, a kill) must not leave a last.pt whose resumed run reports a
    best model that was never saved. Every epoch improves; with a long --write-interval epoch 2's best waits, and
    a signal in epoch 3 writes it on the way out."""
    out_dir = tmp_path / "run"
    real_save, real_evaluate, stale = checkpoint.save, trainer.Trainer.evaluate, []

    def save_and_check(state, path):
        real_save(state, path)
        last, best = out_dir / "checkpoints" / "last.pt", out_dir / "checkpoints" / "best.pt"
        if last.exists():
            named = torch.load(last, weights_only=True)["best_epoch"]
            held = torch.load(best, weights_only=True)["epoch"] if best.exists() else None
            if held is None or held < named:
                stale.append((os.path.basename(path), named, held))

    def rising(self, images, labels, **kwargs):
        loss, _, predictions = real_evaluate(self, images, labels, **kwargs)
        return loss, 10.0 * (len(self.history) + 1), predictions
    monkeypatch.setattr(checkpoint, "save", save_and_check)
    monkeypatch.setattr(trainer.Trainer, "evaluate", rising)
    if signal_at:
        stop_by_signal_at(monkeypatch, *signal_at)
    status, out, err = cli(train_args(fake_data, out_dir, "--write-interval", write_interval, epochs=3))
    assert status == (128 + signal.SIGTERM if signal_at else 0), err
    assert torch.load(out_dir / "checkpoints" / "best.pt", weights_only=True)["epoch"] == (2 if signal_at else 3)
    assert stale == []


def test_a_checkpoint_stopped_mid_epoch_says_so_and_needs_its_epoch(tmp_path, fake_data, cli, monkeypatch):
    """--eval-only names the steps past the last whole epoch (the weights are those, not the epoch's); a resume
    whose --epochs ends before the epoch it stopped in is refused before any training."""
    out_dir = tmp_path / "run"
    stop_by_signal_at(monkeypatch, 2, 5)
    status, out, err = cli(train_args(fake_data, out_dir, epochs=3))
    assert status == 128 + signal.SIGTERM, err
    last = str(out_dir / "checkpoints" / "last.pt")
    status, out, err = cli([*TINY, "--data-dir", fake_data, "--eval-only", "--checkpoint", last])
    assert status == 0, err
    assert f"eval {last} (epoch 1 and 5 steps of epoch 2): test loss" in out
    monkeypatch.setattr(trainer.Trainer, "train_epoch", lambda *a, **k: pytest.fail("training started"))
    before = snapshot(str(out_dir / "checkpoints"))
    status, out, err = cli(train_args(fake_data, out_dir, "--resume", "auto", epochs=1))
    assert status == 2
    one_line_error(err, f"{last} has reached epoch 2 (epoch 1 done, stopped at step 5 of the next), beyond "
                        f"--epochs 1: resume with --epochs 2 or more")
    assert snapshot(str(out_dir / "checkpoints")) == before


@pytest.mark.parametrize("at_epoch", [2, 3])
def test_signal_during_the_evaluation_stops_after_the_epoch_and_resume_is_bit_identical(tmp_path, fake_data, cli,
                                                                                       monkeypatch, at_epoch):
    """A signal that arrives while an epoch is evaluated (no training step left to finish it) stops the run at
    the epoch's end with last.pt saved there, the last epoch's too: not one more step, not a silent finish."""
    common = train_args(fake_data, tmp_path, "--dropout", "0.1", "--warmup-epochs", "1", epochs=3)
    straight_dir, resumed_dir = str(tmp_path / "straight"), str(tmp_path / "resumed")
    status, out, err = cli([*common, "--out-dir", straight_dir])
    assert status == 0, err

    real_evaluate, evaluations = trainer.Trainer.evaluate, []

    def evaluate_with_signal(self, *args, **kwargs):
        evaluations.append(1)
        if len(evaluations) == at_epoch:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_evaluate(self, *args, **kwargs)
    monkeypatch.setattr(trainer.Trainer, "evaluate", evaluate_with_signal)
    status, out, err = cli([*common, "--out-dir", resumed_dir])
    monkeypatch.setattr(trainer.Trainer, "evaluate", real_evaluate)
    assert status == 128 + signal.SIGTERM
    one_line_error(err, f"stopped by SIGTERM after epoch {at_epoch}; saved ", "--resume auto")
    saved = torch.load(os.path.join(resumed_dir, "checkpoints", "last.pt"), weights_only=True)
    assert saved["epoch"] == at_epoch and saved["scheduler"]["position"] is None
    assert [r["epoch"] for r in metric_rows(resumed_dir)] == [str(e) for e in range(1, at_epoch + 1)]

    status, out, err = cli([*common, "--out-dir", resumed_dir, "--resume", "auto"])
    assert status == 0, err
    assert_same_run(straight_dir, resumed_dir)


def test_signal_handlers_act_only_in_the_process_that_installed_them(monkeypatch, capsys):
    """DataLoader workers are forked with the handler installed: a Ctrl-C, sent to the whole process group,
    must be acted on (and announced) once, by the training process."""
    runner = trainer.Trainer(main.parse_args(["--device", "cpu"]))
    runner.install_signal_handlers()
    try:
        real_pid = os.getpid()
        monkeypatch.setattr(os, "getpid", lambda: real_pid + 1)  # as in a forked worker
        runner.on_signal(signal.SIGINT, None)
        assert runner.stop_signal is None and capsys.readouterr().out == ""
        monkeypatch.setattr(os, "getpid", lambda: real_pid)
        runner.on_signal(signal.SIGINT, None)
        assert runner.stop_signal == signal.SIGINT and "received SIGINT" in capsys.readouterr().out
    finally:
        runner.restore_signal_handlers()


def wait_until_written(run, path):
    """Waits while the run is alive until `path` exists (epoch 1's last.pt: its checkpoints are complete)."""
    wait_until(lambda: os.path.exists(path), run.proc, run.stderr)


def test_sigterm_to_main_py_then_resume_auto_is_bit_identical(tmp_path, signal_data):
    common = [*TINY, "--data-dir", signal_data, "--epochs", "3", "--warmup-epochs", "1", "--batch-size", "8",
              "--dropout", "0.1"]  # the default device pipeline, with its per-epoch augmentation seeds
    straight_dir, resumed_dir = str(tmp_path / "straight"), str(tmp_path / "resumed")
    straight = Run([*common, "--out-dir", straight_dir])
    interrupted = Run([*common, "--out-dir", resumed_dir])
    interrupted.wait_for("epoch 1/3")
    wait_until_written(interrupted, os.path.join(resumed_dir, "checkpoints", "best.pt"))  # then epoch 2 trains
    interrupted.proc.send_signal(signal.SIGTERM)
    status, out, err = interrupted.finish()

    assert status == 128 + signal.SIGTERM, err
    assert "received SIGTERM" in out
    line = one_line_error(err, "stopped by SIGTERM ", "continue with: python ", "--resume auto")
    assert "epoch 3/3" not in out
    last = os.path.join(resumed_dir, "checkpoints", "last.pt")
    saved = checkpoint.load(last)
    position = saved["scheduler"]["position"]
    if position is None:  # the signal came between epoch 1's last write and epoch 2's first step
        assert f"after epoch {saved['epoch']};" in line
        resuming = f"resuming from {last} (epoch {saved['epoch']} done)"
    else:
        assert f"at epoch {position['epoch']}, step {position['step']};" in line
        resuming = f"resuming from {last} (epoch {saved['epoch']} done, stopped at step {position['step']} of the next)"

    resumed = run_main([*common, "--out-dir", resumed_dir, "--resume", "auto"], env=ONE_THREAD)
    assert resumed.returncode == 0, resumed.stderr
    assert resuming in resumed.stdout
    status, out, err = straight.finish()
    assert status == 0, err
    assert_same_run(straight_dir, resumed_dir)


def test_sighup_is_ignored_and_sigint_stops_with_a_working_resume_command(tmp_path, signal_data):
    out_dir = str(tmp_path / "run")
    args = [*TINY, "--data-dir", signal_data, "--out-dir", out_dir, "--epochs", "2", "--warmup-epochs", "0",
            "--batch-size", "8", "--resume", "auto"]
    run = Run(args)
    assert "starting a new run" in run.wait_for("--resume auto: no ")  # auto with no last.pt: a fresh run
    run.wait_for("epoch 1/2")
    wait_until_written(run, os.path.join(out_dir, "checkpoints", "last.pt"))
    run.proc.send_signal(signal.SIGHUP)  # handled first (lowest number): must not stop the run ...
    run.proc.send_signal(signal.SIGINT)  # ... so that SIGINT finds it alive and stops it gracefully
    status, out, err = run.finish()

    assert status == 128 + signal.SIGINT, err
    assert "received SIGINT" in out and "received SIGHUP" not in out
    line = one_line_error(err, "stopped by SIGINT ", "continue with: python ")  # in epoch 2, or just before it
    command = shlex.split(line.split("continue with: ", 1)[1])
    assert command[0] == "python" and command[1].endswith("main.py")
    assert command.count("--resume") == 1 and command[-2:] == ["--resume", "auto"]
    assert command.count("auto") == 1  # the old --resume's value is not left behind
    assert checkpoint.load(os.path.join(out_dir, "checkpoints", "last.pt"))["epoch"] == 1  # epoch 1 done, not 2

    result = subprocess.run([sys.executable, *command[1:]], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, **ONE_THREAD}, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "resuming from" in result.stdout
    assert [row["epoch"] for row in metric_rows(out_dir)] == ["1", "2"]


def test_second_signal_exits_at_once_without_saving(tmp_path, signal_data, fake_data, cli):
    out_dir = str(tmp_path / "run")
    run = Run([*TINY, "--data-dir", signal_data, "--out-dir", out_dir, "--epochs", "3", "--warmup-epochs", "0",
               "--batch-size", "8"])
    run.wait_for("epoch 1/3")
    wait_until_written(run, os.path.join(out_dir, "checkpoints", "last.pt"))
    run.proc.send_signal(signal.SIGTERM)
    run.proc.send_signal(signal.SIGINT)  # the second: no step to finish, no save
    status, out, err = run.finish()

    assert status in (128 + signal.SIGTERM, 128 + signal.SIGINT), err
    assert "stopped by" not in err and "Traceback" not in err
    last = checkpoint.load(os.path.join(out_dir, "checkpoints", "last.pt"))
    assert last["epoch"] == 1 and last["scheduler"]["position"] is None  # epoch 1's, not a mid-epoch save
    status, out, err = cli([*TINY, "--data-dir", signal_data, "--out-dir", out_dir, "--epochs", "3",
                            "--warmup-epochs", "0", "--batch-size", "8", "--resume", "auto"])
    assert status == 0, err
    assert [row["epoch"] for row in metric_rows(out_dir)] == ["1", "2", "3"]
    assert temp_files(out_dir) == []


def test_a_second_run_into_a_folder_in_use_is_refused(tmp_path, signal_data, cli, no_training):
    """The first run's first epoch writes nothing for a while (minutes on a CPU): a second run started meanwhile
    into the same --out-dir, fresh or --resume auto, is refused at once and the first goes on undisturbed."""
    out_dir = str(tmp_path / "run")
    common = [*TINY, "--data-dir", signal_data, "--out-dir", out_dir, "--warmup-epochs", "0", "--batch-size", "8"]
    first = Run([*common, "--epochs", "2"])
    first.wait_for("model:")  # its out-dir is prepared and held
    first.proc.send_signal(signal.SIGSTOP)  # held still in its first epoch, before any checkpoint
    try:
        assert not os.path.exists(os.path.join(out_dir, "checkpoints", "last.pt"))
        for extra in ([], ["--resume", "auto"]):
            status, out, err = cli([*common, "--epochs", "3", "--seed", "1", *extra])
            assert status == 2 and out == ""  # neither "resuming from" nor "starting a new run"
            one_line_error(err, f"error: another run is writing into {out_dir} (it holds "
                                f"{os.path.join(out_dir, 'checkpoints', trainer.RUN_LOCK)})", "another --out-dir")
    finally:
        first.proc.send_signal(signal.SIGCONT)
    status, out, err = first.finish()
    assert status == 0, err
    assert [row["epoch"] for row in metric_rows(out_dir)] == ["1", "2"]
    assert checkpoint.load(os.path.join(out_dir, "checkpoints", "last.pt"))["config"]["seed"] == 0


# ---------------------------------------------------------------------------------------------- resume checks

@pytest.mark.parametrize("change, fragments", [
    (["--hidden", "64", "--layers", "3"], ["hidden: checkpoint 32, flags 64", "layers: checkpoint 2, flags 3"]),
    (["--dropout", "0.1"], ["dropout: checkpoint 0.0, flags 0.1"]),
    (["--dataset", "cifar100"], ["num_classes: checkpoint 10, flags 100 (set by --dataset)"]),
])
def test_resume_with_another_model_lists_the_differences_and_keeps_the_run(run_dir, fake_data, tmp_path, cli,
                                                                           no_training, no_data, change, fragments):
    data_dir = fake_data
    if "cifar100" in change:
        data_dir = str(tmp_path / "c100")
        write_fake_cifar(data_dir, dataset="cifar100")
    before = snapshot(run_dir)
    status, out, err = cli(train_args(data_dir, run_dir, "--resume", "auto", *change, epochs=2))
    assert status == 2
    one_line_error(err, f"error: {run_dir}/checkpoints/last.pt: the checkpoint's model differs from the flags (",
                   *fragments)
    assert out == ""  # no "resuming from", nor the note on --epochs, for a run that does not resume
    assert snapshot(run_dir) == before


def stopped_mid_epoch(run_dir):
    """run_dir's last.pt, rewritten as if a signal had stopped it after 5 steps of epoch 2."""
    last = os.path.join(run_dir, "checkpoints", "last.pt")
    state = checkpoint.load(last)
    state["scheduler"]["position"] = {"epoch": 2, "step": 5, "sums": torch.zeros(3), "seconds": 1.0}
    checkpoint.save(state, last)


@pytest.mark.parametrize("change, fragment", [
    (["--batch-size", "32"], "--batch-size 16 in the checkpoint, 32 now"),  # 5 steps of 32: past the epoch's end
    (["--seed", "5"], "--seed 0 in the checkpoint, 5 now"),  # another order: some images twice, some never
])
def test_resume_mid_epoch_with_another_batch_size_or_seed_is_refused(run_dir, fake_data, cli, no_training,
                                                                      change, fragment):
    stopped_mid_epoch(run_dir)
    before = snapshot(run_dir)
    status, out, err = cli(train_args(fake_data, run_dir, "--resume", "auto", epochs=2) + change)
    assert status == 2
    one_line_error(err, f"error: {run_dir}/checkpoints/last.pt stopped in the middle of an epoch", fragment,
                   "resume with the checkpoint's values or start a new --out-dir")
    assert out == ""  # no "resuming from" for a run that does not resume
    assert snapshot(run_dir) == before


@pytest.fixture(scope="module")
def fewer_images(tmp_path_factory):
    """A data folder of 120 training images where the run trained on 200."""
    folder = str(tmp_path_factory.mktemp("fewer"))
    write_fake_cifar(folder, train_per_batch=24)
    return folder


def test_resume_mid_epoch_with_another_training_set_is_refused(run_dir, fewer_images, cli, no_training):
    """Its remaining steps would be slices of another order: with fewer images a stop past the new epoch's end
    would train nothing and still log the epoch."""
    assert checkpoint.load(os.path.join(run_dir, "checkpoints", "last.pt"))["train_images"] == 200
    stopped_mid_epoch(run_dir)
    before = snapshot(run_dir)
    status, out, err = cli(train_args(fewer_images, run_dir, "--resume", "auto", epochs=2))
    assert status == 2
    one_line_error(err, f"error: {run_dir}/checkpoints/last.pt stopped in the middle of an epoch of 200 training "
                   f"images, and --data-dir {fewer_images} holds 120: resume with the checkpoint's data or start a "
                   f"new --out-dir")
    assert "resuming from" not in out
    assert snapshot(run_dir) == before


def test_resume_at_an_epochs_end_with_another_training_set_says_so_in_the_log(run_dir, fewer_images, cli):
    status, out, err = cli(train_args(fewer_images, run_dir, "--resume", "auto", epochs=2))
    assert status == 0, err
    assert (f"note: the checkpoint's run trained on 200 images and --data-dir {fewer_images} holds 120; the epochs "
            f"and the learning-rate schedule follow the new count") in out
    assert checkpoint.load(os.path.join(run_dir, "checkpoints", "last.pt"))["train_images"] == 120


def test_resume_with_a_changed_recipe_flag_says_so_in_the_log(run_dir, fake_data, cli):
    status, out, err = cli(train_args(fake_data, run_dir, "--resume", "auto", "--lr", "0.002", epochs=2))
    assert status == 0, err
    assert ("note: resuming with changed flags (--epochs 1 in the checkpoint, 2 now; --lr 0.001 in the "
            "checkpoint, 0.002 now); the run goes on with the new values") in out
    status, out, err = cli(train_args(fake_data, run_dir, "--resume", "auto", "--lr", "0.002", epochs=2))
    assert "note: resuming with changed flags" not in out  # the same flags as the checkpoint of epoch 2


def test_resume_from_another_checkpoint_into_a_run_is_refused(run_dir, fake_data, tmp_path, cli, no_training):
    other = str(tmp_path / "other.pt")
    shutil.copy(os.path.join(run_dir, "checkpoints", "best.pt"), other)
    before = snapshot(run_dir)
    status, out, err = cli(train_args(fake_data, run_dir, "--resume", other, epochs=2))
    assert status == 2
    one_line_error(err, f"error: --resume {other} would overwrite the run in {run_dir}", "--resume auto")
    assert snapshot(run_dir) == before


@pytest.mark.parametrize("batch_size, fragment", [
    (16, "non-finite training loss at epoch 2, step "),  # several steps: the loss of the next step is NaN
    (1000, "non-finite test loss after the update at epoch 2, step 1"),  # one step: only the weights blow up
])
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(run_dir, fake_data, cli, batch_size, fragment):
    before = snapshot(run_dir)
    last = os.path.join(run_dir, "checkpoints", "last.pt")
    status, out, err = cli(train_args(fake_data, run_dir, "--resume", "auto", "--lr", "1e30", epochs=3,
                                      batch_size=batch_size))
    assert status == 1
    one_line_error(err, fragment, f"the last good checkpoint is {last}")
    assert "epoch 2/3" not in out
    assert snapshot(run_dir) == before  # last.pt, best.pt, metrics.csv untouched
    assert all(torch.isfinite(t).all() for t in model_of(last).values())


def test_non_finite_loss_in_a_resume_into_a_new_folder_names_the_resumed_checkpoint_and_a_retry_works(
        run_dir, fake_data, tmp_path, cli):
    last = os.path.join(run_dir, "checkpoints", "last.pt")
    out_dir = str(tmp_path / "again")
    status, out, err = cli(train_args(fake_data, out_dir, "--resume", last, "--lr", "1e30", epochs=2))
    assert status == 1
    one_line_error(err, "non-finite", f"the last good checkpoint is {last}")
    status, out, err = cli(train_args(fake_data, out_dir, "--resume", last, epochs=2))
    assert status == 0, err
    assert [row["epoch"] for row in metric_rows(out_dir)] == ["1", "2"]


def test_a_file_that_cannot_be_replaced_is_named_in_the_error_not_its_temporary_copy(tmp_path, fake_data, cli):
    out_dir = tmp_path / "run"
    (out_dir / "results.png").mkdir(parents=True)  # what a full disk would be at the rename, made repeatable
    status, out, err = cli(train_args(fake_data, str(out_dir)))
    assert status == 1
    one_line_error(err, f"could not write {out_dir / 'results.png'} (Is a directory)")


def test_non_finite_loss_in_a_fresh_run_writes_no_checkpoint(tmp_path, fake_data, cli):
    out_dir = str(tmp_path / "run")
    status, out, err = cli(train_args(fake_data, out_dir, "--lr", "1e30", epochs=2))
    assert status == 1
    one_line_error(err, "non-finite", "at epoch 1, step ", "no checkpoint was written")
    assert not os.path.exists(os.path.join(out_dir, "checkpoints", "last.pt"))
    assert not os.path.exists(os.path.join(out_dir, "metrics.csv"))


# ---------------------------------------------------------------------------------------------- out-dir and disk

def test_out_dir_under_a_regular_file_is_refused_at_start(tmp_path, fake_data, cli, no_data):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    status, out, err = cli(train_args(fake_data, blocker / "run"))
    assert status == 2
    one_line_error(err, f"cannot write to {blocker / 'run' / 'checkpoints'}", "choose a writable --out-dir")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders; see the test above")
def test_read_only_out_dir_is_refused_at_start(tmp_path, fake_data, cli, no_data):
    out_dir = tmp_path / "readonly"
    out_dir.mkdir()
    out_dir.chmod(0o555)
    try:
        status, out, err = cli(train_args(fake_data, out_dir))
    finally:
        out_dir.chmod(0o755)
    assert status == 2
    one_line_error(err, "cannot write to", "choose a writable --out-dir")


def test_full_disk_at_start_is_refused_and_nothing_is_lost(run_dir, fake_data, cli, monkeypatch, no_data):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(checkpoint.tempfile, "TemporaryFile", full)
    before = snapshot(run_dir)
    status, out, err = cli(train_args(fake_data, run_dir, "--resume", "auto", epochs=2))
    assert status == 2
    one_line_error(err, "cannot write to", "No space left on device")
    assert snapshot(run_dir) == before


def test_full_disk_at_checkpoint_save_keeps_the_previous_checkpoint(run_dir, fake_data, cli, monkeypatch):
    real_save = torch.save
    checkpoints = os.path.join(run_dir, "checkpoints")
    before = snapshot(checkpoints)
    monkeypatch.setattr(torch, "save", disk_fills_halfway(real_save))
    status, out, err = cli(train_args(fake_data, run_dir, "--resume", "auto", epochs=2))
    assert status == 1
    line = one_line_error(err, f"could not write {checkpoints}{os.sep}", "(No space left on device)")
    name = "best.pt" if "best.pt (" in line else "last.pt"  # best.pt comes first when epoch 2 improved
    assert f"the previous {name} is intact" in line
    assert snapshot(checkpoints) == before
    assert temp_files(run_dir) == []
    assert metric_rows(run_dir)[0]["epoch"] == "1"  # still a whole CSV
    monkeypatch.setattr(torch, "save", real_save)  # space freed: the run continues from epoch 1's checkpoint
    status, out, err = cli(train_args(fake_data, run_dir, "--resume", "auto", epochs=2))
    assert status == 0, err
    assert "(epoch 1 done)" in out
    assert [row["epoch"] for row in metric_rows(run_dir)] == ["1", "2"]


def test_full_disk_at_a_new_runs_first_checkpoint_lets_the_same_command_run_again(tmp_path, fake_data, cli,
                                                                                 monkeypatch):
    """The checkpoints are written before metrics.csv: a disk that fills at a new run's first last.pt leaves no
    metrics.csv without a checkpoint, which would make the folder refuse the same command and --resume auto."""
    out_dir = str(tmp_path / "run")
    real_save = checkpoint.save

    def full_at_last(state, path):
        if path.endswith("last.pt"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        real_save(state, path)
    monkeypatch.setattr(checkpoint, "save", full_at_last)
    status, out, err = cli(train_args(fake_data, out_dir))
    assert status == 1
    one_line_error(err, "could not write", "last.pt", "No space left on device")
    assert not os.path.exists(os.path.join(out_dir, "metrics.csv"))
    monkeypatch.setattr(checkpoint, "save", real_save)  # space freed: the same command starts over
    status, out, err = cli(train_args(fake_data, out_dir))
    assert status == 0, err
    assert [row["epoch"] for row in metric_rows(out_dir)] == ["1"]
    assert os.path.isfile(os.path.join(out_dir, "checkpoints", "last.pt"))


def test_full_disk_at_metrics_write_is_a_clear_stop(run_dir, fake_data, cli, monkeypatch):
    real_replace = os.replace

    def full_at_metrics(source, target):
        if str(target).endswith("metrics.csv"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), target)
        real_replace(source, target)
    monkeypatch.setattr(os, "replace", full_at_metrics)
    metrics = os.path.join(run_dir, "metrics.csv")
    before = snapshot(run_dir)
    status, out, err = cli(train_args(fake_data, run_dir, "--resume", "auto", epochs=2))
    assert status == 1
    one_line_error(err, "could not write", "metrics.csv", "No space left on device")
    assert snapshot(run_dir)["metrics.csv"] == before["metrics.csv"] and temp_files(run_dir) == []
    state = checkpoint.load(os.path.join(run_dir, "checkpoints", "last.pt"))  # written first: epoch 2 is kept
    assert state["epoch"] == 2 and [row["epoch"] for row in state["history"]] == [1, 2]
    assert [row["epoch"] for row in metric_rows(run_dir)] == ["1"] and os.path.isfile(metrics)


# ---------------------------------------------------------------------------------------------- hostile checkpoints

class _Exploit:
    """Unpickling this runs os.mkdir(marker): what a malicious 'checkpoint' would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def _state(good):
    return torch.load(good, map_location="cpu", weights_only=True)


def _write(path, content):
    with open(path, "wb") as f:
        f.write(content)


def make_checkpoint(kind, good, path, marker):
    """Writes a hostile checkpoint of `kind` at path."""
    with open(good, "rb") as f:
        good_bytes = f.read()
    if kind == "truncated":
        _write(path, good_bytes[:len(good_bytes) // 2])
    elif kind == "cut in its first records":  # torch.load raises OSError (Invalid argument) for such cuts
        _write(path, good_bytes[:5000])
    elif kind == "empty":
        _write(path, b"")
    elif kind == "text":
        _write(path, b"epoch 1/3 | lr 1e-3 | this is a log, not a checkpoint\n")
    elif kind == "random bytes":
        _write(path, np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    elif kind == "plain pickle":
        _write(path, pickle.dumps({"model": [1, 2, 3]}))
    elif kind == "tensor":
        torch.save(torch.zeros(3), path)
    elif kind in ("code execution", "code execution, legacy format"):
        state = _state(good)
        state["model"] = _Exploit(marker)
        torch.save(state, path, _use_new_zipfile_serialization=kind == "code execution")
    elif kind == "weights do not fit":
        state = _state(good)
        state["model"]["head.weight"] = torch.zeros(3, 3)
        torch.save(state, path)
    elif kind == "invalid model_config":
        state = _state(good)
        state["model_config"]["heads"] = 5
        torch.save(state, path)
    elif kind == "made for other images":  # 64-pixel images: weights that fit their config, but not CIFAR
        state = _state(good)
        state["model_config"]["image_size"] = 64
        state["model"] = VisionTransformer(ViTConfig(**state["model_config"])).state_dict()
        torch.save(state, path)
    elif kind == "no training state":
        state = _state(good)
        torch.save({k: state[k] for k in ("model", "model_config", "classes")}, path)
    elif kind == "malformed training state":
        state = _state(good)
        state["rng"] = {"torch": "not a generator state"}
        torch.save(state, path)
    elif kind == "history without metrics":
        state = _state(good)
        state["history"] = [{"epoch": 1}]
        torch.save(state, path)
    elif kind == "best accuracy as text":
        state = _state(good)
        state["best_acc"] = "0.5"
        torch.save(state, path)
    else:
        raise ValueError(kind)


BAD_FILE = "is truncated or not a PyTorch checkpoint"
CHECKPOINT_CASES = {  # kind: (message fragment with --resume, with --eval-only, refused before the data is read)
    "truncated": (BAD_FILE, BAD_FILE, True),
    "cut in its first records": (BAD_FILE, BAD_FILE, True),
    "empty": (BAD_FILE, BAD_FILE, True),
    "text": (BAD_FILE, BAD_FILE, True),
    "random bytes": (BAD_FILE, BAD_FILE, True),
    "plain pickle": (BAD_FILE, BAD_FILE, True),
    "tensor": ("is a PyTorch file but not a checkpoint of this project",) * 2 + (True,),
    "code execution": ("was refused by safe (weights_only) loading",) * 2 + (True,),
    "code execution, legacy format": ("was refused by safe (weights_only) loading",) * 2 + (True,),
    "weights do not fit": ("the stored weights do not fit its model_config (size mismatch for head.weight",) * 2
    + (False,),
    "invalid model_config": ("has an invalid model_config (hidden size 32 is not divisible by 5 heads",) * 2 + (True,),
    "made for other images": ("holds a model for 64-pixel images with 3 channels; CIFAR's are 32-pixel",) * 2 + (True,),
    "no training state": ("holds a model but no training state", None, True),
    "malformed training state": ("has a malformed training state", None, False),
    "history without metrics": ("has a malformed training state", None, False),  # else a traceback an epoch later
    "best accuracy as text": ("has a malformed training state", None, False),
}


@pytest.mark.parametrize("kind, mode", [(kind, mode) for kind, (on_resume, on_eval, _) in CHECKPOINT_CASES.items()
                                        for mode, fragment in (("resume", on_resume), ("eval-only", on_eval))
                                        if fragment is not None])  # evaluation needs no training state
def test_hostile_checkpoint_is_refused(kind, mode, run_dir, fake_data, tmp_path, cli, no_training, monkeypatch):
    resume_fragment, eval_fragment, early = CHECKPOINT_CASES[kind]
    fragment = resume_fragment if mode == "resume" else eval_fragment
    if early:
        no_data_patch(monkeypatch)
    marker = str(tmp_path / "MARKER")
    path = str(tmp_path / "hostile.pt")
    make_checkpoint(kind, os.path.join(run_dir, "checkpoints", "last.pt"), path, marker)
    before = snapshot(run_dir)
    if mode == "resume":  # into a new folder: resuming another file into run_dir is refused for that alone
        status, out, err = cli(train_args(fake_data, str(tmp_path / "resumed"), "--resume", path, epochs=2))
        assert not os.path.exists(tmp_path / "resumed" / "checkpoints" / "last.pt")
    else:
        status, out, err = cli([*TINY, "--data-dir", fake_data, "--out-dir", str(tmp_path / "eval"), "--eval-only",
                                "--checkpoint", path])
    assert status == 2 and out == ""  # refused late too (weights that do not fit): no "resuming from"
    line = one_line_error(err, "error: ", path, fragment)
    assert snapshot(run_dir) == before
    assert not os.path.exists(tmp_path / "eval")
    if kind.startswith("code execution"):
        assert "posix.mkdir" in line and "nothing in it was run" in line
        assert not os.path.exists(marker)
        torch.load(path, weights_only=False)  # the control: unsafe loading does run the file's code
        assert os.path.isdir(marker)


def test_resume_auto_with_a_corrupt_last_pt_is_refused(run_dir, fake_data, cli, no_training, monkeypatch):
    no_data_patch(monkeypatch)
    last = os.path.join(run_dir, "checkpoints", "last.pt")
    make_checkpoint("truncated", last, last, None)
    before = snapshot(run_dir)
    status, out, err = cli(train_args(fake_data, run_dir, "--resume", "auto", epochs=2))
    assert status == 2
    best = os.path.join(run_dir, "checkpoints", "best.pt")
    one_line_error(err, f"checkpoint {last} {BAD_FILE}",
                   f"go on from an earlier checkpoint in a new folder: --resume {best} --out-dir NEW_FOLDER")
    status, out, err = cli(train_args(fake_data, run_dir, "--resume", best, epochs=2))  # the hint, same folder
    assert status == 2
    line = one_line_error(err, f"--resume {best} would overwrite the run in {run_dir}", "resume into another "
                          "--out-dir (its last.pt cannot be read, so that run cannot be continued)")
    assert "--resume auto" not in line  # which just failed
    assert snapshot(run_dir) == before


@pytest.mark.parametrize("flag", ["--resume", "--checkpoint"])
@pytest.mark.parametrize("given, fragment", [("nope.pt", "nope.pt does not exist: check the path"),
                                             ("checkpoints", "checkpoints is a folder: name a checkpoint file in it, "
                                                             "e.g. {tmp}/checkpoints/best.pt")])
def test_missing_checkpoint_file_is_a_usage_error(tmp_path, fake_data, cli, flag, given, fragment):
    (tmp_path / "checkpoints").mkdir()
    extra = ["--eval-only"] if flag == "--checkpoint" else []
    status, out, err = cli(train_args(fake_data, tmp_path / "run", *extra, flag, str(tmp_path / given)))
    assert status == 2
    line = usage_error(err, f"{flag} {tmp_path}/{fragment.format(tmp=tmp_path)}")
    assert ("--resume auto starts fresh" in line) == (flag == "--resume" and given == "nope.pt"), line
    assert not os.path.exists(tmp_path / "run")


def test_a_folder_given_as_a_checkpoint_is_named_as_one(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="is a folder: name a checkpoint file in it"):
        checkpoint.load(str(tmp_path))
    (tmp_path / "checkpoints").mkdir()  # a run's folder: the example is its checkpoints/best.pt
    with pytest.raises(checkpoint.CheckpointError) as info:
        checkpoint.load(str(tmp_path))
    assert str(info.value).endswith(f"e.g. {tmp_path / 'checkpoints' / 'best.pt'}")


def test_data_dir_that_is_a_file_is_a_usage_error(tmp_path, cli, no_data):
    notes = tmp_path / "notes.txt"
    notes.write_text("not data")
    status, out, err = cli(train_args(notes, tmp_path / "run"))
    assert status == 2
    usage_error(err, f"--data-dir {notes} is a file, not a folder")
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize("resume, fragment", [
    ([], "metrics.csv holds an earlier run, and there is no {run}/checkpoints/last.pt to continue it from: start "
         "the new run in another --out-dir"),
    (["--resume", "auto"], "metrics.csv holds an earlier run, and there is no {run}/checkpoints/last.pt"),
    (["--resume", "{other}"], "--resume {other} would overwrite the run in {run} (its {run}/metrics.csv): resume "
                              "into another --out-dir"),
])
def test_an_earlier_runs_metrics_are_never_overwritten(run_dir, fake_data, tmp_path, cli, no_data, monkeypatch,
                                                       resume, fragment):
    """An earlier run's metrics.csv whose checkpoints were moved away is kept by a new run, --resume auto (nothing
    to continue) and a resume from elsewhere; with --device auto and no GPU the CPU warning would only come
    before training, so the error is the only line."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    other = str(tmp_path / "other.pt")
    shutil.move(os.path.join(run_dir, "checkpoints"), tmp_path / "moved")
    shutil.copy(tmp_path / "moved" / "last.pt", other)
    before = snapshot(run_dir)
    status, out, err = cli(train_args(fake_data, run_dir, "--device", "auto",
                                      *[arg.format(other=other) for arg in resume]))
    assert status == 2
    one_line_error(err, fragment.format(run=run_dir, other=other))
    assert "--resume auto" not in err.replace("--resume auto: ", "")  # there is nothing to continue
    assert snapshot(run_dir) == before


def test_cpu_warning_comes_once_training_starts(tmp_path, fake_data, cli, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    status, out, err = cli(train_args(fake_data, tmp_path / "run", "--device", "auto"))
    assert status == 0, err
    assert err.splitlines() == ["warning: CUDA is not available, running on the CPU (slow; use a GPU for the full "
                                "recipe)"]


# ---------------------------------------------------------------------------------------------- hostile data

def _rewrite_batch(folder, name, change):
    path = os.path.join(folder, "cifar-10-batches-py", name)
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    with open(path, "wb") as f:
        pickle.dump(change(batch), f)


def make_data(kind, folder, marker):
    write_fake_cifar(folder)
    batches = os.path.join(folder, "cifar-10-batches-py")
    if kind == "partial folder":
        os.remove(os.path.join(batches, "data_batch_3"))
    elif kind == "wrong image shape":
        _rewrite_batch(folder, "data_batch_2", lambda b: {**b, b"data": b[b"data"][:, :1024]})
    elif kind == "wrong dtype":
        _rewrite_batch(folder, "test_batch", lambda b: {**b, b"data": b[b"data"].astype(np.float32)})
    elif kind == "labels out of range":
        _rewrite_batch(folder, "data_batch_4", lambda b: {**b, b"labels": [10] + b[b"labels"][1:]})
    elif kind == "negative labels":
        _rewrite_batch(folder, "test_batch", lambda b: {**b, b"labels": [-1] + b[b"labels"][1:]})
    elif kind == "labels not integers":
        _rewrite_batch(folder, "data_batch_1", lambda b: {**b, b"labels": ["cat"] * len(b[b"labels"])})
    elif kind == "fractional labels":
        _rewrite_batch(folder, "data_batch_1", lambda b: {**b, b"labels": [0.5] * len(b[b"labels"])})
    elif kind == "labels beyond 64 bits":
        _rewrite_batch(folder, "data_batch_1", lambda b: {**b, b"labels": [2 ** 64] * len(b[b"labels"])})
    elif kind == "fewer labels than images":
        _rewrite_batch(folder, "data_batch_5", lambda b: {**b, b"labels": b[b"labels"][:-1]})
    elif kind == "not a dict":
        _rewrite_batch(folder, "data_batch_1", lambda b: [1, 2, 3])
    elif kind == "garbage file":
        _write(os.path.join(batches, "data_batch_1"), b"\x00garbage, not a pickle")
    elif kind == "truncated file":
        with open(os.path.join(batches, "data_batch_2"), "rb") as f:
            content = f.read()
        _write(os.path.join(batches, "data_batch_2"), content[:len(content) // 2])
    elif kind == "no class names":
        _rewrite_batch(folder, "batches.meta", lambda b: {b"num_cases_per_batch": 10000})
    elif kind == "code execution":
        _rewrite_batch(folder, "data_batch_1", lambda b: {**b, b"data": _Exploit(marker)})
    else:
        raise ValueError(kind)


DATA_CASES = {
    "partial folder": "data_batch_3 is missing: the data folder is incomplete",
    "wrong image shape": "data_batch_2 holds data of shape (40, 1024)",
    "wrong dtype": "test_batch holds data of shape (50, 3072) and dtype float32",
    "labels out of range": "data_batch_4 has labels outside 0..9 (found 0..10)",
    "negative labels": "test_batch has labels outside 0..9 (found -1..",
    "labels not integers": "data_batch_1: its b'labels' are not integer class labels",
    "fractional labels": "data_batch_1: its b'labels' are not integer class labels",  # not truncated to 0
    "labels beyond 64 bits": "data_batch_1: its b'labels' are not integer class labels",
    "fewer labels than images": "data_batch_5 holds data of shape (40, 3072) and dtype uint8 with 39 labels",
    "not a dict": "data_batch_1 has no b'data' or b'labels' entry",
    "garbage file": "data_batch_1 is not",
    "truncated file": "data_batch_2 is not a CIFAR batch (pickle data was truncated): replace it with the file from",
    "no class names": "batches.meta has no list of class names",
    "code execution": "data_batch_1 is not a CIFAR batch (it would import posix.mkdir",
}
DATA_CASES_RUN = {"code execution"}  # the only case whose message says that nothing in the file was run


@pytest.mark.parametrize("kind", list(DATA_CASES))
def test_hostile_data_folder_is_refused(kind, tmp_path, cli, no_training):
    folder, marker = str(tmp_path / "data"), str(tmp_path / "MARKER")
    make_data(kind, folder, marker)
    status, out, err = cli(train_args(folder, tmp_path / "run"))
    assert status == 2
    line = one_line_error(err, "error: ", DATA_CASES[kind])
    assert ("nothing in it was run" in line) == (kind in DATA_CASES_RUN), line
    assert not os.path.exists(tmp_path / "run" / "metrics.csv")
    if kind == "code execution":
        assert not os.path.exists(marker)
        with open(os.path.join(folder, "cifar-10-batches-py", "data_batch_1"), "rb") as f:
            pickle.load(f)  # the control: plain unpickling does run the file's code
        assert os.path.isdir(marker)


def test_missing_data_folder_fails_with_a_download_hint(tmp_path, cli, no_training, monkeypatch):
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")  # nothing listens there: the download fails at once
    status, out, err = cli(train_args(tmp_path / "nodata", tmp_path / "run"))
    assert status == 2
    one_line_error(err, f"error: could not download cifar10 into {tmp_path / 'nodata'}", "extract it so that",
                   "--data-dir")


# ---------------------------------------------------------------------------------------------- hostile flags

# Every numeric flag of main.py, with values it must refuse at parse time ...
REFUSED = {
    "--epochs": ["0", "-1", "nan", "inf", "1.5"],
    "--batch-size": ["0", "-1", "nan", "inf", "1.5"],
    "--eval-batch-size": ["0", "-1", "nan", "inf"],
    "--lr": ["0", "-1", "nan", "inf", "-inf"],
    "--min-lr": ["-1", "nan", "inf"],
    "--warmup-epochs": ["-1", "nan", "inf"],
    "--weight-decay": ["-1", "nan", "inf"],
    "--beta1": ["-0.1", "1", "nan", "inf"],
    "--beta2": ["-0.1", "1", "nan", "inf"],
    "--label-smoothing": ["-0.1", "1", "nan", "inf"],
    "--seed": ["-1", "nan", "inf", "1.5", str(2 ** 64)],
    "--layers": ["0", "-1", "nan", "inf"],
    "--hidden": ["0", "-1", "nan", "inf"],
    "--mlp-hidden": ["0", "-1", "nan", "inf"],
    "--heads": ["0", "-1", "nan", "inf", "5"],
    "--patch-size": ["0", "-1", "nan", "inf", "3"],
    "--dropout": ["-0.1", "1", "nan", "inf"],
    "--workers": ["-1", "nan", "inf"],
    "--save-every": ["-1", "nan", "inf"],
    "--write-interval": ["-1", "nan", "inf", "-inf"],
}
# ... and the edge values that are valid and must be accepted.
ACCEPTED = {"--min-lr": "0", "--warmup-epochs": "0", "--weight-decay": "0", "--beta1": "0", "--beta2": "0",
            "--label-smoothing": "0", "--seed": "0", "--dropout": "0", "--workers": "0", "--save-every": "0",
            "--write-interval": "0"}


def test_every_numeric_flag_is_covered():
    numeric = {action.option_strings[-1] for action in main.build_parser()._actions
               if action.option_strings and action.type not in (None, nonempty_path) and action.choices is None}
    assert numeric == set(REFUSED)


@pytest.mark.parametrize("flag, value", [(flag, value) for flag, values in REFUSED.items() for value in values])
def test_invalid_numeric_flag_is_refused_at_parse_time(flag, value, capsys):
    with pytest.raises(SystemExit) as exit_:
        main.parse_args([f"{flag}={value}"])
    assert exit_.value.code == 2
    usage_error(capsys.readouterr().err, flag)


@pytest.mark.parametrize("flag, value", list(ACCEPTED.items()))
def test_valid_edge_value_is_accepted(flag, value):
    args = main.parse_args([f"{flag}={value}"])
    assert float(getattr(args, flag[2:].replace("-", "_"))) == float(value)


def test_ctrl_c_while_starting_is_one_line_and_sighup_is_ignored_from_the_start(cli, monkeypatch):
    found = signal.signal(signal.SIGHUP, signal.SIG_DFL)
    seen = []

    def interrupted(argv):
        seen.append(signal.getsignal(signal.SIGHUP))
        raise KeyboardInterrupt  # e.g. while matplotlib loads, before the trainer exists
    monkeypatch.setattr(main, "parse_args", interrupted)
    status, out, err = cli(["--epochs", "1"])
    assert status == 130 and seen == [signal.SIG_IGN]
    one_line_error(err, "error: interrupted outside the training loop")
    assert signal.getsignal(signal.SIGHUP) == signal.SIG_DFL  # main() gives the caller its handler back
    signal.signal(signal.SIGHUP, found)


def test_ctrl_c_while_reading_the_data_is_one_line_and_exit_130(tmp_path, fake_data, cli, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(data, "load_cifar", interrupted)
    status, out, err = cli(train_args(fake_data, str(tmp_path / "run")))
    assert status == 130
    one_line_error(err, "error: interrupted outside the training loop; the files already written are kept")


def test_sigterm_during_the_final_report_is_one_line_exit_143_and_the_run_files_are_kept(tmp_path, fake_data, cli,
                                                                                           monkeypatch):
    def handler_before(signum, frame):  # were main()'s own handler missing, this would take the signal, not pytest
        pass
    original = signal.signal(signal.SIGTERM, handler_before)
    monkeypatch.setattr(trainer.Trainer, "write_report", lambda self, *args, **kwargs: os.kill(os.getpid(),
                                                                                              signal.SIGTERM))
    out_dir = tmp_path / "run"
    try:
        status, out, err = cli(train_args(fake_data, str(out_dir)))
    finally:
        handler_after = signal.signal(signal.SIGTERM, original)
    assert status == 143
    one_line_error(err, "error: interrupted by SIGTERM outside the training loop; the files already written are kept")
    assert torch.load(out_dir / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 1
    assert len(metric_rows(str(out_dir))) == 1
    assert handler_after is handler_before  # main() leaves the process as it found it


@pytest.mark.parametrize("world", [None, "2"])
def test_sigterm_outside_the_epochs_is_main_s_own_only_in_one_process(world, cli, monkeypatch):
    if world:
        monkeypatch.setenv("WORLD_SIZE", world)  # torchrun's: its SIGTERMs end the ranks after one has failed
    else:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    seen = []
    monkeypatch.setattr(main, "run", lambda args: seen.append(signal.getsignal(signal.SIGTERM)) or 0)
    assert cli([])[0] == 0
    assert (seen[0] is main._raise_terminated) == (world is None)


@pytest.mark.parametrize("problem", ["unwritable out-dir", "other dataset"])
def test_eval_only_refuses_before_reading_the_data(problem, run_dir, fake_data, tmp_path, cli, monkeypatch):
    no_data_patch(monkeypatch)
    best = os.path.join(run_dir, "checkpoints", "best.pt")
    args = [*TINY, "--data-dir", fake_data, "--eval-only", "--checkpoint", best]
    if problem == "unwritable out-dir":
        blocker = tmp_path / "a_file"
        blocker.write_text("not a folder")
        status, out, err = cli([*args, "--out-dir", str(blocker / "eval")])
        one_line_error(err, f"error: cannot write to {blocker / 'eval'} (", "choose a writable --out-dir")
    else:
        status, out, err = cli([*args, "--out-dir", str(tmp_path / "eval"), "--dataset", "cifar100"])
        one_line_error(err, f"error: {best} predicts 10 classes but cifar100 has 100: pass the --dataset")
        assert not os.path.exists(tmp_path / "eval")
    assert status == 2


def test_eval_only_without_dataset_evaluates_on_the_cifar_the_checkpoints_model_classifies(tmp_path, cli):
    """A CIFAR-100 model needs no --dataset to be evaluated; training without it still means cifar10."""
    data_dir = str(tmp_path / "data")
    write_fake_cifar(data_dir, dataset="cifar100")
    config = trainer.model_config_from_args(main.parse_args(TINY), 100, "math")
    path = str(tmp_path / "c100.pt")
    checkpoint.save({"model": VisionTransformer(config).state_dict(), "model_config": dataclasses.asdict(config),
                     "config": {}}, path)
    status, out, err = cli([*TINY, "--data-dir", data_dir, "--eval-only", "--checkpoint", path])
    assert status == 0, err
    assert re.search(r"acc \d+\.\d+% on 50 cifar100 test images", out), out
    assert main.parse_args([]).dataset == "cifar10"


@pytest.mark.parametrize("script, argv, argument", [
    *[("main.py", [f"{flag}="], flag) for flag in ("--out-dir", "--data-dir", "--resume", "--checkpoint",
                                                    "--compare-curve")],
    ("bench.py", ["--data-dir="], "--data-dir"),  # was taken as absent: random images timed without a word
    ("bench.py", ["--json="], "--json"),
    ("predict.py", ["", "--checkpoint=x.pt"], "IMAGE"),
    ("predict.py", ["x.png", "--checkpoint="], "--checkpoint"),
    ("predict.py", ["x.png", "--checkpoint=x.pt", "--out-dir="], "--out-dir"),
    ("plots.py", ["", "out.png"], "metrics"),
    ("plots.py", ["metrics.csv", ""], "out"),
    ("plots.py", ["metrics.csv", "out.png", "--compare-curve="], "--compare-curve"),
])
def test_an_empty_path_is_refused_not_taken_as_absent(script, argv, argument, capsys):
    """`--resume "$CKPT"` with CKPT unset must not start a fresh run without a word: every script refuses it."""
    import bench
    import plots
    import predict
    parse = {"main.py": main.parse_args, "bench.py": bench.main_cli, "predict.py": predict.parse_args,
             "plots.py": plots.main}[script]
    with pytest.raises(SystemExit) as exit_:
        parse(argv)
    assert exit_.value.code == 2
    usage_error(capsys.readouterr().err, f"argument {argument}: empty path: give one, or leave the flag out")


def test_a_tilde_the_shell_left_in_a_path_is_expanded(monkeypatch, tmp_path):
    """bash leaves ~ in --data-dir=~/x: torchvision would download into $HOME/x while the reading looked in ./~/x."""
    monkeypatch.setenv("HOME", str(tmp_path))
    args = main.parse_args(["--data-dir=~/cifar", "--out-dir=~/run"])
    assert (args.data_dir, args.out_dir) == (str(tmp_path / "cifar"), str(tmp_path / "run"))
    assert main.parse_args(["--resume", "auto"]).resume == "auto"


@pytest.mark.parametrize("argv, message", [
    (["--epochs", "3", "--warmup-epochs", "3.0000001"], "--warmup-epochs 3.0000001 is longer than --epochs 3"),
    (["--lr", "0.001", "--min-lr", "0.0010000001"], "--min-lr 0.0010000001 is above --lr 0.001"),
])
def test_a_refusal_shows_the_values_as_given(argv, message, capsys):  # "3 is longer than 3" read as a bug
    with pytest.raises(SystemExit):
        main.parse_args(argv)
    usage_error(capsys.readouterr().err, message)


def test_a_rewritten_file_keeps_its_permissions_and_chmod_may_fail(tmp_path, monkeypatch):
    path = str(tmp_path / "last.pt")
    previous_umask = os.umask(0o022)
    try:
        with checkpoint.atomic_file(path) as f:
            f.write(b"first")
    finally:
        os.umask(previous_umask)
    assert os.stat(path).st_mode & 0o777 == 0o644  # as open() makes it (mkstemp's own 0600 would hide it from others)
    os.chmod(path, 0o600)  # a private checkpoint
    with checkpoint.atomic_file(path) as f:
        f.write(b"second")
    assert os.stat(path).st_mode & 0o777 == 0o600
    refused = OSError(errno.EPERM, "Operation not permitted")
    monkeypatch.setattr(os, "chmod", lambda *a, **k: (_ for _ in ()).throw(refused))  # as on a FAT disk
    with checkpoint.atomic_file(path) as f:
        f.write(b"third")
    assert open(path, "rb").read() == b"third" and temp_files(str(tmp_path)) == []


def test_a_file_is_fsynced_before_it_replaces_the_old_one(tmp_path, monkeypatch):
    """Else a power loss just after the rename could leave an empty file where the old checkpoint was."""
    events, real_fsync, real_replace = [], os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1])
    with checkpoint.atomic_file(str(tmp_path / "last.pt")) as f:
        f.write(b"weights")
    assert events[:2] == ["fsync", "replace"]


def test_first_line_is_the_first_non_blank_line_of_a_message_stripped():
    assert first_line(ValueError("\n   \n  the weights do not fit \n details")) == "the weights do not fit"
    assert first_line(ValueError()) == ""


def test_a_folder_whose_filesystem_refuses_locks_still_trains(tmp_path, fake_data, cli, monkeypatch):
    """Some network mounts answer flock with ENOLCK: the run goes on without the lock rather than stopping."""
    def no_locks(file, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
    monkeypatch.setattr(checkpoint.fcntl, "flock", no_locks)
    status, out, err = cli(train_args(fake_data, tmp_path / "run"))
    assert status == 0, err
    assert [row["epoch"] for row in metric_rows(str(tmp_path / "run"))] == ["1"]


def test_ctrl_c_ends_bench_predict_and_plots_in_one_line(capsys):
    """Their `__main__` runs through cli.run_script (main.py has its own handling, with the resume command)."""
    def interrupted():
        raise KeyboardInterrupt
    with pytest.raises(SystemExit) as exit_:
        run_script(interrupted)
    assert exit_.value.code == 130
    assert capsys.readouterr().err == "error: interrupted (Ctrl-C); files already written are kept\n"
    for script, entry in (("bench.py", "main_cli"), ("predict.py", "main"), ("plots.py", "main")):
        with open(os.path.join(ROOT, script)) as f:
            assert f.read().endswith(f'if __name__ == "__main__":\n    run_script({entry})\n'), script


def test_a_forked_child_does_not_keep_the_run_lock(tmp_path):
    """A DataLoader worker (forked) outlives its killed run for a few seconds: the run's lock must end with the run,
    not with the worker, or an immediate --resume auto is refused."""
    path = str(tmp_path / trainer.RUN_LOCK)
    held = checkpoint.hold_lock(path, wait=False)
    read, write = os.pipe()
    started_read, started_write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the worker: says it runs (fork's handlers are done), then lives until the pipe closes
        os.close(write)
        os.write(started_write, b"1")
        os.read(read, 1)
        os._exit(0)
    os.close(read)
    os.close(started_write)
    os.read(started_read, 1)
    os.close(started_read)
    try:
        held.close()  # the run ends (a kill -9 closes its files the same way)
        again = checkpoint.hold_lock(path, wait=False)
        assert again is not None, "the forked child still holds the lock"
        again.close()
    finally:
        os.close(write)
        os.waitpid(pid, 0)
