"""nnUNetTrainerCMC: cross-modality collaboration (Zhou et al., MICCAI 2024; authors' code med-air/CMC) in nnU-Net.

Network (architectures/cmc_network.py): ONE planned encoder shared by both modalities, bottleneck fusion, ONE
shared decoder with each modality's own skips, two outputs. Loss per step:

    L = sup_scale * [DC+CE(out_a, y) + DC+CE(out_b, y)]                     labeled cases (nnU-Net's loss, DS)
      + w_csc(t) * CSC(f_a, f_b) + w_cac(t) * CAC(out_a, out_b)            unlabeled cases, from t >= ssl_start

- CSC (contrastive, main.py:128-143): NT-Xent (MONAI ContrastiveLoss, temperature 0.5) per case between the two
  modalities' encoder bottlenecks f_a, f_b (before attention and fusion, as the source returns them), averaged
  over the cases of the batch. Rows: ``csc_rows = "voxels"`` (default) makes each bottleneck voxel's C-dim
  feature vector a row, positive = the same voxel in the other modality, negatives = every other voxel of either
  modality of that case; ``"released"`` reproduces the source's ``F[b].reshape(-1, C)``, whose rows are
  contiguous C-element chunks of the flattened channel maps (not feature vectors).
- CAC (agreement, main.py:107-126): 1 - mean_{b,c} (2 sum p_a p_b + eps) / (sum p_a^2 + sum p_b^2 + eps), eps 1e-6,
  on the full-resolution softmax probabilities (sigmoid for region training), background included, as 1 - Dice
  so that minimising it makes the modalities agree. The source returns the similarity itself (which minimising
  would push apart) and computes it on the raw logits: ``cac_on_probabilities = False`` uses the logits.
- Gradients: the source computes CSC and CAC under model.eval() + torch.no_grad() (trainer.py:63-67), so they
  add constants to its loss and never train anything. Here both are computed in train mode WITH gradients, and
  nothing is detached: both modalities' bottlenecks and outputs (and so the shared encoder, the fusion and the
  decoder) receive the gradients of both terms.
- Schedules (trainer.py:72-75), t = the fraction of all training iterations done (the source: epoch /
  max_epochs): w_csc(t) = csc_weight * exp(-5 (1 - t)^2) (sigmoid ramp-up over the whole run), w_cac(t) =
  cac_weight * 0.5 (cos(pi t) + 1) (cosine ramp-down over the whole run), both 0 before ``ssl_start`` = 0.7
  (start_fusion_epoch 350 of 500 epochs, main.py:52,101); at the start w_csc = 0.64, w_cac = 0.21. Before
  ssl_start no unlabeled batch is drawn at all (the step is the supervised step). nnU-Net runs are long
  (250k iterations): 175k supervised iterations come first; set ``ssl_start`` lower to let the unlabeled terms
  act longer (the weights follow the same curves of t). The base trainer's ramp is off (unsup_rampup 0,
  unsup_weight 1): these schedules replace it. Terms are logged with their schedule weights applied.
- Supervised: the source halves the sum of the two modalities' losses (main.py:193-196): sup_scale = 0.5 (the
  logged loss_sup_a / loss_sup_b include the factor). nnU-Net's DC+CE with deep supervision replaces MONAI's
  squared-Dice DiceCE; both outputs are scored against the one label (paired, co-registered modalities; the
  source has a label per modality).
- Predicts: the mean of the two outputs' logits (``output_branch = "fused"``); "a" / "b" predict one output
  (the nnUNet_smms_output_branch variable at prediction time, like SMMS). Both modalities are always needed.
  Validation scores the predicting output ("" -> nnU-Net's pseudo Dice and checkpoint_best) and each output.
- Not taken over: AdamW 1e-4 with warm-up cosine (nnU-Net's SGD + poly is kept, as for every trainer of the
  plugin), the pretrained "Foundation model" weights, the resizing of unlabeled images to the ROI (nnU-Net's
  random crops and augmentation are used), unpaired CT/MR loaders (one paired dataset here).
"""
import dataclasses
import math

import torch
import torch.nn.functional as F

from nnunetv2_smms import settings
from nnunetv2_smms.architectures import resolve_channel_split, unwrap
from nnunetv2_smms.architectures.cmc_network import CMCNetworkConfig, build_cmc_network
from nnunetv2_smms.architectures.config import branch_channel_names
from nnunetv2_smms.trainers.recorded_settings import with_method_settings
from nnunetv2_smms.trainers.semi_supervised import full_resolution, nnUNetTrainerSemiSupervised

CSC_ROWS = ("voxels", "released")


