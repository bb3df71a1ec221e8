"""nnUNetTrainerSMMS: semi-supervised multi-modal segmentation (Meng et al. 2025) inside nnU-Net.

Everything not named here is nnU-Net's own: planning, preprocessing, the labeled data loader and its
augmentation, Dice + CE with deep supervision, SGD + poly LR, checkpoints, the final validation and prediction.
What this trainer changes:
- the network: two planned encoder-decoders, one per modality, joined by MMF and MAE (architectures/);
- each training batch: the planned labeled batch plus an unlabeled batch (same size by default; the paper's
  2 + 2) drawn from nnUNet_preprocessed/<dataset>/<data_identifier>_unlabeled through nnU-Net's dataset class,
  augmentation and background workers; the two parts get their own forward + backward pass and one optimizer
  step (separate_unlabeled_pass: same update as one joint pass, half the peak activation memory);
- the loss: L = L_sup(a) + L_sup(b) + alpha * L_unsup (MCML, trainers/mutual_learning.py);
- logging: L_sup per branch, L_unsup and pseudo Dice per branch, drawn into progress.png;
- checkpoints: checkpoint_latest.pth every epoch (nnU-Net: every 50), always written to a temporary file and
  renamed, so a killed run loses at most one epoch and never leaves a half-written checkpoint.

Switches are class attributes; the ablation trainers (variants.py) flip them.
Environment variables (all optional):
  nnUNet_smms_channel_split        "A|B" channels per branch, e.g. "0|1" or "T1,T1ce|T2,FLAIR"
  nnUNet_smms_unlabeled_batch_size unlabeled cases per step (global over GPUs; default: the planned batch size)
  nnUNet_smms_epochs / nnUNet_smms_iterations_per_epoch / nnUNet_smms_val_iterations   shorter schedules
  nnUNet_smms_output_branch        fused | a | b: what the network returns at inference (nnUNetv2_predict)
  nnUNet_smms_seed                 seed Python, NumPy and torch at start-up; with nnUNet_n_proc_DA=0 (augmentation in
                                   the main process) two CPU runs then give the same losses
"""
import os
import random
from typing import List

import numpy as np
import torch
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from nnunetv2.paths import nnUNet_raw
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
from nnunetv2.training.loss.dice import get_tp_fp_fn_tn
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.collate_outputs import collate_outputs
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA
from nnunetv2.utilities.helpers import dummy_context
from torch import autocast
from torch import distributed as dist

from nnunetv2_smms.architectures import SMMSNetworkConfig, build_from_configuration, resolve_channel_split, unwrap
from nnunetv2_smms.architectures.config import branch_channel_names
from nnunetv2_smms.architectures.dual_branch import DualBranchUNet
from nnunetv2_smms.trainers.mutual_learning import MutualLearningLoss, unsupervised_weight
from nnunetv2_smms.trainers.progress import SMMSLocalLogger
from nnunetv2_smms.unlabeled.loader import UnlabeledDataLoader, batch_share
from nnunetv2_smms.unlabeled.preprocess import check_unlabeled_ready


def _env_int(name: str, default):
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} must be an integer") from None


