"""Multi-process training under torchrun (DistributedDataParallel, gloo on the CPU).

Every distributed run here is a real `python -m torch.distributed.run` launch of 2 (or 3) CPU processes,
compared with a plain single-process run. The launches are shared where they can be: one 2-rank and one
single-process tiny training run (module fixture `runs`) serve the file, quiet-rank, resume and eval tests.
"""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from conftest import ROOT, TINY_MODEL, assert_same_run, metric_rows, run_main, wait_until, write_fake_cifar

import data
import trainer

# Launched processes get one thread each (2 cores; torchrun would set this itself, with a banner) and
# none of the torchrun variables of an outer launcher.
_ENV = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                          "MASTER_PORT", "LOCAL_WORLD_SIZE")}
_ENV["OMP_NUM_THREADS"] = "1"
# The tiny runs stay on the CPU even where CUDA exists (one GPU cannot host two ranks).
DEVICE = "cpu" if torch.cuda.is_available() else "auto"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd):
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_ENV,
                            start_new_session=True)


def finish(proc, timeout=180):
    """Wait for a launched process; a hang (a deadlocked collective) fails the test instead of blocking it."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its workers: the session this test started
        out, err = proc.communicate()
        pytest.fail(f"timed out after {timeout}s (deadlock?): {' '.join(proc.args)}\n{out}\n{err}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def torchrun_cmd(script_and_args, nproc=2, launcher=()):
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", *launcher,
            *(() if launcher else ("--master_addr=127.0.0.1", f"--master_port={free_port()}")),
            *script_and_args]


def torchrun(script_and_args, nproc=2, timeout=180):
    return finish(start(torchrun_cmd(script_and_args, nproc)), timeout)


def single(args):
    return run_main(args, env={"OMP_NUM_THREADS": "1"})


def ok(result):
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


def files_under(folder):
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, names in os.walk(folder)
                  for f in names if not f.startswith(".tmp"))


def lines_starting(text, prefix):
    return [line for line in text.splitlines() if line.startswith(prefix)]


# ------------------------------------------------------------------------------------------------
# A script run by torchrun (and, for the reference, by plain python): drives the real Trainer.

HELPER = r'''
import json, os, sys
sys.path.insert(0, ROOT)
import torch
import data, main, trainer

out, data_dir, configs, coverage_batch = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
configs = [tuple(map(int, c.split(":"))) for c in configs.split(",") if c]
# fp32: the float32 tolerances below (in bf16, per-rank partial sums round differently from one big sum)
args = main.parse_args(TINY_MODEL + ["--device", "cpu", "--epochs", "1", "--warmup-epochs", "0", "--lr", "3e-3",
                                     "--batch-size", "48", "--data-dir", data_dir, "--out-dir", out, "--workers", "1",
                                     "--precision", "fp32"])
tr = trainer.Trainer(args)
result = {"rank": tr.rank, "world": tr.world, "coverage": {}}

# Training steps on a fixed, unaugmented data set of n images in global batches of b (the last one partial):
# the gradients each optimizer step sees and the final weights.
for n, b in configs:
    g = torch.Generator().manual_seed(1234)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (n,), generator=g)
    args.batch_size = b
    tr.build(10)
    grads, optimizer_step = [], tr.optimizer.step
    def recording_step(*a, **k):
        grads.append([p.grad.detach().clone() for p in tr.model.parameters()])
        return optimizer_step(*a, **k)
    tr.optimizer.step = recording_step
    loader = data.DeviceTrainLoader(images, labels, b, args.seed, tr.device, augment=False, rank=tr.rank,
                                    world=tr.world)
    steps = loader.steps()
    tr.train_epoch(1, loader, steps, steps, 0, None)
    local_sizes = [len(x) for x in data.EpochBatches(n, b, args.seed, 1, tr.rank, tr.world).batches]
    torch.save({"grads": grads, "weights": tr.model.state_dict(), "local_sizes": local_sizes},
               os.path.join(out, f"step-{n}-{b}-rank{tr.rank}.pt"))

# Which training images each rank's loader hands out, step by step, for both pipelines (augmentation off,
# so that every image can be recognised by its bytes).
if coverage_batch:
    from torchvision import transforms
    cifar = data.load_cifar("cifar10", data_dir)
    index_of = {image.numpy().tobytes(): i for i, image in enumerate(cifar.train_images)}
    assert len(index_of) == len(cifar.train_images)
    args.batch_size = coverage_batch
    for pipeline in data.PIPELINES:
        args.data_pipeline = pipeline
        loader = tr.make_train_loader(cifar)
        if pipeline == "device":
            loader.augment = False
        else:
            loader.dataset.transform = transforms.PILToTensor()
        for epoch in (1, 2):
            steps = []
            for images, labels in loader.epoch(epoch):
                indices = [index_of[image.contiguous().numpy().tobytes()] for image in images]
                assert labels.tolist() == cifar.train_labels[indices].tolist()
                steps.append(indices)
            assert len(steps) == loader.steps()
            result["coverage"][f"{pipeline}/{epoch}"] = steps
with open(os.path.join(out, f"rank{tr.rank}.json"), "w") as f:
    json.dump(result, f)
trainer.shutdown_distributed()
'''


def write_helper(folder):
    path = os.path.join(folder, "dist_helper.py")
    with open(path, "w") as f:
        f.write(f"ROOT = {ROOT!r}\nTINY_MODEL = {TINY_MODEL!r}\n" + HELPER)
    return path


@pytest.fixture(scope="module")
def helper_runs(tmp_path_factory):
    """The helper under 2 ranks, under 3 ranks and in one process; all three started at once."""
    base = tmp_path_factory.mktemp("helper")
    data_dir = str(base / "data")
    write_fake_cifar(data_dir)
    script = write_helper(str(base))
    # (n images, global batch b): 15:8 -> steps of 8 = 4+4 and a last 7 = 4+3 on 2 ranks;
    # 14:6 -> 6 = 2+2+2 and a last 2 = 1+1+0 on 3 ranks (one rank's share is empty).
    jobs = {"world2": (2, "15:8", 48), "world3": (3, "14:6", 48)}
    procs, outs = {}, {}
    for name, (nproc, configs, coverage) in jobs.items():
        outs[name] = str(base / name)
        os.makedirs(outs[name])
        procs[name] = start(torchrun_cmd([script, outs[name], data_dir, configs, str(coverage)], nproc))
    outs["single"] = str(base / "single")
    os.makedirs(outs["single"])
    procs["single"] = start([sys.executable, script, outs["single"], data_dir, "15:8,14:6", "48"])
    results = {name: finish(proc) for name, proc in procs.items()}
    return SimpleNamespace(outs=outs, results=results, data_dir=data_dir)


def _max_relative_error(a, b):
    """max |a - b| relative to the largest magnitude in b (elementwise relative error is meaningless where
    sums cancel to near zero)."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