# ---------------------------------------------------------------------------------------------------- the terms
def nt_xent(z_a: torch.Tensor, z_b: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent of N row pairs (z_a[i], z_b[i]), as MONAI's ContrastiveLoss: over the 2N L2-normalised rows,
    mean_i -log(exp(s(i, pos(i)) / T) / sum_{k != i} exp(s(i, k) / T)), s = cosine similarity."""
    n = z_a.shape[0]
    with torch.autocast(device_type=z_a.device.type, enabled=False):  # float32 similarities
        z = F.normalize(torch.cat((z_a, z_b), 0).float(), dim=1)
        sim = (z @ z.t()) / temperature
        sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
        positives = torch.cat((torch.arange(n, 2 * n), torch.arange(n))).to(z.device)
        return F.cross_entropy(sim, positives)


def feature_rows(features: torch.Tensor, rows: str = "voxels") -> torch.Tensor:
    """One case's bottleneck (C, *spatial) as rows: (N voxels, C) feature vectors, or the source's
    reshape(-1, C) of the (C, *spatial) tensor ("released")."""
    c = features.shape[0]
    if rows == "voxels":
        return features.reshape(c, -1).t()
    if rows == "released":
        return features.reshape(-1, c)
    raise ValueError(f"rows must be one of {CSC_ROWS}, got {rows!r}")


def contrastive_loss(f_a: torch.Tensor, f_b: torch.Tensor, temperature: float = 0.5,
                     rows: str = "voxels") -> torch.Tensor:
    """CSC: NT-Xent between the two modalities' bottlenecks, per case, averaged over the batch."""
    return torch.stack([nt_xent(feature_rows(f_a[i], rows), feature_rows(f_b[i], rows), temperature)
                        for i in range(f_a.shape[0])]).mean()


def agreement_loss(logits_a: torch.Tensor, logits_b: torch.Tensor, use_sigmoid: bool = False,
                   on_probabilities: bool = True, include_background: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """CAC as a loss: 1 - mean over cases and classes of the squared-denominator soft Dice of the two outputs."""
    a, b = logits_a.float(), logits_b.float()
    if on_probabilities:
        a, b = (torch.sigmoid(a), torch.sigmoid(b)) if use_sigmoid else (torch.softmax(a, 1), torch.softmax(b, 1))
    if not include_background and not use_sigmoid:
        a, b = a[:, 1:], b[:, 1:]
    axes = tuple(range(2, a.ndim))
    dice = (2 * (a * b).sum(axes) + eps) / ((a * a).sum(axes) + (b * b).sum(axes) + eps)
    return 1 - dice.mean()


def csc_schedule(progress: float) -> float:
    """The source's sigmoid_rampup(epoch, max_epochs): exp(-5 (1 - t)^2), t in [0, 1]."""
    t = min(max(progress, 0.0), 1.0)
    return math.exp(-5.0 * (1.0 - t) ** 2)


def cac_schedule(progress: float) -> float:
    """The source's cosine_rampdown(epoch, max_epochs): 0.5 (cos(pi t) + 1)."""
    t = min(max(progress, 0.0), 1.0)
    return 0.5 * (math.cos(math.pi * t) + 1.0)


# ---------------------------------------------------------------------------------------------------- trainer
class nnUNetTrainerCMC(nnUNetTrainerSemiSupervised):
    # --- network ---
    use_attention = True            # MIA channel attention on each bottleneck (one module for both)
    separate_projections = False    # source: one 1x1 projection for both modalities
    output_branch = "fused"         # what predicts: fused (mean of the two outputs' logits) | a | b
    # --- losses ---
    sup_scale = 0.5                 # L_sup = 0.5 (L_a + L_b)
    ssl_start = 0.7                 # fraction of training before which no unlabeled term is used (350 / 500)
    csc_weight = 1.0
    csc_temperature = 0.5
    csc_rows = "voxels"             # voxels | released
    cac_weight = 1.0
    cac_on_probabilities = True     # False: on the raw logits, as released
    cac_include_background = True   # source: mean over all channels
    # the base's ramp is replaced by the two schedules
    unsup_weight = 1.0
    unsup_rampup = 0.0
    supervised_only_alternative = "nnUNetTrainer (labeled cases only)"

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.csc_rows not in CSC_ROWS:
            raise ValueError(f"csc_rows must be one of {CSC_ROWS}, got {self.csc_rows!r}")
        channels_a, channels_b = resolve_channel_split(dataset_json, settings.channel_split())
        self.cmc_config = CMCNetworkConfig(channels_a=channels_a, channels_b=channels_b,
                                           attention=self.use_attention,
                                           separate_projections=self.separate_projections,
                                           output_branch=self.output_branch)
        self._ssl_progress = 0.0
        self.print_to_log_file(
            f"CMC: modality a = channels {channels_a} ({branch_channel_names(dataset_json, channels_a)}), modality "
            f"b = channels {channels_b} ({branch_channel_names(dataset_json, channels_b)}), one shared encoder and "
            f"decoder; attention={self.use_attention}; unlabeled terms from {self.ssl_start:.0%} of training: "
            f"CSC (NT-Xent, T={self.csc_temperature}, rows={self.csc_rows}, weight {self.csc_weight} x sigmoid "
            f"ramp-up) + CAC (1 - Dice, weight {self.cac_weight} x cosine ramp-down); predicts "
            f"{self.output_branch}", also_print_to_console=True)

    def loss_settings(self) -> dict:
        return {"sup_scale": float(self.sup_scale), "ssl_start": float(self.ssl_start),
                "csc_weight": float(self.csc_weight), "csc_temperature": float(self.csc_temperature),
                "csc_rows": self.csc_rows, "cac_weight": float(self.cac_weight),
                "cac_on_probabilities": bool(self.cac_on_probabilities),
                "cac_include_background": bool(self.cac_include_background)}

    def recorded_settings(self):
        """The network settings (read back by build_network_architecture at prediction time) and the loss
        settings, under semi_supervised.cmc (recorded_settings.with_method_settings)."""
        return with_method_settings(super().recorded_settings(), "cmc", {
            "network": self.cmc_config.to_dict(), "losses": self.loss_settings()})

    # ------------------------------------------------------------------------------------------------ network
    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True):
        """From the settings recorded in the plans (the model folder's plans.json at prediction time);
        nnUNet_smms_output_branch (fused | a | b) picks the output for prediction (training resets it)."""
        recorded = configuration_manager.configuration.get("semi_supervised", {}).get("cmc")
        if recorded is None:
            raise RuntimeError("These plans carry no CMC settings (plans['configurations'][<configuration>]"
                               "['semi_supervised']['cmc']); nnUNetTrainerCMC writes them into the model folder's "
                               "plans.json when training starts: predict from a folder it trained.")
        config = CMCNetworkConfig.from_dict(recorded["network"])
        branch = settings.output_branch()
        if branch:
            config = dataclasses.replace(config, output_branch=branch)
        return build_cmc_network(configuration_manager.network_arch_class_name,
                                 configuration_manager.network_arch_init_kwargs,
                                 configuration_manager.network_arch_init_kwargs_req_import,
                                 num_input_channels, num_output_channels, config, enable_deep_supervision)

    def initialize(self):
        super().initialize()
        unwrap(self.network).output_branch = self.cmc_config.output_branch  # the variable is for prediction only

    def set_deep_supervision_enabled(self, enabled: bool):
        unwrap(self.network).set_deep_supervision(enabled)

    # ------------------------------------------------------------------------------------------------ schedule
    def training_progress(self, iteration: int) -> float:
        return iteration / max(1, self.num_epochs * self.num_iterations_per_epoch)

    def next_unlabeled_batch(self):
        """No unlabeled batch (the supervised step) before ssl_start: both weights are 0 there."""
        self._ssl_progress = self.training_progress(self._iteration)
        if self._ssl_progress < self.ssl_start:
            return None
        return super().next_unlabeled_batch()

    # ------------------------------------------------------------------------------------------------ losses
    def labeled_losses(self, data, target):
        out_a, out_b, _, _ = self.network(data)
        return {"loss_sup_a": self.sup_scale * self.loss(out_a, target),
                "loss_sup_b": self.sup_scale * self.loss(out_b, target)}

    def unlabeled_losses(self, data):
        out_a, out_b, f_a, f_b = self.network(data)
        t = self._ssl_progress
        csc = contrastive_loss(f_a, f_b, self.csc_temperature, self.csc_rows)
        cac = agreement_loss(full_resolution(out_a), full_resolution(out_b), self.label_manager.has_regions,
                             self.cac_on_probabilities, self.cac_include_background)
        terms = {"loss_csc": self.csc_weight * csc_schedule(t) * csc,
                 "loss_cac": self.cac_weight * cac_schedule(t) * cac}
        if isinstance(out_a, (list, tuple)):  # DDP: the lower-resolution seg heads stay in the graph
            terms["loss_cac"] = terms["loss_cac"] + self.ddp_anchor(list(out_a[1:]) + list(out_b[1:]))
        return terms

    # ------------------------------------------------------------------------------------------------ validation
    def validation_outputs(self, data, target):
        net = unwrap(self.network)
        out_a, out_b = net.forward_branches(data)
        loss = self.sup_scale * (self.loss(out_a, target) + self.loss(out_b, target))
        predicting = out_a if net.output_branch == "a" else out_b if net.output_branch == "b" \
            else net.fuse(out_a, out_b)
        return loss, {"": predicting, "_a": out_a, "_b": out_b}
