"""Batched, per-sample CIFAR-10 training augmentation on uint8 tensors.

The pipeline is RandomCrop(32, padding=4) with zero padding, RandomHorizontalFlip(p=0.5) and
AutoAugment with the CIFAR-10 policy, applied to a whole ``[N, 3, H, W]`` uint8 batch on whatever
device it lives on. Unlike ``torchvision.transforms.v2.AutoAugment``, which makes one set of random
draws per call and so shares them across a batch, every image here gets its own crop offset, flip,
sub-policy, apply/skip draw per operation and sign for signed operations.

Each operation follows the semantics of torchvision 0.29's ``transforms.v2`` tensor functions
(magnitude bins, truncation of translations, rounding, clamping, nearest-neighbour sampling,
equalize's PIL-style lookup table, autocontrast's handling of constant channels, sharpness'
untouched border), with grey fill 128 for the pixels that geometric operations uncover. The tests
check the result against torchvision, image by image. (The reference pipeline, ``--data-pipeline torchvision``, runs torchvision's v1
transforms on PIL images instead: the same policy, but not the same arithmetic in every case.)

The reference's original pipeline was a PIL implementation of the same paper. It used the same 25
sub-policies and probabilities and also filled with grey, but it differed in details we do not
copy: shear used bicubic resampling, rotation always turned counter-clockwise (no random sign),
translations kept their fractional part (up to 14.5 px instead of 14), solarize thresholds were on
a 256 scale rather than 255, and an operation fired when ``rand() < p`` rather than ``<= p``.
"""

import functools

import torch
import torch.nn.functional as F

FILL = 128  # grey for the pixels that geometric operations uncover, in both pipelines (data.py)

OPS = (
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "Rotate",
    "Brightness",
    "Color",
    "Contrast",
    "Sharpness",
    "Posterize",
    "Solarize",
    "AutoContrast",
    "Equalize",
    "Invert",
)
# The geometric operations come first in OPS so that, once samples are sorted by operation, they
# form one contiguous run that a single grid_sample call can warp.
_GEOMETRIC_OPS = OPS[:5]
_SIGNED_OPS = frozenset(OPS[:9])  # all but Posterize, Solarize, AutoContrast, Equalize, Invert (as torchvision)
_SKIP = len(OPS)  # operation id of a slot whose apply draw failed

CIFAR10_POLICY = (
    (("Invert", 0.1, None), ("Contrast", 0.2, 6)),
    (("Rotate", 0.7, 2), ("TranslateX", 0.3, 9)),
    (("Sharpness", 0.8, 1), ("Sharpness", 0.9, 3)),
    (("ShearY", 0.5, 8), ("TranslateY", 0.7, 9)),
    (("AutoContrast", 0.5, None), ("Equalize", 0.9, None)),
    (("ShearY", 0.2, 7), ("Posterize", 0.3, 7)),
    (("Color", 0.4, 3), ("Brightness", 0.6, 7)),
    (("Sharpness", 0.3, 9), ("Brightness", 0.7, 9)),
    (("Equalize", 0.6, None), ("Equalize", 0.5, None)),
    (("Contrast", 0.6, 7), ("Sharpness", 0.6, 5)),
    (("Color", 0.7, 7), ("TranslateX", 0.5, 8)),
    (("Equalize", 0.3, None), ("AutoContrast", 0.4, None)),
    (("TranslateY", 0.4, 3), ("Sharpness", 0.2, 6)),
    (("Brightness", 0.9, 6), ("Color", 0.2, 8)),
    (("Solarize", 0.5, 2), ("Invert", 0.0, None)),
    (("Equalize", 0.2, None), ("AutoContrast", 0.6, None)),
    (("Equalize", 0.2, None), ("Equalize", 0.6, None)),
    (("Color", 0.9, 9), ("Equalize", 0.6, None)),
    (("AutoContrast", 0.8, None), ("Solarize", 0.2, 8)),
    (("Brightness", 0.1, 3), ("Color", 0.7, 0)),
    (("Solarize", 0.4, 5), ("AutoContrast", 0.9, None)),
    (("TranslateY", 0.9, 9), ("TranslateY", 0.7, 9)),
    (("AutoContrast", 0.9, None), ("Solarize", 0.8, 3)),
    (("Equalize", 0.8, None), ("Invert", 0.1, None)),
    (("TranslateY", 0.7, 9), ("AutoContrast", 0.9, None)),
)

