"""The CUDA code paths: skipped on machines without a GPU (CI), run on a GPU box with `pytest tests/test_cuda.py`."""
import os

import pytest
import torch

from conftest import TINY_MODEL, load_script, relative_error, run_main, write_fake_cifar

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_sdpa_matches_math_on_cuda_fp32_and_bf16():
    from models import ViTConfig, VisionTransformer
    torch.manual_seed(0)
    math_model = VisionTransformer(ViTConfig(attention="math")).cuda()
    sdpa_model = VisionTransformer(ViTConfig(attention="sdpa")).cuda()
    sdpa_model.load_state_dict(math_model.state_dict())
    images = torch.randn(64, 3, 32, 32, device="cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    with torch.no_grad():
        assert relative_error(sdpa_model(images), math_model(images)) < 1e-4  # fused kernels reorder float32 sums
        with torch.autocast("cuda", dtype=torch.bfloat16):
            fast, reference = sdpa_model(images).float(), math_model(images).float()
        assert relative_error(fast, reference) < 2e-2  # bf16 operands: 8 mantissa bits


def test_triton_attention_in_bf16_errs_no_more_than_sdpa():
    """The model's loss and gradients in bf16 autocast through the Triton kernels and through sdpa, each against
    the explicit formula in fp32: the kernels' rounding may not exceed cuDNN's by half (fp32 against float64:
    tests/test_triton_attention.py, which runs on the GPU here too)."""
    from models import ViTConfig, VisionTransformer
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = False
    models_by_path = {path: VisionTransformer(ViTConfig(attention=path)).cuda() for path in ("math", "sdpa", "triton")}
    for model in models_by_path.values():
        model.load_state_dict(models_by_path["math"].state_dict())
    images, labels = torch.randn(64, 3, 32, 32, device="cuda"), torch.randint(0, 10, (64,), device="cuda")

    def loss_and_gradients(path, dtype):
        model = models_by_path[path]
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(images).float(), labels)
        return [loss, *torch.autograd.grad(loss, list(model.parameters()))]

    reference = loss_and_gradients("math", torch.float32)
    errors = {path: [relative_error(a, b) for a, b in zip(loss_and_gradients(path, torch.bfloat16), reference)]
              for path in ("sdpa", "triton")}
    for name, triton_error, sdpa_error in zip(["loss", *dict(models_by_path["math"].named_parameters())],
                                              errors["triton"], errors["sdpa"]):
        assert triton_error <= 1.5 * sdpa_error + 1e-3, (name, triton_error, sdpa_error)


def test_compiled_bf16_train_step_learns_a_fixed_batch():
    import main
    import trainer
    args = main.parse_args(["--device", "cuda", *TINY_MODEL, "--out-dir", "/tmp/cuda-test"])
    runner = trainer.Trainer(args)
    runner.build(10)
    assert runner.compiled and runner.amp_dtype == torch.bfloat16
    images = torch.randint(0, 256, (128, 3, 32, 32), dtype=torch.uint8, device="cuda")
    labels = torch.randint(0, 10, (128,), device="cuda")
    losses = [runner.train_step(images, labels, 1e-3)[0].item() for _ in range(30)]
    assert losses[-1] < 0.9 * losses[0]  # on an H100: 2.30 -> 1.82 after 30 steps; a broken backward stays at 2.30


def test_augmentation_on_cuda_equals_cpu_for_given_magnitudes():
    import augment
    images = torch.randint(0, 256, (256, 3, 32, 32), dtype=torch.uint8)
    magnitudes = torch.linspace(-1, 1, 256)
    for op in augment.OPS:
        scale = augment.magnitude(op, 9) if augment.magnitude(op, 9) else 1.0
        cpu = augment.apply_op(images, op, magnitudes * scale)
        gpu = augment.apply_op(images.cuda(), op, (magnitudes * scale).cuda()).cpu()
        mismatch = (cpu.int() - gpu.int()).abs()
        assert mismatch.max() <= 1 and (mismatch > 0).float().mean() < 1e-3, op  # float rounding on the boundary


def test_device_loader_on_cuda_covers_the_epoch():
    import data
    images = torch.arange(300).view(300, 1, 1, 1).expand(300, 3, 32, 32).to(torch.uint8)
    labels = torch.arange(300)
    loader = data.DeviceTrainLoader(images, labels, 128, seed=0, device="cuda", augment=False)
    batches = list(loader.epoch(1))
    assert [len(y) for _, y in batches] == [128, 128, 44]
    seen = torch.cat([y for _, y in batches]).cpu()
    assert sorted(seen.tolist()) == list(range(300))
    assert all(x.is_cuda and x.dtype == torch.uint8 for x, _ in batches)


