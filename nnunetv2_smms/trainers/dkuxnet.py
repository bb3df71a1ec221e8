"""nnUNetTrainerDKUXNet: Dual-KMax UX-Net (Wu, Li, Zhang, "Semi-supervised Medical Image Segmentation via Query
Distribution Consistency", ISBI 2024, arXiv 2311.12364; authors' code ``Rows21/DK-UXNet``).

Single-modal method on the modalities concatenated as channels (SMMS section 3.2). Network: two DK-UXNets (3D UX-Net
encoder + UNETR-style decoder + kMaX decoder; architectures/dkuxnet.py, uxnet.py, kmax_decoder.py) in one module,
independently initialised. Each network n gives semantic logits z_n (B, K, *s) over nnU-Net's K labels and the
query-group distribution G_n (B, K, *s): the softmax-over-queries mass of the queries of each class group.

Supervised, per network, on the labeled cases (the public code, ``main_train.py:167-227``; notes B2):
    L_sup,n = DC+CE(z_n, y)                       nnU-Net's loss (no deep supervision: the network has none)
    L_qd,n  = qd_weight * QD(G_n, y),  QD = -mean_b mean_v sum_k onehot(y)_k log G_n,k     (qd_weight 0.1: source)
The source SUMS QD over the voxels (mean over cases, ``qd_loss``): at a 96^3 crop that is ~9e5 x the per-voxel CE
and swamps the Dice + CE next to it; ``qd_reduction = "mean"`` (default) averages over voxels, ``"sum"`` is the
source's. The source clips the labels to 3 classes in place (``y[y > 2] = 2``); here every nnU-Net label is one
query group (``query_groups``, default: the queries split evenly over the classes; the source's 16 / 4 / rest). Voxels
with nnU-Net's ignore label are left out of QD (DC+CE: nnU-Net's own handling).

Mutual learning on the unlabeled cases. **The public code has no semi-supervised training, and the paper's formulas
for L_segc and L_qdc are not public: both terms below are this plugin's design from the abstract (UNVERIFIED).**
    L_segc,1 = CE(z_1, argmax sg(z_2)),   L_segc,2 = CE(z_2, argmax sg(z_1))            (cross pseudo-labels, CPS)
    L_qdc,1  = D(G_1, sg(G_2)),           L_qdc,2  = D(G_2, sg(G_1))
    D = ``qdc_mode``: "mse" (default): mean_{b,k,v} (G - G')^2;  "kl": mean_{b,v} sum_k G' (log G' - log G)
    L = sum_n [L_sup,n + L_qd,n] + w(t) * sum_n [segc_weight L_segc,n + qdc_weight L_qdc,n]
sg = no gradient. What carries gradient (tests/test_dkuxnet.py pins each):
- the pseudo-labels argmax sg(z_m) and the targets sg(G_m) carry none: L_*,n moves network n only;
- L_qd and L_qdc reach a network through its mask logits (pixel head, mask embeddings, queries, decoder, encoder),
  never through the semantic MLP (G does not depend on it); L_sup and L_segc reach the semantic MLP too;
- the hard k-means assignments inside the kMaX layers carry none (one-hot argmax under no_grad), so the layers'
  own predictors get no gradient at all (as in the source) and are frozen.
Each logged term (``loss_sup_n``, ``loss_qd_n``, ``loss_segc_n``, ``loss_qdc_n``) includes its own weight (qd_weight,
segc_weight, qdc_weight) and not w(t): w(t) = ``unsup_weight`` (1.0) with the sigmoid ramp-up over the first
``unsup_rampup`` (0.4) of training, both without source (the ramp length of the SSL4MIS mutual-learning scripts,
e.g. 6000 of 15 000 iterations). segc_weight 1.0 and qdc_weight 0.1 (the supervised QD's weight): no source.
A weight of 0 switches a term off (computed, multiplied by 0: the update equals the supervised-only step).

Optimisation: AdamW, lr 1e-4 (source ``main_train.py:46-51``; weight decay: PyTorch's default 1e-2, the source
passes none), with nnU-Net's poly schedule over nnU-Net's epochs (the source: constant lr, 40 000 iterations);
``optimizer_name = "sgd"`` gives nnU-Net's SGD (lr 1e-2, momentum 0.99, Nesterov). Gradient norm clipped per
network (12, nnU-Net's), as two optimizers would. Deep supervision: off (``enable_deep_supervision = False``: the
targets arrive as one tensor and nnU-Net's loss is not wrapped; ``set_deep_supervision_enabled`` is a no-op).
BatchNorm throughout the kMaX decoder (the source's): with nnU-Net's batch 2 the per-batch statistics are over 2
cases; prediction uses the running statistics (momentum 0.01, the source's: they need a few hundred steps).

Network defaults (``network_config``, architectures/dkuxnet.py): the source's (dims 48-96-192-384, depths 2-2-2-2,
hidden 768, 128 queries of 256 channels, kMaX layers 2 x 2 on strides 8 and 4, FFN 2048) except the mask logits at
stride 2 (``mask_stride = 2``; source: full resolution): per-query mask logits and the 256-channel pixel head at full
resolution do not fit a 24 GB card for two networks at nnU-Net's 3D patches. Peak of one training step, batch 2,
meta-device estimate under emulated AMP (fp32) (benchmarks/bench_dkuxnet_memory.py, results/dkuxnet_memory.json):
patch 128^3 (BraTS 3d_fullres): default 14.3 GB (23.5), 32 queries 13.4; stride 4: 8.5; full resolution (source)
41.7-47.8 GB for 32-128 queries; patch 96^3: default 7.3 GB (11.0), full resolution 18.8-21.4 GB.
Patches that are not a multiple of 16 per axis are padded inside the network (zeros; outputs cropped back), so any
nnU-Net plan works; a patch with every axis <= 16 (one voxel at stride 16) is refused at start-up. Softmax labels
only: region-based (sigmoid) training is refused. ``nnUNetTrainerDKUXNet_Light``: the same method with a small
network (CPU smoke tests). At initialisation the mask logits are small (their BatchNorm weight starts at 0.1), the
responses nearly uniform: L_qd starts near -0.1 log(n_k / N) (0.069 for two equal groups), L_qdc near 0 (0.0000).
torch.compile (nnU-Net's default on GPU) has not been tried with this network; nnUNet_compile=f switches it off.

Predicts: network 1 (semantic logits, one tensor in eval mode). Validation logs network 1's pseudo Dice
(``mean_fg_dice``, checkpoint_best) and network 2's (``mean_fg_dice_2``).
"""
from dataclasses import replace

