"""`nnunetv2_smms plan-gpu`: a configuration of the plans that fits SMMS training into a given GPU memory.

nnU-Net plans 3d_fullres for plain nnU-Net on about 8 GB. SMMS runs two planned encoder-decoders (one per
modality) on the labeled batch plus an unlabeled batch of the same size, so with the same plans it needs about

    2 branches x (labeled + unlabeled batch) / labeled batch  = 4x  the activations of plain nnU-Net

(plus the fusion / enhancement modules). ``plan-gpu`` writes into the plans file a configuration

    "3d_fullres_smms_12GB": {"inherits_from": "3d_fullres", "data_identifier": <the same>, "patch_size": ...,
                             "architecture": ..., "batch_size": ..., "smms_gpu_plan": {how it was derived}}

whose patch size is shrunk with nnU-Net's own planner logic (ExperimentPlanner.get_plans_for_configuration:
reduce the axis that is largest relative to the median image shape by one pooling step, re-derive the network
topology with get_pool_and_conv_props, re-estimate with static_estimate_VRAM_usage) until the SMMS estimate fits
the target. It keeps ``data_identifier``, so it trains on the already preprocessed cases AND the preprocessed
unlabeled folder (whose stamp ignores patch size, batch size and architecture). Then:

    nnUNetv2_train D 3d_fullres_smms_12GB 0 -tr nnUNetTrainerSMMS

The estimate is nnU-Net's (a count of feature-map voxels, calibrated by nnU-Net against measured memory of plain
nnU-Net), not a measurement; see docs/gpu_memory.md.
"""
import json
import os
from copy import deepcopy
from typing import Optional

import numpy as np

from nnunetv2_smms.errors import SMMSUserError, cli_command

# nnU-Net's default ExperimentPlanner constants (nnunetv2 2.8.1, default_experiment_planner.py); the planner
# named in the plans file is asked for its own values first (ResEnc presets use other ones)
_DEFAULT_REFERENCE = {"val_3d": 560000000, "val_2d": 85000000, "corresp_GB": 8, "bs_3d": 2, "bs_2d": 12,
                      "min_edge": 4}
MMF_STAGES_DEFAULT = 4
MMF_UNITS, MAE_UNITS = 6, 4  # feature maps of C channels per MMF stage / MAE module (see fusion_estimate)


class PlanGPUError(SMMSUserError, RuntimeError):
    pass


def config_name(configuration: str, gpu_memory_gb: float) -> str:
    return f"{configuration}_smms_{gpu_memory_gb:g}GB"


# the calibration of nnU-Net's own planners (nnunetv2 2.8.1): reference feature-map voxels for corresp_GB
_KNOWN_PLANNERS = {
    "ExperimentPlanner": {},
    "ResEncUNetPlanner": {"val_3d": 680000000, "val_2d": 135000000},
    "nnUNetPlannerResEncM": {"val_3d": 680000000, "val_2d": 135000000},
    "nnUNetPlannerResEncL": {"val_3d": 2100000000, "val_2d": 380000000, "corresp_GB": 24},
    "nnUNetPlannerResEncXL": {"val_3d": 3600000000, "val_2d": 560000000, "corresp_GB": 40},
}


def planner_reference(plans: dict) -> dict:
    """The reference values (feature-map voxels per GB) of the planner that made these plans: nnU-Net's own
    planners from a table, another planner by instantiating it (which needs nnUNet_raw), else the defaults."""
    ref = dict(_DEFAULT_REFERENCE)
    name = plans.get("experiment_planner_used")
    if not name:
        return ref
    if name in _KNOWN_PLANNERS:
        return dict(ref, **_KNOWN_PLANNERS[name])
    try:
        import nnunetv2
        from nnunetv2.utilities.find_class_by_name import recursive_find_python_class
        cls = recursive_find_python_class(os.path.join(nnunetv2.__path__[0], "experiment_planning"), name,
                                          "nnunetv2.experiment_planning")
        planner = cls(plans["dataset_name"], plans_name=plans.get("plans_name", "nnUNetPlans"))
    except Exception:  # raw dataset not reachable, unknown planner: the default planner's constants
        return ref
    return {"val_3d": planner.UNet_reference_val_3d, "val_2d": planner.UNet_reference_val_2d,
            "corresp_GB": planner.UNet_reference_val_corresp_GB, "bs_3d": planner.UNet_reference_val_corresp_bs_3d,
            "bs_2d": planner.UNet_reference_val_corresp_bs_2d, "min_edge": planner.UNet_featuremap_min_edge_length}


