import dataclasses
import io
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoint
import predict
from data import normalize
from models import ViTConfig, VisionTransformer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = ViTConfig(layers=2, hidden=32, mlp_hidden=32, heads=4, patch_size=8)
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def save_checkpoint(path, config=CONFIG, classes=CLASSES):
    torch.manual_seed(0)
    model = VisionTransformer(config)
    checkpoint.save({"model": model.state_dict(), "model_config": dataclasses.asdict(config),
                     "classes": classes, "config": {}}, str(path))
    return str(path)


@pytest.fixture
def model(tmp_path):
    model, _ = checkpoint.load_model(save_checkpoint(tmp_path / "model.pt"))
    return model


def random_pixels(height, width, channels=3, seed=0):
    shape = (height, width, channels) if channels > 1 else (height, width)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def save_image(path, array, mode=None):
    Image.fromarray(array, mode).save(path)
    return str(path)


def model_top(model, image_uint8, k=5):
    with torch.no_grad():
        probabilities = model(normalize(image_uint8[None])).softmax(dim=-1)[0]
    values, indices = probabilities.topk(k)
    return [CLASSES[i] for i in indices.tolist()], values.tolist()


def test_predicts_the_models_top5_for_a_32x32_image(tmp_path, model):
    pixels = random_pixels(32, 32)
    path = save_image(tmp_path / "image.png", pixels)
    [result] = predict.predict_images(model, CLASSES, [path])
    assert result.error is None
    assert torch.equal(result.image, torch.from_numpy(pixels).permute(2, 0, 1))
    names, probabilities = model_top(model, result.image)
    assert [name for name, _ in result.top] == names
    assert [p for _, p in result.top] == pytest.approx(probabilities, abs=1e-6)


def test_oversized_image_is_resized_to_32x32_with_bilinear_filter(tmp_path, model):
    path = save_image(tmp_path / "big.jpg", random_pixels(700, 1000))
    [result] = predict.predict_images(model, CLASSES, [path])
    with Image.open(path) as image:
        expected = np.array(image.convert("RGB").resize((32, 32), Image.Resampling.BILINEAR))
    assert result.image.shape == (3, 32, 32) and result.image.dtype == torch.uint8
    assert torch.equal(result.image, torch.from_numpy(expected).permute(2, 0, 1))
    assert len(result.top) == 5


def test_grayscale_image_becomes_three_equal_channels(tmp_path, model):
    gray = random_pixels(32, 32, channels=1)
    [result] = predict.predict_images(model, CLASSES, [save_image(tmp_path / "gray.png", gray, "L")])
    assert result.error is None and len(result.top) == 5
    for channel in result.image:
        assert torch.equal(channel, torch.from_numpy(gray))


def test_transparent_pixels_of_an_rgba_png_become_white(tmp_path, model):
    rgba = np.zeros((32, 32, 4), dtype=np.uint8)
    rgba[:, :, 1] = 255  # green everywhere, but only the left half is opaque and it is red
    rgba[:, :16] = (255, 0, 0, 255)
    [result] = predict.predict_images(model, CLASSES, [save_image(tmp_path / "rgba.png", rgba, "RGBA")])
    assert result.error is None and len(result.top) == 5
    assert result.image[:, :, :16].reshape(3, -1).T.unique(dim=0).tolist() == [[255, 0, 0]]
    assert result.image[:, :, 16:].reshape(3, -1).T.unique(dim=0).tolist() == [[255, 255, 255]]


