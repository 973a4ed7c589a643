"""Training, evaluation, logging and checkpoints for the ViT; driven by main.py.

One `Trainer` runs one process of a run (a single process, or one rank of a torchrun job):
    trainer = Trainer(args); trainer.fit()      # or trainer.evaluate_checkpoint()
The log goes to stdout (rank 0 only; `nohup ... > run.log` keeps it); the files go to args.out_dir:
metrics.csv, results.png, checkpoints/{last,best,epoch_N}.pt (best_epoch_N.pt: see flush_deferred_outputs) and, at
the end, the evaluation report (attention.png, confusion.png, per_class.csv). resume.py decides what --resume
continues.
"""
import collections
import copy
import csv
import dataclasses
import math
import os
import shlex
import signal
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

import checkpoint
import data
import plots
import resume
import visualize
from cli import first_line
from models import ViTConfig, VisionTransformer, count_parameters

# Compile modes that replay CUDA graphs: one process only.
GRAPHED_MODES = ("reduce-overhead", "whole-step")
RUN_LOCK = ".run.lock"  # in checkpoints/: one run at a time per --out-dir


class TrainingStopped(Exception):
    """Ends a run early with a message and an exit status: 2 for a setup problem found before training
    (no CUDA, an unwritable --out-dir or one another run is writing into, a batch size the processes cannot
    split), 1 for non-finite values or a failed write, 128 + signum for a stop by signal (main.py prints it
    without "error:")."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


def learning_rate(step: int, total_steps: int, warmup_steps: int, base_lr: float, min_lr: float) -> float:
    """Linear warm-up from base_lr/warmup_steps to base_lr, then cosine decay from base_lr at its first step to
    min_lr at the last step. With no step or one step after the warm-up (a warm-up as long as the run, which
    main.py allows, or one step shorter) there is nothing to decay over: the run ends at base_lr."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps - 1)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + (base_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def model_config_from_args(args, num_classes: int, attention: str) -> ViTConfig:
    """Every flag named as a ViTConfig field (--mlp-hidden: mlp_hidden) sets it; attention comes resolved."""
    flags = {field.name: getattr(args, field.name) for field in dataclasses.fields(ViTConfig) if hasattr(args, field.name)}
    return ViTConfig(**{**flags, "num_classes": num_classes, "attention": attention})


# ---------------------------------------------------------------------------------------------- setup

def resolve_device(requested: str, local_rank: int = 0) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise TrainingStopped("--device cuda was asked for but CUDA is not available on this machine: "
                              "use --device cpu or --device auto", 2)
    if requested == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank)


def native_bf16(device: torch.device) -> bool:
    """Whether the device computes bf16 matrix products in hardware rather than by emulation."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private: absent on some builds
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


def resolve_precision(requested: str, device: torch.device):
    """The autocast dtype (torch.bfloat16), or None for fp32. auto: bf16 where the hardware has it."""
    if requested == "auto":
        return torch.bfloat16 if native_bf16(device) else None
    return torch.bfloat16 if requested == "bf16" else None


def resolve_attention(requested: str, device: torch.device, amp_dtype) -> str:
    """auto: the fused kernels, except on the CPU in bf16, where PyTorch's fused attention is the slower one
    (one layer's forward and backward at batch 128: 132 ms fused, 25 ms explicit; 2-core AVX512-BF16 CPU,
    torch 2.14)."""
    if requested == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise TrainingStopped("--attention triton runs Triton's GPU kernels and needs a CUDA GPU: use --attention "
                              "sdpa on the CPU (TRITON_INTERPRET=1 runs them there, slowly, as the tests do)", 2)
    if requested != "auto":
        return requested
    return "math" if device.type == "cpu" and amp_dtype is not None else "sdpa"


def resolve_eval_batch_size(requested, device: torch.device) -> int:
    """auto: 1000 images per batch on CUDA, 128 on the CPU, where batches of 1000 evaluated a quarter
    slower (2-core AVX2 CPU, fp32: 62 against 85 images/s; README Speed)."""
    if requested != "auto":
        return requested
    return 1000 if device.type == "cuda" else 128


def resolve_compile_mode(requested: str, world: int) -> str:
    """auto: one process replays the whole training step, Adam included, as one CUDA graph (whole-step: 36,947
    against reduce-overhead's 29,316 images/s in bench.py on an H100, torch 2.11; with either data pipeline, each
    run by a CUDA test there). Under torchrun: default, as DDP's gradient hooks cannot be graphed."""
    if requested != "auto":
        return requested
    return "default" if world > 1 else "whole-step"


def resume_command(argv: list, world: int, local_world: int) -> str:
    """The command that continues a stopped run: its own without its --resume, plus --resume auto, under the
    launcher it ran with (torchrun's options of a run over several machines are not known here)."""
    if world == 1:
        launcher = "python"
    elif world == local_world:
        launcher = f"torchrun --nproc_per_node={world}"
    else:
        launcher = "torchrun (with this run's options, on every machine)"
    return f"{launcher} {shlex.join(argv_without_resume(argv))} --resume auto"


