"""Classify your own pictures with a trained checkpoint.

    python predict.py cat.jpg truck.png --checkpoint checkpoints/best.pt
    python predict.py cat.jpg --checkpoint checkpoints/best.pt --attention --out-dir figures
    python predict.py photos/*.jpg --checkpoint checkpoints/best.pt --device cpu

Any picture Pillow can read works, of any size and mode: grayscale, palette and CMYK pictures are
converted to RGB and transparent ones are laid over white. The whole picture is then resized to the
model's input size (32x32; the aspect ratio is not kept) with Pillow's bilinear filter, which
antialiases when it shrinks, and normalised as in training (`data.normalize`). For each image the
five most likely classes (all of them if the model has fewer) are printed with their probabilities.
--attention also writes <out-dir>/<image-stem>_attention.png (<image-stem>-2_attention.png and so on for
a name that repeats, e.g. cat.jpg and cat.png): the image as the model saw it, its
attention rollout from the class token, and the last layer's per-head maps (see visualize.py).

An image that cannot be read gets a one-line error on stderr and the others are still classified;
the exit status is then 1. A missing or unreadable checkpoint: a one-line error, exit status 2.
"""
import os
import sys
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from checkpoint import CheckpointError, load_model, probe_writable
from cli import OneLineErrors, first_line, nonempty_path, run_script
from data import normalize
from visualize import save_attention_figure

TOP_K = 5
BATCH_SIZE = 256


@dataclass
class Prediction:
    path: str
    image: torch.Tensor = None  # uint8 [3, H, W], what the model saw
    top: list = None  # [(class name, probability)], most likely first
    error: str = None  # why the image could not be read


def to_8bit_gray(image: Image.Image) -> Image.Image:
    """A 16- or 32-bit integer ("I;16", "I": 16-bit PNG, PGM) or float ("F") grayscale image as 8-bit L, or LA
    where a transparent gray value is set: convert("RGB") would clip it to white or black. Integers are read
    in the 16-bit range; floats up to 1 are scaled to 0..255, others clipped to it."""
    pixels = np.asarray(image)
    if image.mode == "F":
        gray = pixels * 255 if pixels.size and pixels.max() <= 1 else pixels
    else:
        gray = np.clip(pixels.astype(np.int64), 0, 65535) >> 8
    result = Image.fromarray(np.clip(gray, 0, 255).astype(np.uint8))
    transparent = image.info.get("transparency")
    if isinstance(transparent, int):
        alpha = Image.fromarray(np.where(pixels == transparent, 0, 255).astype(np.uint8))
        result = Image.merge("LA", (result, alpha))
    return result