def test_main_runs_on_cuda_with_compile(tmp_path):
    data_dir = tmp_path / "data"
    write_fake_cifar(str(data_dir))
    result = run_main(["--data-dir", str(data_dir), "--out-dir", str(tmp_path / "run"), "--epochs", "2",
                       "--warmup-epochs", "1", "--batch-size", "32", *TINY_MODEL])
    assert result.returncode == 0, result.stderr
    assert "device: cuda" in result.stdout and "precision: bf16" in result.stdout and "compile: whole-step" in result.stdout
    assert os.path.isfile(tmp_path / "run" / "checkpoints" / "last.pt")


def test_main_trains_with_triton_attention_inside_the_whole_step_graph(tmp_path):
    write_fake_cifar(str(tmp_path / "data"))
    result = run_main(["--data-dir", str(tmp_path / "data"), "--out-dir", str(tmp_path / "run"), "--epochs", "2",
                       "--warmup-epochs", "1", "--batch-size", "32", "--attention", "triton", *TINY_MODEL[:4],
                       "--heads", "2"])
    assert result.returncode == 0, result.stderr
    assert "attention: triton | compile: whole-step" in result.stdout
    assert os.path.isfile(tmp_path / "run" / "checkpoints" / "last.pt")


def test_reduce_overhead_trains_and_evaluates_like_default_compile():
    """CUDA graphs replay the same kernels: the same losses step by step (stale inputs would change them),
    and the evaluation's predictions survive the graph reusing its output memory on the next batch."""
    import main
    import trainer
    torch.manual_seed(0)
    images = torch.randint(0, 256, (6, 64, 3, 32, 32), dtype=torch.uint8, device="cuda")
    labels = torch.randint(0, 10, (6, 64), device="cuda")
    runners, losses = {}, {}
    for mode in ("default", "reduce-overhead"):
        args = main.parse_args(["--device", "cuda", *TINY_MODEL, "--compile-mode", mode, "--eval-batch-size", "100",
                                "--out-dir", "/tmp/cuda-test"])
        runner = trainer.Trainer(args)
        runner.build(10)
        # clone: under CUDA graphs the returned loss lives in memory that the next step reuses
        losses[mode] = torch.stack([runner.train_step(images[step], labels[step], 1e-3)[0].clone() for step in range(6)])
        runners[mode] = runner
    assert torch.allclose(losses["default"], losses["reduce-overhead"], rtol=1e-3), losses
    test_images, test_labels = images.flatten(0, 1)[:300], labels.flatten()[:300]
    eager = trainer.Trainer(main.parse_args(["--device", "cuda", *TINY_MODEL, "--no-compile", "--out-dir", "/tmp/cuda-test"]))
    eager.build(10)
    eager.model.load_state_dict(runners["reduce-overhead"].model.state_dict())
    _, _, graphed = runners["reduce-overhead"].evaluate(test_images, test_labels)
    _, _, expected = eager.evaluate(test_images, test_labels)
    assert (graphed == expected).float().mean() > 0.9  # bf16 kernels may flip near-ties; overwritten outputs: ~10%