def test_high_bit_depth_grayscale_keeps_its_tones(tmp_path, model):
    """16-bit PNG (I;16), 16-bit PGM (read as 32-bit I) and a float TIFF in 0..1 (F): convert("RGB") alone
    would make them white or black. A 16-bit PNG's transparent gray value turns white like an RGBA's alpha."""
    ramp16 = np.tile(np.arange(0, 65536, 2048, dtype=np.uint16), (32, 1))  # 32 tones, 0 .. 63488
    expected = np.tile(np.arange(0, 256, 8, dtype=np.uint8), (32, 1))  # their top 8 bits
    paths = [save_image(tmp_path / "gray16.png", ramp16), save_image(tmp_path / "gray16.pgm", ramp16),
             save_image(tmp_path / "float.tiff", (ramp16 / 65535).astype(np.float32))]
    with Image.open(paths[1]) as pgm, Image.open(paths[2]) as tiff:
        assert (pgm.mode, tiff.mode) == ("I", "F")
    for result, tolerance in zip(predict.predict_images(model, CLASSES, paths), (0, 0, 1)):
        assert result.error is None and len(result.top) == 5, result.path
        for channel in result.image:
            assert np.abs(channel.numpy().astype(int) - expected).max() <= tolerance, result.path  # float rounding

    transparent = tmp_path / "transparent16.png"
    Image.fromarray(ramp16).save(transparent, transparency=0)  # the first column (0) is transparent
    [result] = predict.predict_images(model, CLASSES, [str(transparent)])
    assert (result.image[:, :, 0] == 255).all() and torch.equal(result.image[0, :, 1:], torch.from_numpy(expected[:, 1:]))


def test_a_photo_stored_sideways_is_turned_upright_by_its_exif_orientation(tmp_path, model):
    pixels = random_pixels(32, 32)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: the stored picture must be turned 90 degrees clockwise to be upright
    path = tmp_path / "sideways.png"
    Image.fromarray(np.rot90(pixels).copy()).save(path, exif=exif)  # stored turned 90 degrees anticlockwise
    [result] = predict.predict_images(model, CLASSES, [str(path)])
    assert torch.equal(result.image, torch.from_numpy(pixels).permute(2, 0, 1))


def test_palette_image_is_read_as_its_colours(tmp_path, model):
    path = tmp_path / "palette.png"
    Image.fromarray(random_pixels(32, 32)).quantize(colors=16).save(path)
    [result] = predict.predict_images(model, CLASSES, [str(path)])
    with Image.open(path) as image:
        assert image.mode == "P"
        expected = np.array(image.convert("RGB"))
    assert torch.equal(result.image, torch.from_numpy(expected).permute(2, 0, 1))


