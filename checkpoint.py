"""Checkpoint files: written atomically, read with `torch.load(weights_only=True)`.

A checkpoint is a dict of tensors and plain Python values:
    model            the model's state_dict (no DistributedDataParallel `module.` prefix)
    model_config     dataclasses.asdict(ViTConfig)
    config           every command-line setting of the run (a dict)
    classes          class names, in label order
    epoch            epochs completed
    optimizer, history, rng, best_acc, best_epoch   (training state, for --resume)
    train_images     how many training images the run trained on (a resume compares it)
    scheduler        {"epoch": epochs completed, "position": None, or where an epoch that a signal
                     interrupted goes on: its epoch, step, running sums and seconds}; the learning
                     rate itself is a function of the step (trainer.learning_rate)
"""
import contextlib
import dataclasses
import os
import pickle
import stat
import tempfile
import warnings
import weakref

import torch

from models import ViTConfig, VisionTransformer

try:
    import fcntl
except ImportError:  # Windows: hold_lock locks nothing there
    fcntl = None

FOLDER = "checkpoints"  # a run's checkpoints: <out-dir>/checkpoints/last.pt, best.pt, epoch_N.pt


class CheckpointError(Exception):
    """A checkpoint that cannot be read or does not fit, or an out-dir whose earlier run a new one would overwrite;
    the message says which file and why."""


@contextlib.contextmanager
def atomic_file(path: str, mode: str = "wb", **open_kwargs):
    """Yields a temporary file beside `path`; once the block succeeds it is flushed, fsynced and renamed over
    `path`, so a crash at any moment leaves either the old file or the new one, never a torn one."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), dir=folder)
    try:
        f = os.fdopen(fd, mode, **open_kwargs)  # owns fd from here: closed however the block ends
        try:  # mkstemp makes 0600; give the file the permissions open() would: a file's own, else the umask's
            os.chmod(tmp, stat.S_IMODE(os.stat(path).st_mode) if os.path.exists(path) else 0o666 & ~_umask())
        except OSError:
            pass  # a filesystem without Unix permissions (FAT) refuses chmod; the file is still written
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as error:  # name the file the caller asked for, not the temporary one
        if error.filename == tmp:
            error.filename = path
        raise
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    _fsync_folder(folder)


_TEMP = ".tmp-"  # atomic_file's temporary files: .tmp-<name>-<random>


def _temp_prefix(path: str) -> str:
    return _TEMP + os.path.basename(path) + "-"


def remove_leftovers(folder: str, names=None) -> None:
    """Deletes what atomic_file leaves when its process is killed mid-write: the temporary files in `folder`
    of the files named `names`, or of every file when names is None."""
    prefixes = tuple(_temp_prefix(name) for name in names) if names is not None else (_TEMP,)
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if name.startswith(prefixes) and os.path.isfile(path):
            os.remove(path)


def probe_writable(folder: str) -> None:
    """Creates `folder` and writes (and syncs) a small file there, so that a read-only, missing or full place
    shows before any long work; raises OSError if it cannot."""
    os.makedirs(folder, exist_ok=True)
    with tempfile.TemporaryFile(dir=folder) as f:
        f.write(b"\0" * 4096)
        f.flush()
        os.fsync(f.fileno())


_held_locks = weakref.WeakSet()  # the open files of hold_lock, which a forked child closes


def hold_lock(path: str, wait: bool = True):
    """An exclusive lock on `path` (created if missing), held while the returned file stays open; the system lets
    go when the process ends, however it ends. None when another process holds it and wait is False."""
    file = open(path, "a")
    if fcntl is not None:
        try:
            fcntl.flock(file, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.close()
            return None
        except OSError:  # a filesystem without locks (some network mounts): go on unlocked
            pass
    _held_locks.add(file)
    return file


def _drop_locks_in_child():
    """A flock belongs to the open file, which fork shares: a DataLoader worker outliving its killed run (a few
    seconds) would keep the run's out-dir locked. The child closes its copies; the parent's stay held."""
    for file in list(_held_locks):
        file.close()


os.register_at_fork(after_in_child=_drop_locks_in_child)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save(state: dict, path: str) -> None:
    with atomic_file(path) as f:
        torch.save(state, f)


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


def run_folder(path: str) -> str:
    """The run a checkpoint belongs to: the folder holding its checkpoints/ folder, else the checkpoint's own."""
    folder = os.path.dirname(os.path.normpath(path)) or "."
    return (os.path.dirname(folder) or ".") if os.path.basename(folder) == FOLDER else folder


