"""Train a Vision Transformer from scratch on CIFAR-10 (or CIFAR-100). Defaults are the reference recipe.

    nohup python -u main.py > run.log 2>&1 &                      # 200 epochs; read run.log, results.png
    python main.py --epochs 20 --dataset cifar100 --out-dir runs/c100
    python main.py --resume auto                                  # continue from ./checkpoints/last.pt
    python main.py --eval-only --checkpoint checkpoints/best.pt
    torchrun --nproc_per_node=4 main.py                           # the same recipe on 4 GPUs

Every hyperparameter is a flag; `python main.py --help` lists them with their defaults.
"""
import argparse
import math
import os
import signal
import sys

try:
    import checkpoint
    import data
    import models
    from cli import OneLineErrors, escape_what_stdout_cannot_encode, nonempty_path
except KeyboardInterrupt:  # Ctrl-C while PyTorch loads: one line, like every other stop
    print("error: interrupted while starting; nothing was written", file=sys.stderr)
    sys.exit(130)


def _number(kind, *, minimum=None, above=None, below=None):
    """An argparse type: a finite int/float within bounds, else a one-line error at parse time."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}")
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if minimum is not None and value < minimum:
            raise argparse.ArgumentTypeError(f"{text} must be at least {minimum}")
        if above is not None and not value > above:
            raise argparse.ArgumentTypeError(f"{text} must be greater than {above}")
        if below is not None and not value < below:
            raise argparse.ArgumentTypeError(f"{text} must be less than {below}")
        return value
    parse.__name__ = kind.__name__
    return parse


positive_int = _number(int, above=0)
non_negative_int = _number(int, minimum=0)
positive_float = _number(float, above=0)
non_negative_float = _number(float, minimum=0)
fraction = _number(float, minimum=0, below=1)
seed = _number(int, minimum=0, below=2 ** 63)  # torch.manual_seed's range


def positive_int_or_auto(text: str):
    if text == "auto":
        return text
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError as error:
        raise argparse.ArgumentTypeError(f"{error} (or auto)") from None


def build_parser() -> argparse.ArgumentParser:
    p = OneLineErrors(description="Train a from-scratch ViT on CIFAR (defaults: the reference recipe).",
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    train = p.add_argument_group("training")
    train.add_argument("--epochs", type=positive_int, default=200, help="training epochs")
    train.add_argument("--batch-size", type=positive_int, default=128,
                       help="global batch: under torchrun it is split evenly across the processes")
    train.add_argument("--eval-batch-size", type=positive_int_or_auto, default="auto",
                       help="images per evaluation batch; auto: 1000 on CUDA, 128 on the CPU (faster there)")
    train.add_argument("--lr", type=positive_float, default=1e-3, help="peak learning rate, after warm-up")
    train.add_argument("--min-lr", type=non_negative_float, default=1e-5, help="learning rate at the last step")
    train.add_argument("--warmup-epochs", type=non_negative_float, default=5,
                       help="linear warm-up, then cosine decay; the schedule steps every iteration")
    train.add_argument("--optimizer", choices=("adam", "adamw"), default="adam",
                       help="adam: L2 weight decay (the reference); adamw: decoupled weight decay")
    train.add_argument("--weight-decay", type=non_negative_float, default=5e-5, help="see --optimizer")
    train.add_argument("--beta1", type=fraction, default=0.9, help="Adam's decay of the gradient average")
    train.add_argument("--beta2", type=fraction, default=0.999, help="Adam's decay of the squared-gradient average")
    train.add_argument("--label-smoothing", type=fraction, default=0.1,
                       help="as F.cross_entropy(label_smoothing=...); --eval-only takes its checkpoint's, so that the "
                            "test loss is the run's")
    train.add_argument("--seed", type=seed, default=0,
                       help="model init, epoch order and augmentation all derive from it")

    model = p.add_argument_group("model")
    model.add_argument("--layers", type=positive_int, default=7, help="encoder layers")
    model.add_argument("--hidden", type=positive_int, default=384, help="token width")
    model.add_argument("--mlp-hidden", type=positive_int, default=384, help="width inside each MLP")
    model.add_argument("--heads", type=positive_int, default=12, help="must divide --hidden")
    model.add_argument("--patch-size", type=positive_int, default=4, help="must divide the 32-pixel image size")
    model.add_argument("--mlp-final-gelu", action=argparse.BooleanOptionalAction, default=True,
                       help="a GELU after the MLP's second linear too, as the reference; --no-mlp-final-gelu: the "
                            "standard ViT MLP (Linear-GELU-Linear)")
    model.add_argument("--dropout", type=fraction, default=0.0,
                       help="on embeddings, attention weights, inside the MLP and on both residual branches")
    model.add_argument("--init", choices=models.INITS, default="pytorch",
                       help="pytorch: nn.Linear's default init and unit-normal class token and position embedding, "
                            "as the reference; timm: timm-style truncated normal, std 0.02 cut at 2 std, for all "
                            "of them, zero biases")
    model.add_argument("--attention", choices=("auto", *models.ATTENTION_PATHS), default="auto",
                       help="sdpa: F.scaled_dot_product_attention (fused kernels); math: the explicit formula; "
                            "triton: this repository's kernels for short sequences (CUDA, no dropout; "
                            "triton_attention.py); auto: sdpa, except math on the CPU in bf16 (faster there)")

    system = p.add_argument_group("data and system")
    system.add_argument("--dataset", choices=data.DATASETS,
                        help="which CIFAR (default: cifar10; with --eval-only, the one the checkpoint's model "
                             "classifies)")
    system.add_argument("--data-dir", default="./data", type=nonempty_path,
                        help="folder holding cifar-10-batches-py/ (or cifar-100-python/); downloaded there if absent")
    system.add_argument("--data-pipeline", choices=data.PIPELINES, default="device",
                        help="device: data and augmentation on the training device, in batches (fast); "
                             "torchvision: per-image PIL transforms in DataLoader workers (the reference)")
    system.add_argument("--workers", type=non_negative_int, default=data.default_workers(),
                        help="DataLoader worker processes of the torchvision pipeline")
    system.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: the GPU when CUDA has one, else the CPU")
    system.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                        help="auto: bf16 autocast where the hardware computes bf16 natively (CUDA GPUs from Ampere "
                             "on, CPUs with AVX512-BF16 or AMX), else fp32")
    system.add_argument("--no-compile", action="store_true", help="do not torch.compile the model (CUDA only)")
    system.add_argument("--compile-mode", choices=("auto", "default", "reduce-overhead", "whole-step"), default="auto",
                        help="torch.compile mode on CUDA; reduce-overhead replays the compiled forward and backward "
                             "as CUDA graphs (one process only); whole-step: forward, backward and the Adam step "
                             "of a full batch as one CUDA graph (one process only); auto: whole-step in one process, "
                             "default under torchrun")

    output = p.add_argument_group("output and checkpoints")
    output.add_argument("--out-dir", default=argparse.SUPPRESS, type=nonempty_path,  # its default depends on --eval-only: parse_args
                        help="folder for metrics.csv, results.png, checkpoints/ and the final report (default: the "
                             "current folder; with --eval-only, the run folder that holds the checkpoint)")
    output.add_argument("--save-every", type=non_negative_int, default=0, help="also keep checkpoints/epoch_N.pt every N epochs (0: never)")
    output.add_argument("--write-interval", type=non_negative_float, default=30, metavar="SECONDS",
                        help="rewrite results.png, last.pt and best.pt at the end of an epoch once this long has passed "
                             "since they were last written, and after the first and last epochs and on a stop "
                             "(metrics.csv: every epoch; 0: everything every epoch)")
    output.add_argument("--compare-curve", metavar="CSV", type=nonempty_path,
                        help="also draw this test-accuracy curve (columns epoch, test_acc) in results.png, e.g. "
                             "reference/seed-test-curve.csv (the reference project's run) or another run's metrics.csv")
    output.add_argument("--resume", metavar="PATH|auto", type=nonempty_path,
                        help="continue a run from a checkpoint; auto: <out-dir>/checkpoints/last.pt if present")
    output.add_argument("--eval-only", action="store_true", help="evaluate --checkpoint on the test split and exit")
    output.add_argument("--checkpoint", type=nonempty_path, help="checkpoint to evaluate with --eval-only")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.dataset is None and not args.eval_only:  # --eval-only's default is its checkpoint's: trainer
        args.dataset = "cifar10"
    if not hasattr(args, "out_dir"):
        args.out_dir = checkpoint.run_folder(args.checkpoint) if args.eval_only and args.checkpoint else "."
    if not args.eval_only and args.warmup_epochs > args.epochs:
        parser.error(f"--warmup-epochs {args.warmup_epochs} is longer than --epochs {args.epochs}: shorten the warm-up")
    if not args.eval_only and args.min_lr > args.lr:
        parser.error(f"--min-lr {args.min_lr} is above --lr {args.lr}: the schedule decays from --lr to --min-lr")
    if args.hidden % args.heads:
        parser.error(f"--hidden {args.hidden} is not divisible by --heads {args.heads}: choose heads that divide it")
    image_size = models.ViTConfig.image_size
    if image_size % args.patch_size:
        parser.error(f"--patch-size {args.patch_size} does not divide the {image_size}-pixel CIFAR images: "
                     f"use one of {', '.join(str(d) for d in range(1, image_size + 1) if image_size % d == 0)}")
    if args.attention == "triton":
        tokens = (image_size // args.patch_size) ** 2 + 1
        problem = models.triton_attention_problem(tokens, args.hidden // args.heads, args.dropout)
        if problem:
            parser.error(f"--attention triton {problem}")
    if args.no_compile and args.compile_mode != "auto":
        parser.error(f"--compile-mode {args.compile_mode} and --no-compile contradict each other: drop one of them")
    if args.eval_only and not args.checkpoint:
        parser.error("--eval-only needs --checkpoint PATH (e.g. checkpoints/best.pt)")
    if args.checkpoint and not args.eval_only:
        parser.error("--checkpoint is read only with --eval-only; to continue training use --resume PATH")
    if args.eval_only and args.resume:
        parser.error("--eval-only and --resume do not go together: evaluate with --checkpoint PATH")
    for flag, path in (("--resume", args.resume if args.resume != "auto" else None), ("--checkpoint", args.checkpoint)):
        problem = path and checkpoint.file_problem(path)
        if problem:
            missing = not os.path.isdir(path)
            hint = " (--resume auto starts fresh when there is none)" if flag == "--resume" and missing else ""
            parser.error(f"{flag} {path} {problem}{hint}")
    if os.path.exists(args.data_dir) and not os.path.isdir(args.data_dir):
        parser.error(f"--data-dir {args.data_dir} is a file, not a folder: name the folder that holds (or will hold) "
                     f"{data.FOLDERS[args.dataset or 'cifar10']}/")
    if args.compare_curve:
        import plots  # matplotlib: only when asked for
        try:
            plots.read_curve(args.compare_curve)
        except ValueError as error:
            parser.error(f"--compare-curve {error}: fix the file or drop --compare-curve")
    return args


class Terminated(KeyboardInterrupt):
    """SIGTERM outside the epochs, raised as Ctrl-C's KeyboardInterrupt is (the trainer handles both during them)."""


