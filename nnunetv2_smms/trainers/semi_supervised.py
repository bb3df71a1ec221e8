"""nnUNetTrainerSemiSupervised: the generic semi-supervised plumbing every method of the plugin shares.

Everything not named here is nnU-Net's own (planning, preprocessing, the labeled loader and its augmentation,
Dice + CE with deep supervision, SGD + poly LR, checkpoints, final validation, prediction). This trainer adds:

- **unlabeled data**: nnUNet_preprocessed/<dataset>/<data_identifier>_unlabeled (``nnunetv2_smms
  preprocess-unlabeled``), checked against the plans and the raw files at start-up (missing or stale: an error
  naming the command that fixes it), loaded through nnU-Net's dataset class, cropping (always random: no labels)
  and training augmentation, in background workers taken from nnU-Net's ``nnUNet_n_proc_DA`` budget (half each,
  not twice the processes); batch size = the planned batch unless set, global over GPUs under DDP;
- **one step**: the labeled pass (under ``no_sync`` in DDP), the unlabeled pass, one finiteness check for both,
  a skipped and counted step on a non-finite loss (a stop after ``max_consecutive_bad_steps`` in a row), grad
  scaler, gradient clipping, one optimizer step, then ``after_optimizer_step()`` (an EMA teacher goes there);
- **the unsupervised weight** ``unsup_weight``, with the sigmoid ramp-up exp(-5 (1 - t)^2) over the first
  ``unsup_rampup`` FRACTION of all training iterations (methods' papers give ramp lengths in iterations of much
  shorter runs than nnU-Net's 250 000), updated every iteration;
- **logging**: every named term a method returns is logged per epoch (``train_<name>``) and drawn into
  progress.png, as is the pseudo Dice of every validation output (``mean_fg_dice_<suffix>``);
- **settings that travel with the model**: ``recorded_settings()`` go into the plans before the network is
  built (so the model folder's plans.json and nnUNetv2_predict see them); ``--c`` and ``--val`` stop with both
  values named if the current call asks for others (trainers/recorded_settings.py);
- seeding (nnUNet_smms_seed), the shorter-schedule variables, checkpoint_latest.pth every epoch, written to a
  temporary file and renamed (a killed run loses at most one epoch, never a half-written checkpoint).

A method is a subclass that fills hooks:
  ``labeled_losses(data, target)``        -> {name: tensor} supervised terms (default: nnU-Net's loss)
  ``unlabeled_losses(data)``              -> {name: tensor} unsupervised terms, summed and weighted here
  ``joint_losses(data, target, unl)``     -> optional, one pass over labeled + unlabeled (separate_unlabeled_pass
                                             = False); methods without it always use two passes
  ``validation_outputs(data, target)``    -> (loss, {"": predicting output, "_x": other outputs})
  ``build_network_architecture``          -> the network; in eval mode it returns the ONE tensor that predicts
  ``after_optimizer_step()``              -> after every optimizer step (not after skipped ones)
  ``clip_gradients()``                    -> gradient clipping (default: nnU-Net's, all parameters, norm 12)
  ``recorded_settings()``                 -> {plans key: dict} that must match on resume
Extra state (an EMA teacher) belongs in modules of the network: nnU-Net's checkpoint carries network_weights.
"""
import math
import os
import random
from typing import Dict, List, Optional

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

from nnunetv2_smms import settings
from nnunetv2_smms.trainers.progress import SemiSupervisedLogger
from nnunetv2_smms.trainers.recorded_settings import check_against_model_folder
from nnunetv2_smms.unlabeled.loader import UnlabeledDataLoader, batch_share
from nnunetv2_smms.unlabeled.preprocess import check_unlabeled_ready

Terms = Dict[str, torch.Tensor]


def rampup_weight(weight: float, progress: float, rampup: float) -> float:
    """``weight`` ramped up with exp(-5 (1 - t)^2), t = progress / rampup (progress and rampup: fractions of
    the whole training); ``rampup <= 0``: no ramp-up."""
    if rampup <= 0:
        return weight
    t = min(max(progress, 0.0), rampup) / rampup
    return weight * math.exp(-5.0 * (1.0 - t) ** 2)


def full_resolution(output):
    """The highest-resolution output of a deep-supervision list (or the output itself)."""
    return output[0] if isinstance(output, (list, tuple)) else output


