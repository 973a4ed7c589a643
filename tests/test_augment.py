"""Tests for augment.py: each operation against torchvision image by image, the per-sample random
draws (statistics and their use), crop/flip geometry, determinism and per-sample independence.

Every comparison with torchvision is exact: the batched code reproduces torchvision's float32
arithmetic (see the docstrings of augment._blend and augment._sharpness), so no tolerance is used.
"""

import math

import pytest
import torch
from torchvision.transforms.v2 import AutoAugment, AutoAugmentPolicy, InterpolationMode
from torchvision.transforms.v2 import functional as TF

from conftest import one_torch_thread

import augment
from augment import (
    CIFAR10_POLICY,
    OPS,
    apply_op,
    autoaugment_cifar10,
    magnitude,
    random_crop_flip,
    train_augment,
)

FILL = 128
SIGNED_OPS = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast", "Sharpness")


def reference_op(image, op_name, mag, fill=FILL):
    """One image through torchvision, called as its AutoAugment does (grey fill, NEAREST)."""
    fill_rgb = [float(fill)] * 3
    nearest = InterpolationMode.NEAREST
    if op_name in ("ShearX", "ShearY"):
        shear_deg = math.degrees(math.atan(mag))
        shear = [shear_deg, 0.0] if op_name == "ShearX" else [0.0, shear_deg]
        return TF.affine(image, angle=0.0, translate=[0, 0], scale=1.0, shear=shear,
                         interpolation=nearest, fill=fill_rgb, center=[0, 0])
    if op_name in ("TranslateX", "TranslateY"):
        translate = [int(mag), 0] if op_name == "TranslateX" else [0, int(mag)]
        return TF.affine(image, angle=0.0, translate=translate, scale=1.0, shear=[0.0, 0.0],
                         interpolation=nearest, fill=fill_rgb)
    if op_name == "Rotate":
        return TF.rotate(image, angle=mag, interpolation=nearest, fill=fill_rgb)
    if op_name == "Brightness":
        return TF.adjust_brightness(image, brightness_factor=1.0 + mag)
    if op_name == "Color":
        return TF.adjust_saturation(image, saturation_factor=1.0 + mag)
    if op_name == "Contrast":
        return TF.adjust_contrast(image, contrast_factor=1.0 + mag)
    if op_name == "Sharpness":
        return TF.adjust_sharpness(image, sharpness_factor=1.0 + mag)
    if op_name == "Posterize":
        return TF.posterize(image, bits=int(mag))
    if op_name == "Solarize":
        return TF.solarize(image, threshold=255.0 * mag)
    if op_name == "AutoContrast":
        return TF.autocontrast(image)
    if op_name == "Equalize":
        return TF.equalize(image)
    if op_name == "Invert":
        return TF.invert(image)
    raise ValueError(op_name)


def reference_batch(images, op_name, mags, fill=FILL):
    with one_torch_thread():
        return torch.stack([reference_op(img, op_name, float(m), fill) for img, m in zip(images, mags)])