_NUM_BINS = 10


# ----------------------------------------------------------------------------------------------
# Magnitudes


def _magnitude_bins(op_name, height, width):
    """torchvision's float32 table of the 10 magnitudes of an operation, or None."""
    if op_name in ("ShearX", "ShearY"):
        return torch.linspace(0.0, 0.3, _NUM_BINS)
    if op_name == "TranslateX":
        return torch.linspace(0.0, 150.0 / 331.0 * width, _NUM_BINS)
    if op_name == "TranslateY":
        return torch.linspace(0.0, 150.0 / 331.0 * height, _NUM_BINS)
    if op_name == "Rotate":
        return torch.linspace(0.0, 30.0, _NUM_BINS)
    if op_name in ("Brightness", "Color", "Contrast", "Sharpness"):
        return torch.linspace(0.0, 0.9, _NUM_BINS)
    if op_name == "Posterize":
        bin_ids = torch.arange(_NUM_BINS)
        return (8 - bin_ids / ((_NUM_BINS - 1) / 4)).round().int()
    if op_name == "Solarize":
        return torch.linspace(1.0, 0.0, _NUM_BINS)
    if op_name in ("AutoContrast", "Equalize", "Invert"):
        return None
    raise ValueError(f"unknown operation {op_name!r}")


def magnitude(op_name: str, bin: int, image_size=(32, 32)) -> float:
    """torchvision's unsigned magnitude for ``bin`` (0-9); 0.0 for operations without one."""
    height, width = image_size
    bins = _magnitude_bins(op_name, height, width)
    if bins is None:
        return 0.0
    return float(bins[bin])


# ----------------------------------------------------------------------------------------------
# Geometric operations: per-sample inverse affine matrices, one nearest-neighbour warp


def _inverse_affine_matrices(angle_deg, translate_x, translate_y, shear_x_deg, shear_y_deg, center):
    """Vectorised ``_get_inverse_affine_matrix`` of torchvision (scale 1), in float64.

    ``center`` is in pixels relative to the image centre. Returns ``[n, 2, 3]``.
    """
    rot = torch.deg2rad(angle_deg)
    shear_x = torch.deg2rad(shear_x_deg)
    shear_y = torch.deg2rad(shear_y_deg)
    cos_sy = torch.cos(shear_y)
    tan_sx = torch.tan(shear_x)
    a = torch.cos(rot - shear_y) / cos_sy
    b = -(a * tan_sx + torch.sin(rot))
    c = torch.sin(rot - shear_y) / cos_sy
    d = torch.cos(rot) - c * tan_sx

    center_x, center_y = center
    shifted_x = center_x + translate_x
    shifted_y = center_y + translate_y
    m0, m1, m3, m4 = d, -b, -c, a
    m2 = center_x - m0 * shifted_x - m1 * shifted_y
    m5 = center_y - m3 * shifted_x - m4 * shifted_y
    return torch.stack([m0, m1, m2, m3, m4, m5], dim=-1).view(-1, 2, 3)


def _geometric_matrices(op_name, magnitudes, height, width):
    """Inverse affine matrices [n, 2, 3] that torchvision's AutoAugment builds for ``op_name``."""
    mags = magnitudes.to(torch.float64)
    zeros = torch.zeros_like(mags)
    # Shears pivot on the top-left corner (torchvision passes center=[0, 0]); the rest on the centre.
    corner = (zeros - 0.5 * width, zeros - 0.5 * height)
    centre = (zeros, zeros)
    if op_name == "ShearX":
        shear = torch.rad2deg(torch.atan(mags))
        return _inverse_affine_matrices(zeros, zeros, zeros, shear, zeros, corner)
    if op_name == "ShearY":
        shear = torch.rad2deg(torch.atan(mags))
        return _inverse_affine_matrices(zeros, zeros, zeros, zeros, shear, corner)
    if op_name == "TranslateX":
        return _inverse_affine_matrices(zeros, torch.trunc(mags), zeros, zeros, zeros, centre)
    if op_name == "TranslateY":
        return _inverse_affine_matrices(zeros, zeros, torch.trunc(mags), zeros, zeros, centre)
    if op_name == "Rotate":
        # rotate() turns counter-clockwise, affine() clockwise, hence the minus.
        angle = -torch.remainder(mags, 360.0)
        return _inverse_affine_matrices(angle, zeros, zeros, zeros, zeros, centre)
    raise ValueError(f"{op_name!r} is not a geometric operation")