class nnUNetTrainerSemiSupervised(nnUNetTrainer):
    uses_unlabeled = True            # draw an unlabeled batch every step
    unsup_weight = 1.0               # weight of the summed unsupervised terms
    unsup_rampup = 0.0               # fraction of all iterations over which the weight ramps up (0: none)
    unlabeled_batch_size = None      # global; None = the planned (labeled) batch size
    # True: the labeled and the unlabeled part of a step get their own forward + backward pass (gradients summed
    # before the one optimizer step): for per-sample layers (instance norm, dropout) the same update as one pass
    # over the joined batch, about half the peak activation memory. False: joint_losses (if the method has it).
    separate_unlabeled_pass = True
    max_consecutive_bad_steps = 25   # non-finite losses in a row before the run stops
    gradient_clip = 12.0             # nnU-Net's
    supervised_only_alternative = "nnUNetTrainer"  # named in the error when there are no unlabeled cases

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.seed = settings.seed()
        if self.seed is not None:
            random.seed(self.seed)
            np.random.seed(self.seed)
            torch.manual_seed(self.seed)
        self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = settings.schedule(
            self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch)
        self.unlabeled_batch_size = settings.unlabeled_batch_size(self.unlabeled_batch_size)
        self.save_every = 1
        self.logger.local_logger = SemiSupervisedLogger()
        self.dataloader_unlabeled = None
        self._bad_steps_in_a_row = 0
        self._iteration = 0
        self._current_unsup_weight = self.unsup_weight_at(0)

    # ------------------------------------------------------------------------------------------------ settings
    def recorded_settings(self) -> Dict[str, dict]:
        """{plans configuration key: settings}: written into the plans (and so the model folder's plans.json)
        before the network is built, and checked when a checkpoint is loaded. The schedule (epochs) is not
        among them: resuming with more epochs extends a training, as in nnU-Net."""
        return {"semi_supervised": {
            "trainer": type(self).__name__, "uses_unlabeled": bool(self.uses_unlabeled),
            "unsup_weight": float(self.unsup_weight), "unsup_rampup": float(self.unsup_rampup),
            "unlabeled_batch_size": self.global_unlabeled_batch_size() if self.uses_unlabeled else None,
            "separate_unlabeled_pass": bool(self.separate_unlabeled_pass)}}

    def _record_settings(self) -> None:
        for key, value in self.recorded_settings().items():
            # PlansManager.get_configuration is cached: edit both the plans and the configuration handed out
            self.plans_manager.plans["configurations"][self.configuration_name][key] = value
            self.configuration_manager.configuration[key] = value

    def initialize(self):
        self._record_settings()
        super().initialize()

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        check_against_model_folder(self.output_folder_base, self.configuration_name, self.recorded_settings())
        super().load_checkpoint(filename_or_checkpoint)

    # ------------------------------------------------------------------------------------------------ data
    def get_dataloaders(self):
        if not self.uses_unlabeled:
            return super().get_dataloaders()
        budget = get_allowed_n_proc_DA()
        n_unlabeled = budget // 2
        # checked before nnU-Net starts its workers: a missing/stale unlabeled folder stops at once
        self.dataloader_unlabeled = self.get_unlabeled_dataloader(n_unlabeled)
        # nnU-Net's get_dataloaders reads its worker count from nnUNet_n_proc_DA: give it the rest of the budget
        with settings.temporary_env("nnUNet_n_proc_DA", str(budget - n_unlabeled)):
            return super().get_dataloaders()

    def global_unlabeled_batch_size(self) -> int:
        return self.unlabeled_batch_size or self.configuration_manager.batch_size

    def get_unlabeled_dataloader(self, n_proc: int):
        if self.is_cascaded:
            raise NotImplementedError("semi-supervised trainers do not support cascade configurations (the "
                                      "unlabeled cases have no previous-stage predictions); train 3d_fullres, "
                                      "3d_lowres or 2d")
        dataset_name = self.plans_manager.dataset_name
        folder = check_unlabeled_ready(
            dataset_name, self.preprocessed_dataset_folder_base,
            os.path.join(nnUNet_raw.get(), dataset_name) if nnUNet_raw.is_set() else None,
            self.plans_manager.plans, self.configuration_name, self.dataset_json, self.plans_manager.plans_name,
            supervised_alternative=self.supervised_only_alternative)
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
        self.print_to_log_file(f"{len(dataset.identifiers)} unlabeled cases from {folder}, {batch_size} per step on "
                               f"this rank (labeled: {self.batch_size}), {n_proc} augmentation workers",
                               also_print_to_console=True)
        if n_proc == 0:
            return SingleThreadedAugmenter(loader, None)
        return NonDetMultiThreadedAugmenter(loader, None, n_proc, max(6, n_proc // 2), None,
                                            pin_memory=self.device.type == "cuda", wait_time=0.002)

    def on_train_end(self):
        super().on_train_end()
        if isinstance(self.dataloader_unlabeled, NonDetMultiThreadedAugmenter):
            self.dataloader_unlabeled._finish()

    # ------------------------------------------------------------------------------------------------ hooks
    def labeled_losses(self, data: torch.Tensor, target) -> Terms:
        return {"loss_sup": self.loss(self.network(data), target)}

    def unlabeled_losses(self, data: torch.Tensor) -> Terms:
        raise NotImplementedError(f"{type(self).__name__} uses unlabeled data but defines no unlabeled_losses")

    joint_losses = None  # optional: (data, target, unlabeled) -> (supervised terms, unsupervised terms)

    def validation_outputs(self, data: torch.Tensor, target):
        output = self.network(data)
        return self.loss(output, target), {"": output}

    def after_optimizer_step(self) -> None:
        pass

    def clip_gradients(self) -> None:
        """Gradient-norm clipping before the optimizer step (nnU-Net's: all parameters together); a method with
        two networks in one module can clip each on its own."""
        torch.nn.utils.clip_grad_norm_(self.network.parameters(), self.gradient_clip)

    def ddp_anchor(self, outputs) -> torch.Tensor:
        """0 x the outputs a loss leaves unused: under DDP (find_unused_parameters=False, as nnU-Net wraps the
        network) every parameter needs a gradient, even a zero one, in every synchronised backward."""
        if not self.is_ddp:
            return torch.zeros(())
        return 0.0 * sum(o.float().mean() for o in outputs)

    # ------------------------------------------------------------------------------------------------ training
    def unsup_weight_at(self, iteration: int) -> float:
        total = max(1, self.num_epochs * self.num_iterations_per_epoch)
        return rampup_weight(self.unsup_weight, iteration / total, self.unsup_rampup)

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        self._iteration = self.current_epoch * self.num_iterations_per_epoch  # also right after --c

    def _autocast(self):
        return autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context()

    def _backward(self, loss: torch.Tensor) -> None:
        (self.grad_scaler.scale(loss) if self.grad_scaler is not None else loss).backward()

    def _all_ranks_finite(self, loss: torch.Tensor) -> bool:
        finite = torch.isfinite(loss.detach()).float()
        if self.is_ddp:  # every rank must take the same decision, or the gradient all-reduce hangs
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        return bool(finite.item())

    def _skip_step(self, terms: Terms, batch: dict) -> dict:
        """A non-finite loss (on every rank): no update; stop after max_consecutive_bad_steps in a row."""
        self.optimizer.zero_grad(set_to_none=True)
        self._bad_steps_in_a_row += 1
        self.print_to_log_file(f"WARNING: non-finite loss ({', '.join(f'{k}={v.item():.4g}' for k, v in terms.items())}"
                               f") on cases {list(batch.get('keys', []))}; step skipped "
                               f"({self._bad_steps_in_a_row} in a row)")
        if self._bad_steps_in_a_row >= self.max_consecutive_bad_steps:
            raise RuntimeError(
                f"{self._bad_steps_in_a_row} consecutive training steps had a non-finite loss; stopping. The "
                f"last good checkpoint is {os.path.join(self.output_folder, 'checkpoint_latest.pth')} (resume "
                f"with --c after fixing the data or lowering the learning rate).")
        return {k: np.array(np.nan) for k in terms} | {"skipped": np.array(1.0)}

    def next_unlabeled_batch(self) -> Optional[torch.Tensor]:
        if not self.uses_unlabeled:
            return None
        return next(self.dataloader_unlabeled)["data"].to(self.device, non_blocking=True)

    def _weighted_unsup(self, unsup: Terms) -> torch.Tensor:
        return self._current_unsup_weight * sum(unsup.values())

    def train_step(self, batch: dict) -> dict:
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"]
        target = [t.to(self.device, non_blocking=True) for t in target] if isinstance(target, list) \
            else target.to(self.device, non_blocking=True)
        unlabeled = self.next_unlabeled_batch()
        self._current_unsup_weight = self.unsup_weight_at(self._iteration)
        self._iteration += 1
        self.optimizer.zero_grad(set_to_none=True)

        if unlabeled is not None and not self.separate_unlabeled_pass and self.joint_losses is not None:
            with self._autocast():
                sup, unsup = self.joint_losses(data, target, unlabeled)
                total = sum(sup.values()) + self._weighted_unsup(unsup)
            terms = {**sup, **unsup, "loss": total}
            if not self._all_ranks_finite(total):
                return self._skip_step(terms, batch)
            self._backward(total)
        else:
            # under DDP the gradients are all-reduced once, after the last backward (no_sync must cover the first
            # pass's forward too: DDP decides in forward whether the next backward synchronises). One finiteness
            # check (one host sync) after both passes: a non-finite part leaves NaN gradients, which _skip_step
            # drops before any optimizer or grad-scaler step.
            with self.network.no_sync() if self.is_ddp and unlabeled is not None else dummy_context():
                with self._autocast():
                    sup = self.labeled_losses(data, target)
                    sup_total = sum(sup.values())
                self._backward(sup_total)
            terms, total = dict(sup), sup_total.detach()
            if unlabeled is not None:
                with self._autocast():
                    unsup = self.unlabeled_losses(unlabeled)
                    unsup_total = self._weighted_unsup(unsup)
                self._backward(unsup_total)
                terms.update(unsup)
                total = total + unsup_total.detach()
            terms["loss"] = total
            if not self._all_ranks_finite(total):
                return self._skip_step(terms, batch)
        self._bad_steps_in_a_row = 0

        if self.grad_scaler is not None:
            self.grad_scaler.unscale_(self.optimizer)
            self.clip_gradients()
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            self.clip_gradients()
            self.optimizer.step()
        self.after_optimizer_step()
        return {k: v.detach().cpu().numpy() for k, v in terms.items()} | {"skipped": np.array(0.0)}

    def _mean_over_ranks(self, values) -> float:
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
        for key in outputs:
            if key.startswith("loss_"):
                self.logger.log("train_" + key, self._mean_over_ranks(outputs[key]), e)
        if self.uses_unlabeled:
            self.logger.log("unsup_weight", self._current_unsup_weight, e)
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
        with self._autocast():
            loss, outputs = self.validation_outputs(data, target)
        result = {"loss": loss.detach().cpu().numpy()}
        for suffix, out in outputs.items():
            tp, fp, fn = self._hard_tp_fp_fn(full_resolution(out), full_resolution(target))
            result.update({"tp_hard" + suffix: tp, "fp_hard" + suffix: fp, "fn_hard" + suffix: fn})
        return result

    def _sum_over_ranks(self, x: np.ndarray) -> np.ndarray:
        if not self.is_ddp:
            return x
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, x)
        return np.sum(gathered, 0)

    def on_validation_epoch_end(self, val_outputs: List[dict]):
        super().on_validation_epoch_end(val_outputs)  # the predicting output: pseudo Dice, EMA, best checkpoint
        outputs = collate_outputs(val_outputs)
        for key in outputs:
            if key.startswith("tp_hard_"):
                suffix = key[len("tp_hard"):]
                tp, fp, fn = (self._sum_over_ranks(np.sum(outputs[f"{k}_hard{suffix}"], 0)) for k in ("tp", "fp", "fn"))
                with np.errstate(invalid="ignore", divide="ignore"):
                    dice = 2 * tp / (2 * tp + fp + fn)
                self.logger.log(f"mean_fg_dice{suffix}", float(np.nanmean(dice)) if np.isfinite(dice).any()
                                else float("nan"), self.current_epoch)

    def on_epoch_end(self):
        g = self.logger.get_value
        keys = self.logger.local_logger.extra_keys
        parts = [f"{k[len('train_'):]} {g(k, -1):.4f}" for k in keys("train_loss_")]
        parts += [f"pseudo dice{k[len('mean_fg_dice'):].replace('_', ' ')} {g(k, -1):.4f}" for k in keys("mean_fg_dice_")]
        if self.uses_unlabeled:
            parts.append(f"unsup weight {g('unsup_weight', -1):.3g}")
        if g("skipped_steps", -1):
            parts.append(f"skipped steps {g('skipped_steps', -1)}")
        self.print_to_log_file(", ".join(parts))
        super().on_epoch_end()

    # ------------------------------------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint, written to a temporary file and renamed into place (never half-written)."""
        tmp = filename + ".tmp"
        super().save_checkpoint(tmp)
        if self.local_rank == 0 and os.path.isfile(tmp):
            os.replace(tmp, filename)
