"""results.png with a comparison curve (--compare-curve); the one-line errors for a bad curve file, and for an output
that would replace another file."""
import os
import re

import numpy as np
import pytest
from PIL import Image

import plots
from conftest import ROOT, TINY_MODEL

HISTORY = [{"epoch": e, "lr": 1e-3, "train_loss": 2.0 / e, "test_loss": 2.1 / e, "train_acc": 20.0 + 5 * e,
            "test_acc": 25.0 + 5 * e} for e in range(1, 6)]

METRICS = ("epoch,lr,train_loss,train_acc,test_loss,test_acc,epoch_seconds,images_per_second\n"
           "1,0.0002,2.1,22.0,1.9,38.5,29.2,1780\n2,0.0004,1.9,34.6,1.6,49.3,1.5,34354\n")


def test_the_shipped_reference_curve_is_the_reference_run():
    label, points = plots.read_curve(os.path.join(ROOT, "reference", "seed-test-curve.csv"))
    assert label == "seed-test-curve.csv"
    assert [e for e, _ in points] == list(range(1, 201))
    assert points[0] == (1, 10.16) and points[-1] == (200, 89.87) and max(a for _, a in points) == 89.87


def test_the_comparison_curve_is_drawn(tmp_path):
    curve = tmp_path / "metrics.csv"
    curve.write_text("epoch,lr,test_acc\n1,0.001,60\n2,0.001,70\n3,0.001,80\n")
    plots.plot_results(HISTORY, str(tmp_path / "plain.png"))
    plots.plot_results(HISTORY, str(tmp_path / "compared.png"), plots.read_curve(str(curve)))
    plain = np.asarray(Image.open(tmp_path / "plain.png").convert("L"), dtype=int)
    compared = np.asarray(Image.open(tmp_path / "compared.png").convert("L"), dtype=int)
    assert plain.shape == compared.shape
    width = plain.shape[1]
    changed = np.abs(plain - compared) > 0
    assert changed[:, width // 3:2 * width // 3].sum() > 100  # the accuracy panel got a line and a legend entry
    assert changed[:, :width // 3].sum() == 0  # the loss panel did not change


def test_a_single_epoch_is_drawn_as_points(tmp_path, monkeypatch):
    """A line through one point draws nothing: after the first epoch every curve of the run gets markers."""
    close, figures = plots.plt.close, []
    monkeypatch.setattr(plots.plt, "close", figures.append)
    plots.plot_results(HISTORY[:1], str(tmp_path / "one.png"))
    plots.plot_results(HISTORY, str(tmp_path / "five.png"))
    markers = [[line.get_markevery() for axis in figure.axes for line in axis.lines] for figure in figures]
    ticks = [[[t for t in axis.get_xticks() if axis.get_xlim()[0] <= t <= axis.get_xlim()[1]] for axis in figure.axes]
             for figure in figures]
    for figure in figures:
        close(figure)
    assert markers == [[[0]] * 5, [None] * 5]  # train and test loss, train and test accuracy, learning rate
    assert ticks[0] == [[1.0]] * 3  # whole epochs only, not 0.96 ... 1.04
    assert all(float(t).is_integer() for axis in ticks[1] for t in axis)


def test_a_value_between_nans_and_a_one_point_comparison_curve_are_marked(tmp_path, monkeypatch):
    close, figures = plots.plt.close, []
    monkeypatch.setattr(plots.plt, "close", figures.append)
    nan = float("nan")
    history = [dict(row, test_acc=acc) for row, acc in zip(HISTORY, [10.0, nan, 30.0, nan, 50.0])]
    plots.plot_results(history, str(tmp_path / "gaps.png"), ("smoke run", [(1, 40.0)]))
    (figure,) = figures
    test_acc, compared = figure.axes[1].lines[1], figure.axes[1].lines[2]
    marked = {line.get_label(): line.get_markevery() for line in (test_acc, compared)}
    close(figure)
    assert marked == {"test": [0, 2, 4], "test, smoke run": [0]}


def test_the_best_epoch_marked_is_never_a_nan_row(tmp_path, monkeypatch):
    close, figures = plots.plt.close, []
    monkeypatch.setattr(plots.plt, "close", figures.append)
    history = [dict(row, test_acc=float("nan")) if row["epoch"] == 1 else row for row in HISTORY]
    plots.plot_results(history, str(tmp_path / "nan.png"))
    labels = [text.get_text() for text in figures[0].axes[1].get_legend().get_texts()]
    close(figures[0])
    best = max(HISTORY[1:], key=lambda row: row["test_acc"])
    assert f"best {best['test_acc']:.2f}% (epoch {best['epoch']})" in labels


@pytest.mark.parametrize("text, problem", [("", "holds no rows"), ("epoch,test_acc\n", "holds no rows"),
                                           ("epoch,acc\n1,50\n", "not a test-accuracy curve"),
                                           ("epoch,test_acc\n1,high\n", "numeric columns epoch, test_acc"),
                                           *[(f"epoch,test_acc\n1,10\n{epoch},20\n", "whole numbers from 1 on")
                                             for epoch in ("inf", "nan", "1.5", "0")],
                                           *[(f"epoch,test_acc\n1,10\n2,{acc}\n",
                                              re.escape(f"test_acc must be a percentage from 0 to 100, row 2 holds "
                                                        f"{acc}"))
                                             for acc in ("1e+308", "-1", "inf", "100.5")]])
def test_a_bad_curve_file_is_named_with_its_problem(tmp_path, text, problem):
    path = tmp_path / "curve.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=problem) as error:
        plots.read_curve(str(path))
    assert str(error.value).startswith(f"{path}: ")


def test_a_spreadsheets_curve_is_read_with_its_byte_order_mark_and_spaces(tmp_path):
    """Excel's "CSV UTF-8" starts with a byte-order mark; hand-written files often have spaces after commas."""
    path = tmp_path / "curve.csv"
    path.write_bytes(b"\xef\xbb\xbfepoch, test_acc\n1, 30.5\n2,nan\n")
    label, points = plots.read_curve(str(path))
    assert points[0] == (1, 30.5) and points[1][0] == 2 and points[1][1] != points[1][1]  # a NaN gap is kept


def test_a_metrics_file_with_an_accuracy_beyond_100_is_one_line(tmp_path, capsys):
    metrics = tmp_path / "metrics.csv"
    metrics.write_text(METRICS.replace("34.6", "1e308"))
    assert plots.main([str(metrics), str(tmp_path / "out.png")]) == 2
    assert capsys.readouterr().err == (f"error: {metrics}: train_acc must be a percentage from 0 to 100, row 2 holds "
                                       f"1e+308\n")
    assert not (tmp_path / "out.png").exists()


def test_a_drawing_that_fails_warns_once_and_the_run_goes_on(fake_cifar10, tmp_path, monkeypatch, capsys):
    """Not the disk (that stops the run): a drawing error loses only the picture, never the run or its files."""
    import main

    def broken(history, path, compare=None):
        raise ValueError("arange: cannot compute length\nmore")
    monkeypatch.setattr(plots, "plot_results", broken)
    assert main.main(["--data-dir", fake_cifar10, "--out-dir", str(tmp_path), "--epochs", "2", "--warmup-epochs", "0",
                      "--batch-size", "40", "--device", "cpu", "--write-interval", "0", *TINY_MODEL]) == 0
    err = capsys.readouterr().err
    assert err.count("warning: could not draw results.png (ValueError: arange: cannot compute length): training "
                     "goes on without it; redraw it later with plots.py\n") == 1
    assert "Traceback" not in err and not (tmp_path / "results.png").exists()
    assert [row["epoch"] for row in plots.read_history(str(tmp_path / "metrics.csv"))] == [1, 2]
    assert os.path.isfile(tmp_path / "checkpoints" / "last.pt")


def test_a_run_draws_its_compare_curve_into_results_png(fake_cifar10, tmp_path, monkeypatch):
    import main
    drawn = []
    real_plot = plots.plot_results

    def plot(history, path, compare=None):
        drawn.append(compare)
        real_plot(history, path, compare)

    monkeypatch.setattr(plots, "plot_results", plot)
    curve = os.path.join(ROOT, "reference", "seed-test-curve.csv")
    assert main.main(["--data-dir", fake_cifar10, "--out-dir", str(tmp_path), "--epochs", "1", "--warmup-epochs", "1",
                      "--batch-size", "40", "--device", "cpu", *TINY_MODEL, "--compare-curve", curve]) == 0
    assert drawn == [plots.read_curve(curve)]
    assert os.path.isfile(tmp_path / "results.png")


def test_redraw_from_metrics_csv_with_the_reference(tmp_path, capsys):
    metrics = tmp_path / "metrics.csv"
    metrics.write_text(METRICS)
    assert plots.read_history(str(metrics))[1] == {"epoch": 2, "lr": 0.0004, "train_loss": 1.9, "train_acc": 34.6,
                                                   "test_loss": 1.6, "test_acc": 49.3}
    out = tmp_path / "vs.png"
    assert plots.main([str(metrics), str(out), "--compare-curve",
                       os.path.join(ROOT, "reference", "seed-test-curve.csv")]) == 0
    assert Image.open(out).size[0] > 300
    (tmp_path / "bad.csv").write_text("epoch,test_acc\n1,50\n")
    assert plots.main([str(tmp_path / "bad.csv"), str(tmp_path / "bad.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "not a metrics.csv" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "bad.png").exists()
    with pytest.raises(SystemExit) as exit_:
        plots.main([str(metrics), str(tmp_path)])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(
        f"error: {tmp_path} is a folder: give the PNG's file name, e.g. {tmp_path / 'results-redrawn.png'}")


@pytest.mark.parametrize("out, flags, message", [
    ("./metrics.csv", [],
     "./metrics.csv is the metrics file itself: give the plot its own file name, e.g. ./results-redrawn.png"),
    ("curve.csv", ["--compare-curve", "curve.csv"],
     "curve.csv is the --compare-curve file itself: give the plot its own file name, e.g. results-redrawn.png"),
    ("checkpoints/last.pt", [], "checkpoints/last.pt is not an image file name (.png, .pdf or .svg): "
                                "give a .png file name, e.g. checkpoints/results-redrawn.png"),
    ("other.csv", [], "other.csv is not an image file name (.png, .pdf or .svg): give a .png file name, "
                      "e.g. results-redrawn.png"),
    ("metrics.csv/plot.png", [], "metrics.csv/plot.png: cannot write into metrics.csv (File exists): choose another "
                                 "place"),  # was "[Errno 17] File exists", after reading the inputs
])
def test_an_output_that_would_replace_another_file_is_refused(tmp_path, monkeypatch, capsys, out, flags, message):
    monkeypatch.chdir(tmp_path)
    files = {"metrics.csv": METRICS.encode(), "curve.csv": b"epoch,test_acc\n1,50\n",
             "checkpoints/last.pt": b"\x80\x02 a checkpoint", "other.csv": b"kept\n"}
    os.makedirs("checkpoints")
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    with pytest.raises(SystemExit) as exit_:
        plots.main(["metrics.csv", out, *flags])
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].endswith(f": error: {message}"), lines
    assert {name: (tmp_path / name).read_bytes() for name in files} == files


def test_each_panel_draws_its_own_columns(tmp_path, monkeypatch):
    close, figures = plots.plt.close, []
    monkeypatch.setattr(plots.plt, "close", figures.append)
    history = [dict(row, lr=1e-3 / row["epoch"]) for row in HISTORY]
    plots.plot_results(history, str(tmp_path / "columns.png"))
    (figure,) = figures
    drawn = [[list(line.get_ydata()) for line in axis.lines] for axis in figure.axes]
    close(figure)
    column = {name: [row[name] for row in history] for name in history[0]}
    assert drawn == [[column["train_loss"], column["test_loss"]], [column["train_acc"], column["test_acc"]],
                     [column["lr"]]]


@pytest.mark.parametrize("name, start", [("plot.svg", b"<?xml"), ("plot.pdf", b"%PDF"), ("plot.png", b"\x89PNG"),
                                         ("plot.PNG", b"\x89PNG")])
def test_the_output_is_written_in_the_format_its_name_asks_for(tmp_path, name, start):
    (tmp_path / "metrics.csv").write_text(METRICS)
    assert plots.main([str(tmp_path / "metrics.csv"), str(tmp_path / name)]) == 0
    assert (tmp_path / name).read_bytes().startswith(start)