def argv_without_resume(argv: list) -> list:
    """The command line less its --resume: `--resume PATH`, `--resume=PATH`, or an abbreviation (`--res P`)."""
    kept, skip_value = [], False
    for arg in argv:
        name = arg.split("=", 1)[0]
        if skip_value:
            skip_value = False
        elif len(name) > 2 and "--resume".startswith(name):
            skip_value = "=" not in arg  # the value is the next argument
        else:
            kept.append(arg)
    return kept


def require_writable(folder: str) -> None:
    """checkpoint.probe_writable, its failure turned into the one-line stop main.py prints."""
    try:
        checkpoint.probe_writable(folder)
    except OSError as error:
        raise TrainingStopped(f"cannot write to {folder} ({error.strerror or error}): choose a writable --out-dir",
                              2) from None


def trained_for(state: dict) -> str:
    """How far a checkpoint's run had trained: "epoch 3", or "epoch 3 and 7 steps of epoch 4" (a signal's stop)."""
    epoch = state.get("epoch", "?")
    try:
        position = state["scheduler"]["position"]
        return f"epoch {epoch} and {int(position['step'])} steps of epoch {int(position['epoch'])}"
    except (KeyError, TypeError, ValueError, IndexError):  # no position (an epoch's end), or an older checkpoint
        return f"epoch {epoch}"


DistributedEnv = collections.namedtuple("DistributedEnv", "rank world local_rank local_world")


