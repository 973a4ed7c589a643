"""models.py: parameter count, the two attention paths, attention weights, init, config checks, and a
cross-check of the whole forward pass against timm's VisionTransformer with the same weights."""
import dataclasses
import functools
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from conftest import one_torch_thread, relative_error
from models import ViTConfig, VisionTransformer, count_parameters, self_attention

SMALL = ViTConfig(layers=2, hidden=32, mlp_hidden=48, heads=4)


@pytest.fixture(autouse=True, scope="module")
def in_one_torch_thread():
    with one_torch_thread():
        yield


def model_pair(config: ViTConfig, sdpa_model: VisionTransformer | None = None):
    """The same weights behind the explicit ("math") and the fused ("sdpa") attention path."""
    torch.manual_seed(0)
    if sdpa_model is None:
        sdpa_model = VisionTransformer(dataclasses.replace(config, attention="sdpa"))
    assert sdpa_model.config.attention == "sdpa"
    math_model = VisionTransformer(dataclasses.replace(config, attention="math"))
    math_model.load_state_dict(sdpa_model.state_dict())
    return math_model, sdpa_model


@pytest.fixture(scope="module")
def default_model():
    """The reference model (built once: a 6M-parameter init takes seconds on 2 cores). Do not modify it."""
    torch.manual_seed(0)
    return VisionTransformer(ViTConfig())


def random_images(n: int, config: ViTConfig = SMALL, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, config.in_channels, config.image_size, config.image_size, generator=generator)


# ---------------------------------------------------------------------------------------------- size

def test_default_model_has_the_reference_parameter_count(default_model):
    assert count_parameters(default_model) == 6_268_810


def test_head_count_does_not_change_the_parameter_count():
    assert count_parameters(VisionTransformer(ViTConfig(heads=8))) == 6_268_810


# ---------------------------------------------------------------------------------------------- attention paths

