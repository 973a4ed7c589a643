"""results.png: training curves of a run, redrawn during training (at most every --write-interval seconds, and after
the first and last epochs) so a long run can be watched.

Redraw it from a run's metrics.csv, optionally against another curve (the reference's, or another run's):
    python plots.py runs/a/metrics.csv runs/a/vs-reference.png --compare-curve reference/seed-test-curve.csv
"""
import csv
import math
import os
import sys

import matplotlib

matplotlib.use("Agg")  # no display under nohup
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from checkpoint import atomic_file, probe_writable  # noqa: E402
from cli import OneLineErrors, nonempty_path, run_script  # noqa: E402

# The columns of a run's metrics.csv, one row per epoch (the trainer's history rows hold the same keys).
METRIC_FIELDS = ("epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "epoch_seconds",
                 "images_per_second")


def read_numeric_csv(path: str, columns: tuple, what: str) -> list:
    """The rows of a CSV file as {column: float} for `columns` (others ignored); a ValueError that names
    the file and says what it should be when it cannot be read, lacks a column or holds no rows. A spreadsheet's
    byte-order mark and spaces after the commas are allowed."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = [{column: float(row[column]) for column in columns}
                    for row in csv.DictReader(f, skipinitialspace=True)]
    except OSError as error:
        raise ValueError(f"{path}: cannot read it ({error.strerror or error})") from None
    except (KeyError, TypeError, ValueError, csv.Error):
        raise ValueError(f"{path}: not {what} (numeric columns {', '.join(columns)})") from None
    if not rows:
        raise ValueError(f"{path}: the file holds no rows")
    return rows


def read_curve(path: str) -> tuple:
    """(label, [(epoch, test accuracy %)]) from a CSV with `epoch` and `test_acc` columns, such as
    reference/seed-test-curve.csv (the reference project's run) or another run's metrics.csv."""
    rows = whole_epochs(path, read_numeric_csv(path, ("epoch", "test_acc"), "a test-accuracy curve"))
    check_percentages(path, rows, ("test_acc",))
    return os.path.basename(path), [(row["epoch"], row["test_acc"]) for row in rows]


def read_history(path: str) -> list:
    """The rows of a run's metrics.csv, as the trainer keeps them."""
    columns = ("epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc")
    rows = whole_epochs(path, read_numeric_csv(path, columns, "a metrics.csv"))
    check_percentages(path, rows, ("train_acc", "test_acc"))
    return rows


def whole_epochs(path: str, rows: list) -> list:
    """The rows with their epoch as an int; a file whose epochs are not whole numbers from 1 is refused."""
    if not all(math.isfinite(row["epoch"]) and row["epoch"] == int(row["epoch"]) >= 1 for row in rows):
        raise ValueError(f"{path}: its epochs must be whole numbers from 1 on")
    return [{**row, "epoch": int(row["epoch"])} for row in rows]


def check_percentages(path: str, rows: list, columns: tuple) -> None:
    """A ValueError unless every value of `columns` is a percentage from 0 to 100 (or NaN: a gap in the curve); an
    accuracy of 1e308 would pass as a number and then break the drawing."""
    for number, row in enumerate(rows, start=1):
        for column in columns:
            if not (math.isnan(row[column]) or 0.0 <= row[column] <= 100.0):
                raise ValueError(f"{path}: {column} must be a percentage from 0 to 100, row {number} holds "
                                 f"{row[column]:g}")


IMAGE_FORMATS = ("png", "pdf", "svg")


def image_format(path: str) -> str:
    """The format a file name asks for, by its extension: "png" for results.png ("" for no extension)."""
    return os.path.splitext(path)[1][1:].lower()


def same_file(a: str, b: str) -> bool:
    return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)


