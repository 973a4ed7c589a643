"""triton_attention.py: the kernels against the explicit formula in float64, their registration with
torch.library (fake shapes, autograd, torch.compile), the model and main.py with --attention triton, and its
refusals. Without a GPU the kernels run through Triton's interpreter (conftest sets TRITON_INTERPRET=1)."""
import dataclasses
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, TINY_MODEL, relative_error, run_main, usage_error, write_fake_cifar

triton_attention = pytest.importorskip("triton_attention", reason="needs Triton (PyTorch's CUDA builds on Linux)")
import checkpoint  # noqa: E402
import models  # noqa: E402
from models import ViTConfig, VisionTransformer  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SMALL = ViTConfig(layers=2, hidden=32, mlp_hidden=48, heads=2, attention="triton")  # head width 16


def random_qkv(batch, heads, tokens, width, dtype):
    """The fused projection's output as the model hands it to the kernels: [N, T, 3 * heads * width]."""
    return torch.randn(batch, tokens, 3 * heads * width, device=DEVICE, dtype=dtype, requires_grad=True)


def explicit_attention(qkv, heads):
    return models.merge_heads(models.self_attention(*models.split_heads(qkv, heads))[0])


def forward_and_gradient(attend, qkv, heads, upstream):
    """The attention's output and the gradient it sends back to the qkv projection for the given upstream one,
    which is handed over transposed (last dimension not contiguous), as a reshaping caller may."""
    out = attend(qkv, heads)
    (grad_qkv,) = torch.autograd.grad(out, qkv, upstream.transpose(1, 2).contiguous().transpose(1, 2))
    return out, grad_qkv


def against_float64(qkv, heads, upstream):
    """(out, grad_qkv) of the kernels and of the explicit formula in float64, from the same qkv and upstream."""
    qkv64 = qkv.detach().double().requires_grad_(True)
    return (forward_and_gradient(triton_attention.attention, qkv, heads, upstream),
            forward_and_gradient(explicit_attention, qkv64, heads, upstream.double()))


@pytest.mark.parametrize("batch, heads, tokens, width", [(2, 4, 65, 32), (3, 2, 20, 16), (1, 1, 129, 64), (2, 1, 1, 16), (1, 2, 2, 16)],
                         ids=["model-shape", "padded-to-32", "longest", "one-token", "two-tokens"])
def test_forward_and_gradients_equal_the_explicit_formula_in_float64(batch, heads, tokens, width):
    torch.manual_seed(0)
    qkv = random_qkv(batch, heads, tokens, width, torch.float32)
    upstream = torch.randn(batch, tokens, heads * width, device=DEVICE)
    (out, grad), (out64, grad64) = against_float64(qkv, heads, upstream)
    assert out.shape == out64.shape == (batch, tokens, heads * width) and out.dtype == torch.float32
    assert grad.shape == qkv.shape and grad.is_contiguous()
    assert relative_error(out, out64) < 1e-5  # fp32 products in full fp32 (not TF32): rounding only
    assert relative_error(grad, grad64) < 1e-5
    for part, part64 in zip(grad.chunk(3, dim=2), grad64.chunk(3, dim=2)):  # dq, dk and dv: each its own third
        assert relative_error(part, part64) < 1e-5 or tokens == 1  # one token: dq = dk = 0, rounding is all


def test_half_precision_inputs_stay_within_half_precision_rounding():
    """16-bit inputs: the probabilities and score gradients are rounded to 16 bits before their products, as
    fused kernels do. (fp16 stands in for bf16 here: Triton 3.8's interpreter mis-multiplies bf16; the CUDA
    test checks bf16 on the GPU.)"""
    torch.manual_seed(1)
    qkv = random_qkv(2, 4, 65, 32, torch.float16)
    upstream = torch.randn(2, 65, 4 * 32, device=DEVICE, dtype=torch.float16)
    (out, grad), (out64, grad64) = against_float64(qkv, 4, upstream)
    assert out.dtype == grad.dtype == torch.float16
    assert relative_error(out, out64) < 2e-3
    assert relative_error(grad, grad64) < 5e-3


def test_the_ops_fake_shapes_and_autograd_registration_pass_opcheck():
    torch.manual_seed(2)
    qkv = random_qkv(2, 2, 9, 16, torch.float32)
    torch.library.opcheck(triton_attention._attention, (qkv, 2))
    out, lse = triton_attention._attention(qkv, 2)
    assert out.requires_grad and not lse.requires_grad  # the log-sum-exps are marked non-differentiable
    qkv = qkv.detach()  # the backward has no backward of its own (no double backward)
    out, lse = triton_attention._attention(qkv, 2)
    torch.library.opcheck(triton_attention._attention_backward, (qkv, out, torch.randn_like(out), lse, 2))