def plain_estimate(patch_size, n_in: int, n_out: int, arch: dict) -> float:
    """nnU-Net's memory estimate of ONE plain network for one sample (feature-map voxels)."""
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
    return float(ExperimentPlanner.static_estimate_VRAM_usage(
        tuple(int(p) for p in patch_size), n_in, n_out, arch["network_class_name"], arch["arch_kwargs"],
        tuple(arch["_kw_requires_import"])))


def fusion_estimate(patch_size, arch: dict, mmf_stages: int = MMF_STAGES_DEFAULT, mae_bottleneck: bool = True) -> float:
    """Feature-map voxels of the SMMS modules for one sample, in the units of nnU-Net's estimate (one unit per
    conv output of a plain conv block; nnU-Net's calibration absorbs norm and nonlinearity). Per MMF stage
    (after encoder stages 1..mmf_stages) 6 x C, per MAE module (one per branch at the bottleneck) 4 x C: these
    factors reproduce the activation memory measured with benchmarks/bench_memory.py (autograd's saved tensors
    of the real modules) on the BraTS 1 mm plans: fusion = 1.2 x one plain branch at 128^3."""
    kw = arch["arch_kwargs"]
    features, strides = list(kw["features_per_stage"]), [list(np.atleast_1d(s)) for s in kw["strides"]]
    shape = np.array(patch_size, dtype=float)
    sizes = []
    for s in strides:
        shape = shape / np.array(s if len(s) == len(shape) else [s[0]] * len(shape))
        sizes.append(float(np.prod(shape)))
    n_stages = len(features)
    total = 0.0
    for s in range(min(mmf_stages, n_stages - 1)):
        total += sizes[s] * features[s] * MMF_UNITS
    if mae_bottleneck:
        total += 2 * sizes[-1] * features[-1] * MAE_UNITS
    return total


def smms_estimate(patch_size, n_in_a: int, n_in_b: int, n_out: int, arch: dict, labeled_bs: int,
                  unlabeled_bs: int, separate_passes: bool = True) -> float:
    """Feature-map voxels of one SMMS training step: two branches and the fusion modules, on the labeled and the
    unlabeled samples; with separate passes (the trainer's default, separate_unlabeled_pass) only the larger of
    the two parts is held at once, with one joint pass both are."""
    per_sample = plain_estimate(patch_size, n_in_a, n_out, arch) + plain_estimate(patch_size, n_in_b, n_out, arch) \
        + fusion_estimate(patch_size, arch)
    return per_sample * (max(labeled_bs, unlabeled_bs) if separate_passes else labeled_bs + unlabeled_bs)


def estimate_gb(voxels_per_batch: float, ref: dict, dim: int) -> float:
    """GB that nnU-Net's calibration assigns to a step costing `voxels_per_batch` (estimate x samples)."""
    val = ref["val_3d"] if dim == 3 else ref["val_2d"]
    ref_bs = ref["bs_3d"] if dim == 3 else ref["bs_2d"]
    return voxels_per_batch / ref_bs / val * ref["corresp_GB"]


def _topology(spacing, patch_size, min_edge: int):
    from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props
    return get_pool_and_conv_props(list(spacing), list(patch_size), min_edge, 999999)


def _rebuild_arch(arch: dict, n_stages: int, kernel_sizes, strides) -> dict:
    """The planned architecture entry with a new topology (as the planner re-derives it while shrinking)."""
    arch = deepcopy(arch)
    kw = arch["arch_kwargs"]
    features = list(kw["features_per_stage"])
    base, max_f = features[0], max(features)
    kw["n_stages"] = n_stages
    kw["kernel_sizes"] = [list(k) for k in kernel_sizes]
    kw["strides"] = [list(s) for s in strides]
    kw["features_per_stage"] = [min(max_f, base * 2 ** i) for i in range(n_stages)]
    for key, n in (("n_conv_per_stage", n_stages), ("n_blocks_per_stage", n_stages),
                   ("n_conv_per_stage_decoder", n_stages - 1)):
        if key in kw:
            v = list(kw[key])
            kw[key] = (v + [v[-1]] * n)[:n]
    return arch


