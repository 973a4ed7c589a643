"""results.png: training curves of a run, rewritten after every epoch so a long run can be watched."""
import matplotlib

matplotlib.use("Agg")  # no display under nohup
import matplotlib.pyplot as plt  # noqa: E402

from checkpoint import atomic_file  # noqa: E402


def plot_results(history: list, path: str) -> None:
    """Loss (train, test), accuracy (train, test, best epoch marked) and the learning rate, per epoch."""
    epochs = [row["epoch"] for row in history]
    figure, (loss_axis, acc_axis, lr_axis) = plt.subplots(
        1, 3, figsize=(15, 4.2), gridspec_kw={"width_ratios": [1, 1, 0.6]})
    loss_axis.plot(epochs, [r["train_loss"] for r in history], label="train")
    loss_axis.plot(epochs, [r["test_loss"] for r in history], label="test")
    loss_axis.set(title="loss", xlabel="epoch")
    acc_axis.plot(epochs, [r["train_acc"] for r in history], label="train")
    acc_axis.plot(epochs, [r["test_acc"] for r in history], label="test")
    if history:
        best = max(history, key=lambda r: r["test_acc"])
        acc_axis.scatter([best["epoch"]], [best["test_acc"]], color="red", zorder=3,
                         label=f"best {best['test_acc']:.2f}% (epoch {best['epoch']})")
    acc_axis.set(title="accuracy (%)", xlabel="epoch")
    lr_axis.plot(epochs, [r["lr"] for r in history], color="gray")
    lr_axis.set(title="learning rate (end of epoch)", xlabel="epoch")
    lr_axis.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    for axis in (loss_axis, acc_axis):
        axis.legend()
    for axis in (loss_axis, acc_axis, lr_axis):
        axis.grid(alpha=0.3)
    figure.tight_layout()
    try:
        with atomic_file(path) as f:
            figure.savefig(f, format="png", dpi=100)
    finally:
        plt.close(figure)
