"""Memory of one training step of SMMS and of plain nnU-Net at the planned patch and batch size, how it grows with
the unlabeled batch size, and what `nnunetv2_smms plan-gpu` configurations need.

    python benchmarks/bench_memory.py [--plans PLANS.json ...] [--out benchmarks/results/memory.json]

Without a GPU nothing can measure GPU memory, so this script measures what dominates it, exactly and device-
independently: the bytes of all tensors autograd saves for the backward pass (activations; counted with
torch.autograd.graph.saved_tensors_hooks, each storage once) of a forward pass in train mode with deep
supervision, on the *meta* device (no memory is allocated, so the real BraTS 1 mm patch can be measured on a
laptop), plus the parameters x 3 (weights, gradients, SGD momentum). float32; under CUDA AMP most activations
are float16 (about half). Next to it: nnU-Net's own planner estimate converted to GB (what plan-gpu uses).
With a GPU (`--gpu`), the real peak of torch.cuda.max_memory_allocated over forward + backward is added.

Default plans: the real BraTS 2018 cases planned by nnU-Net at their native 1 mm (fingerprint + planning only,
no preprocessing: the plans nnU-Net gives this data) and at 4 mm (what the CPU benchmarks run).
"""
import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, brats_cases, machine_info, nnunet_env, run, write_brats_case, write_result  # noqa: E402

GPU_TARGETS = (8, 11, 12, 16, 24, 40, 80)


def plan_brats(root: Path, dataset_id: int, spacing) -> Path:
    """nnU-Net fingerprint + planning (no preprocessing) of the 6 BraTS cases at `spacing` (None: native)."""
    name = f"Dataset{dataset_id}_BraTSPlan"
    plans = root / "preprocessed" / name / "nnUNetPlans.json"
    if plans.is_file():
        return plans
    raw = root / "raw" / name
    for sub in ("imagesTr", "labelsTr"):
        (raw / sub).mkdir(parents=True, exist_ok=True)
    cases = brats_cases()
    for c in cases:
        write_brats_case(c, spacing, raw / "imagesTr", raw / "labelsTr")
    (raw / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "T1ce", "1": "T2"}, "labels": {"background": 0, "whole_tumor": 1},
        "numTraining": len(cases), "file_ending": ".nii.gz"}))
    env = nnunet_env(root)
    run(["nnUNetv2_extract_fingerprint", "-d", dataset_id, "-np", "1"], env)
    run(["nnUNetv2_plan_experiment", "-d", dataset_id], env)
    return plans


def saved_bytes(net, x) -> int:
    import torch
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        key = id(s) if t.device.type == "meta" else s.data_ptr()
        seen[key] = max(seen.get(key, 0), s.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        net(x)
    return sum(seen.values())


def measure(cfg_entry: dict, plans: dict, configuration: str, dataset_json: dict, batch: int, unlabeled: int,
            smms: bool, device: str = "meta") -> dict:
    import torch
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2_smms.architectures.build import build_dual_branch_network
    from nnunetv2_smms.architectures.config import SMMSNetworkConfig
    arch = cfg_entry["architecture"]
    patch = [int(p) for p in cfg_entry["patch_size"]]
    n_in, n_out = len(dataset_json["channel_names"]), len(dataset_json["labels"])
    n = batch + (unlabeled if smms else 0)
    with torch.device(device):
        if smms:
            net = build_dual_branch_network(arch["network_class_name"], arch["arch_kwargs"],
                                            arch["_kw_requires_import"], n_in, n_out,
                                            SMMSNetworkConfig(channels_a=[0], channels_b=[1]), True)
        else:
            net = get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"],
                                         n_in, n_out, allow_init=False, deep_supervision=True)
        net.train()
        x = torch.zeros((n, n_in, *patch))
        params = sum(p.numel() * p.element_size() for p in net.parameters())
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            with torch.autocast("cuda"):
                out = net(x)
                loss = sum(o.float().mean() for o in (out if isinstance(out, (list, tuple)) else [out])
                           for o in (o if isinstance(o, (list, tuple)) else [o]))
            loss.backward()
            torch.cuda.synchronize()
            return {"peak_gpu_gb_fwd_bwd_amp": round((torch.cuda.max_memory_allocated() - base + params) / 2 ** 30, 3)}
        act = saved_bytes(net, x)
    return {"samples": n, "activations_gb_fp32": round(act / 2 ** 30, 3), "params_m": round(params / 4e6, 2),
            "params_x3_gb": round(3 * params / 2 ** 30, 3),
            "total_gb_fp32": round((act + 3 * params) / 2 ** 30, 3)}