def distributed_env() -> DistributedEnv:
    """The process's place as torchrun sets it (local_world: the processes on this machine); (0, 1, 0, 1) for a
    plain `python main.py`."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return DistributedEnv(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")),
                          int(os.environ.get("LOCAL_WORLD_SIZE", world)))


def init_distributed(device: torch.device):
    """Starts the process group when launched by torchrun with >1 process (a no-op otherwise): backend nccl
    when this rank trains on a GPU (its own: LOCAL_RANK), gloo on the CPU. Returns (rank, world size)."""
    rank, world = distributed_env()[:2]
    if world == 1:
        return 0, 1
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size()


def shutdown_distributed():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class StepGraph:
    """--compile-mode whole-step: a full batch's forward, backward and optimizer step replayed as one CUDA graph.

    reduce-overhead graphs the compiled forward and backward, but the optimizer step, the learning-rate update and
    the launches between them stay on the host, which on an H100 took about as long as the kernels. Here the first
    `warmup_steps` full-batch steps are ordinary steps on a side stream (they compile the model and create Adam's state;
    neither may happen during a capture); the next one is captured, and from then on a full batch costs two
    copies into the graph's static inputs, a fill of its learning-rate tensor and one replay. A batch of another
    size (an epoch's partial last one) takes the ordinary step. For the capture the param groups hold the
    learning rate as that device tensor and capturable=True (fused Adam computes the same either way); both are
    put back after it, so checkpoints are alike in every mode. capture=False runs the same body every step, without
    a graph (and with capturable left False): how the tests check its logic on a CPU."""

    def __init__(self, trainer, batch_size: int, capture: bool = True, warmup_steps: int = 3):
        self.trainer, self.batch_size, self.capture = trainer, batch_size, capture
        self.warmup_steps = self.warmup_left = warmup_steps
        self.graph = self.images = self.labels = self.lr = self.outputs = None
        self.replays = 0  # steps taken through the graph (or, without capture, through its body)

    def __call__(self, images, labels, lr: float):
        self.trainer.set_learning_rate(lr)  # the float a checkpoint records
        if self.warmup_left:
            self.warmup_left -= 1
            return self.warmup_step(images.to(self.trainer.device, non_blocking=True), labels)
        if self.images is None:
            self.images = torch.empty_like(images, device=self.trainer.device)
            self.labels = torch.empty_like(labels)
            self.lr = torch.empty((), device=self.trainer.device)
        self.images.copy_(images, non_blocking=True)
        self.labels.copy_(labels, non_blocking=True)
        self.lr.fill_(lr)
        if not self.capture:
            self.outputs = self.body()
        elif self.graph is None:
            self.record()
        if self.graph is not None:
            self.graph.replay()  # the capture only recorded the step: this takes it
        self.replays += 1
        return self.outputs

    def warmup_step(self, images, labels):
        if not self.capture:
            return self.trainer.update(images, labels)
        side, main_stream = torch.cuda.Stream(self.trainer.device), torch.cuda.current_stream(self.trainer.device)
        side.wait_stream(main_stream)
        with torch.cuda.stream(side):
            outputs = self.trainer.update(images, labels)
        main_stream.wait_stream(side)
        return outputs

    def record(self):
        # The model was compiled during the warm-up: a compilation during the capture would fail. thread_local:
        # the torchvision pipeline's pin-memory thread may touch CUDA meanwhile, which is no part of the step.
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self.outputs = self.body()
        except Exception as error:  # any failure has the one remedy; the weights are as the warm-up left them
            reason = first_line(error)
            raise TrainingStopped(f"capturing the training step as one CUDA graph failed ({type(error).__name__}: "
                                  f"{reason}): run with --compile-mode reduce-overhead instead") from error
        self.graph = graph  # only a capture that succeeded is replayed
        self.trainer.log(f"whole-step: the training step is captured as one CUDA graph (after {self.warmup_steps} "
                         f"ordinary steps); full batches replay it")

    def body(self):
        groups = self.trainer.optimizer.param_groups
        saved = [(group["lr"], group["capturable"]) for group in groups]
        for group in groups:
            group["lr"], group["capturable"] = self.lr, self.capture
        try:
            return self.trainer.update(self.images, self.labels)
        finally:
            for group, (lr, capturable) in zip(groups, saved):
                group["lr"], group["capturable"] = lr, capturable


class Trainer:
    def __init__(self, args):
        self.args = args
        _, env_world, local_rank, _ = distributed_env()
        if args.batch_size % env_world:  # checked before the processes rendezvous, so every rank exits at once
            raise TrainingStopped(f"--batch-size {args.batch_size} is the global batch and must divide by the "
                                  f"{env_world} processes: choose a multiple of {env_world}", 2)
        if args.compile_mode in GRAPHED_MODES and env_world > 1:  # DDP's gradient hooks cannot be graphed
            raise TrainingStopped(f"--compile-mode {args.compile_mode} works in one process only: drop it under "
                                  f"torchrun", 2)
        self.compile_mode = resolve_compile_mode(args.compile_mode, env_world)
        self.device = resolve_device(args.device, local_rank)
        self.rank, self.world = init_distributed(self.device)
        self.is_main = self.rank == 0
        self.use_cuda = self.device.type == "cuda"
        self.amp_dtype = resolve_precision(args.precision, self.device)
        self.attention = resolve_attention(args.attention, self.device, self.amp_dtype)
        self.eval_batch_size = resolve_eval_batch_size(args.eval_batch_size, self.device)
        self.out_dir = args.out_dir
        self.checkpoint_dir = os.path.join(self.out_dir, checkpoint.FOLDER)
        self.last_checkpoint = os.path.join(self.checkpoint_dir, "last.pt")
        self.stop_signal = None
        self.resume_path = None  # the checkpoint a resumed run started from (resume.find)
        self.run_lock = None  # the open lock file of this run's out-dir (rank 0): prepare_checkpoint_dir
        self.compare_curve = None  # (label, points) for results.png: --compare-curve, read by fit()
        self.plot_failed = False  # results.png could not be drawn once: warned, not again

    def warn_if_on_cpu(self) -> None:
        """Said once the checks have passed, just before the work, so that an error stays the only line."""
        if self.args.device == "auto" and self.device.type == "cpu" and self.is_main:
            print("warning: CUDA is not available, running on the CPU (slow; use a GPU for the full recipe)",
                  file=sys.stderr, flush=True)

    def log(self, message: str) -> None:
        if self.is_main:
            print(message, flush=True)

    # ------------------------------------------------------------------------------------ building

    def build(self, num_classes: int, model_config: ViTConfig | None = None):
        args = self.args
        torch.manual_seed(args.seed)  # same initial weights on every rank
        # the attention path is a way to compute, not part of the model: a resumed run takes today's choice
        config = model_config or model_config_from_args(args, num_classes, self.attention)
        self.model_config = dataclasses.replace(config, attention=self.attention)
        self.compiled = self.use_cuda and not args.no_compile
        self.model = VisionTransformer(self.model_config).to(self.device)
        # Adam's weight_decay is L2 added to the gradient (the reference); AdamW's is decoupled.
        optimizer_class = torch.optim.Adam if args.optimizer == "adam" else torch.optim.AdamW
        self.optimizer = optimizer_class(self.model.parameters(), lr=args.lr, betas=(args.beta1, args.beta2),
                                         weight_decay=args.weight_decay, fused=self.use_cuda)
        self.network = self.model
        if self.world > 1:
            self.network = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.use_cuda else None)
        # Compiling the whole forward (normalisation, model, loss, argmax) fuses its small kernels. whole-step
        # compiles in default mode and captures the CUDA graph itself (StepGraph), optimizer step included.
        torch_mode = "default" if self.compile_mode == "whole-step" else self.compile_mode
        self.loss_and_predictions = (torch.compile(self._loss_and_predictions, dynamic=False, mode=torch_mode)
                                     if self.compiled else self._loss_and_predictions)
        self.step_graph = StepGraph(self, args.batch_size) if self.compiled and self.compile_mode == "whole-step" else None

    def compile_label(self) -> str:
        if not self.compiled:
            return "off"
        return self.compile_mode

    def settings_label(self) -> str:
        """How this run computes, as the log's `model:` line and bench.py's rows state it."""
        return (f"pipeline: {self.args.data_pipeline} | precision: {'bf16' if self.amp_dtype else 'fp32'} | "
                f"attention: {self.attention} | compile: {self.compile_label()}")

    def make_train_loader(self, cifar: data.Cifar):
        args, batch_size = self.args, self.args.batch_size  # global: EpochBatches splits it
        if args.data_pipeline == "device":
            return data.DeviceTrainLoader(cifar.train_images, cifar.train_labels, batch_size, args.seed,
                                          self.device, rank=self.rank, world=self.world)
        return data.TorchvisionTrainLoader(cifar.train_images, cifar.train_labels, batch_size, args.seed,
                                           args.workers, pin_memory=self.use_cuda, rank=self.rank, world=self.world)

    # ------------------------------------------------------------------------------------ steps

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def _loss_and_predictions(self, network, images_uint8, labels):
        """Label-smoothed cross-entropy and predicted classes, from uint8 images."""
        with self.autocast():
            logits = network(data.normalize(images_uint8))
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.args.label_smoothing)
        return loss, logits.argmax(-1)

    def train_step(self, images_uint8, labels, lr, global_batch=None):
        """One optimisation step; returns the loss and the number of correct predictions as device tensors,
        without waiting for the device. `global_batch`: the size of this step's batch over all ranks.
        Under CUDA graphs (compile modes reduce-overhead and whole-step) the loss lives in graph memory that the
        next step reuses: read it (or clone it) before the next call."""
        if self.step_graph is not None and len(labels) == self.step_graph.batch_size:
            return self.step_graph(images_uint8, labels, lr)
        self.set_learning_rate(lr)
        return self.update(images_uint8.to(self.device, non_blocking=True), labels, global_batch)

    def set_learning_rate(self, lr):
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def update(self, images_uint8, labels, global_batch=None):
        """Forward, backward and the optimizer step at the learning rate already set; the gradients are None
        before and after. Also the body of the whole-step graph."""
        loss, predictions = self.loss_and_predictions(self.network, images_uint8, labels)
        weight = len(labels) * self.world / global_batch if self.world > 1 and global_batch else 1.0
        # DDP averages the ranks' gradients with equal weights, but a partial last global batch splits into
        # unequal (even empty) local batches: weighting each rank's mean loss by its share makes the gradient
        # the mean over the global batch, as in one process. Full batches have weight exactly 1.
        (loss * weight if weight != 1.0 else loss).backward()
        if not len(labels):
            loss = torch.zeros_like(loss)  # the mean over an empty share is nan (its gradient, weighted 0, is 0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach(), (predictions == labels).sum()

    @torch.no_grad()
    def evaluate(self, images, labels, sharded=True):
        """(test loss, test accuracy %, predictions) over a test set held as uint8. Sharded: each rank takes
        its part and the sums are reduced (predictions are then this rank's part); else this process alone."""
        was_training = self.model.training
        self.model.eval()
        world, rank = (self.world, self.rank) if sharded else (1, 0)
        shard = torch.tensor_split(torch.arange(len(images)), world)[rank]
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        predictions = []
        for batch in shard.split(self.eval_batch_size):
            x = images[batch].to(self.device, non_blocking=True)
            y = labels[batch].to(self.device, non_blocking=True)
            loss, predicted = self.loss_and_predictions(self.model, x, y)
            loss_sum += loss * len(y)
            correct += (predicted == y).sum()
            predictions.append(predicted.clone())  # CUDA graphs (reduce-overhead) reuse output memory on the next call
        totals = torch.stack([loss_sum, correct.float()])
        if sharded:
            self.all_reduce(totals)
        self.model.train(was_training)
        predictions = torch.cat(predictions) if predictions else torch.zeros(0, dtype=torch.long)
        return totals[0].item() / len(images), 100.0 * totals[1].item() / len(images), predictions.cpu()

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    def all_reduce(self, tensor, op=dist.ReduceOp.SUM):
        if self.world > 1:
            dist.all_reduce(tensor, op=op)
        return tensor

    # ------------------------------------------------------------------------------------ training

    def fit(self) -> dict:
        try:
            return self.train_run()
        finally:  # let go of the out-dir (an exiting process would anyway; a caller in-process may start the next)
            if self.run_lock is not None:
                self.run_lock.close()

    def train_run(self) -> dict:
        args = self.args
        if args.compare_curve:  # checked by main.parse_args
            self.compare_curve = plots.read_curve(args.compare_curve)
        # checkpoint and out-dir problems show before the data is read
        wanted = model_config_from_args(args, data.NUM_CLASSES[args.dataset], self.attention)
        resume_state, self.resume_path, start_notes = resume.find(args, self.last_checkpoint, wanted)
        if self.is_main:
            self.prepare_checkpoint_dir()
        cifar = data.load_cifar(args.dataset, args.data_dir)
        self.classes = cifar.classes
        self.build(cifar.num_classes,
                   checkpoint.model_config_of(resume_state, self.resume_path) if resume_state else wanted)
        self.train_images = len(cifar.train_images)
        if resume_state:
            start_notes += resume.check_training_set(resume_state, self.resume_path, self.train_images, args.data_dir)
        loader = self.make_train_loader(cifar)
        steps_per_epoch = loader.steps()
        total_steps = args.epochs * steps_per_epoch
        warmup_steps = round(args.warmup_epochs * steps_per_epoch)
        self.history, self.best_acc, self.best_epoch, start_epoch, position = [], 0.0, 0, 1, None
        if resume_state:
            self.history, self.best_acc, self.best_epoch, start_epoch, position = resume.restore(
                resume_state, self.resume_path, self.model, self.optimizer, self.rank, self.world, self.device)
        for note in start_notes:  # not before: a refused run must not say it is starting or resuming
            self.log(note)
        if resume_state and self.is_main:
            self.carry_best_over(resume_state)
        self.warn_if_on_cpu()
        self.log(f"model: {count_parameters(self.model):,} parameters | data: {args.dataset}, "
                 f"{len(cifar.train_images):,} train / {len(cifar.test_images):,} test | device: {self.device}"
                 f"{f' x{self.world} processes' if self.world > 1 else ''} | {self.settings_label()}")
        test_images = cifar.test_images.to(self.device)
        test_labels = cifar.test_labels.to(self.device)
        run_start, predictions = time.time(), None
        self.last_write, self.pending_best = -math.inf, None
        self.install_signal_handlers()
        try:
            for epoch in range(start_epoch, args.epochs + 1):
                row, epoch_start = self.train_epoch(epoch, loader, steps_per_epoch, total_steps, warmup_steps,
                                                    position if epoch == start_epoch else None)
                test_loss, test_acc, predictions = self.evaluate(test_images, test_labels)
                if not math.isfinite(test_loss):  # finite but huge weights: caught before they are saved
                    raise self.non_finite_error("test loss after the update", epoch, steps_per_epoch)
                row.update(test_loss=test_loss, test_acc=test_acc, epoch_seconds=time.time() - epoch_start)
                self.end_epoch(row)
                if self.stop_requested(0):  # a signal during the evaluation or the epoch's writes
                    self.stop(epoch)
        except TrainingStopped:
            self.flush_deferred_outputs()
            raise
        finally:
            self.restore_signal_handlers()
        summary = {"parameters": count_parameters(self.model), "best_acc": self.best_acc, "best_epoch": self.best_epoch,
                   "final_acc": self.history[-1]["test_acc"] if self.history else float("nan"),
                   "seconds": time.time() - run_start}
        if self.is_main:
            self.write_report(cifar, predictions.cpu() if predictions is not None else None)
            self.log(f"done: {summary['parameters']:,} parameters | best test acc {self.best_acc:.2f}% at epoch "
                     f"{self.best_epoch} | final {summary['final_acc']:.2f}% | {summary['seconds'] / 60:.1f} min "
                     f"this session")
        self.barrier()  # the other ranks wait for rank 0's report, then all leave together
        return summary

    def train_epoch(self, epoch, loader, steps_per_epoch, total_steps, warmup_steps, position):
        """One epoch; `position` resumes one that a signal interrupted (its step and running sums). Returns the
        metrics row so far and the epoch's start time. Losses and accuracies accumulate on the device and are
        read once, at the end."""
        args = self.args
        self.network.train()
        sums = torch.zeros(3, device=self.device)  # loss sum, correct, samples
        non_finite = torch.zeros(steps_per_epoch, device=self.device, dtype=torch.bool)
        skip, elapsed = (position["step"], position["seconds"]) if position else (0, 0.0)
        if position and self.is_main:  # the saved sums are already reduced over all ranks
            sums += position["sums"].to(self.device)
        # epoch_start counts the seconds an interrupted session already spent on this epoch (epoch_seconds,
        # the saved position); session_start times only this session's training (images/s)
        epoch_start, session_start = time.time() - elapsed, time.time()
        progress = self.progress_bar(epoch, steps_per_epoch, skip)
        for step_in_epoch, (images, labels) in enumerate(loader.epoch(epoch)):
            if step_in_epoch < skip:
                continue
            lr = learning_rate((epoch - 1) * steps_per_epoch + step_in_epoch, total_steps, warmup_steps,
                               args.lr, args.min_lr)
            labels = labels.to(self.device, non_blocking=True)
            global_batch = min(args.batch_size, loader.num_samples - step_in_epoch * args.batch_size)  # as EpochBatches
            loss, correct = self.train_step(images, labels, lr, global_batch)
            sums[0] += loss * len(labels)
            sums[1] += correct
            sums[2] += len(labels)
            non_finite[step_in_epoch] = ~torch.isfinite(loss)
            if progress is not None:
                progress.update(1)
            if self.stop_requested(step_in_epoch):
                self.check_finite(non_finite, epoch, step_in_epoch + 1)
                self.stop_mid_epoch(epoch, step_in_epoch + 1, sums, time.time() - epoch_start)
        if progress is not None:
            progress.close()
        self.check_finite(non_finite, epoch, steps_per_epoch)
        train_seconds = time.time() - session_start
        loss_sum, correct, seen = self.all_reduce(sums).tolist()
        seen_this_session = seen - (position["sums"][2].item() if position else 0)
        # a resume after the epoch's last step trains none of it: its speed is the interrupted session's
        images_per_second = (seen_this_session / max(train_seconds, 1e-9) if seen_this_session
                             else seen / max(elapsed, 1e-9))
        last_lr = learning_rate(epoch * steps_per_epoch - 1, total_steps, warmup_steps, args.lr, args.min_lr)
        return {"epoch": epoch, "lr": last_lr, "train_loss": loss_sum / seen, "train_acc": 100.0 * correct / seen,
                "images_per_second": images_per_second}, epoch_start

    def stop_requested(self, step_in_epoch) -> bool:
        """Whether a signal asked to stop. Ranks of a distributed run must stop at the same step, so they
        agree through a small all-reduce every few steps; a single process just reads its flag."""
        if self.world == 1:
            return self.stop_signal is not None
        if step_in_epoch % 10:
            return False
        flag = torch.tensor(float(self.stop_signal or 0), device=self.device)
        signum = int(self.all_reduce(flag, dist.ReduceOp.MAX).item())
        if signum and self.stop_signal is None:
            self.stop_signal = signum
        return bool(signum)

    def check_finite(self, non_finite, epoch, steps_done):
        """Stop before anything is saved when a loss so far, or the weights after step `steps_done`, are NaN/inf."""
        bad = self.all_reduce(non_finite.float(), dist.ReduceOp.MAX).nonzero()
        if len(bad):
            what, step = "training loss", int(bad[0]) + 1
        elif not bool(torch.stack([torch.isfinite(p).all() for p in self.model.parameters()]).all()):
            what, step = "weights after the update", steps_done  # identical on every rank
        else:
            return
        raise self.non_finite_error(what, epoch, step)

    def non_finite_error(self, what, epoch, step):
        good = next((path for path in (self.last_checkpoint, self.resume_path) if path and os.path.isfile(path)), None)
        kept = f"the last good checkpoint is {good}" if good else "no checkpoint was written"
        return TrainingStopped(f"non-finite {what} at epoch {epoch}, step {step}: stopped; {kept} (try a lower --lr)")

    def progress_bar(self, epoch, steps, done):
        if not (self.is_main and sys.stderr.isatty()):
            return None
        from tqdm import tqdm
        return tqdm(total=steps, initial=done, desc=f"epoch {epoch}", leave=False, dynamic_ncols=True)

    def end_epoch(self, row):
        args = self.args
        self.history.append(row)
        improved = self.best_epoch == 0 or row["test_acc"] > self.best_acc
        if improved:
            self.best_acc, self.best_epoch = row["test_acc"], row["epoch"]
        epoch = row["epoch"]
        self.log(f"epoch {epoch:>{len(str(args.epochs))}}/{args.epochs} | lr {row['lr']:.3e} | "
                 f"train loss {row['train_loss']:.4f} acc {row['train_acc']:6.2f}% | "
                 f"test loss {row['test_loss']:.4f} acc {row['test_acc']:6.2f}% | "
                 f"best {self.best_acc:6.2f}% (epoch {self.best_epoch}) | "
                 f"{row['epoch_seconds']:.1f}s | {row['images_per_second']:,.0f} img/s")
        rng_by_rank = self.rng_states_by_rank()
        if not self.is_main:
            return
        # metrics.csv every epoch; results.png and the checkpoints at most every --write-interval seconds (and
        # after the first and last epochs): on a GPU an epoch can take a second, about what writing them takes.
        due = epoch == args.epochs or time.time() - self.last_write >= args.write_interval
        state = self.state(epoch, position=None, rng_by_rank=rng_by_rank)
        if improved:
            self.pending_best = None if due else copy.deepcopy(state)  # a snapshot: the live tensors keep training
        if due:  # best.pt first: a stop between the two must not leave a last.pt naming an unsaved best
            if improved:
                self.save(state, "best.pt")
            self.save_pending_best()
            self.save(state, "last.pt")
            self.last_write = time.time()
        # after the checkpoints: a disk that fills at a new run's first last.pt leaves no metrics.csv, which
        # without a last.pt would make the folder refuse both the same command and --resume auto
        self.write_outputs(metrics=True, plot=due)
        if args.save_every and epoch % args.save_every == 0:
            self.save(state, f"epoch_{epoch}.pt")

    def write_outputs(self, metrics: bool, plot: bool):
        try:
            if metrics:
                self.write_metrics()
            if plot:
                self.plot()
        except OSError as error:
            raise TrainingStopped(f"could not write {error.filename or self.out_dir} ({error.strerror or error}): "
                                  f"free disk space or choose another --out-dir; the previous files are intact") from None

    def save_pending_best(self):
        if self.pending_best is not None:
            pending, self.pending_best = self.pending_best, None
            self.save(pending, "best.pt")

    def flush_deferred_outputs(self):
        """When a run stops with TrainingStopped but no last.pt (non-finite values, a failed write): results.png, and
        the best model of an improvement made since the last write, as best_epoch_N.pt. Not as best.pt: last.pt,
        which a resume goes on from, names the best.pt of its own epochs. (A signal's stop saves the pending best.pt,
        then last.pt.) A failure here is logged or dropped: the error that stopped the run is the one to report."""
        if not self.is_main:
            return
        if self.pending_best is not None:
            pending, self.pending_best = self.pending_best, None
            path = os.path.join(self.checkpoint_dir, f"best_epoch_{pending['epoch']}.pt")
            what = f"the best model since the last checkpoint (epoch {pending['epoch']}, {pending['best_acc']:.2f}%)"
            try:
                checkpoint.save(pending, path)
                self.log(f"saved {path}: {what}, apart from best.pt, which {self.last_checkpoint} names")
            except OSError as error:
                self.log(f"could not save {what} as {path} ({error.strerror or error})")
        try:
            self.write_outputs(metrics=False, plot=bool(self.history))
        except TrainingStopped:
            pass

    # ------------------------------------------------------------------------------------ outputs

    def write_metrics(self):
        path = os.path.join(self.out_dir, "metrics.csv")
        with checkpoint.atomic_file(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=plots.METRIC_FIELDS)
            writer.writeheader()
            for row in self.history:
                writer.writerow({k: (f"{row[k]:.6g}" if isinstance(row[k], float) else row[k])
                                 for k in plots.METRIC_FIELDS})

    def plot(self):
        """results.png. A drawing that fails for another reason than the disk (OSError: write_outputs stops the
        run) is warned about once and skipped: the numbers are in metrics.csv, and the run goes on."""
        try:
            plots.plot_results(self.history, os.path.join(self.out_dir, "results.png"), self.compare_curve)
        except OSError:
            raise
        except Exception as error:
            if not self.plot_failed:
                print(f"warning: could not draw results.png ({type(error).__name__}: {first_line(error)}): training "
                      f"goes on without it; redraw it later with plots.py", file=sys.stderr, flush=True)
            self.plot_failed = True

    def write_report(self, cifar, predictions=None, suffix=""):
        """attention.png, confusion.png, per_class.csv (named with `suffix`, see visualize) and the per-class
        table in the log (rank 0)."""
        if predictions is None or len(predictions) != len(cifar.test_labels):
            _, _, predictions = self.evaluate(cifar.test_images, cifar.test_labels, sharded=False)
        for line in visualize.write_evaluation_report(self.model, cifar.test_images, cifar.test_labels, predictions,
                                                       cifar.classes, self.out_dir, suffix):
            self.log(line)

    # ------------------------------------------------------------------------------------ checkpoints

    def rng_state(self) -> dict:
        rng = {"torch": torch.get_rng_state()}
        if self.use_cuda:
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return rng

    def rng_states_by_rank(self):
        """Every rank's RNG states, for the checkpoint rank 0 writes (a collective: every rank calls it), so that
        a resume gives each rank its own dropout stream back; None in one process."""
        if self.world == 1:
            return None
        states = [None] * self.world
        dist.all_gather_object(states, self.rng_state())
        return states

    def state(self, epoch, position, rng_by_rank):
        rng = {"by_rank": rng_by_rank} if rng_by_rank else self.rng_state()
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": {"epoch": epoch, "position": position},
                "model_config": dataclasses.asdict(self.model_config), "config": dict(vars(self.args)),
                "classes": self.classes, "epoch": epoch, "history": self.history, "best_acc": self.best_acc,
                "best_epoch": self.best_epoch, "rng": rng, "train_images": self.train_images}

    def save(self, state, name):
        path = os.path.join(self.checkpoint_dir, name)
        try:
            checkpoint.save(state, path)
        except OSError as error:
            raise TrainingStopped(f"could not write {path} ({error.strerror or error}): free disk space or choose "
                                  f"another --out-dir; the previous {name} is intact") from None

    def prepare_checkpoint_dir(self):
        """An unwritable --out-dir shows before any long work; a run already writing there (whose long first epoch
        may have written nothing yet) refuses this one; partial files of writes that were killed (SIGKILL, power
        loss) are cleared: checkpoints, metrics.csv, results.png and the final report's files."""
        require_writable(self.checkpoint_dir)
        lock = os.path.join(self.checkpoint_dir, RUN_LOCK)
        self.run_lock = checkpoint.hold_lock(lock, wait=False)  # held for the run: fit() lets go
        if self.run_lock is None:
            raise TrainingStopped(f"another run is writing into {self.out_dir} (it holds {lock}): let it finish or "
                                  f"stop it first, or give this run another --out-dir", 2)
        checkpoint.remove_leftovers(self.checkpoint_dir)
        checkpoint.remove_leftovers(self.out_dir, ("metrics.csv", "results.png", *visualize.REPORT_FILES))

    def carry_best_over(self, state):
        """A resume into an out-dir without best.pt (a new one): the run's best model is saved there at the start
        when the checkpoint holds it (saved at the end of its best epoch) or a best.pt beside it does. Otherwise
        the log says so: the last.pt written here will name a best model that is not in this folder. (Only
        best.pt: a metrics.csv without last.pt would make the folder refuse both a retry and --resume auto.)"""
        if self.best_epoch == 0 or os.path.isfile(os.path.join(self.checkpoint_dir, "best.pt")):
            return
        best = resume.best_model_at_hand(state, self.resume_path, self.best_epoch, self.best_acc)
        if best is not None:
            self.save(best, "best.pt")
        else:
            self.log(f"note: the best model so far (epoch {self.best_epoch}, {self.best_acc:.2f}%) is neither "
                     f"{self.resume_path} nor a best.pt beside it: this folder's best.pt will be the first epoch "
                     f"that beats it")

    # ------------------------------------------------------------------------------------ signals

    def install_signal_handlers(self):
        self._previous_handlers, self._handler_pid = {}, os.getpid()
        for signum in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous_handlers[signum] = signal.signal(signum, self.on_signal)
            except ValueError:  # not the main thread
                pass

    def restore_signal_handlers(self):
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)

    def on_signal(self, signum, frame):
        if os.getpid() != self._handler_pid:
            return  # DataLoader workers inherit the handler (main.py ignores SIGHUP, a closed SSH session)
        if self.stop_signal is not None:
            os._exit(128 + signum)
        self.stop_signal = signum
        if self.is_main:
            print(f"received {signal.Signals(signum).name}: finishing the current training step or "
                  f"evaluation, then saving checkpoints/last.pt (send it again to exit at once)", flush=True)

    def stop_mid_epoch(self, epoch, steps_done, sums, seconds):
        position = {"epoch": epoch, "step": steps_done, "sums": self.all_reduce(sums.clone()).cpu(), "seconds": seconds}
        self.stop(epoch, position)

    def stop(self, epoch, position=None):
        """Ends a run that a signal asked to stop: last.pt where it stands (in epoch `epoch` at `position`, or
        after it), and the command that continues it."""
        rng_by_rank = self.rng_states_by_rank()
        if self.is_main:
            self.save_pending_best()  # before last.pt, which names it (a second signal may end the process)
            self.save(self.state(epoch - 1 if position else epoch, position, rng_by_rank), "last.pt")
        where = f"at epoch {epoch}, step {position['step']}" if position else f"after epoch {epoch}"
        command = resume_command(sys.argv, self.world, distributed_env().local_world)
        raise TrainingStopped(f"stopped by {signal.Signals(self.stop_signal).name} {where}; saved "
                              f"{self.last_checkpoint}; continue with: {command}", 128 + self.stop_signal)

    # ------------------------------------------------------------------------------------ eval-only

    def evaluate_checkpoint(self) -> dict:
        args = self.args
        self.model, state = checkpoint.load_model(args.checkpoint, attention=self.attention)  # before the data
        config = self.model.config
        checkpoint.refuse_non_cifar_model(config, args.checkpoint)
        if args.dataset is None:  # not given: the CIFAR whose classes the model predicts
            args.dataset = next((name for name, n in data.NUM_CLASSES.items() if n == config.num_classes), "cifar10")
        if config.num_classes != data.NUM_CLASSES[args.dataset]:
            raise checkpoint.CheckpointError(f"{args.checkpoint} predicts {config.num_classes} classes but {args.dataset} "
                                             f"has {data.NUM_CLASSES[args.dataset]}: pass the --dataset it was trained on")
        if self.is_main:
            require_writable(self.out_dir)
        smoothing = state["config"].get("label_smoothing") if isinstance(state.get("config"), dict) else None
        if isinstance(smoothing, float) and 0.0 <= smoothing < 1.0:  # the run's own loss: its metrics.csv's test loss
            args.label_smoothing = smoothing
        cifar = data.load_cifar(args.dataset, args.data_dir)
        self.warn_if_on_cpu()
        self.model_config, self.classes = config, cifar.classes
        self.model = self.model.to(self.device)
        self.network = self.model
        self.loss_and_predictions = self._loss_and_predictions  # (build() is not called for eval-only)
        test_loss, test_acc, predictions = self.evaluate(cifar.test_images, cifar.test_labels)
        self.log(f"eval {args.checkpoint} ({trained_for(state)}): test loss {test_loss:.4f} "
                 f"acc {test_acc:.2f}% on {len(cifar.test_images):,} {args.dataset} test images")
        if self.is_main:  # named after the checkpoint, so a run's own final report is never replaced
            self.write_report(cifar, predictions, "-" + os.path.splitext(os.path.basename(args.checkpoint))[0])
        self.barrier()
        return {"test_loss": test_loss, "test_acc": test_acc}