def _outputs_and_gradients(model, images, weights):
    model.zero_grad(set_to_none=True)
    logits = model(images)
    (logits * weights).sum().backward()
    return logits.detach(), {name: p.grad.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("config, batch", [(SMALL, 4), (dataclasses.replace(SMALL, heads=8, layers=3), 3),
                                           (ViTConfig(), 2)],
                         ids=["small", "small-8-heads", "default"])
def test_math_and_sdpa_paths_agree_on_outputs_and_gradients(config, batch, request):
    math_model, sdpa_model = model_pair(config, request.getfixturevalue("default_model")
                                        if config == ViTConfig() else None)
    images = random_images(batch, config)
    # a random linear function of the logits, so every logit's gradient path is exercised
    weights = torch.randn(batch, config.num_classes, generator=torch.Generator().manual_seed(2))
    math_logits, math_grads = _outputs_and_gradients(math_model, images, weights)
    sdpa_logits, sdpa_grads = _outputs_and_gradients(sdpa_model, images, weights)
    assert relative_error(sdpa_logits, math_logits) <= 1e-5
    assert math_grads.keys() == sdpa_grads.keys()
    for name in math_grads:
        assert math_grads[name].abs().sum() > 0, f"{name} got no gradient"
        error = relative_error(sdpa_grads[name], math_grads[name])
        assert error <= 1e-5, f"{name}: relative gradient error {error:.2e}"
    sdpa_model.zero_grad(set_to_none=True)  # leave the shared default model as it was


def test_forward_with_attention_returns_row_stochastic_weights_and_the_forward_logits():
    torch.manual_seed(0)
    model = VisionTransformer(SMALL).eval()  # attention="sdpa": forward and forward_with_attention take different paths
    images = random_images(3)
    logits, attentions = model.forward_with_attention(images)
    tokens = SMALL.num_patches + 1
    assert len(attentions) == SMALL.layers
    for weights in attentions:
        assert weights.shape == (3, SMALL.heads, tokens, tokens)
        assert (weights >= 0).all()
        torch.testing.assert_close(weights.sum(-1), torch.ones(3, SMALL.heads, tokens), rtol=0, atol=1e-5)
    assert relative_error(logits, model(images)) <= 1e-5


def test_self_attention_matches_a_float64_hand_computation():
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 8, generator=generator) for _ in range(3))
    out, weights = self_attention(q, k, v)
    qn, kn, vn = (t.double().numpy() for t in (q, k, v))
    scores = np.einsum("bhqd,bhkd->bhqk", qn, kn) / np.sqrt(8)
    expected_weights = np.exp(scores - scores.max(-1, keepdims=True))
    expected_weights /= expected_weights.sum(-1, keepdims=True)
    expected_out = np.einsum("bhqk,bhkd->bhqd", expected_weights, vn)
    np.testing.assert_allclose(weights.double().numpy(), expected_weights, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.double().numpy(), expected_out, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- init

# nn.init.trunc_normal_(std=0.02, a=-0.04, b=0.04) draws from N(0, 0.02^2) cut at 2 std, whose standard
# deviation is 0.02 * sqrt(1 - 2*2*phi(2) / (2*Phi(2) - 1)) = 0.02 * 0.87963 = 0.017593.
TRUNCATED_STD = 0.02 * math.sqrt(1 - 4 * math.exp(-2) / math.sqrt(2 * math.pi) / math.erf(2 / math.sqrt(2)))


def _check_truncated_normal(name, values):
    values = values.detach().double().flatten()
    assert values.abs().max() <= 0.04 + 1e-7, f"{name} is not truncated at 2 std"
    tolerance = 6 * TRUNCATED_STD / math.sqrt(2 * len(values)) + 1e-4  # ~6 standard errors of a sample std
    assert abs(values.std().item() - TRUNCATED_STD) <= tolerance, f"{name}: std {values.std().item():.5f}"
    assert abs(values.mean().item()) <= 6 * TRUNCATED_STD / math.sqrt(len(values)), f"{name}: mean not 0"


def test_timm_init_follows_the_vit_recipe():
    torch.manual_seed(0)
    model = VisionTransformer(ViTConfig(init="timm"))
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    assert len(linears) == 1 + 4 * 7 + 1 and len(norms) == 2 * 7 + 1
    _check_truncated_normal("all linear weights", torch.cat([m.weight.flatten() for m in linears]))
    _check_truncated_normal("layer 0 qkv weight", model.layers[0].attn.qkv.weight)
    for module in linears:
        assert torch.equal(module.bias, torch.zeros_like(module.bias))
    for module in norms:  # left at identity (PyTorch's own LayerNorm init)
        assert torch.equal(module.weight, torch.ones_like(module.weight))
        assert torch.equal(module.bias, torch.zeros_like(module.bias))
    _check_truncated_normal("class token", model.class_token)
    _check_truncated_normal("position embedding", model.pos_embed)


def test_default_init_is_the_references_linear_defaults_and_unit_normal_embeddings(default_model):
    model = default_model
    assert model.config.init == "pytorch"
    for embedding in (model.pos_embed, model.class_token):
        assert 0.8 < embedding.std().item() < 1.2  # unit normal, not std 0.02
    qkv = model.layers[0].attn.qkv
    bound = 1 / math.sqrt(qkv.in_features)  # nn.Linear's kaiming-uniform(a=sqrt(5)) weight and uniform bias
    assert qkv.weight.abs().max() <= bound and qkv.weight.abs().max() > 0.9 * bound
    assert qkv.bias.abs().max() > 0.5 * bound  # biases are not zeroed


# ---------------------------------------------------------------------------------------------- config errors

@pytest.mark.parametrize("fields, words", [
    (dict(hidden=32, heads=5), ["hidden", "not divisible", "5 heads"]),
    (dict(patch_size=5), ["image size 32", "patch size 5"]),
    (dict(image_size=30, patch_size=4), ["image size 30", "patch size 4"]),
    (dict(hidden=0), ["hidden", "positive integer", "0"]),
    (dict(heads=-2), ["heads", "positive integer", "-2"]),
    (dict(layers=0), ["layers", "positive integer"]),
    (dict(patch_size=0), ["patch_size", "positive integer"]),
    (dict(image_size=0), ["image_size", "positive integer"]),
    (dict(num_classes=0), ["num_classes", "positive integer"]),
    (dict(mlp_hidden=-1), ["mlp_hidden", "positive integer"]),
    (dict(attention="flash"), ["attention must be one of", "'flash'"]),
    (dict(dropout=1.0), ["dropout"]),
    (dict(dropout=-0.1), ["dropout must be in [0, 1)", "-0.1"]),
])
def test_bad_config_raises_a_clear_value_error(fields, words):
    with pytest.raises(ValueError) as info:
        ViTConfig(**fields)
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


@pytest.mark.parametrize("attention", ["math", "sdpa"])
def test_dropout_acts_at_every_site_in_training_and_nowhere_in_evaluation(attention, monkeypatch):
    """--dropout acts after the embeddings, on the attention weights, after the attention's projection, and after
    each MLP linear: 4 per layer + 1 calls of F.dropout (the sdpa path passes the attention weights' share to the
    fused kernel as dropout_p). In eval mode every site is off, so two forward passes agree."""
    import models
    config = dataclasses.replace(SMALL, dropout=0.5, attention=attention)
    model, images = VisionTransformer(config), random_images(3)
    rates, sdpa_rates = [], []
    dropout, sdpa = models.F.dropout, models.F.scaled_dot_product_attention

    def counted_dropout(x, p=0.5, training=True, *args, **kwargs):
        rates.append(p if training else 0.0)
        return dropout(x, p, training, *args, **kwargs)

    def counted_sdpa(*args, dropout_p=0.0, **kwargs):
        sdpa_rates.append(dropout_p)
        return sdpa(*args, dropout_p=dropout_p, **kwargs)
    monkeypatch.setattr(models.F, "dropout", counted_dropout)
    monkeypatch.setattr(models.F, "scaled_dot_product_attention", counted_sdpa)
    model.train()
    model(images)
    in_kernel = config.layers if attention == "sdpa" else 0
    assert rates == [0.5] * (4 * config.layers + 1 - in_kernel) and sdpa_rates == [0.5] * in_kernel
    rates.clear(), sdpa_rates.clear()
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(images), model(images))
    assert set(rates) <= {0.0} and set(sdpa_rates) <= {0.0}


