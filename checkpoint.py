"""Checkpoint files: written atomically, read with `torch.load(weights_only=True)`.

A checkpoint is a dict of tensors and plain Python values:
    model            the model's state_dict (no DistributedDataParallel `module.` prefix)
    model_config     dataclasses.asdict(ViTConfig)
    config           every command-line setting of the run (a dict)
    classes          class names, in label order
    epoch            epochs completed
    optimizer, scheduler, history, rng, best_acc   (training state, for --resume)
"""
import dataclasses
import os
import pickle
import tempfile
import zipfile

import torch

from models import ViTConfig, VisionTransformer


class CheckpointError(Exception):
    """A checkpoint that cannot be read or does not fit; the message says which file and why."""


def save(state: dict, path: str) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over `path`:
    a crash at any moment leaves either the old file or the new one, never a torn one."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_folder(folder)


def _fsync_folder(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load(path: str, map_location="cpu") -> dict:
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist: check the path")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"checkpoint {path} was refused by safe (weights_only) loading, "
                              f"it holds objects other than tensors and plain values: {first_line}") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as error:
        raise CheckpointError(f"checkpoint {path} is truncated or not a PyTorch checkpoint "
                              f"({type(error).__name__}): use another file, e.g. checkpoints/best.pt") from None
    if not isinstance(state, dict) or "model" not in state or "model_config" not in state:
        raise CheckpointError(f"{path} is a PyTorch file but not a checkpoint of this project "
                              f"(no 'model' and 'model_config' entries)")
    return state


def model_config_of(state: dict) -> ViTConfig:
    fields = {f.name for f in dataclasses.fields(ViTConfig)}
    return ViTConfig(**{k: v for k, v in state["model_config"].items() if k in fields})


def load_model(path: str, device="cpu", attention: str | None = None):
    """The model stored in a checkpoint, in eval mode, and the checkpoint dict."""
    state = load(path)
    config = model_config_of(state)
    if attention is not None:
        config = dataclasses.replace(config, attention=attention)
    model = VisionTransformer(config)
    model.load_state_dict(state["model"])
    return model.to(device).eval(), state