def png_with_a_broken_second_idat(pixels) -> bytes:
    """A PNG whose image data is split over two chunks, the second with an invalid type (ID@T)."""
    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    png = buffer.getvalue()
    start = png.index(b"IDAT") - 4
    size = struct.unpack(">I", png[start:start + 4])[0]
    payload = png[start + 8:start + 8 + size]
    return (png[:start] + chunk(b"IDAT", payload[:size // 2]) + chunk(b"ID@T", payload[size // 2:])
            + chunk(b"IEND", b""))


def test_bad_files_get_a_reason_and_the_others_are_still_predicted(tmp_path, model):
    good = save_image(tmp_path / "good.png", random_pixels(32, 32))
    text = tmp_path / "notes.png"
    text.write_text("not a picture")
    truncated = tmp_path / "truncated.jpg"
    save_image(truncated, random_pixels(200, 200))
    truncated.write_bytes(truncated.read_bytes()[:1000])
    broken_chunk = tmp_path / "broken_chunk.png"  # Pillow raises SyntaxError for a corrupt chunk name
    broken_chunk.write_bytes(png_with_a_broken_second_idat(random_pixels(32, 32)))
    paths = [str(text), good, str(tmp_path / "missing.jpg"), str(tmp_path), str(truncated), good, str(broken_chunk)]

    results = predict.predict_images(model, CLASSES, paths)

    assert [result.path for result in results] == paths
    assert results[0].error == "not an image file Pillow can read"
    assert results[2].error == "No such file or directory"
    assert results[3].error == "Is a directory"
    assert "truncated" in results[4].error
    assert "broken PNG file" in results[6].error
    for bad in (results[0], results[2], results[3], results[4], results[6]):
        assert bad.top is None and "\n" not in bad.error
    for ok in (results[1], results[5]):
        assert ok.error is None and len(ok.top) == 5
    assert [name for name, _ in results[1].top] == [name for name, _ in results[5].top]
    # the same image, batched at another position: equal up to float32 summation order
    assert all(abs(a - b) < 1e-6 for (_, a), (_, b) in zip(results[1].top, results[5].top))


def test_a_picture_over_pillows_pixel_limit_is_read_quietly_and_one_over_twice_it_refused(tmp_path, model,
                                                                                          monkeypatch, recwarn):
    path = save_image(tmp_path / "big.png", random_pixels(64, 64))  # 4,096 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # Pillow warns above this, refuses above twice it
    [result] = predict.predict_images(model, CLASSES, [path])
    assert result.error is None and len(result.top) == 5
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)
    [result] = predict.predict_images(model, CLASSES, [path])
    assert result.top is None and "exceeds limit of 4000 pixels" in result.error


def test_top_k_is_at_most_the_number_of_classes(tmp_path):
    config = dataclasses.replace(CONFIG, num_classes=3)
    model, state = checkpoint.load_model(save_checkpoint(tmp_path / "three.pt", config, ["a", "b", "c"]))
    [result] = predict.predict_images(model, state["classes"], [save_image(tmp_path / "x.png", random_pixels(32, 32))])
    assert sorted(name for name, _ in result.top) == ["a", "b", "c"]
    assert sum(p for _, p in result.top) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("kind", ["missing", "garbage", "not_a_checkpoint"])
def test_bad_checkpoint_is_one_line_error_and_exit_2_before_reading_images(tmp_path, capsys, kind):
    path = tmp_path / f"{kind}.pt"
    if kind == "garbage":
        path.write_bytes(b"definitely not a checkpoint\n" * 10)
    elif kind == "not_a_checkpoint":
        torch.save({"weights": torch.zeros(3)}, path)
    status = predict.main([str(tmp_path / "missing.png"), "--checkpoint", str(path), "--device", "cpu"])
    out, err = capsys.readouterr()
    assert status == 2
    assert out == ""
    assert err.count("\n") == 1 and str(path) in err and "missing.png" not in err


def test_command_line(tmp_path):
    checkpoint_path = save_checkpoint(tmp_path / "model.pt")
    good = save_image(tmp_path / "good.png", random_pixels(32, 32))
    bad = tmp_path / "bad.jpg"
    bad.write_text("hello")
    out_dir = tmp_path / "figures"
    run = subprocess.run([sys.executable, os.path.join(REPO, "predict.py"), good, str(bad), "--checkpoint",
                          checkpoint_path, "--device", "cpu", "--attention", "--out-dir", str(out_dir)],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert run.returncode == 1
    assert run.stderr == f"error: {bad}: not an image file Pillow can read\n"
    lines = run.stdout.splitlines()
    assert lines[0] == good
    assert [line.split()[0] for line in lines[1:6]] == ["1.", "2.", "3.", "4.", "5."]
    assert all(line.split()[1] in CLASSES and line.endswith("%") for line in lines[1:6])
    with Image.open(out_dir / "good_attention.png") as image:
        assert image.format == "PNG" and image.size == (6 * 150, 150)  # image, rollout, 4 heads
    assert not (out_dir / "bad_attention.png").exists()


def test_a_file_name_the_output_encoding_cannot_show_is_printed_escaped(tmp_path):
    checkpoint_path = save_checkpoint(tmp_path / "model.pt")
    latin1_name = save_image(os.fsdecode(bytes(tmp_path / "caf") + b"\xe9.png"), random_pixels(32, 32))
    run = subprocess.run([sys.executable, os.path.join(REPO, "predict.py"), latin1_name, "--checkpoint",
                          checkpoint_path, "--device", "cpu"], capture_output=True, cwd=tmp_path, timeout=120,
                         env={**os.environ, "PYTHONIOENCODING": "utf-8"})  # strict: it cannot encode the byte
    assert run.returncode == 0, run.stderr.decode(errors="replace")
    lines = run.stdout.decode("ascii").splitlines()
    assert lines[0] == str(tmp_path / "caf") + "\\udce9.png"
    assert len(lines) == 6 and lines[5].endswith("%")


def test_attention_into_a_folder_that_cannot_be_written_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    checkpoint_path = save_checkpoint(tmp_path / "model.pt")
    good = save_image(tmp_path / "good.png", random_pixels(32, 32))
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    monkeypatch.setattr(predict, "load_model", lambda *a, **k: pytest.fail("the checkpoint was read"))
    with pytest.raises(SystemExit) as exit_:
        predict.main([good, "--checkpoint", checkpoint_path, "--device", "cpu", "--attention",
                      "--out-dir", str(blocker / "figures")])
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines  # the error alone, without argparse's usage block
    last = lines[0]
    assert f"--out-dir {blocker / 'figures'}: cannot write there (" in last
    assert last.endswith("choose another folder for the --attention figures")


def test_a_figure_that_cannot_be_written_is_one_line_and_the_other_images_go_on(tmp_path, capsys):
    checkpoint_path = save_checkpoint(tmp_path / "model.pt")
    first, second = (save_image(tmp_path / name, random_pixels(32, 32)) for name in ("cat.png", "dog.png"))
    out_dir = tmp_path / "figures"
    (out_dir / "cat_attention.png").mkdir(parents=True)  # a folder where the first figure goes
    status = predict.main([first, second, "--checkpoint", checkpoint_path, "--device", "cpu", "--attention",
                           "--out-dir", str(out_dir)])
    out, err = capsys.readouterr()
    assert status == 1
    assert err == (f"error: could not write {out_dir / 'cat_attention.png'} (Is a directory): free disk space or "
                   f"choose another --out-dir\n")
    assert out.splitlines()[0] == first and second in out.splitlines()
    assert (out_dir / "dog_attention.png").is_file()


def test_attention_figures_of_images_with_the_same_name_do_not_replace_each_other(tmp_path):
    paths = predict.attention_figure_paths(["a/cat.jpg", "b/cat.png", "cat-2.png", "dog.png", "a/cat.jpg"], "figs")
    assert paths == [os.path.join("figs", f"{name}_attention.png") for name in
                     ("cat", "cat-2", "cat-2-2", "dog", "cat-3")]


def test_an_attention_figure_never_replaces_an_input_image(tmp_path):
    """`predict.py *.png --attention` run again where an earlier run's figures lie: cat.png's figure would be
    the input cat_attention.png, so it takes the next free name."""
    inputs = [str(tmp_path / "cat.png"), str(tmp_path / "cat_attention.png")]
    assert predict.attention_figure_paths(inputs, str(tmp_path)) == [
        str(tmp_path / "cat-2_attention.png"), str(tmp_path / "cat_attention_attention.png")]


@pytest.mark.parametrize("device, expected", [("auto", "cpu"), ("cpu", "cpu"), ("cuda", None)])
def test_the_device_resolves_as_in_training_and_missing_cuda_is_one_line(tmp_path, capsys, monkeypatch, device,
                                                                          expected):
    checkpoint_path = save_checkpoint(tmp_path / "model.pt")
    good = save_image(tmp_path / "good.png", random_pixels(32, 32))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    asked = []

    def load_model(path, device):
        asked.append(device)
        raise ValueError()  # the device is chosen: stop here (an exception without a message, as some are)

    monkeypatch.setattr(predict, "load_model", load_model)
    if expected:
        assert predict.main([good, "--checkpoint", checkpoint_path, "--device", device]) == 2
        assert asked == [expected]
        assert capsys.readouterr().err == f"error: checkpoint {checkpoint_path} could not be loaded (ValueError: )\n"
    else:
        with pytest.raises(SystemExit) as exit_:
            predict.main([good, "--checkpoint", checkpoint_path, "--device", device])
        assert exit_.value.code == 2 and asked == []
        lines = capsys.readouterr().err.splitlines()
        assert len(lines) == 1 and "--device cuda was asked for but CUDA is not available" in lines[0], lines
