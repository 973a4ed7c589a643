import contextlib
import csv
import dataclasses
import math
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

import plots
import visualize
from conftest import ROOT
from data import normalize
from models import ViTConfig, VisionTransformer

# patch 8: a 4x4 grid, so nothing can pass by assuming the default 8x8 one
CONFIG = ViTConfig(layers=2, hidden=32, mlp_hidden=32, heads=4, patch_size=8, attention="math")
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def tiny_model(config=CONFIG, seed=0):
    torch.manual_seed(seed)
    return VisionTransformer(config).eval()


def random_images(count, seed=0):
    return torch.randint(0, 256, (count, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def random_attention(layers, n, heads, tokens, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(n, heads, tokens, tokens, generator=generator).softmax(dim=-1) for _ in range(layers)]


# ----------------------------------------------------------------------------- rollout

def test_rollout_has_shape_n_t_t_and_rows_sum_to_one():
    rollout = visualize.attention_rollout(random_attention(layers=3, n=2, heads=4, tokens=5))
    assert rollout.shape == (2, 5, 5)
    assert (rollout >= 0).all()
    torch.testing.assert_close(rollout.sum(dim=-1), torch.ones(2, 5))


def test_rollout_matches_hand_computed_two_layer_example():
    layer1 = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [1.0, 0.0]]]])  # [1, 2 heads, 2, 2]
    layer2 = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]], [[1.0, 0.0], [1.0, 0.0]]]])
    # head mean + I, rows renormalised: A1 = [[.75, .25], [.25, .75]], A2 = [[1, 0], [.5, .5]]
    # rollout = A2 @ A1 (A1 @ A2 would give [[.875, .125], [.625, .375]])
    expected = torch.tensor([[[0.75, 0.25], [0.5, 0.5]]])
    torch.testing.assert_close(visualize.attention_rollout([layer1, layer2]), expected)


def test_class_token_map_is_row_zero_over_patches_in_row_major_grid():
    tokens = 1 + 16
    matrix = torch.rand(2, 3, tokens, tokens)  # [N, heads, T, T]
    matrix[:, :, 0, 1:] = torch.arange(16.0)
    grid = visualize.class_token_map(matrix, CONFIG)
    assert grid.shape == (2, 3, 4, 4)
    torch.testing.assert_close(grid, torch.arange(16.0).reshape(4, 4).expand(2, 3, 4, 4))
    with pytest.raises(ValueError, match="17 tokens"):
        visualize.class_token_map(torch.rand(1, 65, 65), CONFIG)


def test_attention_maps_come_from_the_forward_pass_in_eval_mode_and_restore_training():
    model = tiny_model(dataclasses.replace(CONFIG, dropout=0.5))
    images = random_images(2)
    with torch.no_grad():
        logits, attentions = model.forward_with_attention(normalize(images))
    model.train()  # with dropout 0.5, running in train mode would give other maps
    probabilities, rollout, heads = visualize.attention_maps(model, images)
    assert model.training
    torch.testing.assert_close(probabilities, logits.softmax(dim=-1))
    torch.testing.assert_close(rollout, visualize.class_token_map(visualize.attention_rollout(attentions), CONFIG))
    torch.testing.assert_close(heads, attentions[-1][:, :, 0, 1:].reshape(2, CONFIG.heads, 4, 4))


def test_pick_one_per_class_takes_the_first_image_of_each_class():
    labels = torch.tensor([2, 0, 2, 1, 0, 1, 4])
    assert visualize.pick_one_per_class(labels, num_classes=5).tolist() == [1, 3, 0, 6]  # class 3 absent


# ----------------------------------------------------------------------------- confusion

def test_confusion_matrix_rows_are_true_classes():
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2])
    predictions = torch.tensor([0, 1, 1, 1, 2, 0, 0])
    matrix = visualize.confusion_matrix(predictions, labels, num_classes=3)
    assert matrix.dtype == torch.int64
    assert matrix.tolist() == [[1, 1, 0],
                               [0, 2, 1],
                               [2, 0, 0]]
    with pytest.raises(ValueError):
        visualize.confusion_matrix(torch.tensor([3]), torch.tensor([0]), num_classes=3)


def test_per_class_accuracy_in_percent_and_nan_for_empty_classes():
    matrix = torch.tensor([[1, 1, 0], [0, 2, 1], [0, 0, 0]])
    accuracy = visualize.per_class_accuracy(matrix)
    assert accuracy[:2] == pytest.approx([50.0, 200 / 3])
    assert math.isnan(accuracy[2])


def test_per_class_csv(tmp_path):
    matrix = torch.tensor([[3, 1], [2, 2]])
    path = tmp_path / "per_class.csv"
    visualize.write_per_class_csv(matrix, ["cat", "dog"], str(path))
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    assert rows == [["class", "correct", "total", "accuracy_percent"],
                    ["cat", "3", "4", "75.00"],
                    ["dog", "2", "4", "50.00"]]


