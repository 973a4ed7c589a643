"""Continuing a run from a checkpoint (--resume), for trainer.Trainer: which checkpoint, whether this run may
continue it with its flags into its --out-dir, and putting its state back.

    state, path, notes = resume.find(args, last_checkpoint, wanted_config)  # before the data is read; None: a new run
    ...                                                                      # build the model and optimizer
    history, best_acc, best_epoch, start_epoch, position = resume.restore(state, path, model, optimizer, ...)

Each refusal is one line (checkpoint.CheckpointError) naming the fix; find's come before the data is read and
anything is written. The notes (what is resumed, which flags changed) are for the log once the run has started.
"""
import dataclasses
import os
import typing

import torch

import checkpoint
import plots
from cli import first_line
from models import ViTConfig

# Flags that choose how a run computes or reports, not what it trains. Every other flag (a new one too, and
# --data-pipeline: the two pipelines draw their augmentations apart) sets the run's trajectory, and a resume that
# changes it says so in the log; a different model shape is refused before (check_model), and the init only acts
# on a new run's first weights. What --data-dir holds is compared by check_training_set.
COMPUTE_AND_OUTPUT_FLAGS = ("eval_batch_size", "data_dir", "workers", "device", "precision",
                            "attention", "no_compile", "compile_mode", "init", "out_dir", "save_every",
                            "write_interval", "compare_curve", "resume", "eval_only", "checkpoint")


class Restored(typing.NamedTuple):
    history: list
    best_acc: float
    best_epoch: int
    start_epoch: int  # the epoch to train next (the interrupted one, for a mid-epoch stop)
    position: dict | None  # a mid-epoch stop's step, running sums and seconds; None at an epoch's end


def find(args, last_checkpoint: str, wanted: ViTConfig):
    """(state, path, notes): the checkpoint to continue, or (None, None, notes) for a new run. Refuses to overwrite
    an earlier run's files, a checkpoint without training state or beyond --epochs, and a model other than
    `wanted` (the flags' model)."""
    earlier = next((f for f in (last_checkpoint, os.path.join(args.out_dir, "metrics.csv")) if os.path.isfile(f)),
                   None)
    path = path_or_none(args.resume, last_checkpoint, earlier)
    if path is None:
        return None, None, [f"--resume auto: no {last_checkpoint}, starting a new run"] if args.resume == "auto" else []
    best = os.path.join(os.path.dirname(last_checkpoint), "best.pt")
    state = checkpoint.load(path, another=(
        f"go on from an earlier checkpoint in a new folder: --resume {best} --out-dir NEW_FOLDER"
        if path == last_checkpoint and os.path.isfile(best) else
        "resume from another checkpoint, or start a new run"))
    for key in ("optimizer", "scheduler", "history", "rng", "epoch"):
        if key not in state:
            raise checkpoint.CheckpointError(f"{path} holds a model but no training state ({key!r} missing): "
                                             f"it can be evaluated (--eval-only) but not resumed")
    refuse_overwriting(path, last_checkpoint, earlier, args.out_dir)
    try:
        position = state["scheduler"]["position"]
        stopped = f", stopped at step {int(position['step'])} of the next" if position is not None else ""
        reached = int(state["epoch"]) + (position is not None)  # the epoch it finished, or stopped in
    except (KeyError, TypeError, ValueError, IndexError) as error:
        raise malformed_error(path, error) from None
    if args.epochs < reached:  # nothing to train, and a mid-epoch stop's report would be of other weights
        raise checkpoint.CheckpointError(f"{path} has reached epoch {reached} (epoch {state['epoch']} done"
                                         f"{stopped}), beyond --epochs {args.epochs}: resume with --epochs "
                                         f"{reached} or more")
    check_model(state, path, wanted)
    notes = [f"resuming from {path} (epoch {state['epoch']} done{stopped})",
             *check_recipe_flags(state, path, args, stopped_mid_epoch=position is not None)]
    return state, path, notes