@functools.lru_cache(maxsize=16)
def _base_grid(height, width, device):
    """Pixel-centre coordinates relative to the image centre, with a 1 column: [1, H*W, 3]."""
    grid = torch.empty(1, height, width, 3, device=device)
    grid[..., 0].copy_(torch.linspace((1.0 - width) * 0.5, (width - 1.0) * 0.5, width, device=device))
    grid[..., 1].copy_(torch.linspace((1.0 - height) * 0.5, (height - 1.0) * 0.5, height, device=device)[:, None])
    grid[..., 2].fill_(1.0)
    return grid.view(1, height * width, 3)


def _warp_nearest(images, inverse_matrices, fill):
    """Nearest-neighbour warp of each image by its own matrix, uncovered pixels set to ``fill``.

    Builds the sampling grid exactly as torchvision's affine/rotate do, so that grid_sample picks
    the same source pixels. Rather than sampling the image itself, it samples a map of 1-based
    pixel numbers (0 outside the image, from the zero padding) and gathers uint8 pixels with it.
    """
    n, channels, height, width = images.shape
    device = images.device
    theta = inverse_matrices.to(device=device, dtype=torch.float32)
    half_size = torch.tensor([0.5 * width, 0.5 * height], dtype=torch.float32, device=device)
    normalised_theta = theta.transpose(1, 2) / half_size
    grid = _base_grid(height, width, device).expand(n, -1, -1).bmm(normalised_theta)
    grid = grid.view(n, height, width, 2)

    pixel_numbers = torch.arange(1, height * width + 1, dtype=torch.float32, device=device)
    pixel_numbers = pixel_numbers.view(1, 1, height, width).expand(n, 1, height, width)
    sampled = F.grid_sample(pixel_numbers, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    source = sampled.view(n, 1, height * width).long()

    fill_column = images.new_full((n, channels, 1), fill)
    flat = torch.cat([fill_column, images.reshape(n, channels, height * width)], dim=2)
    return flat.gather(2, source.expand(n, channels, height * width)).view_as(images)


# ----------------------------------------------------------------------------------------------
# Colour operations


def _per_sample(values):
    return values.view(-1, 1, 1, 1)


def _blend(pixels, other, factors):
    """torchvision v2's ``_blend``: clamp(pixels * f + other * (1 - f)), truncated to uint8.

    torchvision.transforms.v2 computes ``image.mul(f).add_(other, alpha=1 - f)`` in float32, and the
    add with alpha is a fused multiply-add: one rounding. With per-sample factors there is no fused
    op to call, so the add is done in float64, where for uint8 images the product and the sum are
    exact (they need about 50 significant bits at most), and then rounded to float32 once.
    ``pixels`` is the uint8 image as float32.
    """
    ratio = _per_sample(factors.to(torch.float32))
    alpha = _per_sample((1.0 - factors).to(torch.float32)).double()
    scaled = pixels * ratio
    blended = scaled.double().add_(other.double() * alpha).to(torch.float32)
    return blended.clamp_(0, 255).to(torch.uint8)


def _grayscale_floor(pixels):
    """torchvision's float32 luma (0.2989, 0.587, 0.114), floored as it does for uint8 input."""
    red, green, blue = pixels.unbind(dim=1)
    luma = red.mul(0.2989).add_(green, alpha=0.587).add_(blue, alpha=0.114)
    return luma.floor_().unsqueeze(1)


def _brightness(images, magnitudes, fill):
    factors = _per_sample((1.0 + magnitudes.double()).to(torch.float32))
    return (images.to(torch.float32) * factors).clamp_(0, 255).to(torch.uint8)


def _color(images, magnitudes, fill):
    pixels = images.to(torch.float32)
    return _blend(pixels, _grayscale_floor(pixels), 1.0 + magnitudes.double())


def _contrast(images, magnitudes, fill):
    pixels = images.to(torch.float32)
    mean = _grayscale_floor(pixels).mean(dim=(-3, -2, -1), keepdim=True)
    return _blend(pixels, mean, 1.0 + magnitudes.double())


def _sharpness(images, magnitudes, fill):
    """Blend with a 1-1-1/1-5-1/1-1-1 (÷13) blur on the interior; the one-pixel border is kept.

    torchvision rounds a float32 convolution. Here the weighted 3x3 sum S is exact (integers far
    below 2**24) and the blur is round(S / 13): 13 is odd, so S / 13 is never within 1/26 of a
    .5 tie and float error cannot change the rounding; both give the same blur.
    """
    height, width = images.shape[-2:]
    if height <= 2 or width <= 2:
        return images.clone()
    pixels = images.to(torch.float32)
    interior = pixels[..., 1:-1, 1:-1]
    box_sums = F.avg_pool2d(pixels, kernel_size=3, stride=1, divisor_override=1)
    blurred = box_sums.add_(interior, alpha=4).div_(13).round_()

    # torchvision: interior + (blurred - interior) * (1 - f) as a fused float32 multiply-add; see
    # _blend for why float64 gives the same value.
    alpha = _per_sample((1.0 - (1.0 + magnitudes.double())).to(torch.float32)).double()
    sharpened = blurred.sub_(interior).double().mul_(alpha).add_(interior).to(torch.float32)
    output = images.clone()
    output[..., 1:-1, 1:-1] = sharpened.clamp_(0, 255)
    return output


def _posterize(images, magnitudes, fill):
    bits = torch.trunc(magnitudes).long().clamp(0, 8)
    dropped_bits = 8 - bits
    masks = (torch.full_like(bits, 255) >> dropped_bits) << dropped_bits
    return images & _per_sample(masks.to(torch.uint8))


def _solarize(images, magnitudes, fill):
    # torchvision compares the uint8 image with the float threshold 255 * m in float32.
    thresholds = _per_sample((255.0 * magnitudes.double()).to(torch.float32))
    return torch.where(images >= thresholds, images.bitwise_not(), images)


def _autocontrast(images, magnitudes, fill):
    lowest = images.amin(dim=(-2, -1), keepdim=True).to(torch.float32)
    highest = images.amax(dim=(-2, -1), keepdim=True).to(torch.float32)
    constant = highest == lowest
    inverse_scale = (highest - lowest) * (1.0 / 255)
    # A constant channel is left as it is.
    lowest = lowest.masked_fill(constant, 0.0)
    inverse_scale = inverse_scale.masked_fill(constant, 1.0)
    stretched = (images.to(torch.float32) - lowest) / inverse_scale
    return stretched.clamp_(0, 255).to(torch.uint8)


def _equalize(images, magnitudes, fill):
    """PIL's histogram equalisation per (image, channel), as torchvision implements it.

    lut[0] = 0 and lut[k] = (cdf[k-1] + step // 2) // step, where step is the number of pixels
    that are not of the channel's highest value, floor-divided by 255; channels with step 0 are
    left as they are.
    """
    n, channels, height, width = images.shape
    num_rows = n * channels
    num_pixels = height * width
    flat = images.reshape(num_rows, num_pixels).long()
    offsets = torch.arange(num_rows, device=images.device).mul_(256).unsqueeze(1)
    bin_ids = flat + offsets
    histograms = torch.bincount(bin_ids.view(-1), minlength=num_rows * 256).view(num_rows, 256)

    top_counts = histograms.gather(1, flat.amax(dim=1, keepdim=True))
    steps = torch.div(num_pixels - top_counts, 255, rounding_mode="floor")
    cumulative = histograms.cumsum(dim=1)[:, :-1]
    lut_tail = torch.div(cumulative + steps // 2, steps.clamp(min=1), rounding_mode="floor").clamp_(0, 255)
    lut = torch.cat([torch.zeros_like(lut_tail[:, :1]), lut_tail], dim=1).to(torch.uint8)

    equalized = lut.view(-1)[bin_ids].view_as(images)
    unchanged = (steps == 0).view(n, channels, 1, 1)
    return torch.where(unchanged, images, equalized)


def _invert(images, magnitudes, fill):
    return images.bitwise_not()


def _geometric(op_name):
    def warp(images, magnitudes, fill):
        height, width = images.shape[-2:]
        return _warp_nearest(images, _geometric_matrices(op_name, magnitudes, height, width), fill)

    return warp


_OP_FUNCTIONS = {
    **{name: _geometric(name) for name in _GEOMETRIC_OPS},
    "Brightness": _brightness,
    "Color": _color,
    "Contrast": _contrast,
    "Sharpness": _sharpness,
    "Posterize": _posterize,
    "Solarize": _solarize,
    "AutoContrast": _autocontrast,
    "Equalize": _equalize,
    "Invert": _invert,
}


def _check_images(images):
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected uint8 images of shape [N, 3, H, W], got {images.dtype} {tuple(images.shape)}")


def apply_op(images: torch.Tensor, op_name: str, magnitudes: torch.Tensor, fill: int = FILL) -> torch.Tensor:
    """Apply ``op_name`` to every image, image i with the signed magnitude ``magnitudes[i]``.

    Magnitudes are the values torchvision's AutoAugment passes (see ``magnitude``), already
    negated where the sign draw says so; they are ignored by operations that take none.
    One operation at a time, for the tests and for trying an operation alone: the policy (``_apply_policy``)
    warps the images of all five geometric operations in one ``grid_sample``, from the same matrices.
    """
    _check_images(images)
    if op_name not in _OP_FUNCTIONS:
        raise ValueError(f"unknown operation {op_name!r}")
    magnitudes = torch.as_tensor(magnitudes, device=images.device).reshape(-1)
    if magnitudes.numel() != images.shape[0]:
        raise ValueError(f"need one magnitude per image, got {magnitudes.numel()} for {images.shape[0]} images")
    if images.shape[0] == 0:
        return images.clone()
    return _OP_FUNCTIONS[op_name](images, magnitudes, fill)


# ----------------------------------------------------------------------------------------------
# Random crop and flip


def _draw_crop_flip(n, padding, generator, device):
    """Per-sample crop offsets (top, left) in [0, 2 * padding] and flip flags (p = 1/2)."""
    tops = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=device)
    lefts = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=device)
    flips = torch.rand(n, generator=generator, device=device) < 0.5
    return tops, lefts, flips