@pytest.mark.parametrize("shape", [(2, 3, 28, 28), (2, 1, 32, 32), (2, 3, 32, 16), (3, 32, 32)])
def test_wrong_image_shape_raises_a_clear_value_error(shape):
    model = VisionTransformer(SMALL)
    with pytest.raises(ValueError, match=r"expected images of shape \[N, 3, 32, 32\]"):
        model(torch.zeros(shape))


# ---------------------------------------------------------------------------------------------- timm cross-check

def _timm_copy(model: VisionTransformer):
    """timm's VisionTransformer with the architecture and the weights of `model` (strict load)."""
    vision_transformer = pytest.importorskip("timm.models.vision_transformer")
    config = model.config
    peer = vision_transformer.VisionTransformer(
        img_size=config.image_size, patch_size=config.patch_size, in_chans=config.in_channels,
        num_classes=config.num_classes, embed_dim=config.hidden, depth=config.layers, num_heads=config.heads,
        mlp_ratio=config.mlp_hidden / config.hidden, qkv_bias=True, class_token=True, global_pool="token",
        norm_layer=functools.partial(nn.LayerNorm, eps=1e-5))
    ours = model.state_dict()
    p = config.patch_size
    state = {
        # our patch embedding flattens each patch as (C, p, p), which is exactly a Conv2d kernel's layout
        "patch_embed.proj.weight": ours["patch_embed.weight"].reshape(config.hidden, config.in_channels, p, p),
        "patch_embed.proj.bias": ours["patch_embed.bias"],
        "cls_token": ours["class_token"],
        "pos_embed": ours["pos_embed"],
        "norm.weight": ours["norm.weight"], "norm.bias": ours["norm.bias"],
        "head.weight": ours["head.weight"], "head.bias": ours["head.bias"],
    }
    for i in range(config.layers):
        for ours_name, timm_name in (("norm1", "norm1"), ("attn.qkv", "attn.qkv"), ("attn.proj", "attn.proj"),
                                     ("norm2", "norm2"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
            for kind in ("weight", "bias"):
                state[f"blocks.{i}.{timm_name}.{kind}"] = ours[f"layers.{i}.{ours_name}.{kind}"]
    assert len(state) == len(ours), "every one of our tensors must have a place in timm's model"
    peer.load_state_dict(state, strict=True)
    return peer.eval()


def test_logits_match_timm_vision_transformer_with_the_same_weights():
    config = dataclasses.replace(SMALL, mlp_final_gelu=False)
    torch.manual_seed(0)
    model = VisionTransformer(config).eval()
    with torch.no_grad():  # spread the LayerNorm and embedding parameters so a mix-up would show
        for name, parameter in model.named_parameters():
            if "norm" in name or parameter.dim() == 1:
                parameter.add_(0.1 * torch.randn_like(parameter))
    peer = _timm_copy(model)
    images = random_images(4, config)
    with torch.no_grad():
        ours, theirs = model(images), peer(images)
        assert relative_error(ours, theirs) <= 1e-5
        # the field matters: the reference's extra GELU after the second MLP linear changes the function
        reference = VisionTransformer(dataclasses.replace(config, mlp_final_gelu=True)).eval()
        reference.load_state_dict(model.state_dict())
        assert relative_error(reference(images), theirs) > 1e-3