def path_or_none(resume: str | None, last: str, earlier: str | None) -> str | None:
    """--resume's checkpoint (auto: the out-dir's last.pt), or None for a new run, which is refused where
    `earlier` (the out-dir's last.pt or metrics.csv) would be overwritten."""
    if resume == "auto" and earlier == last:
        return last
    if resume and resume != "auto":
        return resume
    if earlier == last:
        raise checkpoint.CheckpointError(f"{last} holds an earlier run: continue it with --resume auto, or start a "
                                         f"new run in another --out-dir (or move that folder away)")
    if earlier:  # metrics.csv without the checkpoint that could continue it
        raise checkpoint.CheckpointError(f"{earlier} holds an earlier run, and there is no {last} to continue it "
                                         f"from: start the new run in another --out-dir (or move that file away)")
    return None


def refuse_overwriting(path: str, last: str, earlier: str | None, out_dir: str) -> None:
    """--resume PATH into an out-dir whose files (`earlier`) belong to another run: an older checkpoint must not
    overwrite a newer run."""
    if not earlier or (earlier == last and os.path.samefile(path, last)):
        return
    or_continue = ""
    if earlier == last:
        try:
            checkpoint.load(last)
            or_continue = ", or continue that run with --resume auto"
        except checkpoint.CheckpointError:  # the run cannot be continued: a new folder is the only way on
            or_continue = " (its last.pt cannot be read, so that run cannot be continued)"
    raise checkpoint.CheckpointError(f"--resume {path} would overwrite the run in {out_dir} (its {earlier}): resume "
                                     f"into another --out-dir{or_continue}")


def check_model(state: dict, path: str, wanted: ViTConfig) -> None:
    """The checkpoint's model must be the flags' (a field an older checkpoint lacks had its default then)."""
    stored_config = checkpoint.model_config_of(state, path)
    checkpoint.refuse_non_cifar_model(stored_config, path)
    stored = dataclasses.asdict(stored_config)
    differing = [f"{k}: checkpoint {stored[k]!r}, flags {v!r}" + (" (set by --dataset)" if k == "num_classes" else "")
                 for k, v in dataclasses.asdict(wanted).items()
                 if k not in COMPUTE_AND_OUTPUT_FLAGS and stored[k] != v]
    if differing:
        raise checkpoint.CheckpointError(f"{path}: the checkpoint's model differs from the flags ("
                                         + "; ".join(differing)
                                         + "): resume with the original flags or start a new --out-dir")


def check_recipe_flags(state: dict, path: str, args, stopped_mid_epoch: bool) -> list:
    """The log's note on the training flags that differ from the checkpoint's (a changed recipe is never silent),
    as a list of one line or none. Refuses a new batch size or seed for a run stopped mid-epoch, whose remaining
    steps are slices of that epoch's order."""
    stored = state.get("config") if isinstance(state.get("config"), dict) else {}
    if not stored:
        return []
    import main  # the flags' defaults: a flag missing from an older checkpoint did not exist yet, so its default held
    defaults = main.build_parser()
    # the torchvision pipeline's DataLoader workers each draw their own augmentation stream
    ignored = set(COMPUTE_AND_OUTPUT_FLAGS) - ({"workers"} if args.data_pipeline == "torchvision" else set())
    then = {k: stored.get(k, defaults.get_default(k)) for k in vars(args) if k not in ignored}
    changed = [k for k in then if then[k] != getattr(args, k)]
    describe = "; ".join(f"--{k.replace('_', '-')} {then[k]} in the checkpoint, {getattr(args, k)} now"
                         for k in changed)
    if stopped_mid_epoch and {"batch_size", "seed"} & set(changed):
        raise checkpoint.CheckpointError(f"{path} stopped in the middle of an epoch, whose remaining steps depend "
                                         f"on --batch-size and --seed ({describe}): resume with the checkpoint's "
                                         f"values or start a new --out-dir")
    if not changed:
        return []
    return [f"note: resuming with changed flags ({describe}); the run goes on with the new values"]