def make_images(num_random=96, seed=0):
    """Random images plus structured ones that hit the edge cases of the colour operations."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randint(0, 256, (num_random, 3, 32, 32), dtype=torch.uint8, generator=g)
    smooth = torch.nn.functional.avg_pool2d(
        torch.randint(0, 256, (num_random, 3, 36, 36), generator=g).float(), 5, stride=1
    ).round().to(torch.uint8)
    ramp = torch.arange(32, dtype=torch.float32)
    horizontal = (ramp * 8).expand(32, 32)
    vertical = horizontal.t()
    structured = [
        torch.zeros(3, 32, 32),
        torch.full((3, 32, 32), 255.0),
        torch.full((3, 32, 32), 77.0),  # constant channels: autocontrast/equalize leave them alone
        torch.stack([torch.full((32, 32), 10.0), horizontal, vertical]),  # one constant channel
        torch.stack([horizontal, vertical, 255 - horizontal]),
        torch.stack([horizontal.clamp(max=3.0)] * 3),  # only a few levels: equalize step 0
        (torch.rand(3, 32, 32, generator=g) < 0.5).float() * 200 + 20,  # two levels
        horizontal.expand(3, 32, 32),  # grey: saturation is a no-op in exact arithmetic
    ]
    structured = torch.stack(structured).round().clamp(0, 255).to(torch.uint8)
    return torch.cat([noise, smooth, structured])


IMAGES = make_images()


def bin_sign_magnitudes(op_name, n, seed):
    """Per-sample magnitudes as AutoAugment makes them: every bin, both signs for signed ops."""
    g = torch.Generator().manual_seed(seed)
    bins = torch.arange(n) % 10
    values = torch.tensor([magnitude(op_name, int(b)) for b in bins], dtype=torch.float32)
    if op_name in SIGNED_OPS:
        signs = torch.where(torch.rand(n, generator=g) <= 0.5, -1.0, 1.0)
        values = values * signs
    return values[torch.randperm(n, generator=g)]


# ----------------------------------------------------------------------------------------------
# Policy and magnitudes


def test_policy_matches_torchvision():
    reference = AutoAugment(AutoAugmentPolicy.CIFAR10)._policies
    assert [tuple(map(tuple, sub)) for sub in reference] == [tuple(map(tuple, sub)) for sub in CIFAR10_POLICY]
    assert len(CIFAR10_POLICY) == 25
    assert {name for sub in CIFAR10_POLICY for name, _, _ in sub} <= set(OPS)
    assert len(OPS) == 14 and set(OPS) == set(AutoAugment._AUGMENTATION_SPACE)


@pytest.mark.parametrize("image_size", [(32, 32), (24, 40)])
def test_magnitudes_match_torchvision(image_size):
    height, width = image_size
    for op_name in OPS:
        table_fn, signed = AutoAugment._AUGMENTATION_SPACE[op_name]
        assert signed == (op_name in SIGNED_OPS)
        table = table_fn(10, height, width)
        for bin in range(10):
            expected = 0.0 if table is None else float(table[bin])
            assert magnitude(op_name, bin, image_size) == expected, (op_name, bin)


# ----------------------------------------------------------------------------------------------
# Operations against torchvision


@pytest.mark.parametrize("op_name", OPS)
def test_apply_op_matches_torchvision_on_bins(op_name):
    images = IMAGES.clone()
    mags = bin_sign_magnitudes(op_name, len(images), seed=OPS.index(op_name))
    output = apply_op(images, op_name, mags, fill=FILL)
    assert torch.equal(images, IMAGES), "input modified in place"
    assert output.dtype == torch.uint8 and output.shape == images.shape
    expected = reference_batch(images, op_name, mags)
    assert torch.equal(output, expected)


@pytest.mark.parametrize("op_name", SIGNED_OPS)
def test_apply_op_matches_torchvision_on_any_magnitude(op_name):
    # Magnitudes between and beyond the bins (rotations up to 180 degrees): the rounding paths
    # must agree everywhere, not only at the 10 policy values.
    limits = {"ShearX": 0.3, "ShearY": 0.3, "TranslateX": 15.0, "TranslateY": 15.0, "Rotate": 180.0}
    limit = limits.get(op_name, 0.9)
    g = torch.Generator().manual_seed(100 + OPS.index(op_name))
    mags = (torch.rand(len(IMAGES), generator=g) * 2 - 1) * limit
    output = apply_op(IMAGES, op_name, mags)
    assert torch.equal(output, reference_batch(IMAGES, op_name, mags))


@pytest.mark.parametrize("fill", [0, 37, 255])
@pytest.mark.parametrize("op_name", ["ShearX", "TranslateY", "Rotate"])
def test_geometric_fill(op_name, fill):
    mags = torch.full((8,), magnitude(op_name, 9)) * torch.tensor([1.0, -1.0] * 4)
    images = IMAGES[:8]
    output = apply_op(images, op_name, mags, fill=fill)
    assert torch.equal(output, reference_batch(images, op_name, mags, fill=fill))
    assert (output == fill).any()


def test_apply_op_other_image_size():
    g = torch.Generator().manual_seed(5)
    images = torch.randint(0, 256, (12, 3, 24, 40), dtype=torch.uint8, generator=g)
    for op_name in OPS:
        mags = torch.tensor([magnitude(op_name, k % 10, (24, 40)) for k in range(12)]) * torch.tensor([1.0, -1.0] * 6)
        if op_name not in SIGNED_OPS:
            mags = mags.abs()
        assert torch.equal(apply_op(images, op_name, mags), reference_batch(images, op_name, mags)), op_name


def test_apply_op_rejects_bad_input():
    with pytest.raises(ValueError):
        apply_op(IMAGES.float(), "Invert", torch.zeros(len(IMAGES)))
    with pytest.raises(ValueError):
        apply_op(IMAGES, "Cutout", torch.zeros(len(IMAGES)))
    with pytest.raises(ValueError):
        apply_op(IMAGES, "Invert", torch.zeros(3))


# ----------------------------------------------------------------------------------------------
# Random crop and flip


def binomial_bound(n, p, sigmas=5.0):
    return sigmas * math.sqrt(n * p * (1 - p))


def test_crop_flip_uses_its_draws_and_crops_correctly():
    images = IMAGES[:64]
    tops, lefts, flips = augment._draw_crop_flip(len(images), 4, torch.Generator().manual_seed(7), images.device)
    output = random_crop_flip(images, padding=4, generator=torch.Generator().manual_seed(7))
    assert torch.equal(images, IMAGES[:64])
    for i, image in enumerate(images):
        padded = TF.pad(image, [4, 4, 4, 4], fill=0)
        expected = TF.crop(padded, int(tops[i]), int(lefts[i]), 32, 32)
        if flips[i]:
            expected = TF.horizontal_flip(expected)
        assert torch.equal(output[i], expected), i
    # the draws cover the whole range, so this compared more than the trivial offsets
    assert tops.min() == 0 and tops.max() == 8 and lefts.min() == 0 and lefts.max() == 8
    assert flips.any() and not flips.all()


def test_crop_flip_draw_statistics():
    n = 81 * 600
    tops, lefts, flips = augment._draw_crop_flip(n, 4, torch.Generator().manual_seed(3), "cpu")
    counts = torch.bincount(tops * 9 + lefts, minlength=81)
    assert counts.numel() == 81
    expected = n / 81
    assert (counts - expected).abs().max() < binomial_bound(n, 1 / 81)
    assert abs(int(flips.sum()) - n / 2) < binomial_bound(n, 0.5)
    # offsets and flips are independent draws, not the same numbers reused
    assert abs(int((flips & (tops < 4)).sum()) - n * 0.5 * 4 / 9) < binomial_bound(n, 0.5 * 4 / 9)


# ----------------------------------------------------------------------------------------------
# AutoAugment draws


def test_policy_draw_statistics():
    n = 50_000
    sub_policies, applies, negates = augment._draw_policy(n, torch.Generator().manual_seed(11))
    counts = torch.bincount(sub_policies, minlength=25)
    assert counts.numel() == 25
    assert (counts - n / 25).abs().max() < binomial_bound(n, 1 / 25)
    for index, sub_policy in enumerate(CIFAR10_POLICY):
        chosen = sub_policies == index
        num_chosen = int(chosen.sum())
        for slot, (_, p, _) in enumerate(sub_policy):
            applied = int(applies[chosen, slot].sum())
            if p == 0.0:
                assert applied == 0
            else:
                assert abs(applied - num_chosen * p) < binomial_bound(num_chosen, p) + 1, (index, slot)
    for slot in range(2):
        assert abs(int(negates[:, slot].sum()) - n / 2) < binomial_bound(n, 0.5)
        # the sign is its own draw: half of the applied operations are negated, whatever their probability
        applied = applies[:, slot]
        num_applied = int(applied.sum())
        assert abs(int(negates[applied, slot].sum()) - num_applied / 2) < binomial_bound(num_applied, 0.5)
    # the two slots' draws are independent
    both = int((applies[:, 0] & applies[:, 1]).sum())
    rate0 = applies[:, 0].float().mean().item()
    rate1 = applies[:, 1].float().mean().item()
    assert abs(both - n * rate0 * rate1) < binomial_bound(n, rate0 * rate1)
    both_negative = int((negates[:, 0] & negates[:, 1]).sum())
    assert abs(both_negative - n / 4) < binomial_bound(n, 0.25)


def reference_autoaugment(image, sub_policy, applies, negates, fill=FILL):
    for slot, (op_name, _, bin) in enumerate(CIFAR10_POLICY[sub_policy]):
        if not applies[slot]:
            continue
        mag = magnitude(op_name, bin) if bin is not None else 0.0
        if op_name in SIGNED_OPS and negates[slot]:
            mag = -mag
        image = reference_op(image, op_name, mag, fill)
    return image


def test_autoaugment_applies_each_samples_draws():
    g = torch.Generator().manual_seed(0)
    images = torch.cat([IMAGES] * 3)[torch.randperm(3 * len(IMAGES), generator=g)]
    sub_policies, applies, negates = augment._draw_policy(len(images), torch.Generator().manual_seed(21))
    output = autoaugment_cifar10(images, fill=FILL, generator=torch.Generator().manual_seed(21))
    # every sub-policy and both slots are exercised
    assert torch.unique(sub_policies).numel() == 25
    assert applies.any(dim=0).all() and not applies.all()
    with one_torch_thread():
        for i in range(len(images)):
            expected = reference_autoaugment(images[i], int(sub_policies[i]), applies[i].tolist(), negates[i].tolist())
            assert torch.equal(output[i], expected), i


def test_train_augment_is_crop_flip_then_autoaugment():
    """The recipe's values written out: 4-pixel padding, grey fill 128; and a fill passed in reaches the warps."""
    images = IMAGES[:100]
    g = torch.Generator().manual_seed(9)
    expected = autoaugment_cifar10(random_crop_flip(images, padding=4, generator=g), fill=128, generator=g)
    output = train_augment(images, generator=torch.Generator().manual_seed(9))
    assert torch.equal(output, expected)
    g = torch.Generator().manual_seed(9)
    dark = train_augment(images, generator=torch.Generator().manual_seed(9), fill=37)
    cropped = random_crop_flip(images, padding=4, generator=g)
    assert torch.equal(dark, autoaugment_cifar10(cropped, fill=37, generator=g))
    assert not torch.equal(dark, output)  # some of the 100 images were rotated, sheared or translated
    assert torch.equal(images, IMAGES[:100])
    assert output.dtype == torch.uint8 and output.shape == images.shape


