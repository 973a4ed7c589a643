"""bench.py: its rows, its JSON and its profile tables, on a tiny CPU run; the FLOP count it reports; its one-line
refusals of bad input."""
import json
import os
import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import bench
import trainer
from conftest import ROOT, load_script, usage_error, write_fake_cifar
from models import ViTConfig, VisionTransformer


def test_flop_count_matches_torch_flop_counter():
    # explicit attention: the counter does not see inside the CPU's fused attention kernel
    for config in (ViTConfig(attention="math"), ViTConfig(layers=2, hidden=64, mlp_hidden=96, heads=4, patch_size=8,
                                                          num_classes=100, attention="math")):
        model = VisionTransformer(config)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(torch.zeros(2, 3, 32, 32))
        assert counter.get_total_flops() / 2 == bench.forward_flops_per_image(config)


def test_bench_rows_json_and_profiles(tmp_path, fake_cifar10):
    out = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, os.path.join(ROOT, "bench.py"), "--device", "cpu", "--data-dir", fake_cifar10,
                          "--batch-size", "8", "--steps", "2", "--warmup", "1", "--eval-images", "20",
                          "--augment-images", "40", "--workers", "0", "--fast-flags", "",
                          "--fast-flags", "--attention math --precision bf16", "--profile-steps", "2", "--json", str(out),
                          "--model-flags", "--layers 1 --hidden 32 --mlp-hidden 32 --heads 2"],  # the rows, not the model
                         capture_output=True, text=True, timeout=300, env={k: v for k, v in os.environ.items() if k != "KINETO_LOG_LEVEL"})
    assert run.returncode == 0, run.stderr
    assert "gpuGetDeviceCount" not in run.stderr and "profiler_start" not in run.stderr  # the profiler's noise
    result = json.loads(out.read_text())
    rows = result["training"]
    assert [r["config"] for r in rows] == ["reference", "fast", "fast-2"]
    assert rows[0]["flags"] == " ".join(bench.REFERENCE_FLAGS)
    assert rows[2]["flags"] == "--attention math --precision bf16"
    bf16 = trainer.native_bf16(torch.device("cpu"))  # the defaults' precision and attention on this CPU
    assert [r["settings"] for r in rows] == [  # what "(defaults)" resolved to, kept beside the numbers
        "pipeline: torchvision | precision: fp32 | attention: math | compile: off",
        f"pipeline: device | precision: {'bf16' if bf16 else 'fp32'} | attention: {'math' if bf16 else 'sdpa'} | "
        f"compile: off",
        "pipeline: device | precision: bf16 | attention: math | compile: off"]
    for r in rows:
        assert r["train_images_per_s"] > 0 and r["eval_images_per_s"] > 0
        assert r["eval_batch_size"] == 128  # main.py's auto on the CPU: the rate is of that batch size
        assert r["profile"]["steps"] == 2
        table = open(r["profile"]["table"]).read()
        assert table.startswith(f"{r['config']}: 2 steps") and "aten::" in table
    assert os.path.dirname(rows[0]["profile"]["table"]) == str(tmp_path)
    assert result["augmentation"]["images"] == 40
    printed = run.stdout
    assert "fast-2" in printed and "vs ref." in printed and "profile fast-2" in printed
    assert "--attention math --precision bf16 (pipeline: device | precision: bf16 | attention: math | compile: off)" in printed


def test_a_failing_row_is_recorded_and_the_others_still_run(tmp_path, fake_cifar10, capsys, monkeypatch):
    measure = bench.bench_training

    def fail_for_graphs(name, flags, cifar, opts):
        if "reduce-overhead" in flags:
            raise RuntimeError("no CUDA graphs here")
        return measure(name, flags, cifar, opts)

    monkeypatch.setattr(bench, "bench_training", fail_for_graphs)
    out = tmp_path / "bench.json"
    bench.main_cli(["--device", "cpu", "--data-dir", fake_cifar10, "--batch-size", "8", "--steps", "1",
                    "--warmup", "1", "--eval-images", "10", "--augment-images", "20", "--workers", "0",
                    "--fast-flags", "--compile-mode reduce-overhead", "--fast-flags", "--attention math",
                    "--json", str(out)])
    rows = json.loads(out.read_text())["training"]
    assert rows[1] == {"config": "fast", "flags": "--compile-mode reduce-overhead",
                       "error": "RuntimeError: no CUDA graphs here"}
    assert rows[0]["train_images_per_s"] > 0 and rows[2]["train_images_per_s"] > 0
    assert "fast       failed: RuntimeError: no CUDA graphs here" in capsys.readouterr().out