# Float32 tolerance for "the same step": the distributed gradient is each rank's mean over its share, weighted,
# all-reduced and divided by the world size; the single process takes one mean over the global batch. Same
# mathematics, different summation order over <= 8 samples and a few extra multiplications, so each element
# differs by a few float32 roundings (unit roundoff 6e-8) relative to the largest terms: 1e-5 of the tensor's
# largest magnitude is ~100x that, while a wrong weighting of a partial batch (e.g. 4 vs 3 samples averaged
# equally) is off by several percent. (Observed here: ~1e-6.)
GRAD_RTOL = 1e-5
# The weights after Adam steps: Adam moves each weight by about lr * g / |g|, whatever g's scale, so the
# difference is measured in units of one step, lr: at most 1% of a step (observed: <= 0.05%). Excluded: the
# attention's key bias, whose true gradient is exactly zero (softmax ignores a shift shared by all keys), so
# Adam turns its roundoff-level gradient into a step of arbitrary sign in both runs.
WEIGHT_ATOL_IN_STEPS = 1e-2


@pytest.mark.parametrize("world,n,b", [(2, 15, 8), (3, 14, 6)])
def test_distributed_steps_match_single_process(helper_runs, world, n, b):
    for name in (f"world{world}", "single"):
        ok(helper_runs.results[name])
    reference = torch.load(os.path.join(helper_runs.outs["single"], f"step-{n}-{b}-rank0.pt"))
    ranks = [torch.load(os.path.join(helper_runs.outs[f"world{world}"], f"step-{n}-{b}-rank{r}.pt"))
             for r in range(world)]
    # The split really is uneven in the last step (so the loss weighting is exercised).
    last = [r["local_sizes"][-1] for r in ranks]
    assert sum(last) == n % b and len(set(last)) > 1
    assert all(sum(r["local_sizes"][i] for r in ranks) == min(b, n - i * b) for i in range(len(ranks[0]["local_sizes"])))
    # Every rank holds the same weights (DDP keeps the replicas identical).
    for r in ranks[1:]:
        for key in reference["weights"]:
            assert torch.equal(r["weights"][key], ranks[0]["weights"][key]), key
    assert len(ranks[0]["grads"]) == len(reference["grads"]) == -(-n // b)
    for step, (got, want) in enumerate(zip(ranks[0]["grads"], reference["grads"])):
        for g_ddp, g_one in zip(got, want):
            assert _max_relative_error(g_ddp, g_one) <= GRAD_RTOL, f"step {step}"
    lr = 3e-3
    for key, want in reference["weights"].items():
        difference = (ranks[0]["weights"][key] - want).abs()
        if key.endswith("attn.qkv.bias"):
            hidden = len(want) // 3
            difference = torch.cat([difference[:hidden], difference[2 * hidden:]])  # q and v biases
        assert difference.max().item() <= WEIGHT_ATOL_IN_STEPS * lr, key
    assert not any(key.startswith("module.") for key in ranks[0]["weights"])


def test_epoch_batches_split_is_exact():
    for world in (2, 3):
        for num_samples, batch in [(12, 6), (13, 6), (14, 6), (20, 6), (7, 6), (5, 6), (100, 12), (101, 30)]:
            if batch % world:
                continue
            for epoch in (1, 2):
                plans = [data.EpochBatches(num_samples, batch, 0, epoch, rank, world) for rank in range(world)]
                whole = data.EpochBatches(num_samples, batch, 0, epoch)
                assert all(len(p) == len(whole) == -(-num_samples // batch) for p in plans)
                seen = []
                for step, full in enumerate(whole.batches):
                    shares = [p.batches[step].tolist() for p in plans]
                    # each step's shares are disjoint, cover the single-process batch, and differ in size by <= 1
                    assert sorted(sum(shares, [])) == sorted(full.tolist())
                    assert max(map(len, shares)) - min(map(len, shares)) <= 1
                    if len(full) == batch:
                        assert all(len(s) == batch // world for s in shares)
                    seen += sum(shares, [])
                assert sorted(seen) == list(range(num_samples))  # every image exactly once per epoch
            first = [data.EpochBatches(num_samples, batch, 0, 1, rank, world).indices() for rank in range(world)]
            second = [data.EpochBatches(num_samples, batch, 0, 2, rank, world).indices() for rank in range(world)]
            if num_samples > 3:
                assert any(not torch.equal(a, b) for a, b in zip(first, second))  # a new permutation per epoch


def test_loaders_hand_out_an_empty_share():
    """A last global batch smaller than the world (14 images, batch 6, 3 ranks: 6, 6, 2 = 1 + 1 + 0) leaves
    one rank an empty batch, which both pipelines deliver as a [0, 3, 32, 32] uint8 batch."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (14, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (14,), generator=g)
    for loader in (data.DeviceTrainLoader(images, labels, 6, 0, "cpu", rank=2, world=3),
                   data.TorchvisionTrainLoader(images, labels, 6, 0, workers=0, pin_memory=False, rank=2, world=3)):
        batches = list(loader.epoch(1))
        assert [len(y) for _, y in batches] == [2, 2, 0]
        assert batches[-1][0].shape == (0, 3, 32, 32) and batches[-1][0].dtype == torch.uint8
        assert batches[-1][1].dtype == torch.int64


@pytest.mark.parametrize("world", [2, 3])
def test_loaders_cover_each_image_once_per_epoch(helper_runs, world):
    """End to end through Trainer.make_train_loader under torchrun, for both pipelines: the ranks' batches of
    each step are disjoint and together form the single-process batch; an epoch covers every image once."""
    ok(helper_runs.results[f"world{world}"])
    ok(helper_runs.results["single"])
    ranks = []
    for r in range(world):
        with open(os.path.join(helper_runs.outs[f"world{world}"], f"rank{r}.json")) as f:
            ranks.append(json.load(f))
    assert [r["rank"] for r in ranks] == list(range(world)) and all(r["world"] == world for r in ranks)
    with open(os.path.join(helper_runs.outs["single"], "rank0.json")) as f:
        reference = json.load(f)["coverage"]
    num_train = 200  # write_fake_cifar: 5 x 40
    for key, single_steps in reference.items():
        per_rank = [r["coverage"][key] for r in ranks]
        assert all(len(steps) == len(single_steps) for steps in per_rank), key
        epoch = []
        for step, want in enumerate(single_steps):
            shares = [steps[step] for steps in per_rank]
            assert sorted(sum(shares, [])) == sorted(want), (key, step)
            epoch += sum(shares, [])
        assert len(epoch) == num_train and sorted(epoch) == list(range(num_train)), key
    # Shared permutation: the same for both pipelines; different from epoch to epoch.
    assert reference["device/1"] == reference["torchvision/1"] and reference["device/1"] != reference["device/2"]


# ------------------------------------------------------------------------------------------------
# main.py under torchrun vs plain python

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("runs")
    data_dir = str(base / "data")
    write_fake_cifar(data_dir)
    # 200 train images in global batches of 48 (4 full + 8); 50 test images in eval batches of 16, so each
    # rank's half of the test set takes two eval batches.
    common = TINY_MODEL + ["--epochs", "2", "--warmup-epochs", "0", "--batch-size", "48", "--eval-batch-size", "16",
                           "--device", DEVICE, "--data-dir", data_dir]
    ddp_dir, single_dir = str(base / "ddp"), str(base / "single")
    ddp = start(torchrun_cmd(["main.py", *common, "--out-dir", ddp_dir]))
    one = single([*common, "--out-dir", single_dir])
    return SimpleNamespace(base=base, data_dir=data_dir, common=common, ddp_dir=ddp_dir, single_dir=single_dir,
                           ddp=finish(ddp), single=one)


def test_two_ranks_write_the_same_files_as_one_process(runs):
    ok(runs.ddp)
    ok(runs.single)
    assert files_under(runs.ddp_dir) == files_under(runs.single_dir)
    assert {"metrics.csv", "results.png", "attention.png", "confusion.png", "per_class.csv",
            os.path.join("checkpoints", "last.pt"), os.path.join("checkpoints", "best.pt")} <= set(files_under(runs.ddp_dir))
    assert [row["epoch"] for row in metric_rows(runs.ddp_dir)] == ["1", "2"]
    state = torch.load(os.path.join(runs.ddp_dir, "checkpoints", "last.pt"), weights_only=True)
    assert state["epoch"] == 2


def test_rank_one_is_quiet(runs):
    out = ok(runs.ddp).stdout
    for prefix in ("model:", "epoch 1/2 ", "epoch 2/2 ", "all ", "done:"):
        assert len(lines_starting(out, prefix)) == 1, (prefix, out)
    assert "x2 processes" in lines_starting(out, "model:")[0]
    # The same log as one process, line for line in kind and number.
    assert len(out.splitlines()) == len(ok(runs.single).stdout.splitlines())
    if DEVICE == "auto":
        assert runs.ddp.stderr.count("warning: CUDA is not available") == 1, runs.ddp.stderr


def _eval_line(stdout):
    lines = lines_starting(stdout, "eval ")
    assert len(lines) == 1, stdout
    match = re.search(r"test loss ([\d.]+) acc ([\d.]+)%", lines[0])
    return float(match.group(1)), float(match.group(2))


def test_two_rank_checkpoint_evaluates_the_same_in_one_process(runs, tmp_path):
    ok(runs.ddp)
    path, stem = os.path.join(runs.ddp_dir, "checkpoints", "last.pt"), "last"  # eval-only names its report files
    state = torch.load(path, weights_only=True)
    assert not any(key.startswith("module.") for key in state["model"])
    reported = metric_rows(runs.ddp_dir)[-1]  # epoch 2, evaluated sharded over the 2 ranks
    eval_args = ["--eval-only", "--checkpoint", path, "--eval-batch-size", "16", "--device", DEVICE,
                 "--data-dir", runs.data_dir]
    two = start(torchrun_cmd(["main.py", *eval_args, "--out-dir", str(tmp_path / "two")]))
    one = ok(single([*eval_args, "--out-dir", str(tmp_path / "one")]))
    loss, acc = _eval_line(one.stdout)
    assert acc == round(float(reported["test_acc"]), 2)
    assert abs(loss - float(reported["test_loss"])) <= 1e-4  # printed to 4 decimals; sums in another order
    # eval-only under torchrun: sharded evaluation, report written by rank 0, every rank exits.
    two = ok(finish(two))
    assert _eval_line(two.stdout) == (loss, acc)
    assert files_under(str(tmp_path / "two")) == files_under(str(tmp_path / "one")) == \
        [f"attention-{stem}.png", f"confusion-{stem}.png", f"per_class-{stem}.csv"]
    with open(tmp_path / "two" / f"per_class-{stem}.csv") as a, open(tmp_path / "one" / f"per_class-{stem}.csv") as b:
        assert a.read() == b.read()


def _check_resumed(result, out_dir, before_dir):
    ok(result)
    assert len(lines_starting(result.stdout, "resuming from")) == 1, result.stdout
    assert lines_starting(result.stdout, "epoch ") == lines_starting(result.stdout, "epoch 3/3 ")
    assert len(lines_starting(result.stdout, "epoch 3/3 ")) == 1
    rows, before = metric_rows(out_dir), metric_rows(before_dir)
    assert [row["epoch"] for row in rows] == ["1", "2", "3"]
    assert rows[:2] == before  # the history carried over unchanged
    assert float(rows[2]["train_loss"]) > 0
    state = torch.load(os.path.join(out_dir, "checkpoints", "last.pt"), weights_only=True)
    assert state["epoch"] == 3 and not any(key.startswith("module.") for key in state["model"])


def test_resume_across_world_sizes(runs):
    """Two ranks resume a two-rank run and a single-process run; one process resumes a two-rank run."""
    ok(runs.ddp)
    ok(runs.single)
    resumes = {}
    for name, source in (("ddp_from_ddp", runs.ddp_dir), ("ddp_from_single", runs.single_dir),
                         ("single_from_ddp", runs.ddp_dir)):
        shutil.copytree(source, str(runs.base / name))
    flags = [*runs.common, "--epochs", "3", "--resume", "auto"]
    for name in ("ddp_from_ddp", "ddp_from_single"):
        resumes[name] = start(torchrun_cmd(["main.py", *flags, "--out-dir", str(runs.base / name)]))
    resumes["single_from_ddp"] = single([*flags, "--out-dir", str(runs.base / "single_from_ddp")])
    for name in ("ddp_from_ddp", "ddp_from_single"):
        resumes[name] = finish(resumes[name])
    for name, result in resumes.items():
        source = runs.single_dir if name == "ddp_from_single" else runs.ddp_dir
        _check_resumed(result, str(runs.base / name), source)


def test_batch_not_divisible_by_world_size_is_a_clear_error(runs, tmp_path):
    result = torchrun(["main.py", *TINY_MODEL, "--epochs", "1", "--warmup-epochs", "0", "--batch-size", "47",
                       "--device", DEVICE,
                       "--data-dir", runs.data_dir, "--out-dir", str(tmp_path)], timeout=60)
    assert result.returncode != 0
    assert "--batch-size 47 is the global batch and must divide by the 2 processes: choose a multiple of 2" \
        in result.stderr
    # torchrun itself reports the failed workers (with its own traceback); the workers print none.
    for ours in ("main.py", "trainer.py", "data.py"):
        assert f'{os.sep}{ours}", line' not in result.stderr, result.stderr
    assert not os.path.exists(tmp_path / "checkpoints")


def test_two_nodes(runs, tmp_path):
    """Two torchrun launchers, one process each, as on two machines (--nnodes 2, --node_rank): the second
    node's only process has LOCAL_RANK 0 but RANK 1, and stays quiet."""
    port = free_port()
    args = ["main.py", *runs.common, "--epochs", "1", "--out-dir", str(tmp_path)]
    nodes = [start(torchrun_cmd(args, 1, ("--nnodes=2", f"--node_rank={i}", "--master_addr=127.0.0.1",
                                          f"--master_port={port}"))) for i in range(2)]
    node0, node1 = (ok(finish(p)) for p in nodes)
    assert len(lines_starting(node0.stdout, "epoch 1/1 ")) == 1 and "x2 processes" in node0.stdout
    assert node1.stdout.strip() == "", node1.stdout
    assert [row["epoch"] for row in metric_rows(str(tmp_path))] == ["1"]


def test_backend_follows_the_device(monkeypatch):
    """nccl exactly when this rank's device is a GPU (so --device cpu under torchrun uses gloo even where
    CUDA exists), each rank on the GPU named by LOCAL_RANK."""
    calls = []
    monkeypatch.setattr(trainer.dist, "init_process_group", lambda backend, **kw: calls.append((backend, kw)))
    monkeypatch.setattr(trainer.dist, "get_rank", lambda: 3)
    monkeypatch.setattr(trainer.dist, "get_world_size", lambda: 4)
    monkeypatch.setattr(trainer.torch.cuda, "set_device", lambda device: calls.append(("set_device", device)))
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert trainer.init_distributed(torch.device("cpu")) == (3, 4)
    assert calls == [("gloo", {})]
    calls.clear()
    assert trainer.init_distributed(torch.device("cuda", 1)) == (3, 4)
    assert calls == [("set_device", torch.device("cuda", 1)), ("nccl", {"device_id": torch.device("cuda", 1)})]
    monkeypatch.setattr(trainer.torch.cuda, "is_available", lambda: True)
    assert trainer.resolve_device("auto", 1) == torch.device("cuda", 1)
    assert trainer.resolve_device("cpu", 1) == torch.device("cpu")
    monkeypatch.setenv("WORLD_SIZE", "1")
    calls.clear()
    assert trainer.init_distributed(torch.device("cpu")) == (0, 1) and calls == []


def test_the_resume_command_names_the_launcher_the_run_used():
    argv = ["main.py", "--epochs", "3", "--resume", "old/last.pt"]
    assert trainer.resume_command(argv, 1, 1) == "python main.py --epochs 3 --resume auto"
    assert trainer.resume_command(argv, 2, 2) == "torchrun --nproc_per_node=2 main.py --epochs 3 --resume auto"
    assert trainer.resume_command(argv, 4, 2) == ("torchrun (with this run's options, on every machine) main.py "
                                                  "--epochs 3 --resume auto")


@pytest.mark.parametrize("rank, exit_code, printed", [
    ("0", 143, "stopped by SIGTERM after epoch 1"), ("1", 143, ""),  # every rank stops alike: rank 0 says so
    ("0", 1, "error: disk full"), ("1", 1, "rank 1: error: disk full"),  # an error may be one rank's alone
])
def test_a_stop_is_printed_by_rank_0_and_an_error_by_the_rank_that_meets_it(monkeypatch, capsys, rank, exit_code,
                                                                             printed):
    import main
    message = "stopped by SIGTERM after epoch 1" if exit_code == 143 else "disk full"

    class StoppingTrainer:
        def __init__(self, args):
            raise trainer.TrainingStopped(message, exit_code)
    monkeypatch.setattr(trainer, "Trainer", StoppingTrainer)
    monkeypatch.setenv("RANK", rank)
    assert main.run(main.parse_args(["--device", "cpu"])) == exit_code
    assert capsys.readouterr().err.strip() == printed


def test_a_dropout_run_stopped_and_resumed_under_torchrun_is_bit_identical(tmp_path):
    """2,005 images at batch 16: the last global batch splits 3 + 2, so from the end of epoch 1 the two ranks'
    dropout streams differ; each must get its own back at a resume (a checkpoint holding rank 0's alone gave
    rank 1 other masks). SIGTERM goes to torchrun once epoch 1 is logged; wherever it lands, the resumed run
    must end bit-identical to the uninterrupted one."""
    data_dir = str(tmp_path / "data")
    write_fake_cifar(data_dir, train_per_batch=401, test=40)
    common = ["main.py", *TINY_MODEL, "--patch-size", "8", "--device", "cpu", "--precision", "fp32", "--data-dir",
              data_dir, "--epochs", "3", "--warmup-epochs", "1", "--batch-size", "16", "--dropout", "0.1",
              "--eval-batch-size", "40"]
    straight_dir, resumed_dir = str(tmp_path / "straight"), str(tmp_path / "resumed")
    straight = start(torchrun_cmd([*common, "--out-dir", straight_dir]))
    interrupted = start(torchrun_cmd([*common, "--out-dir", resumed_dir]))
    metrics_csv = os.path.join(resumed_dir, "metrics.csv")
    wait_until(lambda: os.path.exists(metrics_csv) and len(metric_rows(resumed_dir)) >= 1, interrupted,
               lambda: "epoch 1 did not finish")
    interrupted.send_signal(signal.SIGTERM)
    stopped = finish(interrupted)
    assert stopped.returncode != 0 and "stopped by SIGTERM" in stopped.stderr, stopped.stderr
    ok(finish(start(torchrun_cmd([*common, "--out-dir", resumed_dir, "--resume", "auto"]))))
    ok(finish(straight))
    assert_same_run(straight_dir, resumed_dir)