def _crop_flip(images, tops, lefts, flips, padding):
    """Zero-pad, crop back to the input size at (top, left), then mirror where ``flips``."""
    n, channels, height, width = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))
    # Every crop position as a view [n, top, left, C, H, W]; indexing copies one crop per image.
    windows = padded.unfold(2, height, 1).unfold(3, width, 1).permute(0, 2, 3, 1, 4, 5)
    crops = windows[torch.arange(n, device=images.device), tops, lefts]
    columns = torch.arange(width, device=images.device)
    columns = torch.where(flips[:, None], columns.flip(0), columns)
    return crops.gather(3, columns.view(n, 1, 1, width).expand(n, channels, height, width))


def random_crop_flip(images: torch.Tensor, padding: int = 4, generator: torch.Generator | None = None) -> torch.Tensor:
    """RandomCrop(size of the input, padding, zero fill) then RandomHorizontalFlip(0.5), per sample."""
    _check_images(images)
    tops, lefts, flips = _draw_crop_flip(images.shape[0], padding, generator, images.device)
    return _crop_flip(images, tops, lefts, flips, padding)


# ----------------------------------------------------------------------------------------------
# AutoAugment


@functools.lru_cache(maxsize=16)
def _policy_tables(height, width):
    """Per (sub-policy, slot) tables: op ids, unsigned magnitudes, whether the op is signed."""
    op_ids = [[OPS.index(name) for name, _, _ in sub] for sub in CIFAR10_POLICY]
    magnitudes = [[magnitude(name, bin, (height, width)) for name, _, bin in sub] for sub in CIFAR10_POLICY]
    signed = [[name in _SIGNED_OPS for name, _, _ in sub] for sub in CIFAR10_POLICY]
    return torch.tensor(op_ids), torch.tensor(magnitudes, dtype=torch.float64), torch.tensor(signed)


