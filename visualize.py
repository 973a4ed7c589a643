"""Pictures of a trained ViT: where it looks (attention rollout) and which classes it confuses.

    from visualize import write_evaluation_report
    lines = write_evaluation_report(model, data.test_images, data.test_labels, predictions, data.classes, out_dir)
    print("\\n".join(lines))   # per-class accuracy table

writes into out_dir:
    attention.png   the first test image of each class (at most ATTENTION_ROWS classes), its attention
                    rollout from the class token laid over it, and the last layer's per-head
                    class-token attention
    confusion.png   the confusion matrix, each row (true class) normalised to sum 1
    per_class.csv   class, correct, total, accuracy_percent

Attention rollout (Abnar & Zuidema, 2020): average each layer's attention over the heads, add the
identity for the residual connection, renormalise the rows to sum 1, and multiply the layers
together, R = A_L ... A_2 A_1. Row 0 of R says how much the class token at the output draws from
each input token. All attention weights come from `model.forward_with_attention` (the explicit
attention path) on the same normalised images the model classifies.
"""
import csv
import os

import matplotlib

matplotlib.use("Agg")  # headless: the trainer runs under nohup with no display
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

from checkpoint import atomic_file
from data import normalize
from plots import save_figure

DPI = 100
ATTENTION_CELL_INCHES = 1.5  # every panel of attention.png is 150 x 150 pixels
ATTENTION_ROWS = 10  # CIFAR-100 shows its first 10 classes: 100 rows would be unreadable
CELL_TEXT_MAX_CLASSES = 20  # beyond this the confusion matrix cells carry no numbers


# ----------------------------------------------------------------------------- attention

def attention_rollout(attentions: list) -> torch.Tensor:
    """Per-layer attention weights [N, heads, T, T], first layer first -> rollout [N, T, T]."""
    rollout = None
    for weights in attentions:
        mixed = weights.float().mean(dim=1)
        mixed = mixed + torch.eye(mixed.size(-1), device=mixed.device)
        mixed = mixed / mixed.sum(dim=-1, keepdim=True)
        rollout = mixed if rollout is None else mixed @ rollout
    return rollout


def class_token_map(matrix: torch.Tensor, config) -> torch.Tensor:
    """[..., T, T] -> the class token's row over the patch tokens as the patch grid [..., g, g]."""
    grid = config.image_size // config.patch_size
    if matrix.size(-1) != grid * grid + 1:
        raise ValueError(f"expected {grid * grid + 1} tokens (class token + {grid}x{grid} patches), "
                         f"got {matrix.size(-1)}")
    return matrix[..., 0, 1:].reshape(*matrix.shape[:-2], grid, grid)


def attention_maps(model, images_uint8: torch.Tensor):
    """Run the model once on a small uint8 batch [K, 3, H, W].

    Returns (probabilities [K, classes], rollout maps [K, g, g], last layer's per-head maps
    [K, heads, g, g]), all float32 on the CPU."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        # autocast off: the caller may be inside a mixed-precision region; the maps are float32
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            logits, attentions = model.forward_with_attention(normalize(images_uint8.to(device)))
            rollout = class_token_map(attention_rollout(attentions), model.config)
            heads = class_token_map(attentions[-1].float(), model.config)
    finally:
        model.train(was_training)
    return logits.float().softmax(dim=-1).cpu(), rollout.cpu(), heads.cpu()


def pick_one_per_class(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Index of the first image of each class, in class order; classes with no image are skipped."""
    first = {}
    for index, label in enumerate(labels.tolist()):
        first.setdefault(label, index)
    return torch.tensor([first[c] for c in range(num_classes) if c in first], dtype=torch.int64)