def test_per_class_table_is_aligned():
    matrix = torch.tensor([[3, 1], [2, 2]])
    lines = visualize.per_class_table(matrix, ["cat", "hippopotamus"])
    assert len(lines) == 4 and len({len(line) for line in lines}) == 1
    assert lines[1].split() == ["cat", "3", "4", "75.00%"]
    assert lines[-1].split() == ["all", "5", "8", "62.50%"]


@pytest.mark.parametrize("num_classes, pixels", [(10, 800), (100, 2000)])  # 3 + 0.5 C inches, at most 20, 100 dpi
def test_confusion_figure_is_a_png_of_the_set_size(tmp_path, num_classes, pixels):
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, num_classes, (500,), generator=generator)
    predictions = torch.randint(0, num_classes, (500,), generator=generator)
    path = tmp_path / "confusion.png"
    visualize.save_confusion_figure(visualize.confusion_matrix(predictions, labels, num_classes),
                                    [f"class{i}" for i in range(num_classes)], str(path))
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (pixels, pixels)


# ----------------------------------------------------------------------------- report

def test_evaluation_report_runs_the_model_once_on_one_image_per_class(tmp_path, monkeypatch):
    model = tiny_model()
    labels = torch.arange(30) % 10
    images = random_images(30)
    predictions = torch.where(labels < 5, labels, (labels + 1) % 10)  # classes 0-4 right, 5-9 wrong
    batches = []
    forward_with_attention = model.forward_with_attention

    def recording_forward_with_attention(inputs):
        batches.append(inputs.clone())
        return forward_with_attention(inputs)

    monkeypatch.setattr(model, "forward_with_attention", recording_forward_with_attention)
    monkeypatch.setattr(model, "forward", lambda x: pytest.fail("the report must not re-evaluate the test set"))
    model.train()

    lines = visualize.write_evaluation_report(model, images, labels, predictions, CLASSES, str(tmp_path))

    assert model.training
    assert len(batches) == 1
    torch.testing.assert_close(batches[0], normalize(images[:10]))  # the first image of each class
    with Image.open(tmp_path / "attention.png") as image:
        # 10 rows; image, rollout and 4 heads; 1.5-inch panels at 100 dpi
        assert image.format == "PNG" and image.size == (6 * 150, 10 * 150)
    with Image.open(tmp_path / "confusion.png") as image:
        assert image.format == "PNG" and image.size == (800, 800)
    with open(tmp_path / "per_class.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[1] == ["airplane", "3", "3", "100.00"] and rows[10] == ["truck", "0", "3", "0.00"]
    assert len(lines) == 12
    assert lines[1].split() == ["airplane", "3", "3", "100.00%"]
    assert lines[-1].split() == ["all", "15", "30", "50.00%"]


@pytest.mark.parametrize("failing", ["confusion.png", "per_class.csv"])
def test_a_report_write_that_fails_half_way_keeps_the_old_file(tmp_path, monkeypatch, failing):
    """A run killed (or a disk filled) during its final report leaves each report file old or new, never torn."""
    import checkpoint
    labels, images = torch.arange(20) % 10, random_images(20)
    visualize.write_evaluation_report(tiny_model(), images, labels, labels, CLASSES, str(tmp_path))
    before = {name: (tmp_path / name).read_bytes() for name in ("attention.png", "confusion.png", "per_class.csv")}
    real_atomic_file = checkpoint.atomic_file

    @contextlib.contextmanager
    def dies_after_a_few_bytes(path, *args, **kwargs):
        with real_atomic_file(path, *args, **kwargs) as f:
            if os.path.basename(path) != failing:
                yield f
                return
            f.write(b"torn" if "b" in f.mode else "torn")
            raise OSError(28, "No space left on device", path)

    monkeypatch.setattr(visualize, "atomic_file", dies_after_a_few_bytes)
    monkeypatch.setattr(plots, "atomic_file", dies_after_a_few_bytes)
    with pytest.raises(OSError):
        visualize.write_evaluation_report(tiny_model(seed=1), images, labels, (labels + 1) % 10, CLASSES,
                                          str(tmp_path))
    assert (tmp_path / failing).read_bytes() == before[failing]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before)  # no temporary file left


def test_run_as_a_script_it_names_the_commands_that_write_its_pictures():
    result = subprocess.run([sys.executable, os.path.join(ROOT, "visualize.py")], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.splitlines()[-1].startswith("visualize.py is a library, not a script: write a checkpoint's "
                                                     "report (attention.png, confusion.png, per_class.csv) with python "
                                                     "main.py --eval-only --checkpoint CHECKPOINT")