def test_inputs_of_any_layout_give_the_same_results():
    """Inside torch.compile the ops may be handed other layouts than eager gives them (a copy of `out`, say)."""
    torch.manual_seed(5)
    qkv = torch.randn(2, 20, 3 * 3 * 16, device=DEVICE)
    out, lse = triton_attention._attention(qkv, 3)
    assert relative_error(out, explicit_attention(qkv, 3)) < 1e-5
    grad_out = torch.randn(2, 3 * 16, 20, device=DEVICE).transpose(1, 2)
    grad = triton_attention._attention_backward(qkv, out, grad_out, lse, 3)
    qkv_t, out_t = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (qkv, out))
    assert torch.equal(triton_attention._attention(qkv_t, 3)[0], out)
    assert torch.equal(triton_attention._attention_backward(qkv_t, out_t, grad_out.contiguous(), lse, 3), grad)


@pytest.mark.parametrize("shape, heads", [((20, 144), 3), ((2, 20, 144), 5), ((2, 20, 144), 0)])
def test_a_tensor_that_is_not_a_qkv_of_the_given_heads_is_refused_by_name(shape, heads):
    with pytest.raises(ValueError, match=re.escape(f"qkv must be [images, tokens, 3 * heads * head width], got "
                                                   f"{list(shape)} for {heads} heads")):
        triton_attention.attention(torch.zeros(shape), heads)


def test_too_many_tokens_or_an_unsupported_head_width_is_refused_by_name():
    for tokens, width in [(130, 32), (0, 32), (65, 24), (65, 8), (65, 128)]:
        qkv = torch.zeros(1, tokens, 3 * 2 * width)
        refusal = f"^the Triton attention takes up to 129 tokens .*, not {tokens} tokens of width {width}: use the sdpa"
        with pytest.raises(ValueError, match=refusal + " attention$"):
            triton_attention.attention(qkv, 2)


# ---------------------------------------------------------------------------------------------- the model

def test_the_model_with_triton_attention_computes_what_the_explicit_formula_does(monkeypatch):
    calls = []
    kernels = triton_attention._attention
    monkeypatch.setattr(triton_attention, "_attention", lambda *args: calls.append(1) or kernels(*args))
    torch.manual_seed(3)
    triton_model = VisionTransformer(SMALL).to(DEVICE)
    math_model = VisionTransformer(dataclasses.replace(SMALL, attention="math")).to(DEVICE)
    math_model.load_state_dict(triton_model.state_dict())
    images = torch.randn(4, 3, 32, 32, device=DEVICE)
    labels = torch.tensor([0, 3, 7, 9], device=DEVICE)
    results = []
    for model in (triton_model, math_model):
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        results.append((loss, torch.autograd.grad(loss, list(model.parameters()))))
    (triton_loss, triton_grads), (math_loss, math_grads) = results
    assert len(calls) == SMALL.layers  # the model's forward ran through the kernels, once per layer
    assert relative_error(triton_loss, math_loss) < 1e-5
    assert relative_error(triton_grads, math_grads) < 1e-4


def test_torch_compile_runs_the_kernels_as_a_custom_op_with_the_eager_results():
    """torch.compile traces the op through its registered fake shapes (no Python inside it) and calls it."""
    torch.manual_seed(4)
    model = VisionTransformer(SMALL).to(DEVICE)
    images = torch.randn(2, 3, 32, 32, device=DEVICE)
    eager_logits = model(images)
    eager_grads = torch.autograd.grad(eager_logits.square().sum(), list(model.parameters()))
    compiled_logits = torch.compile(model, fullgraph=True)(images)
    compiled_grads = torch.autograd.grad(compiled_logits.square().sum(), list(model.parameters()))
    assert relative_error(compiled_logits, eager_logits) < 1e-5
    assert relative_error(compiled_grads, eager_grads) < 1e-4


@pytest.mark.parametrize("fields, problem", [
    (dict(dropout=0.1), "has no attention dropout: use the sdpa or math attention with dropout"),
    (dict(hidden=32, heads=4), "takes up to 129 tokens of head width 16, 32, 64, not 65 tokens of width 8: use "
                               "the sdpa attention"),
    (dict(patch_size=2), "takes up to 129 tokens of head width 16, 32, 64, not 257 tokens of width 16: use the "
                         "sdpa attention"),
])
def test_a_model_the_kernels_cannot_compute_is_refused_by_the_config_and_by_main(fields, problem, capsys):
    with pytest.raises(ValueError, match=re.escape(f"attention 'triton' {problem}")):
        dataclasses.replace(SMALL, **fields)
    flags = {"dropout": ["--dropout", "0.1"], "heads": ["--heads", "4"], "patch_size": ["--patch-size", "2"]}
    argv = ["--hidden", "32", "--heads", "2", "--attention", "triton"]
    argv += [token for name in fields if name in flags for token in flags[name]]
    import main
    with pytest.raises(SystemExit) as stop:
        main.parse_args(argv)
    assert stop.value.code == 2
    usage_error(capsys.readouterr().err, f"--attention triton {problem}")


