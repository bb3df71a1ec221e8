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


def _train_step_worker(rank: int, world: int, port: int, result_dir: str):
    """nnUNetTrainerSMMS.train_step itself on a DDP-wrapped network with nnU-Net's own loss classes. The trainer
    object is created without nnU-Net's __init__/initialize (they force CUDA under DDP); train_step only needs the
    attributes set here."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
        from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
        from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
        from nnunetv2_smms.trainers import nnUNetTrainerSMMS
        from nnunetv2_smms.trainers.mutual_learning import MutualLearningLoss
        for separate in (True, False):
            torch.manual_seed(0)
            t = object.__new__(nnUNetTrainerSMMS)
            t.network = torch.nn.parallel.DistributedDataParallel(build(n_stages=3, dropout_p=0).train(),
                                                                  find_unused_parameters=False)
            t.device, t.is_ddp, t.grad_scaler = torch.device("cpu"), True, None
            t.optimizer = torch.optim.SGD(t.network.parameters(), lr=0.01, momentum=0.99, nesterov=True)
            t.use_mcml, t.separate_unlabeled_pass = True, separate
            t._bad_steps_in_a_row, t._iteration, t.num_epochs, t.num_iterations_per_epoch = 0, 0, 1, 3
            t.mutual_loss = MutualLearningLoss()
            # nnU-Net's DDP deep-supervision weights: the lowest output gets 1e-6, not 0 (see _build_loss)
            t.loss = DeepSupervisionWrapper(DC_and_CE_loss({"batch_dice": False, "smooth": 1e-5, "do_bg": False,
                                                            "ddp": True}, {}, weight_ce=1, weight_dice=1,
                                                           dice_class=MemoryEfficientSoftDiceLoss), [1.0, 1e-6])
            torch.manual_seed(100 + rank)  # each rank its own cases
            t.dataloader_unlabeled = iter([{"data": torch.randn(1, 2, 8, 8, 8)} for _ in range(3)])
            for step in range(3):
                batch = {"data": torch.randn(2, 2, 8, 8, 8), "keys": [f"r{rank}s{step}"],
                         "target": [torch.randint(0, 3, (2, 1, 8, 8, 8)).float(),
                                    torch.randint(0, 3, (2, 1, 4, 4, 4)).float()]}
                out = t.train_step(batch)
                assert out["skipped"] == 0 and out["loss_unsup"] > 0, out
            torch.save(torch.cat([p.detach().flatten() for p in t.network.parameters()]),
                       os.path.join(result_dir, f"train_step_{'separate' if separate else 'joint'}_rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_train_step_with_separate_unlabeled_pass_keeps_ranks_in_sync(tmp_path):
    """The default separate labeled / unlabeled passes under DDP: the first backward runs under no_sync, the second
    synchronizes; every parameter takes part (else DDP with find_unused_parameters=False raises at the next step),
    the ranks end identical, and the result equals one joint pass."""
    mp.spawn(_train_step_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    w = {(mode, r): torch.load(tmp_path / f"train_step_{mode}_rank{r}.pt") for mode in ("separate", "joint")
         for r in range(2)}
    torch.testing.assert_close(w[("separate", 0)], w[("separate", 1)], msg="ranks diverged")
    torch.testing.assert_close(w[("separate", 0)], w[("joint", 0)], rtol=1e-3, atol=1e-6)
