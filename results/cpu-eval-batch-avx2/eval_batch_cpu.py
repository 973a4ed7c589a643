"""Evaluation images/s of the default model on the CPU at several --eval-batch-size values, interleaved rounds.

    OMP_NUM_THREADS=2 python results/cpu-eval-batch-avx2/eval_batch_cpu.py ../shared/data
"""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

import data
import main
from trainer import Trainer

cifar = data.load_cifar("cifar10", sys.argv[1])
images, labels = cifar.test_images[:2000], cifar.test_labels[:2000]
trainers = {}
for size in (64, 128, 256, 1000):
    trainer = Trainer(main.parse_args(["--device", "cpu", "--eval-batch-size", str(size)]))
    trainer.build(10)
    trainers[size] = trainer
print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, settings: {trainers[128].settings_label()}, {len(images)} test images")
for round_ in range(3):
    for size, trainer in trainers.items():
        start = time.perf_counter()
        trainer.evaluate(images, labels)
        print(f"round {round_} eval batch {size:>4}: {len(images) / (time.perf_counter() - start):.0f} images/s",
              flush=True)
