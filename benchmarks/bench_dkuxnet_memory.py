"""Peak memory of one nnUNetTrainerDKUXNet training step (two DK-UXNets, labeled pass + unlabeled pass) per network
configuration: number of queries x mask-logit stride x patch, at batch 2 (nnU-Net's BraTS 3d_fullres plan: patch
128^3, batch 2; and a 96^3 patch, the source's crop).

    python benchmarks/bench_dkuxnet_memory.py [--patches 128 96] [--queries 32 64 128] [--strides 1 2 4]
        [--batch 2] [--in-channels 2] [--classes 2] [--gpu] [--out benchmarks/results/dkuxnet_memory.json]

Without a GPU (default), an estimate on the *meta* device (nothing is allocated, so any patch can be measured on a
laptop):
    static      = parameters + gradients + AdamW state (2 x the trainable parameters), both networks;
    activations = the bytes of every tensor autograd saves for backward during one pass (both networks' forward +
                  the pass's losses), counted with torch.autograd.graph.saved_tensors_hooks, each storage once,
                  parameters excluded; the larger of the labeled pass (DC+CE + QD) and the unlabeled pass (L_segc +
                  L_qdc) - the trainer runs them one after the other (separate_unlabeled_pass);
    peak        = static + activations.
Two precisions: fp32, and "amp", an emulation of CUDA autocast (what nnU-Net trains with on a GPU): a
TorchFunctionMode runs convolutions, linear layers, matmul / bmm / einsum in float16 and softmax, log-softmax,
layer norm, cross-entropy in float32, everything else in its input's dtype. Not counted: the allocator's cache and
fragmentation, cuDNN workspaces, transient tensors that are not saved (one op's output at a time) - add ~10-20 %.
With ``--gpu`` (and a CUDA device), each row is also measured: torch.cuda.max_memory_allocated over one real training
step (both passes under autocast, AdamW step), or "OOM".
"""
import argparse
import gc
import sys
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine_info, write_result  # noqa: E402

from nnunetv2_smms.architectures.dkuxnet import DKUXNetConfig, build_dkuxnet_pair  # noqa: E402
from nnunetv2_smms.trainers.dkuxnet import (nnUNetTrainerDKUXNet, query_distribution_consistency,  # noqa: E402
                                            query_distribution_loss, segmentation_consistency)

GB = 2 ** 30
CARD_GB = 24

HALF_FUNCS = {F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d, F.linear,
              torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm, torch.einsum}
FLOAT_FUNCS = {F.softmax, torch.softmax, torch.Tensor.softmax, F.log_softmax, torch.log_softmax,
               torch.Tensor.log_softmax, F.layer_norm, F.cross_entropy}


class EmulatedAutocast(TorchFunctionMode):
    """CUDA autocast's dtype rules on any device (meta included), for counting bytes."""

    @staticmethod
    def _cast(x, dtype):
        if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != dtype:
            return x.to(dtype)
        if isinstance(x, (list, tuple)):
            return type(x)(EmulatedAutocast._cast(v, dtype) for v in x)
        return x

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        dtype = torch.float16 if func in HALF_FUNCS else torch.float32 if func in FLOAT_FUNCS else None
        if dtype is not None:
            args = self._cast(args, dtype)
            kwargs = {k: self._cast(v, dtype) for k, v in kwargs.items()}
        return func(*args, **kwargs)


