"""Compute of one training step (forward + backward) of plain nnU-Net and of each SMMS variant, at the planned patch
and batch size: a machine-independent companion of bench_training.py's timings.

    python benchmarks/bench_flops.py [--plans PLANS.json ...] [--out benchmarks/results/flops.json]

FLOPs are counted by torch.utils.flop_counter.FlopCounterMode (convolutions, transposed convolutions, matrix
products; the elementwise work of norms, nonlinearities and losses is not counted) on the *meta* device, so the
real BraTS 1 mm plans can be counted on any machine in seconds. Per (sample x branch) divides by the samples in the
step (SMMS: labeled + unlabeled) and by the branches (2), and is compared with plain nnU-Net's per-sample FLOPs:
the ratio is the structural cost of MMF and MAE over the two plain encoder-decoders SMMS contains.

Default plans: the BraTS 2018 cases planned by nnU-Net at their native 1 mm and at 4 mm (as bench_memory.py).
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine_info, write_result  # noqa: E402

# name -> (SMMSNetworkConfig overrides, unlabeled samples per labeled sample); None = plain nnU-Net
VARIANTS = {
    "nnUNetTrainer": None,
    "nnUNetTrainerSMMS_Baseline": ({"mmf": False, "mae": False}, 0),
    "nnUNetTrainerSMMS_MMF": ({"mae": False}, 0),
    "nnUNetTrainerSMMS_MMF_MAE": ({}, 0),
    "nnUNetTrainerSMMS": ({}, 1),
    "nnUNetTrainerSMMS_LightMMF": ({"mmf_kernel_size": 1}, 1),
}


def step_flops(cfg_entry: dict, n_in: int, n_out: int, batch: int, variant) -> dict:
    import torch
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from torch.utils.flop_counter import FlopCounterMode
    from nnunetv2_smms.architectures.build import build_dual_branch_network
    from nnunetv2_smms.architectures.config import SMMSNetworkConfig
    arch = cfg_entry["architecture"]
    patch = [int(p) for p in cfg_entry["patch_size"]]
    with torch.device("meta"):
        if variant is None:
            net = get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"],
                                         n_in, n_out, allow_init=False, deep_supervision=True)
            n, branches = batch, 1
        else:
            overrides, unlabeled_per_labeled = variant
            net = build_dual_branch_network(arch["network_class_name"], arch["arch_kwargs"],
                                            arch["_kw_requires_import"], n_in, n_out,
                                            SMMSNetworkConfig(channels_a=[0], channels_b=[1], **overrides), True)
            n, branches = batch * (1 + unlabeled_per_labeled), 2
        net.train()
        x = torch.zeros((n, n_in, *patch))
        counter = FlopCounterMode(display=False)
        with counter:
            out = net(x)
            outs = out if isinstance(out, tuple) else (out,)
            loss = sum(o.float().mean() for br in outs for o in (br if isinstance(br, (list, tuple)) else [br]))
            loss.backward()
    total = counter.get_total_flops()
    return {"samples": n, "branches": branches, "gflops_per_step": round(total / 1e9, 2),
            "gflops_per_sample_branch": round(total / 1e9 / (n * branches), 3)}


def bench_plans(plans_file: Path, configuration: str) -> dict:
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    plans = json.loads(plans_file.read_text())
    ds_json = json.loads((plans_file.parent / "dataset.json").read_text())
    cm = PlansManager(plans).get_configuration(configuration)
    entry = {"patch_size": list(cm.patch_size), "architecture": cm.configuration["architecture"]}
    n_in, n_out = len(ds_json["channel_names"]), len(ds_json["labels"])
    out = {"plans": str(plans_file), "configuration": configuration, "spacing": list(cm.spacing),
           "patch_size": entry["patch_size"], "batch_size": cm.batch_size, "variants": {}}
    print(f"{plans_file} {configuration}: spacing {out['spacing']}, patch {out['patch_size']}, batch {cm.batch_size}")
    print(f"  {'variant':28s} {'samples x br':>12s} {'GFLOP/step':>11s} {'GFLOP/(sample*br)':>18s} {'vs plain':>9s}")
    plain = None
    for name, variant in VARIANTS.items():
        r = step_flops(entry, n_in, n_out, cm.batch_size, variant)
        if variant is None:
            plain = r["gflops_per_sample_branch"]
        r["per_sample_branch_over_plain_per_sample"] = round(r["gflops_per_sample_branch"] / plain, 3)
        out["variants"][name] = r
        print(f"  {name:28s} {r['samples']:>5d} x {r['branches']:<4d} {r['gflops_per_step']:>11.1f} "
              f"{r['gflops_per_sample_branch']:>18.2f} {r['per_sample_branch_over_plain_per_sample']:>9.3f}", flush=True)
    return out


def main(argv=None) -> int:
    from bench_memory import add_plans_arguments, plans_or_brats
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_plans_arguments(parser)
    parser.add_argument("--out", default=str(RESULTS / "flops.json"))
    args = parser.parse_args(argv)
    plans_files = plans_or_brats(args.plans, args.root, "smms_bench_flops_")
    result = {"machine": machine_info(),
              "command": "python benchmarks/bench_flops.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "method": "torch.utils.flop_counter.FlopCounterMode, forward + backward of one training step in train "
                        "mode with deep supervision, meta device; conv/matmul FLOPs only",
              "plans": [bench_plans(p, args.configuration) for p in plans_files]}
    write_result(Path(args.out), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
