"""The parts of training that matter under nnU-Net's DDP, run on CPU with two processes (gloo): the SMMS
network inside DistributedDataParallel (find_unused_parameters=False, as nnU-Net wraps it) trains with the
supervised + mutual-learning loss, every parameter receives a gradient at every step, and the ranks stay in sync.
A real `-num_gpus 2` run needs two GPUs."""
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from test_network import build

CONFIGS = {"full": ({}, True), "baseline": ({"mmf": False, "mae": False}, False),
           "all_skips_replace": ({"mae_position": "all_skips", "mmf_mode": "replace"}, True)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, result_dir: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from nnunetv2_smms.trainers.mutual_learning import MutualLearningLoss
        from nnunetv2_smms.unlabeled.loader import batch_share
        mcml = MutualLearningLoss()
        for name, (switches, use_unsup) in CONFIGS.items():
            torch.manual_seed(0)  # same initial weights on every rank (DDP also broadcasts them)
            net = torch.nn.parallel.DistributedDataParallel(build(n_stages=3, **switches).train(),
                                                            find_unused_parameters=False)
            opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.99, nesterov=True)
            n_lab, n_unl = batch_share(3, world, rank), batch_share(2, world, rank)
            torch.manual_seed(100 + rank)  # each rank its own cases
            for step in range(2):
                x = torch.randn(n_lab + n_unl, 2, 8, 8, 8)
                out_a, out_b = net(x)
                loss = sum(o[:n_lab].square().mean() for o in out_a + out_b)
                if use_unsup:
                    loss = loss + mcml(out_a[0][n_lab:], out_b[0][n_lab:])
                opt.zero_grad()
                loss.backward()
                missing = [n for n, p in net.named_parameters() if p.grad is None]
                assert not missing, f"{name}: rank {rank} step {step}: no gradient for {missing[:5]}"
                opt.step()
            torch.save(torch.cat([p.detach().flatten() for p in net.parameters()]),
                       os.path.join(result_dir, f"{name}_rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_every_parameter_gets_a_gradient_and_ranks_stay_in_sync(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for name in CONFIGS:
        w0, w1 = (torch.load(tmp_path / f"{name}_rank{r}.pt") for r in range(2))
        torch.testing.assert_close(w0, w1, msg=f"{name}: ranks diverged")  # gradients were averaged