def bench_plans(plans_file: Path, configuration: str, unlabeled_sizes, gpu: bool) -> dict:
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnunetv2_smms.planning import fit_configuration, planner_reference, plain_estimate, smms_estimate, \
        estimate_gb
    plans = json.loads(plans_file.read_text())
    ds_json = json.loads((plans_file.parent / "dataset.json").read_text())
    cm = PlansManager(plans).get_configuration(configuration)
    entry = {"patch_size": list(cm.patch_size), "architecture": cm.configuration["architecture"]}
    b = cm.batch_size
    ref = planner_reference(plans)
    n_out = len(ds_json["labels"])
    out = {"plans": str(plans_file), "configuration": configuration, "spacing": list(cm.spacing),
           "patch_size": entry["patch_size"], "batch_size": b, "rows": []}

    def row(label, e, smms, unl):
        r = {"what": label, "patch_size": [int(p) for p in e["patch_size"]], "labeled_batch": b,
             "unlabeled_batch": unl if smms else 0}
        r.update(measure(e, plans, configuration, ds_json, b, unl, smms))
        if smms:
            est = smms_estimate(e["patch_size"], 1, 1, n_out, e["architecture"], b, unl) / ref["bs_3d"]
        else:
            est = plain_estimate(e["patch_size"], 2, n_out, e["architecture"]) * b / ref["bs_3d"]
        r["nnunet_estimate_gb"] = round(estimate_gb(est * ref["bs_3d"], ref, len(e["patch_size"])), 2)
        if gpu:
            r.update(measure(e, plans, configuration, ds_json, b, unl, smms, device="cuda"))
        print(f"  {label:38s} patch {r['patch_size']} {b}+{r['unlabeled_batch']}: activations "
              f"{r['activations_gb_fp32']:.2f} GB fp32, params x3 {r['params_x3_gb']:.2f} GB, nnU-Net estimate "
              f"{r['nnunet_estimate_gb']:.2f} GB" + (f", GPU peak {r['peak_gpu_gb_fwd_bwd_amp']} GB" if gpu else ""),
              flush=True)
        out["rows"].append(r)
        return r

    print(f"{plans_file} {configuration}: spacing {out['spacing']}, patch {out['patch_size']}, batch {b}")
    plain = row("plain nnU-Net", entry, False, 0)
    for u in unlabeled_sizes:
        row(f"SMMS, unlabeled batch {u}" + (" (no MCML)" if u == 0 else ""), entry, True, u)
    smms_default = [r for r in out["rows"] if r["unlabeled_batch"] == b]
    if smms_default:
        out["smms_over_plain_activations"] = round(smms_default[0]["activations_gb_fp32"] /
                                                   plain["activations_gb_fp32"], 2)
        out["smms_over_plain_nnunet_estimate"] = round(smms_default[0]["nnunet_estimate_gb"] /
                                                       plain["nnunet_estimate_gb"], 2)
    out["plan_gpu"] = []
    for gb in GPU_TARGETS:
        try:
            e = fit_configuration(plans, configuration, ds_json, gb)
        except Exception as ex:  # noqa: BLE001
            out["plan_gpu"].append({"gpu_memory_gb": gb, "error": str(ex)})
            continue
        r = row(f"plan-gpu --gpu-memory {gb}: SMMS", e, True, b)
        r["gpu_memory_target_gb"] = gb
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plans", nargs="*", default=None, help="plans files (default: BraTS planned at 1 mm and 4 mm)")
    parser.add_argument("-c", "--configuration", default="3d_fullres")
    parser.add_argument("--root", default=None, help="work folder for the default plans (kept)")
    parser.add_argument("--unlabeled", type=int, nargs="+", default=[0, 1, 2, 4])
    parser.add_argument("--gpu", action="store_true", help="also measure the real peak on CUDA")
    parser.add_argument("--out", default=str(RESULTS / "memory.json"))
    args = parser.parse_args(argv)
    plans_files = [Path(p) for p in args.plans] if args.plans else None
    if plans_files is None:
        root = Path(args.root or tempfile.mkdtemp(prefix="smms_bench_mem_"))
        plans_files = [plan_brats(root, 621, None), plan_brats(root, 622, (4.0, 4.0, 4.0))]
        os.environ.update({k: nnunet_env(root)[k] for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")})
    result = {"machine": machine_info(),
              "command": "python benchmarks/bench_memory.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "method": "activations = bytes autograd saves for backward (meta device, fp32, train mode, deep "
                        "supervision); params x3 = weights + grads + SGD momentum; nnU-Net estimate = "
                        "static_estimate_VRAM_usage converted with the planner's 8 GB reference",
              "plans": [bench_plans(p, args.configuration, args.unlabeled, args.gpu) for p in plans_files]}
    write_result(Path(args.out), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