def check_training_set(state: dict, path: str, train_images: int, data_dir: str) -> list:
    """The log's note on a training set of another size than the one the checkpoint's run trained on (another
    --data-dir), as a list of one line or none. Refuses it for a run stopped mid-epoch, whose remaining steps are
    slices of that epoch's order of the checkpoint's images."""
    then = state.get("train_images")  # absent from checkpoints written before it was saved: nothing to compare
    if not isinstance(then, int) or then == train_images:
        return []
    if state["scheduler"]["position"] is not None:
        raise checkpoint.CheckpointError(f"{path} stopped in the middle of an epoch of {then:,} training images, and "
                                         f"--data-dir {data_dir} holds {train_images:,}: resume with the "
                                         f"checkpoint's data or start a new --out-dir")
    return [f"note: the checkpoint's run trained on {then:,} images and --data-dir {data_dir} holds "
            f"{train_images:,}; the epochs and the learning-rate schedule follow the new count"]


def restore(state: dict, path: str, model, optimizer, rank: int, world: int, device: torch.device) -> Restored:
    """Puts the checkpoint's weights, optimizer state and RNG states (this rank's, where it saved as many ranks)
    back, and returns the run's history, best and where to go on."""
    checkpoint.load_weights(model, state, path)
    try:
        load_optimizer_state(optimizer, state["optimizer"])
        history = list(state["history"])
        if not all(isinstance(row, dict) and all(isinstance(row.get(k), (int, float)) for k in plots.METRIC_FIELDS)
                   for row in history):
            raise ValueError("a history row lacks a metrics.csv field or holds a non-number")
        best_acc, best_epoch = state["best_acc"], state["best_epoch"]
        if not isinstance(best_acc, (int, float)) or not isinstance(best_epoch, int):
            raise ValueError("best_acc or best_epoch is not a number")
        by_rank = state["rng"].get("by_rank")  # as many ranks: each takes its own, else all take rank 0's
        rng = by_rank[rank if len(by_rank) == world else 0] if by_rank is not None else state["rng"]
        torch.set_rng_state(rng["torch"])
        if device.type == "cuda" and "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"], device)
        position = state["scheduler"]["position"]
        if position is None:
            return Restored(history, best_acc, best_epoch, int(state["epoch"]) + 1, None)
        if not isinstance(position["sums"], torch.Tensor) or position["sums"].shape != (3,):
            raise ValueError("scheduler.position.sums is not a tensor of 3 running sums")
        float(position["seconds"]), int(position["step"])  # noqa: B018 - present and numbers
        return Restored(history, best_acc, best_epoch, int(position["epoch"]), position)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as error:
        raise malformed_error(path, error) from None


def load_optimizer_state(optimizer, saved: dict) -> None:
    """The checkpoint's optimizer state (step counts and moments) with every setting of this run's optimizer:
    load_state_dict would take the settings from the checkpoint too, so a resume with a new --weight-decay,
    --beta1/--beta2 or --optimizer (Adam's L2 or AdamW's decoupled decay) would keep the old ones, and a run
    saved on a CPU would resume on a GPU unfused, its step counts on the CPU, where a captured Adam step
    cannot read them."""
    ours = optimizer.param_groups
    if len(saved["param_groups"]) != len(ours):  # zip below would drop the extra ones
        raise ValueError("optimizer state with another number of parameter groups")
    groups = [{**{key: value for key, value in own.items() if key != "params"}, "params": group["params"]}
              for group, own in zip(saved["param_groups"], ours)]
    optimizer.load_state_dict({**saved, "param_groups": groups})


def best_model_at_hand(state: dict, path: str, best_epoch: int, best_acc: float):
    """The resumed checkpoint if it was saved at the end of the run's best epoch, else the best.pt beside it if
    that one was; else None."""
    def is_the_best(candidate):
        try:
            return (candidate["epoch"] == best_epoch and candidate["best_acc"] == best_acc
                    and candidate["scheduler"]["position"] is None)
        except (KeyError, TypeError):
            return False

    if is_the_best(state):
        return state
    beside = os.path.join(os.path.dirname(os.path.abspath(path)), "best.pt")
    try:
        candidate = checkpoint.load(beside) if os.path.isfile(beside) else None
    except checkpoint.CheckpointError:
        return None
    return candidate if is_the_best(candidate) else None  # is_the_best(None) is False


def malformed_error(path: str, error: Exception) -> checkpoint.CheckpointError:
    return checkpoint.CheckpointError(f"{path} has a malformed training state ({type(error).__name__}: "
                                      f"{first_line(error)}): resume from another checkpoint or start a new --out-dir")