import torch
import torch.nn.functional as F
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler

from nnunetv2_smms.architectures.dkuxnet import DKUXNetConfig, build_dkuxnet_pair, check_bottleneck, padded_patch
from nnunetv2_smms.architectures.dual_branch import unwrap
from nnunetv2_smms.trainers.cps import hard_pseudo_labels, pseudo_supervision
from nnunetv2_smms.trainers.recorded_settings import recorded_method_settings, with_method_settings
from nnunetv2_smms.trainers.semi_supervised import nnUNetTrainerSemiSupervised

QD_REDUCTIONS = ("mean", "sum")
QDC_MODES = ("mse", "kl")
OPTIMIZERS = ("adamw", "sgd")
LOG_EPS = 1e-8


def query_distribution_loss(distribution: torch.Tensor, target: torch.Tensor, reduction: str = "mean",
                            ignore_label=None) -> torch.Tensor:
    """QD = -sum_k onehot(y)_k log G_k per voxel, averaged over the voxels (``"mean"``) or summed over them
    (``"sum"``, the source) and averaged over the cases. distribution (B, K, *s), target (B, 1, *s) label values.
    Voxels with ``ignore_label`` count nowhere. Float32."""
    if reduction not in QD_REDUCTIONS:
        raise ValueError(f"qd_reduction must be one of {QD_REDUCTIONS}, got {reduction!r}")
    labels = target.long()
    valid = torch.ones_like(labels, dtype=torch.float32) if ignore_label is None else (labels != ignore_label).float()
    labels = labels * valid.long()
    nll = -torch.log(distribution.float().clamp_min(LOG_EPS)).gather(1, labels) * valid      # B, 1, *s
    per_case = nll.flatten(1).sum(1)
    if reduction == "mean":
        per_case = per_case / valid.flatten(1).sum(1).clamp_min(1.0)
    return per_case.mean()