def fit_configuration(plans: dict, configuration: str, dataset_json: dict, gpu_memory_gb: float,
                      unlabeled_batch_size: Optional[int] = None, channel_split=None,
                      separate_passes: bool = True) -> dict:
    """The new configuration entry (not yet written)."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnunetv2_smms.architectures.config import resolve_channel_split

    pm = PlansManager(plans)
    cm = pm.get_configuration(configuration)
    resolved = cm.configuration
    if "architecture" not in resolved:
        raise PlanGPUError(f"configuration {configuration!r} has no 'architecture' entry (nnU-Net v2.4+ plans needed)")
    arch = deepcopy(resolved["architecture"])
    spacing, patch = list(cm.spacing), [int(p) for p in cm.patch_size]
    median = list(cm.median_image_size_in_voxels)
    dim = len(patch)
    labeled_bs = int(cm.batch_size)
    unlabeled_bs = int(unlabeled_batch_size or labeled_bs)
    channels_a, channels_b = channel_split or resolve_channel_split(dataset_json)
    n_out = len(dataset_json["labels"]) if not pm.get_label_manager(dataset_json).has_regions else \
        len(pm.get_label_manager(dataset_json).foreground_regions)
    ref = planner_reference(plans)
    budget = (ref["val_3d"] if dim == 3 else ref["val_2d"]) * gpu_memory_gb / ref["corresp_GB"]
    ref_bs = ref["bs_3d"] if dim == 3 else ref["bs_2d"]

    def cost(p, a):
        return smms_estimate(p, len(channels_a), len(channels_b), n_out, a, labeled_bs, unlabeled_bs,
                             separate_passes) / ref_bs

    start_cost = cost(patch, arch)
    plain_cost = plain_estimate(patch, len(channels_a) + len(channels_b), n_out, arch) * labeled_bs / ref_bs
    *_, must_div = _topology(spacing, patch, ref["min_edge"])
    steps = 0
    current = start_cost
    while current > budget:
        axis = int(np.argsort([p / m for p, m in zip(patch, median)])[-1])
        tmp = list(patch)
        tmp[axis] -= must_div[axis]
        if tmp[axis] < 2 * ref["min_edge"]:
            raise PlanGPUError(
                f"cannot fit SMMS into {gpu_memory_gb:g} GB: the patch is already {patch} (estimate "
                f"{estimate_gb(current * ref_bs, ref, dim):.1f} GB). Use a larger GPU"
                + ("" if separate_passes else ", or plan for the default separate passes (without --joint-pass)"))
        *_, must_div_tmp = _topology(spacing, tmp, ref["min_edge"])
        patch[axis] -= must_div_tmp[axis]
        _, strides, kernels, patch, must_div = _topology(spacing, patch, ref["min_edge"])
        patch = [int(p) for p in patch]
        arch = _rebuild_arch(arch, len(strides), kernels, strides)
        current = cost(patch, arch)
        steps += 1

    new = {
        "inherits_from": configuration,
        "data_identifier": cm.data_identifier,
        "patch_size": patch,
        "batch_size": labeled_bs,
        "architecture": arch,
        "smms_gpu_plan": {
            "gpu_memory_target_gb": gpu_memory_gb,
            "labeled_batch_size": labeled_bs, "unlabeled_batch_size": unlabeled_bs,
            "unlabeled_pass": "separate" if separate_passes else "joint",
            "parent_patch_size": [int(p) for p in cm.patch_size],
            "estimate_gb_parent_plain_nnunet": round(estimate_gb(plain_cost * ref_bs, ref, dim), 2),
            "estimate_gb_parent_smms": round(estimate_gb(start_cost * ref_bs, ref, dim), 2),
            "estimate_gb_smms": round(estimate_gb(current * ref_bs, ref, dim), 2),
            "reduction_steps": steps,
            "how": "nnU-Net's planner estimate (static_estimate_VRAM_usage, feature-map voxels calibrated per GB) "
                   "for 2 branches + MMF/MAE on the labeled, then the unlabeled samples (separate passes) or on "
                   "both at once (joint); patch shrunk like "
                   "ExperimentPlanner.get_plans_for_configuration",
        },
    }
    return new


def write_plans_atomically(plans_file: str, plans: dict) -> None:
    tmp = f"{plans_file}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(plans, f, indent=4, sort_keys=False)
    os.replace(tmp, plans_file)


def plan_gpu(dataset_name_or_id, configuration: str = "3d_fullres", gpu_memory_gb: float = 12,
             plans_identifier: str = "nnUNetPlans", unlabeled_batch_size: Optional[int] = None,
             name: Optional[str] = None, dry_run: bool = False, separate_passes: bool = True) -> dict:
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    if not nnUNet_preprocessed.is_set():
        raise PlanGPUError("nnUNet_preprocessed is not set: export it as for nnUNetv2_plan_and_preprocess")
    if gpu_memory_gb <= 0:
        raise PlanGPUError(f"--gpu-memory must be > 0, got {gpu_memory_gb}")
    dataset_name = maybe_convert_to_dataset_name(dataset_name_or_id)
    pre = os.path.join(nnUNet_preprocessed, dataset_name)
    plans_file = os.path.join(pre, plans_identifier + ".json")
    if not os.path.isfile(plans_file):
        raise PlanGPUError(f"{plans_file} not found: run nnUNetv2_plan_and_preprocess -d {dataset_name} first")
    plans = load_json(plans_file)
    if configuration not in plans["configurations"]:
        raise PlanGPUError(f"configuration {configuration!r} is not in {plans_file} "
                           f"(has {sorted(plans['configurations'])})")
    if "smms_gpu_plan" in plans["configurations"][configuration]:
        raise PlanGPUError(f"{configuration!r} was itself made by plan-gpu; plan from its parent "
                           f"{plans['configurations'][configuration].get('inherits_from')!r}")
    dataset_json = load_json(os.path.join(pre, "dataset.json"))
    entry = fit_configuration(plans, configuration, dataset_json, gpu_memory_gb, unlabeled_batch_size,
                              separate_passes=separate_passes)
    name = name or config_name(configuration, gpu_memory_gb)
    if name == configuration:
        raise PlanGPUError("the new configuration needs a name other than its parent's")
    if not dry_run:
        plans = load_json(plans_file)  # re-read right before writing: keep concurrent edits of other entries
        plans["configurations"][name] = entry
        write_plans_atomically(plans_file, plans)
    return {"name": name, "plans_file": plans_file, "configuration": entry}


def _run(args) -> int:
    results = []
    for gb in args.gpu_memory:
        r = plan_gpu(args.d, args.c, gb, args.p, args.unlabeled_batch_size,
                     args.name if len(args.gpu_memory) == 1 else None, args.dry_run, not args.joint_pass)
        results.append(r)
        g = r["configuration"]["smms_gpu_plan"]
        print(f"{r['name']}: patch {g['parent_patch_size']} -> {r['configuration']['patch_size']}, batch "
              f"{g['labeled_batch_size']} labeled + {g['unlabeled_batch_size']} unlabeled; nnU-Net estimate "
              f"{g['estimate_gb_parent_smms']} GB -> {g['estimate_gb_smms']} GB (plain nnU-Net on {args.c}: "
              f"{g['estimate_gb_parent_plain_nnunet']} GB)")
    if args.dry_run:
        print("(dry run: plans not written)")
    else:
        print(f"written to {results[0]['plans_file']}. Train with:")
        for r in results:
            print(f"  nnUNetv2_train {args.d} {r['name']} FOLD -tr nnUNetTrainerSMMS"
                  + (f" -p {args.p}" if args.p != "nnUNetPlans" else ""))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "plan-gpu",
        help="add a configuration (e.g. 3d_fullres_smms_12GB) whose patch fits SMMS training into a GPU's memory",
        description="Add to the plans a configuration '<C>_smms_<N>GB' that inherits from C, keeps its "
                    "data_identifier (reuses the preprocessed labeled and unlabeled data) and has a patch size "
                    "shrunk with nnU-Net's planner logic until nnU-Net's memory estimate for SMMS (2 branches, "
                    "labeled + unlabeled batch) fits N GB. Then: nnUNetv2_train D <C>_smms_<N>GB FOLD -tr "
                    "nnUNetTrainerSMMS.")
    p.add_argument("-d", required=True, help="dataset name or id")
    p.add_argument("-c", default="3d_fullres", help="configuration to start from (default: 3d_fullres)")
    p.add_argument("-p", default="nnUNetPlans", help="plans identifier (default: nnUNetPlans)")
    p.add_argument("--gpu-memory", type=float, nargs="+", required=True,
                   help="GPU memory in GB (one configuration per value), e.g. 12 24 40")
    p.add_argument("--unlabeled-batch-size", type=int, default=None,
                   help="unlabeled cases per step to plan for (default: the planned batch size, as the trainer)")
    p.add_argument("--name", default=None, help="name of the new configuration (one --gpu-memory value only)")
    p.add_argument("--dry-run", action="store_true", help="print, do not write the plans")
    p.add_argument("--joint-pass", action="store_true",
                   help="plan for a trainer with separate_unlabeled_pass = False (labeled + unlabeled cases in one "
                        "forward pass: about twice the activation memory)")
    p.set_defaults(func=cli_command(_run))
