"""nnU-Net's local logger, generic over named loss terms: whatever a trainer logs (``train_loss_*`` terms, pseudo
Dice per output ``mean_fg_dice_*``, the unsupervised weight, skipped steps) is registered on first use and drawn
into the usual progress.png, with no per-method code."""
import matplotlib

matplotlib.use("agg")
import matplotlib.pyplot as plt  # noqa: E402
from nnunetv2.training.logging.nnunet_logger import LocalLogger  # noqa: E402

NNUNET_KEYS = ("mean_fg_dice", "ema_fg_dice", "dice_per_class_or_region", "train_losses", "val_losses", "lrs",
               "epoch_start_timestamps", "epoch_end_timestamps")


class SemiSupervisedLogger(LocalLogger):
    def log(self, key, value, epoch: int):
        # a key seen for the first time (or new to a resumed run) is padded with NaN to stay aligned with the epochs
        self.my_fantastic_logging.setdefault(key, [])
        while len(self.my_fantastic_logging[key]) < epoch:
            self.my_fantastic_logging[key].append(float("nan"))
        super().log(key, value, epoch)

    def extra_keys(self, prefix: str):
        return [k for k in self.my_fantastic_logging if k.startswith(prefix) and k not in NNUNET_KEYS]

    def plot_progress_png(self, output_folder):
        log = self.my_fantastic_logging
        epoch = min(len(log[k]) for k in NNUNET_KEYS if k in log) - 1
        if epoch < 0:
            return
        x = list(range(epoch + 1))

        def series(key):
            values = log[key][:epoch + 1]
            return values + [float("nan")] * (epoch + 1 - len(values))

        terms = self.extra_keys("train_loss_")
        dice = self.extra_keys("mean_fg_dice_")
        fig, axes = plt.subplots(4, 1, figsize=(14, 22))
        ax = axes[0]
        ax.plot(x, series("train_losses"), "b-", label="loss_tr (total)", lw=2)
        ax.plot(x, series("val_losses"), "r-", label="loss_val", lw=2)
        ax2 = ax.twinx()
        ax2.plot(x, series("mean_fg_dice"), "g:", label="pseudo dice", lw=2)
        ax2.plot(x, series("ema_fg_dice"), "g-", label="pseudo dice (mov. avg.)", lw=2)
        ax.set_ylabel("loss")
        ax2.set_ylabel("pseudo dice")
        ax.legend(loc="upper left")
        ax2.legend(loc="upper right")
        ax.set_title("nnU-Net progress (the output that predicts)")

        ax = axes[1]
        for key in terms:
            ax.plot(x, series(key), "-", label=key[len("train_"):], lw=2)
        if "unsup_weight" in log:
            ax2 = ax.twinx()
            ax2.plot(x, series("unsup_weight"), "k:", label="unsupervised weight", lw=1)
            ax2.set_ylabel("weight")
            ax2.legend(loc="upper right")
        ax.set_ylabel("loss term (unweighted)")
        ax.legend(loc="upper left")
        ax.set_title("loss terms")

        ax = axes[2]
        for key in dice:
            ax.plot(x, series(key), "-", label="pseudo dice " + key[len("mean_fg_dice_"):], lw=2)
        ax.plot(x, series("mean_fg_dice"), "-", color="tab:green", label="pseudo dice (predicting output)", lw=2)
        ax.set_ylabel("pseudo dice")
        ax.legend(loc="upper left")
        ax.set_title("validation pseudo dice per output")

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