def test_without_triton_installed_the_path_is_refused_by_name(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton_attention", None)  # `import triton_attention` now raises ImportError
    problem = models.triton_attention_problem(65, 32, 0.0)
    assert problem.startswith("needs the triton package, which comes with PyTorch's CUDA builds on Linux (")
    assert problem.endswith("): use the sdpa attention")
    with pytest.raises(ValueError, match="attention 'triton' needs the triton package"):
        dataclasses.replace(SMALL, heads=1)


def test_a_checkpoint_loads_with_the_default_attention_and_refuses_triton_for_a_model_with_dropout(tmp_path):
    """The stored attention is how the training machine computed, not part of the model: a GPU run's triton
    checkpoint loads anywhere; asking for triton with a model the kernels cannot compute is a CheckpointError."""
    path = tmp_path / "model.pt"
    torch.save({"model": VisionTransformer(SMALL).state_dict(), "model_config": dataclasses.asdict(SMALL)}, path)
    model, _ = checkpoint.load_model(str(path))
    assert model.config.attention == "sdpa" and model.config.layers == SMALL.layers
    with_dropout = dataclasses.replace(SMALL, attention="sdpa", dropout=0.1)
    torch.save({"model": VisionTransformer(with_dropout).state_dict(),
                "model_config": dataclasses.asdict(with_dropout)}, path)
    with pytest.raises(checkpoint.CheckpointError,
                       match=f"^{path}: attention 'triton' has no attention dropout: use the sdpa or math"):
        checkpoint.load_model(str(path), attention="triton")


# ---------------------------------------------------------------------------------------------- main.py

@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is the CPU's")
def test_main_refuses_triton_attention_on_the_cpu_before_reading_data(tmp_path):
    result = run_main(["--device", "cpu", "--attention", "triton", "--data-dir", str(tmp_path / "absent"),
                       "--out-dir", str(tmp_path / "run"), *TINY_MODEL[:4], "--heads", "2"],
                      env={"TRITON_INTERPRET": "0"})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == ["error: --attention triton runs Triton's GPU kernels and needs a CUDA GPU: use --attention sdpa "
                     "on the CPU (TRITON_INTERPRET=1 runs them there, slowly, as the tests do)"]
    assert not (tmp_path / "absent").exists() and not (tmp_path / "run").exists()


def test_main_trains_an_epoch_with_triton_attention_and_logs_it(tmp_path):
    write_fake_cifar(str(tmp_path / "data"), train_per_batch=8, test=16)  # 5 batches of 8: 40 images
    result = run_main(["--data-dir", str(tmp_path / "data"), "--out-dir", str(tmp_path / "run"), "--epochs", "1",
                       "--warmup-epochs", "0", "--batch-size", "16", "--attention", "triton", "--no-compile",
                       *TINY_MODEL[:4], "--heads", "2"], cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "attention: triton" in result.stdout
    assert (tmp_path / "run" / "checkpoints" / "last.pt").is_file()


# ---------------------------------------------------------------------------------------------- on the GPU's terms

@pytest.mark.parametrize("tokens, head_width, warps", [(65, 32, 4), (65, 64, 8), (129, 16, 8), (33, 64, 4)],
                         ids=["model-shape", "width-64", "longest-width-16", "33-tokens-width-64"])
def test_the_kernels_compile_for_an_h100_without_spilling_registers(tokens, head_width, warps):
    """Triton's real compiler and ptxas (shipped in its wheel) build both kernels for sm_90 here, no GPU needed:
    in bf16, with the warps _launch_settings picks, nothing spills to local memory at the default model's shape
    (with 2 warps the backward would spill 400 bytes) nor at the others where the rule promises it."""
    import triton
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.isfile(ptxas):
        pytest.skip("this Triton has no ptxas")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "triton_registers.py"), "--arch", "90",
                             "--tokens", str(tokens), "--head-width", str(head_width)],
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": ROOT, "TRITON_INTERPRET": "0"})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"{tokens} tokens of head width {head_width}, bf16, sm_90")
    assert f"'num_warps': {warps}" in lines[0]
    assert [line.split(":")[0] for line in lines[1:]] == ["_forward_kernel", "_backward_kernel"]
    for line in lines[1:]:
        assert "0 bytes spill stores, 0 bytes spill loads" in line and "registers" in line, line
