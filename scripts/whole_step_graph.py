"""An experiment for the H100 target: the whole training step captured as one CUDA graph.

    PYTHONPATH=. python scripts/whole_step_graph.py --data-dir DIR [--steps 390] [--check-steps 10]

The trainer's default step replays the compiled forward and backward as two CUDA graphs, but
fused Adam, the learning-rate update and the loss/accuracy sums still run eagerly, and on the H100
the step took 3.75-4.6 ms against 3.12 ms of kernels: the host, not the GPU, set the pace. Here
forward, backward, Adam (capturable, with the learning rate as a device tensor) and the sums are
captured once; a step is then three small copies and one replay. The script

1. checks the graph against the trainer's step: both start from the same weights and take the same
   `--check-steps` batches; it prints the largest loss difference and the weights' relative
   difference at the end (bf16 and fused kernels: small, not zero);
2. times both over `--steps` full batches of one epoch (the device augmentation pass included, as
   in bench.py) and prints images/s and the ratio.

It changes nothing in the trainer: if the graph wins on a GPU, the trainer can adopt it.
"""
import argparse
import itertools
import sys
import time

import torch

import bench
import data
import main
from trainer import Trainer


def build_trainer(device: str, compile_mode: str, flags=()) -> Trainer:
    args = main.parse_args(["--device", device, "--compile-mode", compile_mode, *flags])
    trainer = Trainer(args)
    trainer.build(10)
    return trainer


class WholeStepGraph:
    """Forward, backward, Adam and the epoch's sums of one batch size, captured as one CUDA graph.
    capture=False runs the same body without a graph: how the tests check its logic on a CPU."""

    def __init__(self, trainer: Trainer, batch_size: int, capture: bool = True, warmup_steps: int = 3):
        args, self.trainer, device = trainer.args, trainer, trainer.device
        self.lr = torch.tensor(args.lr, device=device)
        self.optimizer = torch.optim.Adam(trainer.model.parameters(), lr=self.lr, betas=(args.beta1, args.beta2),
                                          weight_decay=args.weight_decay, fused=True, capturable=True)
        self.images = torch.zeros(batch_size, 3, 32, 32, dtype=torch.uint8, device=device)
        self.labels = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.sums = torch.zeros(2, device=device)  # loss sum, correct predictions
        self.graph = None
        if capture:
            self.capture(warmup_steps)

    def capture(self, warmup_steps: int):
        initial = {k: v.clone() for k, v in self.trainer.model.state_dict().items()}
        side = torch.cuda.Stream()  # warm-up (compilation, Adam's state) off the default stream, as capture wants
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup_steps):
                self.optimizer.zero_grad(set_to_none=True)
                self.step_body()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        self.optimizer.zero_grad(set_to_none=True)  # backward inside the graph then writes fresh gradients
        with torch.cuda.graph(self.graph):
            self.step_body()
        self.reset(initial)

    def step_body(self):
        loss, predictions = self.trainer.loss_and_predictions(self.trainer.network, self.images, self.labels)
        loss.backward()
        self.optimizer.step()
        self.sums[0] += loss.detach() * len(self.labels)
        self.sums[1] += (predictions == self.labels).sum()

    def reset(self, weights):
        """Back to `weights` and a fresh Adam, in place: the graph keeps the tensors' addresses."""
        with torch.no_grad():
            for name, tensor in self.trainer.model.state_dict().items():
                tensor.copy_(weights[name])
            for state in self.optimizer.state.values():
                for value in state.values():
                    value.zero_()
        self.sums.zero_()

    def __call__(self, images, labels, lr: float):
        self.images.copy_(images)
        self.labels.copy_(labels)
        self.lr.fill_(lr)
        if self.graph is None:
            self.optimizer.zero_grad(set_to_none=True)
            self.step_body()
        else:
            self.graph.replay()


def check_equal(reference: Trainer, graphed: WholeStepGraph, batches, lr: float):
    """Same start, same batches: the largest loss difference and the weights' relative difference."""
    reference_losses, graphed_losses = [], []
    for images, labels in batches:
        loss, _ = reference.train_step(images, labels, lr)
        reference_losses.append(loss.item())
        before = graphed.sums[0].item()
        graphed(images, labels, lr)
        graphed_losses.append((graphed.sums[0].item() - before) / len(labels))
    a = torch.cat([p.detach().flatten().double() for p in reference.model.parameters()])
    b = torch.cat([p.detach().flatten().double() for p in graphed.trainer.model.parameters()])
    loss_gap = max(abs(x - y) for x, y in zip(reference_losses, graphed_losses))
    return loss_gap, ((a - b).norm() / a.norm()).item(), reference_losses, graphed_losses


def time_images_per_second(step, loader, steps: int, batch_size: int, lr: float) -> float:
    """Images/s of `steps` full batches of one loader epoch (augmentation pass included)."""
    bench.synchronize(loader.device)
    start, seen = time.perf_counter(), 0
    for images, labels in loader.epoch(2):
        if len(labels) < batch_size or seen == steps * batch_size:
            break
        step(images, labels, lr)
        seen += len(labels)
    bench.synchronize(loader.device)
    return seen / (time.perf_counter() - start)


def main_cli(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default="./data")
    p.add_argument("--steps", type=main.positive_int, default=390, help="timed full batches of 128")
    p.add_argument("--check-steps", type=main.positive_int, default=10)
    opts = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("error: whole_step_graph.py captures CUDA graphs and found no CUDA GPU; run it on a GPU machine")
    cifar, source = bench.load_data(opts.data_dir)
    reference = build_trainer("cuda", "reduce-overhead")  # the trainer's default on one GPU
    graphed = WholeStepGraph(build_trainer("cuda", "default"), reference.args.batch_size)
    batch_size, lr = reference.args.batch_size, reference.args.lr
    loader = data.DeviceTrainLoader(cifar.train_images, cifar.train_labels, batch_size, 0, "cuda")
    print(f"whole-step CUDA graph vs the trainer's step: {torch.cuda.get_device_name()} | torch {torch.__version__} "
          f"| {source}", flush=True)

    batches = [(images.clone(), labels.clone()) for images, labels in
               itertools.islice(loader.epoch(1), opts.check_steps)]
    loss_gap, weight_gap, reference_losses, graphed_losses = check_equal(reference, graphed, batches, lr)
    print(f"check over {len(batches)} steps from the same weights: largest loss difference {loss_gap:.2e}, "
          f"weights' relative difference {weight_gap:.2e}")
    print("  trainer losses:", " ".join(f"{x:.4f}" for x in reference_losses))
    print("  graph losses:  ", " ".join(f"{x:.4f}" for x in graphed_losses))

    results = {}
    for name, step in (("trainer step (two graphs, eager Adam)", reference.train_step),
                       ("whole step, one graph", graphed)):
        time_images_per_second(step, loader, 20, batch_size, lr)  # warm-up
        results[name] = time_images_per_second(step, loader, opts.steps, batch_size, lr)
        print(f"{name:40s} {results[name]:10,.0f} images/s", flush=True)
    first, second = results.values()
    print(f"ratio: {second / first:.2f}x")
    return {"loss_gap": loss_gap, "weight_gap": weight_gap, "images_per_s": results}


if __name__ == "__main__":
    main_cli()