# float32, like the torch.rand() value torchvision compares them with.
_POLICY_PROBABILITIES = torch.tensor([[p for _, p, _ in sub] for sub in CIFAR10_POLICY], dtype=torch.float32)


def _draw_policy(n, generator=None, device="cpu"):
    """Per-sample AutoAugment draws.

    Returns ``sub_policies`` [n] (uniform over the 25), ``applies`` [n, 2] (the slot's operation
    runs when ``rand() <= p``, as in torchvision) and ``negates`` [n, 2] (``rand() <= 0.5``; only
    used for signed operations).
    """
    sub_policies = torch.randint(0, len(CIFAR10_POLICY), (n,), generator=generator, device=device)
    thresholds = _POLICY_PROBABILITIES.to(device)[sub_policies]
    applies = torch.rand(n, 2, generator=generator, device=device) <= thresholds
    negates = torch.rand(n, 2, generator=generator, device=device) <= 0.5
    return sub_policies, applies, negates


def _slot_operations(sub_policies, applies, negates, height, width):
    """Operation id ([n, 2], ``_SKIP`` where not applied) and signed magnitude ([n, 2] float64)."""
    device = sub_policies.device
    op_table, magnitude_table, signed_table = (t.to(device) for t in _policy_tables(height, width))
    op_ids = torch.where(applies, op_table[sub_policies], _SKIP)
    flip_sign = negates & signed_table[sub_policies]
    magnitudes = torch.where(flip_sign, -magnitude_table[sub_policies], magnitude_table[sub_policies])
    return op_ids, magnitudes