def test_attention_backends_script_times_every_row(capsys):
    load_script("attention_backends").main(["--batch-size", "8"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("attention forward+backward, shape (8, 12, 65, 32)")
    rows = lines[1:]
    assert [row.split("  ")[0] for row in rows] == [
        "explicit formula, eager", "explicit formula, compiled", "sdpa CUDNN_ATTENTION", "sdpa FLASH_ATTENTION",
        "sdpa EFFICIENT_ATTENTION", "triton_attention.py", "triton_attention.py, 8 warps"]
    assert all(row.endswith(" ms") or "not available" in row for row in rows)


@pytest.mark.parametrize("flags", [[], ["--optimizer", "adamw", "--precision", "fp32", "--attention", "math"]],
                         ids=["defaults", "adamw-fp32-math"])
def test_whole_step_graph_trains_like_reduce_overhead(flags):
    """The same weights and batches (full ones, a partial one that takes the ordinary step between replays,
    changing learning rates): the one-graph step gives reduce-overhead's losses and weights, and the graph was
    captured and replayed; also with the other optimizer, precision and attention, which `auto` graphs the same
    way."""
    import main
    import trainer
    torch.manual_seed(0)
    images = torch.randint(0, 256, (10, 64, 3, 32, 32), dtype=torch.uint8, device="cuda")
    labels = torch.randint(0, 10, (10, 64), device="cuda")
    sizes = [64] * 6 + [40] + [64] * 3
    runners, losses = {}, {}
    for mode in ("reduce-overhead", "whole-step"):
        runner = trainer.Trainer(main.parse_args(["--device", "cuda", *TINY_MODEL, "--compile-mode", mode, *flags,
                                                  "--batch-size", "64", "--out-dir", "/tmp/cuda-test"]))
        runner.build(10)
        losses[mode] = torch.stack([runner.train_step(images[step, :size], labels[step, :size],
                                                      1e-3 * (1 + step % 3))[0].clone()
                                    for step, size in enumerate(sizes)])
        runners[mode] = runner
    graph = runners["whole-step"].step_graph
    assert graph.graph is not None and graph.replays == 9 - 3  # full batches after the three warm-up steps
    assert torch.allclose(losses["whole-step"], losses["reduce-overhead"], rtol=1e-3), losses  # same kernels
    # a coarse bound: the attention's key bias gets a zero gradient up to rounding, which Adam turns into steps
    assert relative_error(runners["whole-step"].model.parameters(), runners["reduce-overhead"].model.parameters()) < 1e-2
    groups = runners["whole-step"].optimizer.param_groups
    assert [(type(group["lr"]), group["lr"], group["capturable"]) for group in groups] == [(float, 1e-3, False)]


@pytest.mark.parametrize("dropout, differ", [("0.1", True), ("0", False)])
def test_whole_step_graph_draws_new_dropout_masks_each_replay(dropout, differ):
    """At learning rate 0 the weights stay; replays of one batch then differ only by their dropout masks."""
    import main
    import trainer
    runner = trainer.Trainer(main.parse_args(["--device", "cuda", *TINY_MODEL, "--compile-mode", "whole-step",
                                              "--dropout", dropout, "--batch-size", "64", "--out-dir", "/tmp/cuda-test"]))
    runner.build(10)
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, device="cuda")
    labels = torch.randint(0, 10, (64,), device="cuda")
    losses = [runner.train_step(images, labels, 0.0)[0].item() for _ in range(6)]
    assert runner.step_graph.replays == 3
    assert (len(set(losses[3:])) == 3) == differ, losses


@pytest.mark.parametrize("mode", ["default", "reduce-overhead", "whole-step"])
def test_training_loop_never_waits_for_the_device(mode):
    """The training loop's steps (train_step and the on-device sums of train_epoch) never synchronise with the GPU:
    in the third epoch, when compilation, graph recording and capture are over (partial batch included), each
    step's loop body runs under CUDA's sync-debug mode "error", where a copy to the host, an .item() or a
    synchronize raises. The epoch's end still reads its sums once, after the last step."""
    import main
    import trainer
    with pytest.raises(RuntimeError, match="synchroniz"):  # the detector works: a host read raises under the mode
        torch.cuda.set_sync_debug_mode("error")
        try:
            torch.ones(1, device="cuda").item()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    runner = trainer.Trainer(main.parse_args(["--device", "cuda", *TINY_MODEL, "--compile-mode", mode,
                                              "--batch-size", "64", "--out-dir", "/tmp/cuda-test"]))
    runner.build(10)
    torch.manual_seed(0)
    batches = [(torch.randint(0, 256, (size, 3, 32, 32), dtype=torch.uint8, device="cuda"),
                torch.randint(0, 10, (size,), device="cuda")) for size in [64] * 5 + [40]]
    checked = []

    class Loader:  # the same batches every epoch; from epoch 3 the loop body after each yield is checked
        num_samples = sum(len(labels) for _, labels in batches)

        def epoch(self, epoch):
            for batch in batches:
                torch.cuda.set_sync_debug_mode("error" if epoch >= 3 else 0)
                yield batch
                torch.cuda.set_sync_debug_mode(0)
                checked.append(epoch >= 3)

    try:
        rows = [runner.train_epoch(epoch, Loader(), len(batches), 3 * len(batches), len(batches), None)[0]
                for epoch in (1, 2, 3)]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert checked.count(True) == len(batches)
    assert all(row["train_loss"] > 0 for row in rows)


@pytest.mark.parametrize("pipeline", ["device", "torchvision"])
def test_main_trains_and_resumes_with_the_whole_step_graph(tmp_path, pipeline):
    """Whole epochs (200 images at batch 32: six steps and a partial batch each), a checkpoint, a resume; with
    the torchvision pipeline, DataLoader threads pin memory while the step is captured."""
    data_dir, out_dir = tmp_path / "data", tmp_path / "run"
    write_fake_cifar(str(data_dir))
    common = ["--data-dir", str(data_dir), "--out-dir", str(out_dir), "--warmup-epochs", "1", "--batch-size", "32",
              "--compile-mode", "whole-step", "--data-pipeline", pipeline, *TINY_MODEL]
    first = run_main([*common, "--epochs", "2"])
    assert first.returncode == 0, first.stderr
    assert "compile: whole-step" in first.stdout
    captured = "whole-step: the training step is captured as one CUDA graph (after 3 ordinary steps)"
    assert first.stdout.count(captured) == 1
    resumed = run_main([*common, "--epochs", "3", "--resume", "auto"])
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.count(captured) == 1
    rows = (out_dir / "metrics.csv").read_text().splitlines()[1:]
    assert [row.split(",")[0] for row in rows] == ["1", "2", "3"]
