"""main.py end to end on tiny fake data: the log, metrics.csv, results.png, checkpoints, exact resume,
--resume auto, --eval-only, and a one-line error (no traceback) for every bad input."""
import csv
import os
import re
import shutil
import subprocess

import pytest
import torch

import data
import main
from conftest import ROOT, TINY_MODEL, assert_same_tensors, one_line_error, run_main, write_fake_cifar

COMMON = [*TINY_MODEL, "--batch-size", "32", "--warmup-epochs", "1", "--device", "cpu"]
METRIC_COLUMNS = ["epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "epoch_seconds",
                  "images_per_second"]
CHECKPOINT_KEYS = {"model", "optimizer", "scheduler", "epoch", "history", "rng", "config", "model_config", "classes"}
# One intra-op thread: on a small shared machine, OpenMP threads of several processes spinning against each
# other make a run many times slower (the results are the same). A proxy that refuses connections makes any
# accidental download fail at once instead of reaching the network.
ENV = {"OMP_NUM_THREADS": "1", "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9",
       "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9", "no_proxy": "", "NO_PROXY": ""}


def run(args, env=ENV, **kwargs):
    return run_main(args, env=env, **kwargs)


def read_metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.csv"), newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def load_checkpoint(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("data")
    write_fake_cifar(str(path))
    return str(path)


@pytest.fixture(scope="module")
def two_epochs(data_dir, tmp_path_factory):
    """Run A: two epochs straight, keeping epoch_N.pt every epoch."""
    out_dir = str(tmp_path_factory.mktemp("run_a"))
    result = run(["--data-dir", data_dir, "--out-dir", out_dir, *COMMON, "--epochs", "2", "--save-every", "1"])
    assert result.returncode == 0, result.stderr
    return out_dir, result


# ---------------------------------------------------------------------------------------------- a run

EPOCH_LINE = re.compile(r"^epoch (\d)/2 \| lr (\S+) \| train loss (\S+) acc +(\S+)% \| test loss (\S+) acc +(\S+)% \| "
                        r"best +(\S+)% \(epoch (\d)\) \| \S+s \| [\d,]+ img/s$")


def test_run_logs_one_line_per_epoch_matching_metrics_csv(two_epochs):
    out_dir, result = two_epochs
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("epoch ")]
    assert len(lines) == 2, result.stdout
    columns, rows = read_metrics(out_dir)
    assert columns == METRIC_COLUMNS
    assert [row["epoch"] for row in rows] == ["1", "2"]
    best = 0.0
    for line, row in zip(lines, rows):
        match = EPOCH_LINE.match(line)
        assert match, line
        epoch, lr, train_loss, train_acc, test_loss, test_acc, best_acc, best_epoch = match.groups()
        assert epoch == row["epoch"]
        assert float(lr) == pytest.approx(float(row["lr"]), rel=1e-3)
        assert float(train_loss) == pytest.approx(float(row["train_loss"]), abs=1e-4)
        assert float(test_acc) == pytest.approx(float(row["test_acc"]), abs=0.01)
        assert float(test_loss) == pytest.approx(float(row["test_loss"]), abs=1e-4)
        assert 0 <= float(row["train_acc"]) <= 100 and float(row["images_per_second"]) > 0
        best = max(best, float(row["test_acc"]))
        assert float(best_acc) == pytest.approx(best, abs=0.01)
    # --warmup-epochs 1 of 2: epoch 1 ends at the peak lr, epoch 2 at --min-lr
    assert float(rows[0]["lr"]) == pytest.approx(1e-3) and float(rows[1]["lr"]) == pytest.approx(1e-5)
    assert "done:" in result.stdout