def test_model_flags_change_the_model_of_every_row(tmp_path, fake_cifar10, capsys):
    small = ViTConfig(layers=1, hidden=32, mlp_hidden=32, heads=2, patch_size=8, num_classes=10)
    flags = "--layers 1 --hidden 32 --mlp-hidden 32 --heads 2 --patch-size 8"
    parameters = sum(p.numel() for p in VisionTransformer(small).parameters())
    out = tmp_path / "bench.json"
    bench.main_cli(["--device", "cpu", "--data-dir", fake_cifar10, "--batch-size", "8", "--steps", "1", "--warmup", "1",
                    "--eval-images", "10", "--augment-images", "20", "--workers", "0", "--model-flags", flags,
                    "--fast-flags", "--attention sdpa", "--json", str(out)])
    result = json.loads(out.read_text())
    rows = result["training"]
    assert [(r["config"], r["parameters"]) for r in rows] == [("reference", parameters), ("fast", parameters)]
    assert rows[0]["flags"] == " ".join(bench.REFERENCE_FLAGS)
    assert result["model_flags"] == flags and result["parameters"] == parameters
    assert result["forward_gflop_per_image"] == bench.forward_flops_per_image(small) / 1e9
    assert f"model {flags}: {parameters:,} parameters" in capsys.readouterr().out.splitlines()[0]


def test_device_time_counts_each_kernel_once():
    from types import SimpleNamespace
    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
    events = [SimpleNamespace(name="gemm", device_type=cuda, is_user_annotation=False, self_device_time_total=30),
              SimpleNamespace(name="softmax", device_type=cuda, is_user_annotation=False, self_device_time_total=10),
              SimpleNamespace(name="## Call CompiledFxGraph", device_type=cuda, is_user_annotation=True,
                              self_device_time_total=40),  # the range around both kernels, as on the H100
              SimpleNamespace(name="aten::mm", device_type=cpu, is_user_annotation=False, self_device_time_total=30)]
    assert [e.name for e in bench.device_kernels(events)] == ["gemm", "softmax"]



def test_attention_backends_times_the_default_models_shape():
    assert load_script("attention_backends").attention_shape(128) == (128, 12, 65, 32)


def test_attention_backends_without_cuda_is_a_one_line_error():
    result = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "attention_backends.py")],
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": ROOT, "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: attention_backends.py times CUDA kernels and found no CUDA GPU; run it on a GPU machine"]


def assert_refused(argv, fragment, capsys):
    """bench.py stops with exit 2 and one `error:` line holding `fragment`."""
    with pytest.raises(SystemExit) as exit_:
        bench.main_cli(argv)
    assert exit_.value.code == 2
    usage_error(capsys.readouterr().err, fragment)


def no_work(*args, **kwargs):
    raise AssertionError("the benchmark started although its input should have been refused")


@pytest.mark.parametrize("args, fragment", [
    (["--json", "/nonexistent-folder/bench.json"], "--json /nonexistent-folder/bench.json: cannot write it (No such "
                                                   "file or directory)"),
    (["--json", "/tmp"], "--json /tmp is not a .json file name"),
    (["--model-flags", "--heads 5"], "--model-flags '--heads 5': --hidden 384 is not divisible by --heads 5"),
    (["--fast-flags", "--heads 5"], "--fast-flags '--heads 5': --heads changes the model, which all rows share: "
                                    "pass it in --model-flags"),
    (["--fast-flags", "--attention math --lay=2"],
     "--fast-flags '--attention math --lay=2': --layers changes the model"),
    (["--model-flags", "--hidden 64 --lr 1e-3"], "--model-flags '--hidden 64 --lr 1e-3': --lr is not a model flag "
                                                 "(--layers, --hidden, --mlp-hidden, --heads, --patch-size, "),
    (["--model-flags", "--attention sdpa"], "--model-flags '--attention sdpa': --attention is not a model flag"),
    (["--model-flags", "--hidden 64 --heads 4 --bat 64"],
     "--model-flags '--hidden 64 --heads 4 --bat 64': every row uses bench.py's own --batch-size"),
    (["--fast-flags", "--lr 1e-3 --batch-size=64"],
     "--fast-flags '--lr 1e-3 --batch-size=64': every row uses bench.py's own --batch-size"),
    (["--fast-flags", "--ba 64"], "--fast-flags '--ba 64': every row uses bench.py's own --batch-size"),
    (["--fast-flags", "--device cpu"], "--fast-flags '--device cpu': every row uses bench.py's own --device: "
                                       "pass it to bench.py"),
    (["--model-flags", "--workers 3"], "--model-flags '--workers 3': every row uses bench.py's own --workers"),
    (["--fast-flags", "--epochs 5"], "--fast-flags '--epochs 5': --epochs belongs to a training run, and bench.py "
                                     "times steps: drop it"),
    *[(["--fast-flags", flags], f"--fast-flags '{flags}': {flags.split()[0]} belongs to a training run")
      for flags in ("--dataset cifar100", "--out-dir /tmp/x", "--resume last.pt", "--eval-only",
                    "--compare-curve c.csv", "--save-every 2")],  # were accepted, and ignored
    (["--fast-flags", "--data-dir /d"], "--fast-flags '--data-dir /d': every row uses bench.py's own --data-dir"),
    (["--fast-flags", '"--precision bf16'], "--fast-flags '\"--precision bf16': No closing quotation: quote the "
                                            "flags as a shell would"),  # was a traceback
    (["--json", "last.pt"], "--json last.pt is not a .json file name"),  # was replaced without a word
    (["--fast-flags=--help"], "--fast-flags '--help': not flags for a training row"),
    (["--fast-flags", "--d 0.1"], "--fast-flags '--d 0.1': ambiguous option: --d could match --dropout, "),
    (["--data-dir", "/nonexistent-data"], "--data-dir /nonexistent-data holds no cifar-10-batches-py/"),
    (["--device", "cuda"], "--device cuda was asked for but CUDA is not available on this machine"),
])
def test_bad_bench_input_stops_before_any_work(args, fragment, capsys, monkeypatch):
    monkeypatch.setattr(bench, "load_data", no_work)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert_refused(["--device", "cpu", *args], fragment, capsys)