# ----------------------------------------------------------------------------------------------
# Determinism and per-sample randomness


def test_same_seed_same_output_different_seed_different_output():
    images = IMAGES
    first = train_augment(images, generator=torch.Generator().manual_seed(1))
    again = train_augment(images, generator=torch.Generator().manual_seed(1))
    other = train_augment(images, generator=torch.Generator().manual_seed(2))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_global_rng_used_when_no_generator():
    torch.manual_seed(4)
    first = train_augment(IMAGES)
    torch.manual_seed(4)
    again = train_augment(IMAGES)
    later = train_augment(IMAGES)
    assert torch.equal(first, again)
    assert not torch.equal(first, later)


def distinct_images(batch):
    return torch.unique(batch.flatten(1), dim=0).shape[0]


def test_draws_are_per_sample():
    n = 400
    image = IMAGES[:1].expand(n, -1, -1, -1).contiguous()
    g = torch.Generator().manual_seed(13)
    # crop/flip alone: 162 (offset, flip) combinations, nearly all seen in 400 draws
    assert distinct_images(random_crop_flip(image, generator=g)) > 100
    # AutoAugment alone: many different sub-policy / apply / sign outcomes
    augmented = autoaugment_cifar10(image, generator=g)
    assert distinct_images(augmented) > 30
    assert distinct_images(train_augment(image, generator=g)) > 300