def segmentation_consistency(z1: torch.Tensor, z2: torch.Tensor) -> dict:
    """L_segc: each network's CE against the other's hard pseudo-labels (argmax of the detached logits)."""
    return {"loss_segc_1": pseudo_supervision(z1, hard_pseudo_labels(z2)),
            "loss_segc_2": pseudo_supervision(z2, hard_pseudo_labels(z1))}


def distribution_discrepancy(g: torch.Tensor, target: torch.Tensor, mode: str = "mse") -> torch.Tensor:
    """D(G, sg(G')): MSE over cases, classes, voxels; or KL(G' || G) summed over classes, mean over voxels."""
    g, target = g.float(), target.detach().float()
    if mode == "mse":
        return F.mse_loss(g, target)
    if mode == "kl":
        t = target.clamp_min(LOG_EPS)
        return (t * (torch.log(t) - torch.log(g.clamp_min(LOG_EPS)))).sum(1).mean()
    raise ValueError(f"qdc_mode must be one of {QDC_MODES}, got {mode!r}")


def query_distribution_consistency(g1: torch.Tensor, g2: torch.Tensor, mode: str = "mse") -> dict:
    """L_qdc: each network's query-group distribution pulled towards the other's, which is detached."""
    return {"loss_qdc_1": distribution_discrepancy(g1, g2, mode), "loss_qdc_2": distribution_discrepancy(g2, g1, mode)}