def test_run_writes_results_png_and_checkpoints(two_epochs):
    out_dir, _ = two_epochs
    from PIL import Image

    with open(os.path.join(out_dir, "results.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with Image.open(os.path.join(out_dir, "results.png")) as image:
        image.verify()
    with Image.open(os.path.join(out_dir, "results.png")) as image:
        assert image.size[0] > 300 and image.size[1] > 200
    names = set(os.listdir(os.path.join(out_dir, "checkpoints")))
    assert {"last.pt", "best.pt", "epoch_1.pt", "epoch_2.pt"} <= names
    assert not [n for n in names if n.startswith(".tmp")]  # no leftovers of the atomic writes
    _, rows = read_metrics(out_dir)
    best_epoch = max(rows, key=lambda r: float(r["test_acc"]))["epoch"]  # first of equals, as the trainer
    for name, epoch in (("epoch_1.pt", 1), ("epoch_2.pt", 2), ("last.pt", 2), ("best.pt", int(best_epoch))):
        state = load_checkpoint(os.path.join(out_dir, "checkpoints", name))
        assert CHECKPOINT_KEYS <= state.keys(), name
        assert state["epoch"] == epoch and len(state["history"]) == epoch, name
        assert state["classes"] == [f"class{i}" for i in range(10)]
        assert state["model_config"]["hidden"] == 32 and state["model_config"]["layers"] == 2
        assert state["model_config"]["heads"] == 4 and state["model_config"]["num_classes"] == 10
        assert state["config"]["epochs"] == 2 and state["config"]["batch_size"] == 32
        assert isinstance(state["rng"]["torch"], torch.Tensor)
        assert state["optimizer"]["state"], "the optimizer state must be saved for --resume"
        assert state["model"]["patch_embed.weight"].shape == (32, 48)
    epoch_2 = load_checkpoint(os.path.join(out_dir, "checkpoints", "epoch_2.pt"))
    last = load_checkpoint(os.path.join(out_dir, "checkpoints", "last.pt"))
    assert all(torch.equal(epoch_2["model"][k], last["model"][k]) for k in last["model"])
    epoch_1 = load_checkpoint(os.path.join(out_dir, "checkpoints", "epoch_1.pt"))
    assert not torch.equal(epoch_1["model"]["head.weight"], last["model"]["head.weight"])


def test_resume_reproduces_the_uninterrupted_run_exactly(two_epochs, data_dir, tmp_path):
    out_a, _ = two_epochs
    start = tmp_path / "after_epoch_1.pt"
    shutil.copy(os.path.join(out_a, "checkpoints", "epoch_1.pt"), start)
    out_b = str(tmp_path / "run_b")
    result = run(["--data-dir", data_dir, "--out-dir", out_b, *COMMON, "--epochs", "2", "--resume", str(start)])
    assert result.returncode == 0, result.stderr
    assert f"resuming from {start} (epoch 1 done)" in result.stdout
    assert [line.split(" |")[0] for line in result.stdout.splitlines() if line.startswith("epoch ")] == ["epoch 2/2"]
    _, rows_a = read_metrics(out_a)
    _, rows_b = read_metrics(out_b)
    assert len(rows_b) == 2  # epoch 1 comes from the checkpoint's history
    for row_a, row_b in zip(rows_a, rows_b):
        for column in ("epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc"):
            assert row_a[column] == row_b[column], (column, row_a, row_b)
    last_a = load_checkpoint(os.path.join(out_a, "checkpoints", "last.pt"))
    last_b = load_checkpoint(os.path.join(out_b, "checkpoints", "last.pt"))
    assert last_a["model"].keys() == last_b["model"].keys()
    for name in last_a["model"]:
        assert torch.equal(last_a["model"][name], last_b["model"][name]), name
    for key in ("train_loss", "train_acc", "test_loss", "test_acc"):  # full precision, not just 6 digits
        assert last_a["history"][-1][key] == last_b["history"][-1][key]


def test_a_resume_into_a_new_folder_brings_the_runs_best_model_there_when_at_hand(two_epochs, data_dir, tmp_path):
    out_a, _ = two_epochs
    epoch_1, epoch_2 = (load_checkpoint(os.path.join(out_a, "checkpoints", f"epoch_{n}.pt")) for n in (1, 2))
    told_epoch_1_was_best = {**epoch_2, "best_epoch": 1, "best_acc": epoch_1["best_acc"]}
    cases = {"itself": ({**epoch_2, "best_epoch": 2, "best_acc": epoch_2["history"][1]["test_acc"]}, None, epoch_2),
             "beside": (told_epoch_1_was_best, epoch_1, epoch_1),  # its best.pt is beside it
             "nowhere": (told_epoch_1_was_best, None, None),
             "beside, of another epoch": (told_epoch_1_was_best, epoch_2, None)}
    for name, (start, best_beside, expected_best) in cases.items():
        folder = tmp_path / name.replace(" ", "_").replace(",", "")
        folder.mkdir()
        torch.save(start, folder / "start.pt")
        if best_beside is not None:
            torch.save(best_beside, folder / "best.pt")
        out_dir = str(folder / "run")
        # --epochs 2: nothing left to train, so whatever is in out_dir came at the start
        command = ["--data-dir", data_dir, "--out-dir", out_dir, *COMMON, "--epochs", "2",
                   "--resume", str(folder / "start.pt")]
        result = run(command)
        assert result.returncode == 0, result.stderr
        # no metrics.csv without a last.pt: such a folder would refuse the same command again and --resume auto
        assert not os.path.exists(os.path.join(out_dir, "metrics.csv")), name
        best = os.path.join(out_dir, "checkpoints", "best.pt")
        if expected_best is None:
            assert not os.path.exists(best), name
            assert "note: the best model so far (epoch 1, " in result.stdout, name
        else:
            assert_same_tensors(load_checkpoint(best)["model"], expected_best["model"])
            assert "note: the best model so far" not in result.stdout, name
    again = run(command)  # the last case's folder, as a retry of a failed resume would find it
    assert again.returncode == 0, again.stderr


def test_resume_auto_without_a_checkpoint_starts_fresh(data_dir, tmp_path):
    # in a folder whose Latin-1 name a strict UTF-8 stdout cannot encode: the log line prints it escaped
    out_dir = os.fsdecode(bytes(tmp_path / "fresh") + b"\xe9")
    result = run(["--data-dir", data_dir, "--out-dir", out_dir, *COMMON, "--epochs", "1", "--resume", "auto"],
                 env={**ENV, "PYTHONIOENCODING": "utf-8"})
    assert result.returncode == 0, result.stderr
    expected = os.path.join(out_dir, "checkpoints", "last.pt")
    escaped = expected.encode("utf-8", "backslashreplace").decode()
    assert f"--resume auto: no {escaped}, starting a new run" in result.stdout
    assert "resuming from" not in result.stdout
    assert load_checkpoint(expected)["epoch"] == 1


def test_eval_only_reports_the_best_epoch(two_epochs, data_dir, tmp_path):
    out_a, _ = two_epochs
    _, rows = read_metrics(out_a)
    best = max(rows, key=lambda r: float(r["test_acc"]))
    out_dir = str(tmp_path / "eval")
    best_path = os.path.join(out_a, "checkpoints", "best.pt")
    result = run(["--eval-only", "--checkpoint", best_path, "--data-dir", data_dir, "--out-dir", out_dir,
                  "--device", "cpu", "--label-smoothing", "0.3"])  # the loss is the run's (0.1), a training flag
    assert result.returncode == 0, result.stderr
    match = re.search(r"^eval .*\(epoch (\d+)\): test loss (\S+) acc (\S+)% on 50 cifar10 test images$",
                      result.stdout, re.MULTILINE)
    assert match, result.stdout
    assert match.group(1) == best["epoch"]
    assert float(match.group(2)) == pytest.approx(float(best["test_loss"]), abs=1e-4)
    assert float(match.group(3)) == pytest.approx(float(best["test_acc"]), abs=0.005)
    assert not os.path.exists(os.path.join(out_dir, "metrics.csv"))  # evaluation trains nothing


def test_eval_only_in_the_runs_folder_keeps_its_final_report(two_epochs, data_dir, tmp_path):
    """Without --out-dir, --eval-only writes beside the checkpoint's run, named after the checkpoint: the run's own
    attention.png, confusion.png and per_class.csv (the final model's) stay as they were. The training flags
    of a reused command line (--epochs 1 with the default 5 warm-up epochs, --lr below --min-lr) are not checked."""
    run_dir = shutil.copytree(two_epochs[0], tmp_path / "run")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    kept = ("attention.png", "confusion.png", "per_class.csv", "metrics.csv", "results.png")
    before = {name: (run_dir / name).read_bytes() for name in kept}
    result = run(["--eval-only", "--checkpoint", str(run_dir / "checkpoints" / "best.pt"), "--data-dir", data_dir,
                  "--device", "cpu", "--epochs", "1", "--lr", "1e-6"], cwd=str(elsewhere))
    assert result.returncode == 0, result.stderr
    assert os.listdir(elsewhere) == []
    assert {name: (run_dir / name).read_bytes() for name in kept} == before
    with open(run_dir / "per_class-best.csv") as f:
        assert f.readline().startswith("class,")
    assert (run_dir / "attention-best.png").is_file() and (run_dir / "confusion-best.png").is_file()


@pytest.mark.parametrize("path, run_folder", [("checkpoints/best.pt", "."), ("./checkpoints/best.pt", "."),
                                              ("runs/a/checkpoints/last.pt", "runs/a"), ("best.pt", "."),
                                              ("saved/epoch_9.pt", "saved")])
def test_eval_only_writes_into_the_checkpoints_run_folder(path, run_folder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    open(path, "wb").close()
    assert main.parse_args(["--eval-only", "--checkpoint", path]).out_dir == run_folder
    assert main.parse_args(["--eval-only", "--checkpoint", path, "--out-dir", "mine"]).out_dir == "mine"
    assert main.parse_args([]).out_dir == "."


def test_incomplete_data_folder_is_a_one_line_error(tmp_path):
    folder = write_fake_cifar(str(tmp_path / "data"), train_per_batch=2, test=2)
    os.remove(os.path.join(folder, "batches.meta"))
    out_dir = tmp_path / "out"
    result = run(["--data-dir", str(tmp_path / "data"), "--out-dir", str(out_dir), *COMMON, "--epochs", "1"])
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and f"{os.path.join(folder, 'batches.meta')} is missing" in lines[0]
    assert not (out_dir / "metrics.csv").exists()


# ---------------------------------------------------------------------------------------------- bad input

BAD_INPUTS = [
    (["--epochs", "0"], "--epochs"),
    (["--lr", "-1"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--lr", "inf"], "--lr"),
    (["--batch-size", "0"], "--batch-size"),
    (["--hidden", "32", "--heads", "5"], "--heads"),
    (["--patch-size", "5"], "--patch-size"),
    (["--warmup-epochs", "10", "--epochs", "2"], "--warmup-epochs"),
    (["--min-lr", "0.1"], "--min-lr"),
    (["--dataset", "imagenet"], "--dataset"),
    (["--eval-only"], "--checkpoint"),
    (["--checkpoint", "x"], "--checkpoint"),
    (["--eval-only", "--checkpoint", "{tmp}/missing.pt"], "--checkpoint"),
    (["--eval-only", "--checkpoint", "{tmp}/present.pt", "--resume", "auto"], "--resume"),
    (["--resume", "{tmp}/missing.pt"], "--resume"),
    (["--label-smoothing", "1.5"], "--label-smoothing"),
    (["--dropout", "1"], "--dropout"),
    (["--workers", "-1"], "--workers"),
    (["--seed", "1.5"], "--seed"),
    (["--device", "cuda"], "--device cuda"),
    (["--compare-curve", "{tmp}/missing.csv"], "--compare-curve"),
    (["--compare-curve", "{tmp}/present.pt"], "--compare-curve"),
]


def _bad_command(tmp_path, flags):
    (tmp_path / "present.pt").write_bytes(b"")
    data_dir = str(tmp_path / "no-such-data-dir")  # never read: the flags must be refused first
    out_dir = str(tmp_path / "out")
    base = ["--data-dir", data_dir, "--out-dir", out_dir, *TINY_MODEL, "--epochs", "2", "--warmup-epochs", "1"]
    return [*base, *(flag.replace("{tmp}", str(tmp_path)) for flag in flags)], data_dir, out_dir


def _check_one_line_error(stderr, flag, data_dir):
    assert len(one_line_error(stderr, flag)) <= 200  # no usage block before it
    assert data_dir not in stderr, "the error must be about the flag, not the data"


@pytest.mark.parametrize("flags, flag", BAD_INPUTS, ids=[" ".join(f) for f, _ in BAD_INPUTS])
def test_bad_input_is_a_one_line_error(flags, flag, tmp_path, monkeypatch, capsys):
    if flag == "--device cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is available here: --device cuda is valid")
    argv, data_dir, out_dir = _bad_command(tmp_path, flags)

    def no_data(*args, **kwargs):
        raise AssertionError("data was loaded before the bad flag was refused")

    monkeypatch.setattr(data, "load_cifar", no_data)
    try:
        status = main.main(argv)
    except SystemExit as exit:  # argparse's parser.error
        status = exit.code
    assert status not in (0, None)
    captured = capsys.readouterr()
    _check_one_line_error(captured.err, flag, data_dir)
    assert not os.path.exists(out_dir)


@pytest.mark.parametrize("flags, flag", [(["--lr", "nan"], "--lr"), (["--hidden", "32", "--heads", "5"], "--heads"),
                                         (["--device", "cuda"], "--device cuda")],
                         ids=["lr-nan", "heads-5", "device-cuda"])
def test_bad_input_from_the_command_line(flags, flag, tmp_path):
    """The same as a user sees it: a process that exits non-zero with one error line and no traceback."""
    if flag == "--device cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is available here: --device cuda is valid")
    argv, data_dir, out_dir = _bad_command(tmp_path, flags)
    result = run(argv, timeout=60)
    assert result.returncode == 2
    _check_one_line_error(result.stderr, flag, data_dir)
    assert result.stdout == "" and not os.path.exists(out_dir)


def test_a_new_run_refuses_to_overwrite_an_earlier_runs_checkpoints(data_dir, two_epochs):
    out_dir, _ = two_epochs
    protected = [os.path.join(out_dir, "checkpoints", "last.pt"), os.path.join(out_dir, "metrics.csv")]
    before = [open(path, "rb").read() for path in protected]
    result = run(["--data-dir", data_dir, "--out-dir", out_dir, *COMMON, "--epochs", "2"])
    assert result.returncode == 2
    assert "--resume auto" in result.stderr and "another --out-dir" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert [open(path, "rb").read() for path in protected] == before


def test_the_log_names_precision_and_attention_and_a_resume_takes_todays_attention(data_dir, tmp_path):
    out_dir = str(tmp_path / "run")
    first = run(["--data-dir", data_dir, "--out-dir", out_dir, *COMMON, "--epochs", "1", "--warmup-epochs", "0",
                 "--precision", "bf16"])
    assert first.returncode == 0, first.stderr
    assert "precision: bf16 | attention: math | compile: off" in first.stdout  # auto attention, CPU in bf16
    last = os.path.join(out_dir, "checkpoints", "last.pt")
    assert load_checkpoint(last)["model_config"]["attention"] == "math"
    resumed = run(["--data-dir", data_dir, "--out-dir", out_dir, *COMMON, "--epochs", "2", "--warmup-epochs", "0",
                   "--precision", "fp32", "--attention", "sdpa", "--resume", "auto"])
    assert resumed.returncode == 0, resumed.stderr
    assert "precision: fp32 | attention: sdpa | compile: off" in resumed.stdout
    assert load_checkpoint(last)["model_config"]["attention"] == "sdpa" and load_checkpoint(last)["epoch"] == 2


def test_help_shows_every_flags_default():
    """ArgumentDefaultsHelpFormatter adds "(default: ...)" only to flags with help text."""
    parser = main.build_parser()
    text = parser.format_help()
    for action in parser._actions:
        if action.option_strings and action.default not in (None, False, "==SUPPRESS=="):
            assert action.help, f"{action.option_strings[0]} has no help text, so --help hides its default"
    assert "training epochs (default: 200)" in text


@pytest.mark.skipif(not os.path.isdir(os.path.join(ROOT, ".git")) or shutil.which("git") is None,
                    reason="needs the git checkout")
def test_what_the_readmes_commands_write_into_the_repository_root_is_ignored_by_git():
    """A run, an --eval-only report and predict.py --attention write into the current folder by default; a
    `git add -A` there must not take them in. The sources stay tracked."""
    written = ["run.log", "metrics.csv", "results.png", "attention.png", "confusion.png", "per_class.csv",
               "attention-best.png", "confusion-last.png", "per_class-epoch_50.csv", "cat_attention.png",
               "checkpoints/last.pt", "runs/smoke/metrics.csv", "data/cifar-10-batches-py/test_batch", "bench.json"]
    result = subprocess.run(["git", "check-ignore", "--no-index", *written, "models.py", "README.md",
                             "results/cpu-smoke-avx2/results.png"], cwd=ROOT, capture_output=True, text=True)
    assert result.stdout.split() == written