def save_attention_figure(model, images_uint8: torch.Tensor, labels, classes: list, path: str) -> None:
    """One row per image: the image, its class-token rollout over it, the last layer's heads.

    `labels` (true classes) may be None, e.g. for the user's own pictures."""
    probabilities, rollout, heads = attention_maps(model, images_uint8)
    images = images_uint8.cpu().permute(0, 2, 3, 1).numpy()
    size = images.shape[1:3]
    rollout = F.interpolate(rollout[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    rows, columns = len(images), 2 + heads.size(1)
    figure, axes = plt.subplots(rows, columns, squeeze=False, dpi=DPI,
                                figsize=(columns * ATTENTION_CELL_INCHES, rows * ATTENTION_CELL_INCHES))
    for row in range(rows):
        confidence, predicted = probabilities[row].max(dim=0)
        title = f"pred {classes[predicted]} {100 * confidence:.0f}%"
        if labels is not None:
            title = f"true {classes[int(labels[row])]}\n{title}"
        axes[row, 0].imshow(images[row])
        axes[row, 0].set_title(title, fontsize=8)
        axes[row, 1].imshow(images[row])
        axes[row, 1].imshow(rollout[row].numpy(), cmap="jet", alpha=0.5)
        for head in range(heads.size(1)):
            axes[row, 2 + head].imshow(heads[row, head].numpy(), cmap="viridis")
    axes[0, 1].set_title("rollout", fontsize=8)
    for head in range(heads.size(1)):
        axes[0, 2 + head].set_title(f"last layer\nhead {head + 1}", fontsize=8)
    for axis in axes.flat:
        axis.set_axis_off()
    title_inches = 0.45
    figure.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - title_inches / (rows * ATTENTION_CELL_INCHES),
                           wspace=0.05, hspace=0.45)
    save_figure(figure, path, DPI)


# ----------------------------------------------------------------------------- confusion

def confusion_matrix(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """int64 [C, C]: rows are the true classes, columns the predicted ones."""
    predictions, labels = predictions.cpu().long().flatten(), labels.cpu().long().flatten()
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    for name, values in (("predictions", predictions), ("labels", labels)):
        if len(values) and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(f"{name} must be in 0..{num_classes - 1}, found {values.min()}..{values.max()}")
    counts = torch.bincount(labels * num_classes + predictions, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def per_class_accuracy(matrix: torch.Tensor) -> list:
    """Accuracy of each true class in percent; nan for a class with no images."""
    correct, total = matrix.diag().double(), matrix.sum(dim=1).double()
    return (100 * correct / total).tolist()  # 0/0 gives nan


def per_class_rows(matrix: torch.Tensor, classes: list) -> list:
    """(class name, correct, total, accuracy %) for each true class of a confusion matrix."""
    return list(zip(classes, matrix.diag().tolist(), matrix.sum(dim=1).tolist(), per_class_accuracy(matrix)))


def save_confusion_figure(matrix: torch.Tensor, classes: list, path: str) -> None:
    num_classes = len(classes)
    totals = matrix.sum(dim=1, keepdim=True).clamp(min=1)
    normalized = (matrix.double() / totals).numpy()
    side = min(3 + 0.5 * num_classes, 20)  # 10 classes: 8 x 8 inches; 100 classes: 20 x 20
    small = num_classes <= CELL_TEXT_MAX_CLASSES
    figure, axis = plt.subplots(figsize=(side, side), dpi=DPI, layout="constrained")
    image = axis.imshow(normalized, cmap="Blues", vmin=0, vmax=1)
    figure.colorbar(image, ax=axis, fraction=0.046, pad=0.04, label="fraction of the true class")
    if small:
        axis.set_xticks(range(num_classes), classes, rotation=45, ha="right", rotation_mode="anchor", fontsize=9)
        axis.set_yticks(range(num_classes), classes, fontsize=9)
    else:
        axis.set_xticks(range(num_classes), classes, rotation=90, fontsize=5)
        axis.set_yticks(range(num_classes), classes, fontsize=5)
    axis.set_xlabel("predicted class")
    axis.set_ylabel("true class")
    axis.set_title("confusion matrix (rows sum to 1)")
    if small:
        for true in range(num_classes):
            for predicted in range(num_classes):
                value = normalized[true, predicted]
                axis.text(predicted, true, f"{value:.2f}", ha="center", va="center", fontsize=8,
                          color="white" if value > 0.5 else "black")
    save_figure(figure, path, DPI)


def write_per_class_csv(matrix: torch.Tensor, classes: list, path: str) -> None:
    with atomic_file(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["class", "correct", "total", "accuracy_percent"])
        for name, correct, total, accuracy in per_class_rows(matrix, classes):
            writer.writerow([name, correct, total, f"{accuracy:.2f}"])


def per_class_table(matrix: torch.Tensor, classes: list) -> list:
    """Aligned text lines: a header, one line per class, and the overall accuracy."""
    width = max(len(name) for name in [*classes, "class"])
    lines = [f"{'class':<{width}}  {'correct':>7}  {'total':>7}  {'accuracy':>8}"]
    for name, correct, total, accuracy in per_class_rows(matrix, classes):
        lines.append(f"{name:<{width}}  {correct:>7}  {total:>7}  {accuracy:>7.2f}%")
    correct, total = int(matrix.diag().sum()), int(matrix.sum())
    lines.append(f"{'all':<{width}}  {correct:>7}  {total:>7}  {100 * correct / max(total, 1):>7.2f}%")
    return lines


# ----------------------------------------------------------------------------- report

REPORT_FILES = ("attention.png", "confusion.png", "per_class.csv")  # a run's; --eval-only adds a suffix to each


def write_evaluation_report(model, images_uint8: torch.Tensor, labels: torch.Tensor, predictions: torch.Tensor,
                            classes: list, out_dir: str, suffix: str = "") -> list:
    """attention.png, confusion.png and per_class.csv into out_dir (attention-best.png and so on with suffix
    "-best"); returns the per-class table lines.

    `predictions` are the model's classes for all of `images_uint8` (computed by the caller); the
    model only runs on the one-image-per-class batch of the attention figure. Pass the bare model,
    not a DistributedDataParallel wrapper."""
    os.makedirs(out_dir, exist_ok=True)
    labels = labels.cpu()
    matrix = confusion_matrix(predictions, labels, len(classes))
    picks = pick_one_per_class(labels, len(classes))[:ATTENTION_ROWS]
    attention, confusion, per_class = (f"{stem}{suffix}{extension}" for stem, extension in
                                       (os.path.splitext(name) for name in REPORT_FILES))
    save_attention_figure(model, images_uint8[picks.to(images_uint8.device)], labels[picks], classes,
                          os.path.join(out_dir, attention))
    save_confusion_figure(matrix, classes, os.path.join(out_dir, confusion))
    write_per_class_csv(matrix, classes, os.path.join(out_dir, per_class))
    return per_class_table(matrix, classes)


if __name__ == "__main__":  # a library: say what writes its pictures rather than exit in silence
    raise SystemExit("visualize.py is a library, not a script: write a checkpoint's report (attention.png, "
                     "confusion.png, per_class.csv) with python main.py --eval-only --checkpoint CHECKPOINT, or "
                     "one image's attention with python predict.py IMAGE --checkpoint CHECKPOINT --attention")