def _raise_terminated(signum, frame):
    raise Terminated


def main(argv=None) -> int:
    sighup = getattr(signal, "SIGHUP", None)  # none on Windows
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, sighup) if signum is not None}
    if sighup is not None:
        signal.signal(sighup, signal.SIG_IGN)  # a closed SSH session must not end a run, from its start
    # Not under torchrun: there a SIGTERM outside the epochs is the launcher ending the other ranks after one
    # failed, and a line from each of them would bury the failure's own.
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return run(parse_args(argv))
    except KeyboardInterrupt as stop:  # outside the epochs: start-up, reading the data, the final report
        by = " by SIGTERM" if isinstance(stop, Terminated) else ""
        print(f"error: interrupted{by} outside the training loop; the files already written are kept",
              file=sys.stderr, flush=True)
        return 128 + (signal.SIGTERM if by else signal.SIGINT)
    finally:  # an in-process caller gets its handlers back
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def run(args) -> int:
    import trainer
    try:
        runner = trainer.Trainer(args)
        if args.eval_only:
            runner.evaluate_checkpoint()
        else:
            runner.fit()
    except (trainer.TrainingStopped, checkpoint.CheckpointError, data.DataError) as error:
        stopped_by_signal = getattr(error, "exit_code", 0) >= 128  # the user's stop, not an error
        rank = trainer.distributed_env().rank
        if rank == 0:
            print(str(error) if stopped_by_signal else f"error: {error}", file=sys.stderr, flush=True)
        elif not stopped_by_signal:  # every rank stops alike on a signal; an error may be this rank's alone
            print(f"rank {rank}: error: {error}", file=sys.stderr, flush=True)
        return getattr(error, "exit_code", 2)
    except OSError as error:  # a file or folder that cannot be read or written, e.g. a full disk
        where = f"{error.filename}: " if error.filename else ""
        print(f"error: {where}{error.strerror or error}", file=sys.stderr, flush=True)
        return 1
    finally:
        trainer.shutdown_distributed()
    return 0


if __name__ == "__main__":
    escape_what_stdout_cannot_encode()
    status = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Under torchrun, skip the interpreter's teardown: gloo's worker threads can abort a finished process
        # while Python finalizes ("terminate called without an active exception"; pytorch/pytorch#179291).
        # Every output file is already closed and renamed into place.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)