@pytest.mark.parametrize("args, fragment", [
    (["--steps", "30", "--batch-size", "8"], "--steps x --batch-size asks for 240 images but the data holds 200"),
    (["--augment-images", "201"], "--augment-images asks for 201 images but the data holds 200"),  # was counted 201
    (["--eval-images", "51"], "--eval-images asks for 51 images but the data holds 50"),
    (["--steps", "2", "--warmup", "3"], "--warmup 3 is more than --steps 2"),
    (["--steps", "2", "--profile-steps", "3"], "--profile-steps 3 is more than --steps 2"),  # profiled 2, silently
])
def test_requests_the_data_cannot_meet_stop_before_any_timing(args, fragment, tmp_path, capsys, monkeypatch):
    """Checked once the data is read (its size is known then), before the first row is timed."""
    monkeypatch.setattr(bench, "bench_row", no_work)
    write_fake_cifar(str(tmp_path), train_per_batch=40, test=50)  # 200 training and 50 test images
    assert_refused(["--device", "cpu", "--data-dir", str(tmp_path), "--json", str(tmp_path / "b.json"),
                    "--batch-size", "8", "--steps", "2", "--warmup", "1", *args], fragment, capsys)


def test_a_damaged_data_folder_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bench, "bench_row", no_work)
    os.remove(os.path.join(write_fake_cifar(str(tmp_path)), "batches.meta"))
    assert_refused(["--device", "cpu", "--data-dir", str(tmp_path), "--json", str(tmp_path / "b.json")],
                   "batches.meta is missing", capsys)


def test_a_one_word_flag_string_is_taken_as_the_row_flags():
    """argparse alone refuses `--fast-flags --no-compile` ("expected one argument")."""
    assert bench.row_flags_joined(["--fast-flags", "--no-compile", "--model-flags", "--no-mlp-final-gelu",
                                   "--fast-flags", "--compile-mode whole-step", "--steps", "3"]) == [
        "--fast-flags=--no-compile", "--model-flags=--no-mlp-final-gelu", "--fast-flags=--compile-mode whole-step",
        "--steps", "3"]
    assert bench.row_flags_joined(["--fast-flags", "", "--steps", "3"]) == ["--fast-flags", "", "--steps", "3"]
    assert bench.row_flags_joined(["--fast", "--no-compile", "--mod", "--layers=2"]) == [
        "--fast=--no-compile", "--mod=--layers=2"]  # argparse's abbreviations
    assert bench.row_flags_joined(["--fast-flags", "--"]) == ["--fast-flags", "--"]  # was a traceback


def test_an_unquoted_row_of_two_words_is_told_to_quote_it(capsys, monkeypatch):
    monkeypatch.setattr(bench, "load_data", no_work)
    assert_refused(["--device", "cpu", "--fast-flags", "--precision", "fp32"],
                   "unrecognized arguments: fp32 (a row's flags go in one quoted string, e.g. --fast-flags "
                   "\"--precision fp32\")", capsys)
    assert_refused(["--device", "cpu", "--fast-flags", "--"], "argument --fast-flags: expected one argument", capsys)


def test_ctrl_c_in_a_row_is_not_taken_for_the_rows_failure(monkeypatch):
    """A failing row is recorded and the bench goes on; a Ctrl-C must end it (as one line, cli.run_script)."""
    def interrupted(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(bench, "bench_training", interrupted)
    monkeypatch.setattr(torch._dynamo, "reset", lambda: pytest.fail("reset during an interrupt"))
    with pytest.raises(KeyboardInterrupt):
        bench.bench_row("fast", [], None, None)


def test_a_json_path_that_is_a_folder_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bench, "load_data", no_work)
    (tmp_path / "bench.json").mkdir()
    assert_refused(["--device", "cpu", "--json", str(tmp_path / "bench.json")],
                   f"--json {tmp_path / 'bench.json'}: cannot write it (Is a directory)", capsys)  # found only at the end