def _apply_policy(images, sub_policies, applies, negates, fill):
    """Run each sample's drawn sub-policy; samples are grouped by operation, slot by slot."""
    n, _, height, width = images.shape
    op_ids, magnitudes = _slot_operations(sub_policies, applies, negates, height, width)
    num_kinds = len(OPS) + 1
    slot_offsets = torch.arange(2, device=images.device) * num_kinds
    # The only host-device sync: how many samples run each operation in each slot.
    counts = torch.bincount((op_ids + slot_offsets).view(-1), minlength=2 * num_kinds).view(2, num_kinds).tolist()
    orders = torch.argsort(op_ids, dim=0, stable=True)

    output = images.clone()
    for slot in range(2):
        order = orders[:, slot]
        slot_magnitudes = magnitudes[:, slot]
        starts = [0]
        for count in counts[slot]:
            starts.append(starts[-1] + count)

        num_geometric = len(_GEOMETRIC_OPS)
        geometric_samples = order[: starts[num_geometric]]
        if geometric_samples.numel():
            matrices = torch.cat([
                _geometric_matrices(name, slot_magnitudes[order[starts[k] : starts[k + 1]]], height, width)
                for k, name in enumerate(_GEOMETRIC_OPS)
            ])
            warped = _warp_nearest(output.index_select(0, geometric_samples), matrices, fill)
            output.index_copy_(0, geometric_samples, warped)

        for k in range(num_geometric, len(OPS)):
            samples = order[starts[k] : starts[k + 1]]
            if samples.numel():
                changed = _OP_FUNCTIONS[OPS[k]](output.index_select(0, samples), slot_magnitudes[samples], fill)
                output.index_copy_(0, samples, changed)
    return output


def autoaugment_cifar10(images: torch.Tensor, fill: int = FILL, generator: torch.Generator | None = None) -> torch.Tensor:
    """AutoAugment, CIFAR-10 policy, with its own random draws for every image."""
    _check_images(images)
    sub_policies, applies, negates = _draw_policy(images.shape[0], generator, images.device)
    return _apply_policy(images, sub_policies, applies, negates, fill)


def train_augment(images: torch.Tensor, generator: torch.Generator | None = None, fill: int = FILL) -> torch.Tensor:
    """The full training augmentation: random crop and flip, then AutoAugment."""
    return autoaugment_cifar10(random_crop_flip(images, generator=generator), fill=fill, generator=generator)
