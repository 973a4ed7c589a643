"""The defaults are the reference recipe, and each value reaches what it controls: the optimizer, the loss,
the model, the data pipeline and the learning rate the optimizer applies at every step."""
import csv
import dataclasses
import os
import types

import pytest
import torch
import torch.nn.functional as F

import checkpoint
import data
import main
import resume
import trainer
from conftest import TINY_MODEL
from models import ViTConfig, count_parameters


def test_default_flags_build_the_reference_recipe():
    args = main.parse_args(["--device", "cpu"])
    assert (args.epochs, args.batch_size, args.lr, args.min_lr, args.warmup_epochs) == (200, 128, 1e-3, 1e-5, 5)
    assert args.data_pipeline == "device" and args.dataset == "cifar10"
    runner = trainer.Trainer(args)
    runner.build(10)

    optimizer = runner.optimizer
    assert type(optimizer) is torch.optim.Adam  # L2 weight decay added to the gradient, not AdamW's decoupled one
    (group,) = optimizer.param_groups
    assert group["betas"] == (0.9, 0.999) and group["weight_decay"] == 5e-5 and group["lr"] == 1e-3
    assert not group.get("decoupled_weight_decay", False)
    assert sum(p.numel() for p in group["params"]) == count_parameters(runner.model)

    config = runner.model_config
    assert (config.layers, config.hidden, config.mlp_hidden, config.heads, config.patch_size) == (7, 384, 384, 12, 4)
    assert config.dropout == 0.0 and config.mlp_final_gelu and config.init == "pytorch" and config.num_classes == 10
    assert count_parameters(runner.model) == 6_268_810
    mlp, x = runner.model.layers[0].mlp, torch.randn(2, 65, 384)
    assert torch.equal(mlp(x), F.gelu(mlp.fc2(F.gelu(mlp.fc1(x)))))  # a GELU after the second linear too

    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 3, 5, 9])
    loss, _ = runner.loss_and_predictions(runner.model, images, labels)
    with torch.no_grad(), runner.autocast():
        logits = runner.model(data.normalize(images)).float()
    assert loss.item() == pytest.approx(F.cross_entropy(logits, labels, label_smoothing=0.1).item(), rel=1e-6)
    assert loss.item() != pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-3)  # the smoothing counts


def test_the_optimizer_applies_the_scheduled_rate_at_every_step(tmp_path, fake_cifar10, monkeypatch):
    """200 images in batches of 64 (the last of 8, kept): 4 steps per epoch, 0.9 warm-up epochs (3.6 steps, taken
    as 4) of 3. The rate Adam reads at each step is the schedule's at that global step, and metrics.csv's lr is the
    epoch's last."""
    applied = []
    build = trainer.Trainer.build

    def build_and_watch(self, *args, **kwargs):
        build(self, *args, **kwargs)
        self.optimizer.register_step_pre_hook(lambda optimizer, *_: applied.append(optimizer.param_groups[0]["lr"]))

    monkeypatch.setattr(trainer.Trainer, "build", build_and_watch)
    out_dir = str(tmp_path / "run")
    args = main.parse_args(["--device", "cpu", "--data-dir", fake_cifar10, "--out-dir", out_dir, "--epochs", "3",
                            "--warmup-epochs", "0.9", "--batch-size", "64", "--lr", "2e-3", "--min-lr", "1e-4",
                            *TINY_MODEL])
    trainer.Trainer(args).fit()

    assert applied == [trainer.learning_rate(step, 12, 4, 2e-3, 1e-4) for step in range(12)]
    assert applied[:4] == pytest.approx([5e-4, 1e-3, 1.5e-3, 2e-3]) and applied[-1] == pytest.approx(1e-4)
    assert all(a > b for a, b in zip(applied[4:], applied[5:]))  # per step, not per epoch
    with open(os.path.join(out_dir, "metrics.csv")) as f:
        logged = [float(row["lr"]) for row in csv.DictReader(f)]
    assert logged == pytest.approx([applied[3], applied[7], applied[11]], rel=1e-4)


def test_an_epochs_metrics_are_per_image_means_over_every_image_seen(monkeypatch):
    """Batches of 64, 64, 64 and 8 with scripted mean losses and correct counts: train_loss weighs each batch's
    mean by its images, train_acc is a percentage of the 200, and images/s is the 200 over the training time."""
    runner = trainer.Trainer(main.parse_args(["--device", "cpu", "--batch-size", "64", *TINY_MODEL]))
    runner.build(10)
    sizes, losses, correct = [64, 64, 64, 8], iter([2.0, 1.0, 0.5, 3.0]), iter([32, 48, 64, 8])

    class Loader:
        num_samples = 200

        def epoch(self, epoch):
            for n in sizes:
                yield torch.zeros(n, 3, 32, 32, dtype=torch.uint8), torch.arange(n) % 10
    runner.train_step = lambda images, labels, lr, global_batch=None: (torch.tensor(next(losses)),
                                                                        torch.tensor(next(correct)))
    times = [100.0, 100.0, 104.0]  # the epoch's start, this session's start, the end of its training (then stays)
    clock = types.SimpleNamespace(time=lambda: times.pop(0) if len(times) > 1 else times[0])
    monkeypatch.setattr(trainer, "time", clock)
    row, _ = runner.train_epoch(1, Loader(), 4, 8, 0, None)
    assert row["train_loss"] == pytest.approx((2.0 * 64 + 1.0 * 64 + 0.5 * 64 + 3.0 * 8) / 200)
    assert row["train_acc"] == pytest.approx(100.0 * 152 / 200)
    assert row["images_per_second"] == pytest.approx(200 / 4.0)