class nnUNetTrainerSMMS(nnUNetTrainer):
    # --- SMMS switches (ablations flip these) ---
    use_mmf = True
    use_mae = True
    use_mcml = True
    mmf_stages = 4
    mmf_mode = "residual_gate"
    mmf_kernel_size = 3          # paper; 1 = light MMF (pointwise convolutions)
    mae_position = "bottleneck"
    dropout_p = 0.5
    # --- mutual learning ---
    unsup_alpha = 1.0            # paper: alpha = 1.0
    unsup_rampup_epochs = 0      # > 0: sigmoid ramp-up of alpha over that many epochs
    unlabeled_batch_size = None  # global; None = the planned (labeled) batch size
    # True: the labeled and the unlabeled part of a step get their own forward + backward pass (gradients summed
    # before the optimizer step): the same gradients as one pass over the joined batch (every layer works per
    # sample: instance norm, MMF, MAE, dropout), about half the peak activation memory, and faster on CPUs.
    # False: one pass over labeled + unlabeled cases joined (plans with batch norm differ between the two).
    separate_unlabeled_pass = True
    # --- robustness ---
    max_consecutive_bad_steps = 25  # non-finite losses in a row before the run stops

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.seed = _env_int("nnUNet_smms_seed", None)
        if self.seed is not None:
            random.seed(self.seed)
            np.random.seed(self.seed)
            torch.manual_seed(self.seed)
        self.num_epochs = _env_int("nnUNet_smms_epochs", self.num_epochs)
        self.num_iterations_per_epoch = _env_int("nnUNet_smms_iterations_per_epoch", self.num_iterations_per_epoch)
        self.num_val_iterations_per_epoch = _env_int("nnUNet_smms_val_iterations", self.num_val_iterations_per_epoch)
        self.unlabeled_batch_size = _env_int("nnUNet_smms_unlabeled_batch_size", self.unlabeled_batch_size)
        self.save_every = 1

        channels_a, channels_b = resolve_channel_split(dataset_json)
        self.smms_config = SMMSNetworkConfig(
            channels_a=channels_a, channels_b=channels_b, mmf=self.use_mmf, mmf_stages=self.mmf_stages,
            mmf_mode=self.mmf_mode, mmf_kernel_size=self.mmf_kernel_size, mae=self.use_mae,
            mae_position=self.mae_position, dropout_p=self.dropout_p)
        # record the settings in the plans that on_train_start copies into the model folder: nnU-Net's predictor
        # rebuilds the network from those plans alone (see architectures/config.py)
        self.plans_manager.plans["configurations"][configuration]["smms"] = self.smms_config.to_dict()
        self.configuration_manager.configuration["smms"] = self.smms_config.to_dict()

        self.logger.local_logger = SMMSLocalLogger()
        self.mutual_loss = MutualLearningLoss(use_sigmoid=self.label_manager.has_regions)
        self.dataloader_unlabeled = None
        self._unsup_weight = self.unsup_alpha
        self._bad_steps_in_a_row = 0
        self.print_to_log_file(
            f"SMMS: branch a = channels {channels_a} ({branch_channel_names(dataset_json, channels_a)}), branch b = "
            f"channels {channels_b} ({branch_channel_names(dataset_json, channels_b)}); MMF={self.use_mmf} "
            f"({self.mmf_mode}, kernel {self.mmf_kernel_size}), MAE={self.use_mae} ({self.mae_position}), "
            f"MCML={self.use_mcml} "
            f"(alpha={self.unsup_alpha}, ramp-up {self.unsup_rampup_epochs} epochs), dropout={self.dropout_p}",
            also_print_to_console=True)

    # ------------------------------------------------------------------------------------------------ network
    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True):
        return build_from_configuration(configuration_manager, num_input_channels, num_output_channels,
                                        enable_deep_supervision)

    def set_deep_supervision_enabled(self, enabled: bool):
        unwrap(self.network).set_deep_supervision(enabled)

    # ------------------------------------------------------------------------------------------------ data
    def get_dataloaders(self):
        if self.use_mcml:  # check the unlabeled data before nnU-Net starts its workers
            self.dataloader_unlabeled = self.get_unlabeled_dataloader()
        return super().get_dataloaders()

    def global_unlabeled_batch_size(self) -> int:
        return self.unlabeled_batch_size or self.configuration_manager.batch_size

    def get_unlabeled_dataloader(self):
        if self.is_cascaded:
            raise NotImplementedError("SMMS does not support cascade configurations (the unlabeled cases have no "
                                      "previous-stage predictions); train 3d_fullres, 3d_lowres or 2d")
        dataset_name = self.plans_manager.dataset_name
        folder = check_unlabeled_ready(
            dataset_name, self.preprocessed_dataset_folder_base,
            os.path.join(nnUNet_raw.get(), dataset_name) if nnUNet_raw.is_set() else None,
            self.plans_manager.plans, self.configuration_name, self.dataset_json, self.plans_manager.plans_name)
        dataset = nnUNetDatasetBlosc2(folder)
        rotation, dummy_2d, initial_patch_size, mirror_axes = \
            self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        transforms = self.get_training_transforms(
            self.configuration_manager.patch_size, rotation, None, mirror_axes, dummy_2d,
            use_mask_for_norm=self.configuration_manager.use_mask_for_norm, is_cascaded=False,
            foreground_labels=self.label_manager.foreground_labels,
            regions=self.label_manager.foreground_regions if self.label_manager.has_regions else None,
            ignore_label=self.label_manager.ignore_label)
        world, rank = (dist.get_world_size(), dist.get_rank()) if self.is_ddp else (1, 0)
        batch_size = batch_share(self.global_unlabeled_batch_size(), world, rank)
        loader = UnlabeledDataLoader(dataset, batch_size, initial_patch_size, self.configuration_manager.patch_size,
                                     self.label_manager, transforms=transforms)
        self.print_to_log_file(f"SMMS: {len(dataset.identifiers)} unlabeled cases from {folder}, {batch_size} per "
                               f"step on this rank (labeled: {self.batch_size})", also_print_to_console=True)
        n_proc = get_allowed_n_proc_DA()
        if n_proc == 0:
            return SingleThreadedAugmenter(loader, None)
        return NonDetMultiThreadedAugmenter(loader, None, n_proc, max(6, n_proc // 2), None,
                                            pin_memory=self.device.type == "cuda", wait_time=0.002)

    def on_train_end(self):
        super().on_train_end()
        if isinstance(self.dataloader_unlabeled, NonDetMultiThreadedAugmenter):
            self.dataloader_unlabeled._finish()

    # ------------------------------------------------------------------------------------------------ training
    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        self._unsup_weight = unsupervised_weight(self.unsup_alpha, self.current_epoch, self.unsup_rampup_epochs)

    def compute_losses(self, out_a, out_b, target, n_labeled: int, with_unsup: bool) -> dict:
        """Losses of one pass whose first n_labeled samples are labeled (target) and the rest unlabeled."""
        def labeled(o):
            return [x[:n_labeled] for x in o] if isinstance(o, (list, tuple)) else o[:n_labeled]

        def full_res(o):
            return o[0] if isinstance(o, (list, tuple)) else o

        zero = torch.zeros((), device=full_res(out_a).device)
        sup_a = self.loss(labeled(out_a), target) if n_labeled else zero
        sup_b = self.loss(labeled(out_b), target) if n_labeled else zero
        unsup = self.mutual_loss(full_res(out_a)[n_labeled:], full_res(out_b)[n_labeled:]) if with_unsup else zero
        total = sup_a + sup_b + self._unsup_weight * unsup
        if self.is_ddp and n_labeled == 0 and isinstance(out_a, (list, tuple)):
            # unlabeled-only pass: L_unsup uses the full-resolution outputs only. DDP (find_unused_parameters=False,
            # as nnU-Net wraps the network) needs a gradient, even a zero one, for every parameter in every synced
            # backward, so the lower-resolution seg heads enter with weight 0 (nnU-Net itself gives its lowest
            # deep-supervision output the weight 1e-6 under DDP for the same reason)
            total = total + 0.0 * sum(o.float().mean() for o in list(out_a[1:]) + list(out_b[1:]))
        return {"loss": total, "loss_sup_a": sup_a, "loss_sup_b": sup_b, "loss_unsup": unsup}

    def _all_ranks_finite(self, loss: torch.Tensor) -> bool:
        finite = torch.isfinite(loss.detach()).float()
        if self.is_ddp:  # every rank must take the same decision, or the gradient all-reduce hangs
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        return bool(finite.item())

    def _forward_losses(self, data, target, n_labeled: int, with_unsup: bool) -> dict:
        with autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context():
            out_a, out_b = self.network(data)
            return self.compute_losses(out_a, out_b, target, n_labeled, with_unsup)

    def _backward(self, loss: torch.Tensor) -> None:
        (self.grad_scaler.scale(loss) if self.grad_scaler is not None else loss).backward()

    def _skip_step(self, losses: dict, batch: dict) -> dict:
        """A non-finite loss (on every rank): no update; stop after max_consecutive_bad_steps in a row."""
        self.optimizer.zero_grad(set_to_none=True)
        self._bad_steps_in_a_row += 1
        self.print_to_log_file(f"WARNING: non-finite loss ({', '.join(f'{k}={v.item():.4g}' for k, v in losses.items())}"
                               f") on cases {list(batch.get('keys', []))}; step skipped "
                               f"({self._bad_steps_in_a_row} in a row)")
        if self._bad_steps_in_a_row >= self.max_consecutive_bad_steps:
            raise RuntimeError(
                f"{self._bad_steps_in_a_row} consecutive training steps had a non-finite loss; stopping. The "
                f"last good checkpoint is {os.path.join(self.output_folder, 'checkpoint_latest.pth')} (resume "
                f"with --c after fixing the data or lowering the learning rate).")
        return {k: np.array(np.nan) for k in losses} | {"skipped": np.array(1.0)}

    def train_step(self, batch: dict) -> dict:
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"]
        target = [t.to(self.device, non_blocking=True) for t in target] if isinstance(target, list) \
            else target.to(self.device, non_blocking=True)
        n_labeled = data.shape[0]
        unlabeled = None
        if self.use_mcml:
            unlabeled = next(self.dataloader_unlabeled)["data"].to(self.device, non_blocking=True)
        separate = unlabeled is not None and self.separate_unlabeled_pass
        self.optimizer.zero_grad(set_to_none=True)

        if not separate:  # one pass: the labeled batch, joined with the unlabeled one if there is one
            joint = unlabeled is not None
            losses = self._forward_losses(torch.cat((data, unlabeled), 0) if joint else data, target, n_labeled,
                                          joint)
            if not self._all_ranks_finite(losses["loss"]):
                return self._skip_step(losses, batch)
            self._backward(losses["loss"])
        else:
            # under DDP the gradients are all-reduced once, after the second backward (no_sync must cover the
            # first pass's forward too: DDP decides in forward whether the next backward synchronizes). One
            # finiteness check (one host sync) after both passes: a non-finite part leaves NaN gradients, which
            # _skip_step drops before any optimizer or grad-scaler step.
            with self.network.no_sync() if self.is_ddp else dummy_context():
                losses = self._forward_losses(data, target, n_labeled, False)
                self._backward(losses["loss"])
            unl = self._forward_losses(unlabeled, None, 0, True)
            self._backward(unl["loss"])
            losses["loss_unsup"] = unl["loss_unsup"]
            losses["loss"] = losses["loss"].detach() + unl["loss"].detach()
            if not self._all_ranks_finite(losses["loss"]):
                return self._skip_step(losses, batch)
        self._bad_steps_in_a_row = 0

        if self.grad_scaler is not None:
            self.grad_scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
            self.optimizer.step()
        return {k: v.detach().cpu().numpy() for k, v in losses.items()} | {"skipped": np.array(0.0)}

    def _mean_over_ranks(self, values: np.ndarray) -> float:
        values = np.asarray(values, dtype=float).ravel()
        if self.is_ddp:
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, values)
            values = np.concatenate(gathered)
        return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")

    def on_train_epoch_end(self, train_outputs: List[dict]):
        outputs = collate_outputs(train_outputs)
        e = self.current_epoch
        self.logger.log("train_losses", self._mean_over_ranks(outputs["loss"]), e)
        for key in ("loss_sup_a", "loss_sup_b", "loss_unsup"):
            self.logger.log("train_" + key, self._mean_over_ranks(outputs[key]), e)
        self.logger.log("unsup_weight", self._unsup_weight, e)
        self.logger.log("skipped_steps", int(round(self._mean_over_ranks(outputs["skipped"]) * len(train_outputs))), e)

    # ------------------------------------------------------------------------------------------------ validation
    def _hard_tp_fp_fn(self, output: torch.Tensor, target: torch.Tensor):
        """nnU-Net's online pseudo-Dice statistics (as in nnUNetTrainer.validation_step) for one output."""
        axes = [0] + list(range(2, output.ndim))
        lm = self.label_manager
        if lm.has_regions:
            pred = (torch.sigmoid(output) > 0.5).long()
        else:
            pred = torch.zeros(output.shape, device=output.device, dtype=torch.float16)
            pred.scatter_(1, output.argmax(1)[:, None], 1)
        mask = None
        if lm.has_ignore_label:
            if not lm.has_regions:
                mask = (target != lm.ignore_label).float()
                target = torch.where(target == lm.ignore_label, torch.zeros_like(target), target)
            else:
                mask = ~target[:, -1:] if target.dtype == torch.bool else 1 - target[:, -1:]
                target = target[:, :-1]
        tp, fp, fn, _ = get_tp_fp_fn_tn(pred, target, axes=axes, mask=mask)
        tp, fp, fn = (x.detach().cpu().numpy() for x in (tp, fp, fn))
        if not lm.has_regions:
            tp, fp, fn = tp[1:], fp[1:], fn[1:]
        return tp, fp, fn

    def validation_step(self, batch: dict) -> dict:
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"]
        target = [t.to(self.device, non_blocking=True) for t in target] if isinstance(target, list) \
            else target.to(self.device, non_blocking=True)
        with autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context():
            out_a, out_b = unwrap(self.network).forward_branches(data)
            loss = self.loss(out_a, target) + self.loss(out_b, target)
        if self.enable_deep_supervision:
            out_a, out_b, target = out_a[0], out_b[0], target[0]
        result = {"loss": loss.detach().cpu().numpy()}
        for suffix, out in (("", DualBranchUNet.fuse(out_a, out_b)), ("_a", out_a), ("_b", out_b)):
            tp, fp, fn = self._hard_tp_fp_fn(out, target)
            result.update({"tp_hard" + suffix: tp, "fp_hard" + suffix: fp, "fn_hard" + suffix: fn})
        return result

    def _sum_over_ranks(self, x: np.ndarray) -> np.ndarray:
        if not self.is_ddp:
            return x
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, x)
        return np.sum(gathered, 0)

    def on_validation_epoch_end(self, val_outputs: List[dict]):
        super().on_validation_epoch_end(val_outputs)  # fused output: nnU-Net's pseudo Dice, EMA and best checkpoint
        outputs = collate_outputs(val_outputs)
        for b in ("a", "b"):
            tp, fp, fn = (self._sum_over_ranks(np.sum(outputs[f"{k}_hard_{b}"], 0)) for k in ("tp", "fp", "fn"))
            with np.errstate(invalid="ignore", divide="ignore"):
                dice = 2 * tp / (2 * tp + fp + fn)
            self.logger.log(f"mean_fg_dice_{b}", float(np.nanmean(dice)) if np.isfinite(dice).any() else float("nan"),
                            self.current_epoch)

    def on_epoch_end(self):
        g = self.logger.get_value
        self.print_to_log_file(
            f"SMMS: L_sup a {g('train_loss_sup_a', -1):.4f}, L_sup b {g('train_loss_sup_b', -1):.4f}, L_unsup "
            f"{g('train_loss_unsup', -1):.4f} (weight {g('unsup_weight', -1):.3g}), pseudo dice a "
            f"{g('mean_fg_dice_a', -1):.4f}, b {g('mean_fg_dice_b', -1):.4f}, fused {g('mean_fg_dice', -1):.4f}"
            + (f", skipped steps {g('skipped_steps', -1)}" if g("skipped_steps", -1) else ""))
        super().on_epoch_end()

    # ------------------------------------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint, written to a temporary file and renamed into place (never half-written)."""
        tmp = filename + ".tmp"
        super().save_checkpoint(tmp)
        if self.local_rank == 0 and os.path.isfile(tmp):
            os.replace(tmp, filename)
