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
Without one, `--rss` adds the real CPU peak: each row runs two training steps (forward + backward, fp32) in a fresh
process and reports the growth of its peak resident set size (ru_maxrss) over the RSS after building the network;
rows whose estimate exceeds --rss-max-gb (default 4: a CPU step at the 1 mm patch takes minutes) or 60% of the
machine's available memory are skipped and say so.

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


def add_plans_arguments(parser) -> None:
    parser.add_argument("--plans", nargs="*", default=None, help="plans files (default: BraTS planned at 1 mm and 4 mm)")
    parser.add_argument("-c", "--configuration", default="3d_fullres")
    parser.add_argument("--root", default=None, help="work folder for the default plans (kept)")


def plans_or_brats(plans, root, prefix: str):
    """The given plans files, or nnU-Net's plans of the BraTS cases at 1 mm and 4 mm (planned under `root`, or a
    temporary folder); sets the nnU-Net paths that PlansManager may need."""
    if plans:
        return [Path(p) for p in plans]
    root = Path(root or tempfile.mkdtemp(prefix=prefix))
    plans_files = [plan_brats(root, 621, None), plan_brats(root, 622, (4.0, 4.0, 4.0))]
    os.environ.update({k: nnunet_env(root)[k] for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")})
    return plans_files


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
            smms: bool, device: str = "meta", separate: bool = True) -> dict:
    """separate: SMMS's default separate_unlabeled_pass (the labeled and the unlabeled part one after the other:
    the peak is the larger part's pass); False: one joint pass over labeled + unlabeled samples."""
    import torch
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2_smms.architectures.build import build_dual_branch_network
    from nnunetv2_smms.architectures.config import SMMSNetworkConfig
    arch = cfg_entry["architecture"]
    patch = [int(p) for p in cfg_entry["patch_size"]]
    n_in, n_out = len(dataset_json["channel_names"]), len(dataset_json["labels"])
    n = (max(batch, unlabeled) if separate else batch + unlabeled) if smms else batch
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


def _rss_child(cfg_entry, n_in, n_out, batch, unlabeled, smms, queue):
    """In a fresh process: build the network, then two forward + backward passes (SMMS: of the larger of the
    labeled and the unlabeled part, as the default separate passes); peak RSS growth in bytes."""
    import resource

    import torch
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2_smms.architectures.build import build_dual_branch_network
    from nnunetv2_smms.architectures.config import SMMSNetworkConfig
    arch = cfg_entry["architecture"]
    if smms:
        net = build_dual_branch_network(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"],
                                        n_in, n_out, SMMSNetworkConfig(channels_a=[0], channels_b=[1]), True)
    else:
        net = get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"],
                                     n_in, n_out, allow_init=True, deep_supervision=True)
    net.train()
    x = torch.randn((max(batch, unlabeled) if smms else batch, n_in, *[int(p) for p in cfg_entry["patch_size"]]))
    before = _current_rss()
    for _ in range(2):
        out = net(x)
        loss = sum(o.float().mean() for o in (out if isinstance(out, (list, tuple)) else [out])
                   for o in (o if isinstance(o, (list, tuple)) else [o]))
        loss.backward()
        net.zero_grad(set_to_none=False)
        del out, loss
    queue.put(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before)


def _current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _available_bytes() -> int:
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    return info.get("MemAvailable", 0)


def rss_peak(cfg_entry, n_in, n_out, batch, unlabeled, smms, estimate_gb: float, max_gb: float) -> dict:
    import multiprocessing as mp
    limit = min(max_gb, 0.6 * _available_bytes() / 2 ** 30)
    if estimate_gb > limit:
        return {"cpu_peak_rss_growth_gb": None,
                "cpu_peak_rss_note": f"skipped (estimate {estimate_gb:.1f} GB > {limit:.1f} GB)"}
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    p = ctx.Process(target=_rss_child, args=(cfg_entry, n_in, n_out, batch, unlabeled, smms, queue))
    p.start()
    grown = queue.get()
    p.join()
    return {"cpu_peak_rss_growth_gb": round(grown / 2 ** 30, 3)}


def bench_plans(plans_file: Path, configuration: str, unlabeled_sizes, gpu: bool, rss_max_gb=None) -> dict:
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
            joint = measure(e, plans, configuration, ds_json, b, unl, smms, separate=False)
            r["joint_pass_activations_gb_fp32"] = joint["activations_gb_fp32"]
            r["joint_pass_nnunet_estimate_gb"] = round(estimate_gb(smms_estimate(
                e["patch_size"], 1, 1, n_out, e["architecture"], b, unl, separate_passes=False), ref,
                len(e["patch_size"])), 2)
        else:
            est = plain_estimate(e["patch_size"], 2, n_out, e["architecture"]) * b / ref["bs_3d"]
        r["nnunet_estimate_gb"] = round(estimate_gb(est * ref["bs_3d"], ref, len(e["patch_size"])), 2)
        if gpu:
            r.update(measure(e, plans, configuration, ds_json, b, unl, smms, device="cuda"))
        rss_text = ""
        if rss_max_gb is not None:
            r.update(rss_peak(e, len(ds_json["channel_names"]), n_out, b, unl, smms, r["total_gb_fp32"], rss_max_gb))
            g = r["cpu_peak_rss_growth_gb"]
            rss_text = f", CPU peak RSS +{g:.2f} GB" if g is not None else f", CPU RSS {r['cpu_peak_rss_note']}"
        print(f"  {label:38s} patch {r['patch_size']} {b}+{r['unlabeled_batch']}: activations "
              f"{r['activations_gb_fp32']:.2f} GB fp32, params x3 {r['params_x3_gb']:.2f} GB, nnU-Net estimate "
              f"{r['nnunet_estimate_gb']:.2f} GB" + (f", GPU peak {r['peak_gpu_gb_fwd_bwd_amp']} GB" if gpu else "")
              + rss_text + (f" (one joint pass: activations {r['joint_pass_activations_gb_fp32']:.2f} GB, estimate "
                            f"{r['joint_pass_nnunet_estimate_gb']:.2f} GB)" if smms else ""), flush=True)
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
        out["smms_joint_pass_over_plain_activations"] = round(smms_default[0]["joint_pass_activations_gb_fp32"] /
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
    add_plans_arguments(parser)
    parser.add_argument("--unlabeled", type=int, nargs="+", default=[0, 1, 2, 4])
    parser.add_argument("--gpu", action="store_true", help="also measure the real peak on CUDA")
    parser.add_argument("--rss", action="store_true", help="also measure the real CPU peak RSS (fresh process per row)")
    parser.add_argument("--rss-max-gb", type=float, default=4.0, help="skip RSS rows estimated above this")
    parser.add_argument("--out", default=str(RESULTS / "memory.json"))
    args = parser.parse_args(argv)
    plans_files = plans_or_brats(args.plans, args.root, "smms_bench_mem_")
    result = {"machine": machine_info(),
              "command": "python benchmarks/bench_memory.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "method": "activations = bytes autograd saves for backward (meta device, fp32, train mode, deep "
                        "supervision); params x3 = weights + grads + SGD momentum; nnU-Net estimate = "
                        "static_estimate_VRAM_usage converted with the planner's 8 GB reference",
              "plans": [bench_plans(p, args.configuration, args.unlabeled, args.gpu,
                                    args.rss_max_gb if args.rss else None) for p in plans_files]}
    write_result(Path(args.out), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