def nnunet_loss():
    """nnU-Net's loss as nnUNetTrainer._build_loss makes it without deep supervision (softmax labels)."""
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
    return DC_and_CE_loss({"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False}, {}, weight_ce=1,
                          weight_dice=1, ignore_label=None, dice_class=MemoryEfficientSoftDiceLoss)


def pass_losses(net, x, target, loss, labeled: bool) -> torch.Tensor:
    """The trainer's losses of one pass (trainers/dkuxnet.py, default weights)."""
    t = nnUNetTrainerDKUXNet
    out1, out2 = net(x)
    if labeled:
        return sum(loss(o["semantic"], target) + t.qd_weight * query_distribution_loss(o["distribution"], target)
                   for o in (out1, out2))
    segc = segmentation_consistency(out1["semantic"], out2["semantic"])
    qdc = query_distribution_consistency(out1["distribution"], out2["distribution"], t.qdc_mode)
    return t.segc_weight * sum(segc.values()) + t.qdc_weight * sum(qdc.values())


def saved_bytes(net, x, target, loss, labeled: bool, amp: bool) -> int:
    """Bytes autograd saves for backward over one pass (each storage once, parameters excluded)."""
    params = {p.untyped_storage()._cdata for p in net.parameters()}
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        if s._cdata not in params:
            seen[s._cdata] = max(seen.get(s._cdata, 0), s.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if amp:
            with EmulatedAutocast():
                pass_losses(net, x, target, loss, labeled)
        else:
            pass_losses(net, x, target, loss, labeled)
    return sum(seen.values())


def static_bytes(net) -> dict:
    total = sum(p.numel() * p.element_size() for p in net.parameters())
    trainable = sum(p.numel() * p.element_size() for p in net.parameters() if p.requires_grad)
    return {"parameters_M": round(sum(p.numel() for p in net.parameters()) / 1e6, 2),
            "static_gb": (total + trainable + 2 * trainable) / GB}


def estimate(config: DKUXNetConfig, patch, batch: int, in_channels: int, classes: int) -> dict:
    with torch.device("meta"):
        net = build_dkuxnet_pair(in_channels, classes, patch, config).train()
        x = torch.zeros((batch, in_channels, *patch))
        target = torch.zeros((batch, 1, *patch))
        loss = nnunet_loss()
        row = static_bytes(net)
        for amp in (False, True):
            act = max(saved_bytes(net, x, target, loss, labeled, amp) for labeled in (True, False)) / GB
            key = "amp" if amp else "fp32"
            row[f"activations_{key}_gb"] = act
            row[f"peak_{key}_gb"] = row["static_gb"] + act
    return row


def measure_gpu(config: DKUXNetConfig, patch, batch: int, in_channels: int, classes: int) -> dict:
    """One real training step on the GPU: labeled + unlabeled pass (autocast, grad scaler), AdamW step."""
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    net = optimizer = None
    try:
        net = build_dkuxnet_pair(in_channels, classes, patch, config).cuda().train()
        optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4)
        scaler = torch.amp.GradScaler("cuda")
        loss = nnunet_loss()
        x = torch.randn((batch, in_channels, *patch), device="cuda")
        target = torch.randint(0, classes, (batch, 1, *patch), device="cuda").float()
        optimizer.zero_grad(set_to_none=True)
        for labeled in (True, False):
            with torch.autocast("cuda"):
                value = pass_losses(net, x, target, loss, labeled)
            scaler.scale(value).backward()
        scaler.step(optimizer)
        scaler.update()
        torch.cuda.synchronize()
        return {"gpu_peak_gb": torch.cuda.max_memory_allocated() / GB}
    except torch.cuda.OutOfMemoryError:
        return {"gpu_peak_gb": "OOM"}
    finally:
        del net, optimizer
        gc.collect()
        torch.cuda.empty_cache()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--patches", type=int, nargs="+", default=[128, 96], help="cubic 3D patch edges")
    p.add_argument("--queries", type=int, nargs="+", default=[32, 64, 128])
    p.add_argument("--strides", type=int, nargs="+", default=[1, 2, 4], help="mask-logit strides")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--in-channels", type=int, default=2, help="BraTS in this plugin: T1ce + T2")
    p.add_argument("--classes", type=int, default=2, help="nnU-Net labels incl. background (whole tumour: 2)")
    p.add_argument("--gpu", action="store_true", help="also measure on the CUDA device")
    p.add_argument("--out", type=Path, default=RESULTS / "dkuxnet_memory.json")
    args = p.parse_args(argv)
    gpu = args.gpu and torch.cuda.is_available()
    default = nnUNetTrainerDKUXNet.network_config
    rows = []
    header = (f"{'queries':>7} {'mask stride':>11} {'patch':>7} {'params M':>8} {'static':>7} {'act fp32':>8} "
              f"{'peak fp32':>9} {'act amp':>8} {'peak amp':>8} {'fits 24 GB':>10}" + ("   GPU peak" if gpu else ""))
    print(f"one training step of nnUNetTrainerDKUXNet (2 networks, labeled + unlabeled pass), batch {args.batch}, "
          f"{args.in_channels} channels, {args.classes} classes; GB = 2^30 bytes; meta-device estimate")
    print(header)
    for edge in args.patches:
        patch = (edge,) * 3
        for stride in args.strides:
            for queries in args.queries:
                config = replace(default, num_queries=queries, mask_stride=stride)
                row = {"num_queries": queries, "mask_stride": stride, "patch": list(patch), "batch": args.batch,
                       "default": config == default}
                row.update(estimate(config, patch, args.batch, args.in_channels, args.classes))
                row["fits_24gb_amp"] = row["peak_amp_gb"] * 1.15 <= CARD_GB
                if gpu:
                    row.update(measure_gpu(config, patch, args.batch, args.in_channels, args.classes))
                rows.append(row)
                gpu_col = ""
                if gpu:
                    g = row["gpu_peak_gb"]
                    gpu_col = f" {g:>10.2f}" if isinstance(g, float) else f" {g:>10}"
                print(f"{queries:>7} {'1/' + str(stride):>11} {edge:>4}^3 {row['parameters_M']:>8.1f} "
                      f"{row['static_gb']:>7.2f} {row['activations_fp32_gb']:>8.2f} {row['peak_fp32_gb']:>9.2f} "
                      f"{row['activations_amp_gb']:>8.2f} {row['peak_amp_gb']:>8.2f} "
                      f"{'yes' if row['fits_24gb_amp'] else 'no':>10}{gpu_col}"
                      + ("  <- default" if row["default"] else ""), flush=True)
    for r in rows:
        for k, v in list(r.items()):
            if isinstance(v, float):
                r[k] = round(v, 3)
    result = {"benchmark": "bench_dkuxnet_memory", "machine": machine_info(), "measured_on_gpu": gpu,
              "default_network": default.to_dict(), "method": __doc__.split("\n\n")[2].strip(),
              "fits_rule": f"peak_amp_gb x 1.15 (allocator, workspaces) <= {CARD_GB}", "rows": rows}
    write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