def load_image(path: str, size: int) -> torch.Tensor:
    """A picture file -> uint8 [3, size, size], upright as its EXIF orientation says (as phone photos are
    stored). Raises OSError, ValueError or DecompressionBombError (over twice Pillow's MAX_IMAGE_PIXELS, about
    179 megapixels); a picture below that but over the limit is read without Pillow's two-line warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        image = Image.open(path)
    with image:
        image = ImageOps.exif_transpose(image)
        if image.mode.startswith("I") or image.mode == "F":
            image = to_8bit_gray(image)
        if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
            image = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image.convert("RGBA"))
        image = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


def read_image(path: str, size: int) -> Prediction:
    try:
        return Prediction(path, image=load_image(path, size))
    except UnidentifiedImageError:
        reason = "not an image file Pillow can read"
    except OSError as error:  # missing file, a folder, no permission, a truncated image
        reason = error.strerror or str(error)
    except (ValueError, SyntaxError, Image.DecompressionBombError) as error:  # SyntaxError: Pillow's broken PNG chunk
        reason = str(error)
    return Prediction(path, error=first_line(reason) or "unreadable")


def predict_images(model, classes: list, paths: list) -> list:
    """One Prediction per path, in order: the top classes, or the error that stopped it.

    `model` should be in eval mode, as `checkpoint.load_model` returns it."""
    results = [read_image(path, model.config.image_size) for path in paths]
    readable = [result for result in results if result.error is None]
    device = next(model.parameters()).device
    k = min(TOP_K, len(classes))
    with torch.no_grad():
        for start in range(0, len(readable), BATCH_SIZE):
            batch = readable[start:start + BATCH_SIZE]
            images = torch.stack([result.image for result in batch]).to(device)
            probabilities, indices = model(normalize(images)).float().softmax(dim=-1).topk(k, dim=-1)
            for result, row_probabilities, row_indices in zip(batch, probabilities.tolist(), indices.tolist()):
                result.top = [(classes[i], p) for i, p in zip(row_indices, row_probabilities)]
    return results


def attention_figure_paths(image_paths, out_dir) -> list:
    """<out-dir>/<stem>_attention.png for each image; a stem already taken gets -2, -3, ... so that no figure
    replaces another, nor one of the input images (an earlier run's figure given as an image, say)."""
    inputs = {os.path.realpath(path) for path in image_paths}
    taken, paths = set(), []
    for path in image_paths:
        stem = os.path.splitext(os.path.basename(path))[0]
        name, copy = stem, 1
        while name in taken or os.path.realpath(os.path.join(out_dir, f"{name}_attention.png")) in inputs:
            copy += 1
            name = f"{stem}-{copy}"
        taken.add(name)
        paths.append(os.path.join(out_dir, f"{name}_attention.png"))
    return paths


def parse_args(argv=None):
    parser = OneLineErrors(description="Classify pictures with a trained ViT checkpoint.")
    parser.add_argument("images", nargs="+", metavar="IMAGE", type=nonempty_path, help="PNG, JPEG or any picture Pillow reads")
    parser.add_argument("--checkpoint", required=True, type=nonempty_path, help="a checkpoint written by training, e.g. checkpoints/best.pt")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: cuda when available, else cpu")
    parser.add_argument("--attention", action="store_true",
                        help="also write <out-dir>/<image-stem>_attention.png for each image (-2, -3, ... for a repeated stem)")
    parser.add_argument("--out-dir", default=".", type=nonempty_path, help="folder for the --attention figures (default: .)")
    args = parser.parse_args(argv)
    from trainer import TrainingStopped, resolve_device
    try:
        args.device = resolve_device(args.device).type
    except TrainingStopped as error:
        parser.error(str(error))
    if args.attention:
        try:
            probe_writable(args.out_dir)
        except OSError as error:
            parser.error(f"--out-dir {args.out_dir}: cannot write there ({error.strerror or error}): "
                         f"choose another folder for the --attention figures")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        model, state = load_model(args.checkpoint, args.device)
    except CheckpointError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # e.g. weights that do not fit the stored config, or a corrupt pickle
        print(f"error: checkpoint {args.checkpoint} could not be loaded "
              f"({type(error).__name__}: {first_line(error)})", file=sys.stderr)
        return 2
    classes = state.get("classes")
    if not classes or len(classes) != model.config.num_classes:
        print(f"error: checkpoint {args.checkpoint} does not list its {model.config.num_classes} class names",
              file=sys.stderr)
        return 2

    status = 0  # 1 once an image or a figure failed; the others still go on
    results = predict_images(model, classes, args.images)
    for result, figure_path in zip(results, attention_figure_paths(args.images, args.out_dir)):
        if result.error is not None:
            print(f"error: {result.path}: {result.error}", file=sys.stderr)
            status = 1
            continue
        print(result.path)
        width = max(len(name) for name, _ in result.top)
        for rank, (name, probability) in enumerate(result.top, start=1):
            print(f"  {rank}. {name:<{width}}  {100 * probability:6.2f}%")
        if args.attention:
            try:
                save_attention_figure(model, result.image[None], None, classes, figure_path)
                print(f"  attention: {figure_path}")
            except OSError as error:  # a full disk, a folder in the way
                print(f"error: could not write {figure_path} ({error.strerror or error}): free disk space or "
                      f"choose another --out-dir", file=sys.stderr)
                status = 1
    return status


if __name__ == "__main__":
    run_script(main)