def file_problem(path: str) -> str | None:
    """What keeps `path` from being a checkpoint file to read (a missing path, a folder), or None."""
    if os.path.isdir(path):
        inside = os.path.join(path, FOLDER) if os.path.isdir(os.path.join(path, FOLDER)) else path  # a run folder
        return f"is a folder: name a checkpoint file in it, e.g. {os.path.join(inside, 'best.pt')}"
    if not os.path.isfile(path):
        return "does not exist: check the path"
    return None


def load(path: str, another: str = "use another checkpoint file") -> dict:
    """The checkpoint dict; a CheckpointError that says why not, ending with `another` where another file
    is the fix."""
    problem = file_problem(path)
    if problem:
        raise CheckpointError(f"checkpoint {path} {problem}")
    try:
        file = open(path, "rb")
    except OSError as error:
        raise CheckpointError(f"checkpoint {path} cannot be read ({error.strerror or error})") from None
    try:  # from here on every failure is the file's content (a cut file can raise OSError: Invalid argument)
        with file, warnings.catch_warnings():  # torch's notes on odd pickles; the error below says what is wrong
            warnings.simplefilter("ignore")
            state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        reason = _unpickling_reason(error)
        if "GLOBAL" in reason:  # it names code or a class to import: what a malicious pickle needs
            raise CheckpointError(f"checkpoint {path} was refused by safe (weights_only) loading: it would import "
                                  f"code, not only tensors and plain values ({reason}); nothing in it was run") from None
        raise CheckpointError(f"checkpoint {path} is truncated or not a PyTorch checkpoint ({reason}): "
                              f"{another}") from None
    except Exception as error:  # noqa: BLE001 - a torn or foreign file can fail anywhere inside the unpickler
        raise CheckpointError(f"checkpoint {path} is truncated or not a PyTorch checkpoint "
                              f"({type(error).__name__}): {another}") from None
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict) \
            or not isinstance(state.get("model_config"), dict):
        raise CheckpointError(f"{path} is a PyTorch file but not a checkpoint of this project "
                              f"(no 'model' and 'model_config' entries)")
    return state


def _unpickling_reason(error: Exception) -> str:
    """The line of torch's long weights_only error that says what was refused."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in lines:
        if "GLOBAL" in line or line.startswith("Unsupported"):
            return line.split(". ")[0].rstrip(".")
    return lines[0] if lines else type(error).__name__


def model_config_of(state: dict, path: str) -> ViTConfig:
    """The stored model, with the default attention: the path it trained with is how that machine computed
    (a GPU run's --attention triton), not part of the model, and the reader picks its own."""
    fields = {f.name for f in dataclasses.fields(ViTConfig)} - {"attention"}
    try:
        return ViTConfig(**{k: v for k, v in state["model_config"].items() if k in fields})
    except (TypeError, ValueError, AttributeError, KeyError) as error:
        raise CheckpointError(f"{path} has an invalid model_config ({error})") from None


def refuse_non_cifar_model(config: ViTConfig, path: str) -> None:
    """A checkpoint made for other images (no flag of ours makes one) is refused before the data is read."""
    cifar = ViTConfig()
    if (config.image_size, config.in_channels) != (cifar.image_size, cifar.in_channels):
        raise CheckpointError(f"{path} holds a model for {config.image_size}-pixel images with {config.in_channels} "
                              f"channels; CIFAR's are {cifar.image_size}-pixel with {cifar.in_channels}: use a "
                              f"checkpoint trained here")


def load_weights(model, state: dict, path: str) -> None:
    """model.load_state_dict(state["model"]), with a CheckpointError when the weights do not fit."""
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, TypeError, ValueError, AttributeError, KeyError) as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
        detail = lines[1] if len(lines) > 1 else lines[0]  # after load_state_dict's "Error(s) in loading ..."
        raise CheckpointError(f"{path}: the stored weights do not fit its model_config ({detail[:300]})") from None


def load_model(path: str, device="cpu", attention: str | None = None):
    """The model stored in a checkpoint, in eval mode, and the checkpoint dict."""
    state = load(path)
    config = model_config_of(state, path)
    if attention is not None:
        try:
            config = dataclasses.replace(config, attention=attention)
        except ValueError as error:  # a path this model's shape or dropout rules out
            raise CheckpointError(f"{path}: {error}") from None
    model = VisionTransformer(config)
    load_weights(model, state, path)
    return model.to(device).eval(), state
