"""Shared test fixtures: tiny fake CIFAR folders, a tiny-model command line for main.py, and small helpers."""
import contextlib
import csv
import os
import pickle
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():  # triton_attention.py's kernels then run on CPU tensors through Triton's
    os.environ.setdefault("TRITON_INTERPRET", "1")  # interpreter; read when Triton is imported (main.py's too)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REAL_CIFAR10 = os.path.join(ROOT, "..", "shared", "data", "cifar-10-batches-py")
sys.path.insert(0, ROOT)


def relative_error(a, b) -> float:
    """|a - b| / |b| in float64; a and b are tensors or iterables of tensors (then one flat vector each)."""
    def flat(x):
        return torch.cat([t.detach().double().flatten() for t in ([x] if isinstance(x, torch.Tensor) else x)])
    a, b = flat(a), flat(b)
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@contextlib.contextmanager
def one_torch_thread():
    """One intra-op thread: on a small machine shared with other processes, spinning OpenMP threads make small
    calls (and even the 6M-parameter model) several times slower. The count is restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def one_line_error(err, *fragments):
    """stderr is exactly one line (no traceback, no warning) that holds every fragment."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


def usage_error(err, *fragments):
    """A parse-time error: one `prog: error: ...` line holding every fragment, no usage block."""
    line = one_line_error(err, *fragments)
    assert ": error: " in line, line
    return line


def load_script(name):
    """A module from scripts/ (not a package), by file name without .py."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "scripts", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY_MODEL = ["--layers", "2", "--hidden", "32", "--mlp-hidden", "32", "--heads", "4"]
WALL_CLOCK = {"epoch_seconds", "images_per_second"}  # the metrics.csv columns that differ between equal runs


def metric_rows(out_dir):
    with open(os.path.join(out_dir, "metrics.csv"), newline="") as f:
        return list(csv.DictReader(f))


def assert_same_tensors(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def assert_same_run(dir_a, dir_b, epochs=3):
    """The final weights and optimizer state are bit-identical, and so are the metrics but for wall-clock times."""
    a = torch.load(os.path.join(dir_a, "checkpoints", "last.pt"), weights_only=True)
    b = torch.load(os.path.join(dir_b, "checkpoints", "last.pt"), weights_only=True)
    assert a["epoch"] == b["epoch"] == epochs
    assert_same_tensors(a["model"], b["model"])
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for key in a["optimizer"]["state"]:
        assert_same_tensors(a["optimizer"]["state"][key], b["optimizer"]["state"][key])
    rows_a, rows_b = metric_rows(dir_a), metric_rows(dir_b)
    assert [r["epoch"] for r in rows_a] == [str(e) for e in range(1, epochs + 1)]
    strip = [[{k: v for k, v in row.items() if k not in WALL_CLOCK} for row in rows] for rows in (rows_a, rows_b)]
    assert strip[0] == strip[1]


def wait_until(condition, process, why=lambda: "", timeout=120):
    """Polls `condition` while `process` (a Popen) runs; fails if it ends or `timeout` seconds pass first."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None and time.monotonic() < deadline, why()
        time.sleep(0.005)


def write_fake_cifar(data_dir, dataset="cifar10", train_per_batch=40, test=50, seed=0):
    """A CIFAR folder in the standard python layout with random, weakly class-coloured images."""
    rng = np.random.default_rng(seed)
    num_classes = 10 if dataset == "cifar10" else 100
    folder = os.path.join(data_dir, "cifar-10-batches-py" if dataset == "cifar10" else "cifar-100-python")
    os.makedirs(folder, exist_ok=True)
    label_key = b"labels" if dataset == "cifar10" else b"fine_labels"

    def batch(n):
        labels = rng.integers(0, num_classes, n)
        images = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        images[:, :1024] = (labels[:, None] * (250 // num_classes)).astype(np.uint8)  # red plane encodes the class
        return {b"data": images, label_key: labels.tolist()}

    def dump(name, obj):
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(obj, f)

    if dataset == "cifar10":
        for i in range(1, 6):
            dump(f"data_batch_{i}", batch(train_per_batch))
        dump("test_batch", batch(test))
        dump("batches.meta", {b"label_names": [f"class{i}".encode() for i in range(10)]})
    else:
        dump("train", batch(5 * train_per_batch))
        dump("test", batch(test))
        dump("meta", {b"fine_label_names": [f"class{i}".encode() for i in range(100)]})
    return folder


@pytest.fixture
def fake_cifar10(tmp_path):
    data_dir = tmp_path / "data"
    write_fake_cifar(str(data_dir))
    return str(data_dir)


def run_main(args, cwd=ROOT, timeout=300, env=None):
    """Run main.py as a user would; returns the CompletedProcess (text stdout/stderr)."""
    return subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})