class nnUNetTrainerDKUXNet(nnUNetTrainerSemiSupervised):
    unsup_weight = 1.0           # no source (the paper's is not public)
    unsup_rampup = 0.4           # no source: SSL4MIS mutual-learning ramp length (fraction of training)
    segc_weight = 1.0            # no source
    qdc_weight = 0.1             # no source: the supervised QD's weight
    qdc_mode = "mse"             # "mse" | "kl"; no source
    qd_weight = 0.1              # source main_train.py (lambda on qd_loss)
    qd_reduction = "mean"        # "sum": the source's sum over voxels
    optimizer_name = "adamw"     # source: AdamW lr 1e-4; "sgd": nnU-Net's
    adamw_lr = 1e-4
    adamw_weight_decay = 1e-2    # PyTorch's default (the source passes none)
    network_config = DKUXNetConfig()

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.label_manager.has_regions:
            raise NotImplementedError("nnUNetTrainerDKUXNet needs softmax labels (one query group per label, argmax "
                                      "pseudo-labels); this dataset uses region-based (sigmoid) training")
        for name, value, allowed in (("qdc_mode", self.qdc_mode, QDC_MODES),
                                     ("qd_reduction", self.qd_reduction, QD_REDUCTIONS),
                                     ("optimizer_name", self.optimizer_name, OPTIMIZERS)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        patch = self.configuration_manager.patch_size
        if len(patch) not in (2, 3):
            raise ValueError(f"nnUNetTrainerDKUXNet needs a 2D or 3D configuration; '{configuration}' has patch_size "
                             f"{list(patch)}")
        self.network_config.check(self.label_manager.num_segmentation_heads)
        check_bottleneck(patch)
        self.enable_deep_supervision = False  # DK-UXNet has no deep-supervision outputs
        if self.optimizer_name == "adamw":
            self.initial_lr, self.weight_decay = self.adamw_lr, self.adamw_weight_decay
        if padded_patch(patch) != tuple(patch):
            self.print_to_log_file(f"DK-UXNet: patch {list(patch)} is not a multiple of 16 per axis; the network pads "
                                   f"it to {list(padded_patch(patch))} (zeros) and crops its outputs back")

    def recorded_settings(self):
        """The network settings (read back by build_network_architecture) and the losses' settings, inside the
        base's 'semi_supervised' entry (recorded_settings.with_method_settings)."""
        return with_method_settings(super().recorded_settings(), "dkuxnet", {
            "network": self.network_config.to_dict(), "segc_weight": float(self.segc_weight),
            "qdc_weight": float(self.qdc_weight), "qdc_mode": self.qdc_mode, "qd_weight": float(self.qd_weight),
            "qd_reduction": self.qd_reduction, "optimizer": self.optimizer_name, "initial_lr": float(self.initial_lr),
            "weight_decay": float(self.weight_decay)})

    # ------------------------------------------------------------------------------------------------ network
    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True):
        """Two DK-UXNets from the network settings recorded in the plans (the defaults if none); 2D or 3D from the
        plans' patch. ``enable_deep_supervision`` is ignored (the network has none)."""
        recorded = recorded_method_settings(configuration_manager.configuration, "dkuxnet") or {}
        config = DKUXNetConfig.from_dict(recorded.get("network"))
        return build_dkuxnet_pair(num_input_channels, num_output_channels, configuration_manager.patch_size, config)

    def set_deep_supervision_enabled(self, enabled: bool):
        pass  # no deep-supervision outputs

    def configure_optimizers(self):
        if self.optimizer_name == "sgd":
            return super().configure_optimizers()
        params = [p for p in self.network.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.initial_lr, weight_decay=self.weight_decay)
        return optimizer, PolyLRScheduler(optimizer, self.initial_lr, self.num_epochs)

    def clip_gradients(self) -> None:
        """Each network's gradient norm on its own (as two optimizers would)."""
        for net in unwrap(self.network).networks():
            torch.nn.utils.clip_grad_norm_(net.parameters(), self.gradient_clip)

    # ------------------------------------------------------------------------------------------------ losses
    def _qd(self, out: dict, target) -> torch.Tensor:
        return self.qd_weight * query_distribution_loss(out["distribution"], target, self.qd_reduction,
                                                        self.label_manager.ignore_label)

    def supervised_terms(self, out1: dict, out2: dict, target) -> dict:
        return {"loss_sup_1": self.loss(out1["semantic"], target), "loss_qd_1": self._qd(out1, target),
                "loss_sup_2": self.loss(out2["semantic"], target), "loss_qd_2": self._qd(out2, target)}

    def mutual_terms(self, out1: dict, out2: dict) -> dict:
        segc = segmentation_consistency(out1["semantic"], out2["semantic"])
        qdc = query_distribution_consistency(out1["distribution"], out2["distribution"], self.qdc_mode)
        return {k: self.segc_weight * v for k, v in segc.items()} | {k: self.qdc_weight * v for k, v in qdc.items()}

    def labeled_losses(self, data, target):
        return self.supervised_terms(*self.network(data), target)

    def unlabeled_losses(self, data):
        return self.mutual_terms(*self.network(data))

    # ------------------------------------------------------------------------------------------------ validation
    def validation_outputs(self, data, target):
        out1, out2 = unwrap(self.network).forward_both(data)
        loss = sum(self.supervised_terms(out1, out2, target).values())
        return loss, {"": out1["semantic"], "_2": out2["semantic"]}


class nnUNetTrainerDKUXNet_Light(nnUNetTrainerDKUXNet):
    """DK-UXNet with a small network (CPU smoke tests, quick looks): channels /3 (16-32-64-128, hidden 128),
    16 queries of 64 channels, kMaX layers of 32 base filters, 4 heads, FFN 256, pixel head 32 -> 32, mask logits at
    stride 2. Same method, losses and schedule."""
    network_config = replace(DKUXNetConfig(), dims=(16, 32, 64, 128), hidden_size=128, num_queries=16, query_dim=64,
                             base_filters=32, num_heads=4, ffn_dim=256, pixel_head_channels=32, mask_embed_dim=32,
                             mask_stride=2)