def check_output(parser, args) -> None:
    """A one-line error, before anything is read or written, for an output that would replace something else:
    a folder, an input of this very command, or a file that is no image (a checkpoint, a CSV)."""
    example = os.path.join(os.path.dirname(args.out), "results-redrawn.png")  # not a run's own results.png
    if os.path.isdir(args.out):
        parser.error(f"{args.out} is a folder: give the PNG's file name, e.g. "
                     f"{os.path.join(args.out, 'results-redrawn.png')}")
    for what, path in (("the metrics file", args.metrics), ("the --compare-curve file", args.compare_curve)):
        if path and same_file(args.out, path):
            parser.error(f"{args.out} is {what} itself: give the plot its own file name, e.g. {example}")
    if image_format(args.out) not in IMAGE_FORMATS:
        parser.error(f"{args.out} is not an image file name (.png, .pdf or .svg): give a .png file name, "
                     f"e.g. {example}")
    folder = os.path.dirname(args.out) or "."
    try:
        probe_writable(folder)
    except OSError as error:  # a file where the folder should be, no permission, a full disk
        parser.error(f"{args.out}: cannot write into {folder} ({error.strerror or error}): choose another place")


def plot_curve(axis, xs: list, ys: list, *style, **options) -> None:
    """A line, with a marker on each point that has no finite neighbour (a one-epoch run, a value between NaNs):
    a line alone would not show it."""
    finite = [math.isfinite(y) for y in ys]
    alone = [i for i, ok in enumerate(finite)
             if ok and not (i > 0 and finite[i - 1]) and not (i + 1 < len(ys) and finite[i + 1])]
    marks = {"marker": "o", "markevery": alone} if alone else {}  # none in the legend of a plain line
    axis.plot(xs, ys, *style, **marks, **options)


def plot_results(history: list, path: str, compare: tuple | None = None) -> None:
    """Loss (train, test), accuracy (train, test, best epoch marked) and the learning rate, per epoch;
    `compare`: a test-accuracy curve from `read_curve`, dashed, on the accuracy panel."""
    epochs = [row["epoch"] for row in history]
    figure, (loss_axis, acc_axis, lr_axis) = plt.subplots(
        1, 3, figsize=(15, 4.2), gridspec_kw={"width_ratios": [1, 1, 0.6]})
    plot_curve(loss_axis, epochs, [r["train_loss"] for r in history], label="train")
    plot_curve(loss_axis, epochs, [r["test_loss"] for r in history], label="test")
    loss_axis.set(title="loss", xlabel="epoch")
    plot_curve(acc_axis, epochs, [r["train_acc"] for r in history], label="train")
    plot_curve(acc_axis, epochs, [r["test_acc"] for r in history], label="test")
    if compare:
        label, points = compare
        plot_curve(acc_axis, [e for e, _ in points], [a for _, a in points], "--", color="gray", label=f"test, {label}")
    finite = [r for r in history if math.isfinite(r["test_acc"])]  # a NaN compares as neither more nor less
    if finite:
        best = max(finite, key=lambda r: r["test_acc"])
        acc_axis.scatter([best["epoch"]], [best["test_acc"]], color="red", zorder=3,
                         label=f"best {best['test_acc']:.2f}% (epoch {best['epoch']})")
    acc_axis.set(title="accuracy (%)", xlabel="epoch")
    plot_curve(lr_axis, epochs, [r["lr"] for r in history], color="gray")
    lr_axis.set(title="learning rate (end of epoch)", xlabel="epoch")
    lr_axis.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    for axis in (loss_axis, acc_axis):
        axis.legend()
    for axis in (loss_axis, acc_axis, lr_axis):
        axis.grid(alpha=0.3)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # epochs, not 0.96 ... 1.04
    figure.tight_layout()
    save_figure(figure, path, dpi=100)


def save_figure(figure, path: str, dpi: int) -> None:
    """In the format the name's extension asks for, written whole or not at all (atomic_file): a run killed
    meanwhile keeps the old file. Closes the figure."""
    try:
        with atomic_file(path) as f:
            figure.savefig(f, format=image_format(path), dpi=dpi)
    finally:
        plt.close(figure)


def main(argv=None) -> int:
    p = OneLineErrors(description="Redraw results.png from a run's metrics.csv.")
    p.add_argument("metrics", type=nonempty_path, help="a run's metrics.csv")
    p.add_argument("out", type=nonempty_path, help="the image to write: .png (or .pdf, .svg)")
    p.add_argument("--compare-curve", metavar="CSV", type=nonempty_path, help="a test-accuracy curve to draw dashed (epoch, test_acc)")
    args = p.parse_args(argv)
    check_output(p, args)
    try:
        history = read_history(args.metrics)
        compare = read_curve(args.compare_curve) if args.compare_curve else None
        plot_results(history, args.out, compare)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    run_script(main)
