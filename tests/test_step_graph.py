"""--compile-mode whole-step on a CPU: StepGraph's body without the capture (which needs CUDA; its CUDA tests
are in test_cuda.py) against the ordinary step."""
import contextlib

import pytest
import torch

import data
import main
import resume
import trainer
from conftest import TINY_MODEL, relative_error

FLAGS = ["--device", "cpu", "--precision", "fp32", "--batch-size", "8", *TINY_MODEL]


def built_trainer(flags=FLAGS):
    runner = trainer.Trainer(main.parse_args(flags))
    runner.build(10)
    return runner


def test_whole_step_body_takes_the_ordinary_steps(fake_cifar10):
    """Warm-up steps, then the body on static inputs with the learning rate as a tensor, and the partial last
    batch through the ordinary step between graph steps: the same losses, weights and Adam state as ordinary
    steps at the same (changing) learning rates, and the param groups keep a float learning rate for checkpoints."""
    ordinary, graphed = built_trainer(), built_trainer()
    graphed.step_graph = trainer.StepGraph(graphed, 8, capture=False, warmup_steps=2)
    cifar = data.load_cifar("cifar10", fake_cifar10, download=False)
    loader = data.DeviceTrainLoader(cifar.train_images[:44], cifar.train_labels[:44], 8, 0, "cpu")  # 5 full, 1 of 4
    learning_rates = []  # as Adam sees them: the graph's tensor on graph steps, a float on ordinary ones
    graphed.optimizer.register_step_pre_hook(lambda optimizer, *_: learning_rates.append(optimizer.param_groups[0]["lr"]))
    batches = [*loader.epoch(1), *loader.epoch(2), next(iter(loader.epoch(3)))]  # ends on a graph step
    assert [len(labels) for _, labels in batches] == [8, 8, 8, 8, 8, 4] * 2 + [8]
    static_inputs = set()  # a captured graph reads the memory it was captured with: the same buffers every step
    for step, (images, labels) in enumerate(batches):
        lr = 1e-3 * (1 + step % 3)  # a graph that kept its first learning rate would drift from the ordinary steps
        expected_loss, expected_correct = ordinary.train_step(images, labels, lr)
        loss, correct = graphed.train_step(images, labels, lr)
        assert torch.allclose(loss, expected_loss, rtol=1e-5, atol=1e-6), step
        assert correct == expected_correct
        if graphed.step_graph.images is not None:
            static_inputs.add(tuple(t.data_ptr() for t in (graphed.step_graph.images, graphed.step_graph.labels,
                                                          graphed.step_graph.lr)))
    assert len(static_inputs) == 1
    assert graphed.step_graph.replays == 11 - 2  # every full batch after the two warm-up steps
    assert [lr is graphed.step_graph.lr for lr in learning_rates] == [False, False, True, True, True, False,
                                                                     True, True, True, True, True, False, True]
    # Summed over all weights: the attention's key bias has a zero gradient up to rounding, which Adam scales up,
    # so its few entries differ by ~1e-5 between two equal computations summed in another order.
    assert relative_error(graphed.model.parameters(), ordinary.model.parameters()) < 1e-6
    ordinary_state, graphed_state = ordinary.optimizer.state_dict(), graphed.optimizer.state_dict()
    for key in ("step", "exp_avg", "exp_avg_sq"):
        assert relative_error([s[key] for s in graphed_state["state"].values()],
                            [s[key] for s in ordinary_state["state"].values()]) < 1e-6, key
    assert [(type(group["lr"]), group["lr"], group["capturable"]) for group in graphed_state["param_groups"]] == [
        (float, lr, False)]
    assert all(parameter.grad is None for parameter in graphed.model.parameters())


def test_a_failed_capture_stops_the_run_naming_the_mode_to_use_instead(monkeypatch):
    """A capture that fails (another GPU, driver or torch) ends the run with one line, not a traceback."""
    runner = built_trainer()
    runner.step_graph = trainer.StepGraph(runner, 8, warmup_steps=0)

    @contextlib.contextmanager
    def failing_capture(graph, capture_error_mode):
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nCUDA kernel errors ...")
        yield

    monkeypatch.setattr(torch.cuda, "CUDAGraph", object)
    monkeypatch.setattr(torch.cuda, "graph", failing_capture)
    with pytest.raises(trainer.TrainingStopped) as stopped:
        runner.train_step(torch.zeros(8, 3, 32, 32, dtype=torch.uint8), torch.arange(8), 1e-3)
    assert str(stopped.value) == ("capturing the training step as one CUDA graph failed (RuntimeError: CUDA error: "
                                  "operation not permitted when stream is capturing): run with --compile-mode "
                                  "reduce-overhead instead")
    assert stopped.value.exit_code == 1 and runner.step_graph.graph is None


def test_whole_step_mode_needs_cuda_and_compile():
    """On a CPU the model is not compiled, so there is no graph: the ordinary step, and the log says compile off."""
    runner = built_trainer([*FLAGS, "--compile-mode", "whole-step"])
    assert runner.step_graph is None and runner.compile_label() == "off"


def test_a_resumed_optimizer_keeps_this_runs_settings_and_the_checkpoints_moments():
    """An optimizer state saved by AdamW (weight decay 0.05), fused and capturable, loads into this run's Adam
    with its own settings: load_state_dict alone would take them all from the checkpoint (a changed
    --weight-decay, --beta1 or --optimizer would be ignored, and a CPU run resumed on a GPU would stay unfused,
    its step counts on the CPU, where a captured Adam step cannot read them). The moments are the checkpoint's."""
    source = built_trainer([*FLAGS, "--optimizer", "adamw", "--weight-decay", "0.05"])
    target = built_trainer([*FLAGS, "--weight-decay", "0", "--beta1", "0.8"])
    source.train_step(torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8), torch.arange(8), 1e-3)
    saved = source.optimizer.state_dict()
    for group in saved["param_groups"]:
        group.update(fused=True, capturable=True)
    def settings(optimizer):
        return [{key: value for key, value in group.items() if key != "params"} for group in optimizer.param_groups]

    expected = settings(target.optimizer)
    resume.load_optimizer_state(target.optimizer, saved)
    loaded = settings(target.optimizer)
    assert loaded == expected
    assert [(group["weight_decay"], group["betas"], group["fused"]) for group in loaded] == [(0.0, (0.8, 0.999), False)]
    assert not loaded[0].get("decoupled_weight_decay", False)  # torch's Adam does AdamW's decay with this set
    for mine, theirs in zip(target.model.parameters(), source.model.parameters()):
        assert torch.equal(target.optimizer.state[mine]["exp_avg"], source.optimizer.state[theirs]["exp_avg"])