def test_evaluation_runs_the_model_in_eval_mode_and_gives_a_percentage():
    """With --dropout 0.5 an evaluation in training mode would be random; it is the eval-mode model's, twice alike,
    and the model goes back to training mode."""
    runner = trainer.Trainer(main.parse_args(["--device", "cpu", "--precision", "fp32", "--dropout", "0.5",
                                              "--eval-batch-size", "16", *TINY_MODEL]))
    runner.build(10)
    images = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    runner.model.eval()
    with torch.no_grad():
        logits = runner.model(data.normalize(images))
    predicted = logits.argmax(-1)
    labels = torch.where(torch.arange(40) < 20, predicted, (predicted + 1) % 10)  # right on exactly half
    runner.model.train()
    first, second = runner.evaluate(images, labels), runner.evaluate(images, labels)
    assert first[1] == second[1] == 50.0 and torch.equal(first[2], predicted)
    assert first[0] == pytest.approx(F.cross_entropy(logits, labels, label_smoothing=0.1).item(), rel=1e-5)
    assert runner.model.training


def test_every_model_flag_reaches_the_model():
    """A flag in main.py's model group is a ViTConfig field (else the model would silently ignore it), and every
    field but the data's shape has a flag; their values reach the built model."""
    model_group = next(group for group in main.build_parser()._action_groups if group.title == "model")
    flags = {action.dest for action in model_group._group_actions}
    fields = {field.name for field in dataclasses.fields(ViTConfig)}
    assert flags <= fields
    assert fields - flags == {"image_size", "in_channels", "num_classes"}
    runner = trainer.Trainer(main.parse_args(["--device", "cpu", "--layers", "3", "--hidden", "48", "--mlp-hidden",
                                              "40", "--heads", "6", "--patch-size", "8", "--dropout", "0.25",
                                              "--init", "timm", "--attention", "math", "--no-mlp-final-gelu"]))
    runner.build(100)
    assert runner.model_config == ViTConfig(layers=3, hidden=48, mlp_hidden=40, heads=6, patch_size=8, dropout=0.25,
                                            init="timm", attention="math", mlp_final_gelu=False, num_classes=100)
    assert len(runner.model.layers) == 3 and not runner.model.layers[0].mlp.final_gelu


def test_a_resume_names_every_changed_training_flag_a_new_one_too():
    """Every flag but those that choose how to compute or report is compared with the checkpoint's; a flag the
    checkpoint does not know (it is older than the flag) is compared with the flag's default."""
    args = main.parse_args(["--device", "cpu", "--lr", "2e-3"])
    assert set(resume.COMPUTE_AND_OUTPUT_FLAGS) <= set(vars(args))  # no misspelt entry
    stored = {k: v for k, v in vars(args).items() if k != "lr"}  # saved before --lr existed: its default held
    stored.update({flag: f"other {flag}" for flag in resume.COMPUTE_AND_OUTPUT_FLAGS})  # silent, all of them
    args.no_autoaugment, stored["no_autoaugment"] = True, False  # as if a researcher had added --no-autoaugment
    notes = resume.check_recipe_flags({"config": stored}, "last.pt", args, stopped_mid_epoch=False)
    assert notes == ["note: resuming with changed flags (--lr 0.001 in the checkpoint, 0.002 now; "
                     "--no-autoaugment False in the checkpoint, True now); the run goes on with the new values"]
    assert resume.check_recipe_flags({"config": vars(args)}, "last.pt", args, stopped_mid_epoch=False) == []


@pytest.mark.parametrize("pipeline, named", [("torchvision", True), ("device", False)])
def test_a_resume_names_changed_workers_where_they_change_the_augmentation(pipeline, named):
    """The torchvision pipeline's workers each draw their own augmentation stream; the device pipeline has none."""
    args = main.parse_args(["--device", "cpu", "--data-pipeline", pipeline, "--workers", "3"])
    stored = {**vars(args), "workers": 1}
    notes = resume.check_recipe_flags({"config": stored}, "last.pt", args, stopped_mid_epoch=False)
    assert ("--workers 1 in the checkpoint, 3 now" in " ".join(notes)) == named


def test_a_resume_names_a_changed_data_pipeline():
    """The two pipelines draw their augmentations apart: switching changes the run's course, so the log says so."""
    args = main.parse_args(["--device", "cpu", "--data-pipeline", "torchvision"])
    notes = resume.check_recipe_flags({"config": {**vars(args), "data_pipeline": "device"}}, "last.pt", args,
                                      stopped_mid_epoch=True)
    assert notes == ["note: resuming with changed flags (--data-pipeline device in the checkpoint, torchvision now); "
                     "the run goes on with the new values"]


def test_a_resume_compares_the_model_with_an_older_checkpoints_defaults():
    """A model field the checkpoint does not know had its default then: --no-mlp-final-gelu differs from it."""
    wanted = trainer.model_config_from_args(main.parse_args(["--no-mlp-final-gelu", *TINY_MODEL]), 10, "math")
    saved = dataclasses.asdict(trainer.model_config_from_args(main.parse_args(TINY_MODEL), 10, "math"))
    del saved["mlp_final_gelu"]
    with pytest.raises(checkpoint.CheckpointError, match="mlp_final_gelu: checkpoint True, flags False"):
        resume.check_model({"model_config": saved}, "old.pt", wanted)
    saved["mlp_final_gelu"] = False
    resume.check_model({"model_config": saved}, "old.pt", wanted)  # the same model: no error
