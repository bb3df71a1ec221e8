"""nnU-Net's local logger with the SMMS curves: supervised loss per branch, mutual-learning loss and pseudo
Dice per branch, all drawn into the usual progress.png."""
import matplotlib

matplotlib.use("agg")
import matplotlib.pyplot as plt  # noqa: E402
from nnunetv2.training.logging.nnunet_logger import LocalLogger  # noqa: E402

SMMS_KEYS = ("train_loss_sup_a", "train_loss_sup_b", "train_loss_unsup", "unsup_weight",
             "mean_fg_dice_a", "mean_fg_dice_b", "skipped_steps")


class SMMSLocalLogger(LocalLogger):
    def __init__(self, verbose: bool = False):
        super().__init__(verbose)
        for k in SMMS_KEYS:
            self.my_fantastic_logging[k] = list()

    def load_checkpoint(self, checkpoint: dict):
        super().load_checkpoint(checkpoint)
        n = len(self.my_fantastic_logging.get("train_losses", []))
        for k in SMMS_KEYS:  # checkpoints of older versions: keep the lists aligned with the epochs
            self.my_fantastic_logging.setdefault(k, [float("nan")] * n)

    def plot_progress_png(self, output_folder):
        log = self.my_fantastic_logging
        epoch = min(len(v) for v in log.values()) - 1
        if epoch < 0:
            return
        x = list(range(epoch + 1))

        def series(key):
            return log[key][:epoch + 1]

        fig, axes = plt.subplots(4, 1, figsize=(14, 22))
        ax = axes[0]
        ax.plot(x, series("train_losses"), "b-", label="loss_tr (total)", lw=2)
        ax.plot(x, series("val_losses"), "r-", label="loss_val", lw=2)
        ax2 = ax.twinx()
        ax2.plot(x, series("mean_fg_dice"), "g:", label="pseudo dice (fused)", lw=2)
        ax2.plot(x, series("ema_fg_dice"), "g-", label="pseudo dice fused (mov. avg.)", lw=2)
        ax.set_ylabel("loss")
        ax2.set_ylabel("pseudo dice")
        ax.legend(loc="upper left")
        ax2.legend(loc="upper right")
        ax.set_title("nnU-Net progress (fused output)")

        ax = axes[1]
        ax.plot(x, series("train_loss_sup_a"), "-", color="tab:blue", label="L_sup branch a", lw=2)
        ax.plot(x, series("train_loss_sup_b"), "-", color="tab:orange", label="L_sup branch b", lw=2)
        ax.set_ylabel("supervised loss (Dice + CE)")
        ax2 = ax.twinx()
        ax2.plot(x, series("train_loss_unsup"), "--", color="tab:purple", label="L_unsup (MCML)", lw=2)
        ax2.set_ylabel("mutual-learning loss")
        ax.legend(loc="upper left")
        ax2.legend(loc="upper right")
        ax.set_title("loss per branch")

        ax = axes[2]
        ax.plot(x, series("mean_fg_dice_a"), "-", color="tab:blue", label="pseudo dice branch a", lw=2)
        ax.plot(x, series("mean_fg_dice_b"), "-", color="tab:orange", label="pseudo dice branch b", lw=2)
        ax.plot(x, series("mean_fg_dice"), "-", color="tab:green", label="pseudo dice fused", lw=2)
        ax.set_ylabel("pseudo dice")
        ax.legend(loc="upper left")
        ax.set_title("validation pseudo dice per branch")

        ax = axes[3]
        ax.plot(x, [e - s for e, s in zip(series("epoch_end_timestamps"), series("epoch_start_timestamps"))],
                "b-", label="epoch duration [s]", lw=2)
        ax.set_ylabel("seconds")
        ax2 = ax.twinx()
        ax2.plot(x, series("lrs"), "k--", label="learning rate", lw=1)
        ax.legend(loc="upper left")
        ax2.legend(loc="upper right")
        for a in axes:
            a.set_xlabel("epoch")
        fig.tight_layout()
        fig.savefig(f"{output_folder}/progress.png")
        plt.close(fig)