def test_empty_batch():
    empty = torch.zeros(0, 3, 32, 32, dtype=torch.uint8)
    assert train_augment(empty).shape == empty.shape
    assert apply_op(empty, "Rotate", torch.zeros(0)).shape == empty.shape


# ----------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU): same checks against torchvision running on the GPU

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@needs_cuda
@pytest.mark.parametrize("op_name", OPS)
def test_apply_op_matches_torchvision_on_cuda(op_name):
    images = IMAGES.cuda()
    mags = bin_sign_magnitudes(op_name, len(images), seed=OPS.index(op_name))
    output = apply_op(images, op_name, mags.cuda())
    assert output.device == images.device and output.dtype == torch.uint8
    assert torch.equal(output, reference_batch(images, op_name, mags))


@needs_cuda
def test_autoaugment_on_cuda():
    images = IMAGES.cuda()
    device = images.device
    draws = augment._draw_policy(len(images), torch.Generator(device=device).manual_seed(5), device)
    output = autoaugment_cifar10(images, generator=torch.Generator(device=device).manual_seed(5))
    sub_policies, applies, negates = (t.cpu() for t in draws)
    with one_torch_thread():
        for i in range(len(images)):
            expected = reference_autoaugment(images[i], int(sub_policies[i]), applies[i].tolist(), negates[i].tolist())
            assert torch.equal(output[i], expected), i

    first = train_augment(images, generator=torch.Generator(device=device).manual_seed(1))
    again = train_augment(images, generator=torch.Generator(device=device).manual_seed(1))
    assert first.device == device and torch.equal(first, again)
    same_image = images[:1].expand(400, -1, -1, -1)
    assert distinct_images(train_augment(same_image, generator=torch.Generator(device=device).manual_seed(2))) > 300
