"""--precision auto and --attention auto: what they resolve to on which hardware, and what a run reports."""
import pytest
import torch

import main
import trainer

CPU = torch.device("cpu")
CUDA = torch.device("cuda", 0)


@pytest.mark.parametrize("avx512_bf16, amx, expected", [(True, False, torch.bfloat16), (False, True, torch.bfloat16),
                                                        (False, False, None)])
def test_auto_precision_on_the_cpu_follows_native_bf16(monkeypatch, avx512_bf16, amx, expected):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert trainer.resolve_precision("auto", CPU) is expected
    assert trainer.resolve_precision("bf16", CPU) is torch.bfloat16  # forced, whatever the hardware
    assert trainer.resolve_precision("fp32", CPU) is None


@pytest.mark.parametrize("native, expected", [(True, torch.bfloat16), (False, None)])
def test_auto_precision_on_cuda_needs_bf16_without_emulation(monkeypatch, native, expected):
    asked = {}

    def is_bf16_supported(including_emulation=True):
        asked["including_emulation"] = including_emulation
        return native or including_emulation

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    assert trainer.resolve_precision("auto", CUDA) is expected
    assert asked == {"including_emulation": False}  # a V100 emulates bf16 slowly: fp32 there


def test_auto_attention_is_explicit_only_on_the_cpu_in_bf16():
    assert trainer.resolve_attention("auto", CPU, torch.bfloat16) == "math"
    assert trainer.resolve_attention("auto", CPU, None) == "sdpa"
    assert trainer.resolve_attention("auto", CUDA, torch.bfloat16) == "sdpa"
    assert trainer.resolve_attention("sdpa", CPU, torch.bfloat16) == "sdpa"
    assert trainer.resolve_attention("math", CUDA, None) == "math"


def test_auto_eval_batch_is_large_on_cuda_only():
    assert trainer.resolve_eval_batch_size("auto", CUDA) == 1000
    assert trainer.resolve_eval_batch_size("auto", CPU) == 128
    assert trainer.resolve_eval_batch_size(300, CPU) == 300
    assert main.parse_args([]).eval_batch_size == "auto"
    assert main.parse_args(["--eval-batch-size", "64"]).eval_batch_size == 64


def test_a_bad_eval_batch_size_names_auto_too(capsys):
    with pytest.raises(SystemExit):
        main.parse_args(["--eval-batch-size", "many"])
    assert capsys.readouterr().err.strip().endswith("argument --eval-batch-size: 'many' is not an integer (or auto)")


@pytest.mark.parametrize("flags, batches", [([], [128, 128, 44]), (["--eval-batch-size", "200"], [200, 100])])
def test_evaluation_runs_in_batches_of_the_resolved_size(flags, batches):
    run = trainer.Trainer(main.parse_args(["--device", "cpu", "--layers", "1", "--hidden", "16", "--mlp-hidden", "16",
                                           "--heads", "2", *flags]))
    run.build(10)
    seen = []
    forward = run.loss_and_predictions
    run.loss_and_predictions = lambda network, x, y: seen.append(len(x)) or forward(network, x, y)
    images = torch.randint(0, 256, (300, 3, 32, 32), dtype=torch.uint8)
    _, _, predictions = run.evaluate(images, torch.zeros(300, dtype=torch.long))
    assert seen == batches and len(predictions) == 300


def test_auto_compile_mode_graphs_one_process_only():
    assert trainer.resolve_compile_mode("auto", 1) == "whole-step"
    assert trainer.resolve_compile_mode("auto", 2) == "default"
    assert trainer.resolve_compile_mode("default", 1) == "default"
    assert trainer.resolve_compile_mode("reduce-overhead", 1) == "reduce-overhead"
    for pipeline in ("device", "torchvision"):  # the Trainer's wiring
        args = main.parse_args(["--device", "cpu", "--data-pipeline", pipeline])
        assert trainer.Trainer(args).compile_mode == "whole-step"


@pytest.mark.parametrize("mode", ["reduce-overhead", "whole-step"])
def test_cuda_graphs_are_refused_under_torchrun_and_with_no_compile(monkeypatch, capsys, mode):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    args = main.parse_args(["--compile-mode", mode, "--device", "cpu"])
    with pytest.raises(trainer.TrainingStopped, match=f"{mode} works in one process only: drop it under torchrun"):
        trainer.Trainer(args)  # before any process group is started
    with pytest.raises(SystemExit):
        main.parse_args(["--compile-mode", mode, "--no-compile"])
    assert f"--compile-mode {mode} and --no-compile contradict each other" in capsys.readouterr().err
