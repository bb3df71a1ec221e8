"""What defines our MMCML re-implementation, each pinned by a test that fails when the behaviour is removed: the
area similarity and its InfoNCE (ASC) against a hand computation, positives are the same case across the
modalities, ASC trains both branches (nothing detached), the consistency term stops the gradient at the target,
PReL is the KL to the stronger branch's detached soft prediction and only the weaker branch learns from it, the
stronger branch is the one with the higher moving-average validation Dice, the branches are decoupled (no
fusion), each unlabeled term moves the weights (weight 0 vs default), validation scores the fused output and each
branch, and the eval network returns one tensor and loads the training checkpoint."""
import math

import numpy as np
import pytest
import torch

from _step_helpers import step_update, started_trainer, fixed_step_inputs
from nnunetv2_smms.architectures import DualBranchUNet, unwrap
from nnunetv2_smms.trainers.mmcml import (area_similarity, area_similarity_contrastive, foreground_maps,
                                          moving_average, prel_loss, soft_kl)


# ------------------------------------------------------------------------------------------------ the terms
def test_area_similarity_and_asc_match_a_hand_computation():
    torch.manual_seed(0)
    a, b = torch.randn(2, 3, 4, 1, 1), torch.randn(2, 3, 4, 1, 1)  # 2 cases, background + 2 foreground classes
    p, q = torch.softmax(a, 1)[:, 1:].flatten(2), torch.softmax(b, 1)[:, 1:].flatten(2)
    eps = 1e-5
    s = [[sum((2 * float((p[i, k] * q[j, k]).sum()) + eps) / (float((p[i, k] ** 2).sum() + (q[j, k] ** 2).sum()) + eps)
              for k in range(2)) / 2 for j in range(2)] for i in range(2)]
    torch.testing.assert_close(area_similarity(p, q), torch.tensor(s))
    lin = [[sum((2 * float((p[i, k] * q[j, k]).sum()) + eps) / (float(p[i, k].sum() + q[j, k].sum()) + eps)
                for k in range(2)) / 2 for j in range(2)] for i in range(2)]
    torch.testing.assert_close(area_similarity(p, q, squared=False), torch.tensor(lin))
    t = 0.1
    rows = sum(-math.log(math.exp(s[i][i] / t) / sum(math.exp(s[i][j] / t) for j in range(2))) for i in range(2)) / 2
    cols = sum(-math.log(math.exp(s[j][j] / t) / sum(math.exp(s[i][j] / t) for i in range(2))) for j in range(2)) / 2
    assert area_similarity_contrastive(a, b, t).item() == pytest.approx(0.5 * (rows + cols), rel=1e-5)
    # regions (sigmoid): every channel is a foreground map
    torch.testing.assert_close(foreground_maps(a, True), torch.sigmoid(a).flatten(2))


def test_asc_positives_are_the_same_case_across_modalities():
    torch.manual_seed(0)
    a = torch.randn(3, 2, 6, 6, 1) * 3
    same = area_similarity_contrastive(a, a + 0.1 * torch.randn_like(a))
    shuffled = area_similarity_contrastive(a, a[[1, 2, 0]])  # b's cases belong to other cases of a
    assert same < shuffled


def test_asc_trains_both_branches():
    torch.manual_seed(0)
    a = torch.randn(2, 2, 4, 4, 4, requires_grad=True)
    b = torch.randn(2, 2, 4, 4, 4, requires_grad=True)
    area_similarity_contrastive(a, b).backward()
    a_ref, b_ref = a.detach().clone().requires_grad_(True), b.detach().clone().requires_grad_(True)
    area_similarity_contrastive(a_ref, b_ref.detach()).backward()  # b as a constant
    assert b.grad.abs().sum() > 0 and a.grad.abs().sum() > 0
    assert not torch.allclose(a.grad, a_ref.grad * 0)  # a learns
    torch.testing.assert_close(a.grad, a_ref.grad)  # the gradient on a is the full formula's (no other path)


def test_prel_is_the_kl_to_the_stronger_branch_and_only_the_weaker_learns():
    torch.manual_seed(0)
    a = torch.randn(2, 3, 2, 2, 2, requires_grad=True)
    b = torch.randn(2, 3, 2, 2, 2, requires_grad=True)
    p_a, p_b = torch.softmax(a, 1).detach(), torch.softmax(b, 1).detach()
    kl_b_learns = (p_a * (p_a.log() - torch.log_softmax(b, 1))).sum(1).mean()
    torch.testing.assert_close(prel_loss(a, b, "a"), kl_b_learns)
    prel_loss(a, b, "a").backward()
    assert a.grad is None or a.grad.abs().sum() == 0  # the stronger branch is the teacher only
    assert b.grad.abs().sum() > 0
    assert prel_loss(a, a, "a").item() == pytest.approx(0.0, abs=1e-6)
    # per voxel, the branch with the lower entropy teaches
    h_a, h_b = -(p_a * p_a.log()).sum(1), -(p_b * p_b.log()).sum(1)
    kl_a_learns = (p_b * (p_b.log() - torch.log_softmax(a, 1))).sum(1)
    expected = torch.where(h_a < h_b, (p_a * (p_a.log() - torch.log_softmax(b, 1))).sum(1), kl_a_learns).mean()
    torch.testing.assert_close(prel_loss(a, b, "entropy"), expected)
    assert 0 < (h_a < h_b).float().mean() < 1  # both directions occur in this example
    # sigmoid (regions): Bernoulli KL summed over the regions
    s_a = torch.sigmoid(a).detach()
    bern = (s_a * (s_a.log() - torch.nn.functional.logsigmoid(b))
            + (1 - s_a) * ((1 - s_a).log() - torch.nn.functional.logsigmoid(-b))).sum(1)
    torch.testing.assert_close(soft_kl(b, s_a, True), bern)


def test_moving_average_of_the_validation_dice():
    assert moving_average([]) is None and moving_average([float("nan")]) is None
    assert moving_average([0.5, float("nan"), 0.7]) == pytest.approx(0.9 * 0.5 + 0.1 * 0.7)


# ------------------------------------------------------------------------------------------------ the trainer
@pytest.fixture(scope="module")
def mmcml_trainer(prepared_dataset, tmp_path_factory):
    with started_trainer(prepared_dataset, tmp_path_factory, "nnUNetTrainerMMCML") as t:
        yield t


@pytest.fixture(scope="module")
def fixed_step(mmcml_trainer):
    return fixed_step_inputs(mmcml_trainer)


def test_network_is_two_decoupled_branches(mmcml_trainer):
    t = mmcml_trainer
    net = unwrap(t.network)
    assert isinstance(net, DualBranchUNet) and len(net.mmf) == 0 and net.mae_levels == []
    recorded = t.plans_manager.plans["configurations"]["3d_fullres"]
    assert recorded["smms"]["mmf"] is False and recorded["smms"]["mae"] is False
    assert recorded["semi_supervised"]["mmcml"]["prel_stronger"] == "val_dice"
    x = torch.randn(1, 2, *t.configuration_manager.patch_size)
    y = x.clone()
    y[:, 1] += torch.randn_like(y[:, 1])  # only modality b changes
    net.eval()
    with torch.no_grad():
        (a0, b0), (a1, b1) = net.forward_branches(x), net.forward_branches(y)
    net.train()
    torch.testing.assert_close(a1[0], a0[0], rtol=0, atol=0)
    assert (b1[0] - b0[0]).abs().max() > 1e-5


def _term_gradients(t, unlabeled, **attrs):
    """{term: gradient of that term alone w.r.t. every parameter (flattened)} from one unlabeled pass."""
    for k, v in attrs.items():
        setattr(t, k, v)
    params = [p for p in t.network.parameters()]
    terms = t.unlabeled_losses(unlabeled)
    return {k: torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(
        torch.autograd.grad(v, params, retain_graph=True, allow_unused=True), params)]) for k, v in terms.items()}


def test_unsupervised_terms_change_the_update(mmcml_trainer, fixed_step):
    t = mmcml_trainer
    assert t.unsup_weight_at(0) == pytest.approx(math.exp(-5))  # default: ramp-up over the whole run
    try:
        out0, u0 = step_update(t, *fixed_step, unsup_rampup=0.0, unsup_weight=0.0)
        out1, u1 = step_update(t, *fixed_step, unsup_weight=1.0)
    finally:
        t.unsup_rampup, t.unsup_weight = 1.0, 1.0
    assert out1["loss_consistency"] > 0 and out1["loss_asc"] > 0 and "loss_prel" not in out1
    assert (u1 - u0).norm() > 1e-3 * u0.norm(), "the unlabeled terms at weight 1 did not change the update"
    assert out1["loss"] == pytest.approx(out1["loss_sup_a"] + out1["loss_sup_b"] + out1["loss_consistency"]
                                         + out1["loss_asc"], rel=1e-5)


def test_each_unlabeled_term_reaches_the_weights_prel_only_the_weaker_branch(mmcml_trainer, fixed_step):
    t = mmcml_trainer
    unlabeled = fixed_step[1]["data"]
    in_a = torch.cat([torch.full((p.numel(),), n.startswith("branch_a."), dtype=torch.bool)
                      for n, p in t.network.named_parameters()])
    assert in_a.any() and (~in_a).any()
    try:
        t._progress = 0.0
        grads = _term_gradients(t, unlabeled, prel_start=0.0, _prel_teacher="a")
        assert set(grads) == {"loss_consistency", "loss_asc", "loss_prel"}
        for name in ("loss_consistency", "loss_asc"):  # both branches learn from the mutual terms
            assert grads[name][in_a].abs().sum() > 0 and grads[name][~in_a].abs().sum() > 0, name
        assert grads["loss_prel"][~in_a].abs().sum() > 0, "PReL does not reach the weaker branch"
        assert grads["loss_prel"][in_a].abs().sum() == 0, "PReL moves the stronger branch"
        t.prel_start, t._progress = 0.5, 0.4
        assert not t.prel_active()  # before prel_start: no PReL term
        t._progress = 0.5
        assert t.prel_active()
        t._prel_teacher = None
        assert not t.prel_active()  # no validation Dice yet: no teacher, no PReL term
    finally:
        t.prel_start, t._prel_teacher, t._progress = 0.5, None, 0.0
        t.optimizer.zero_grad(set_to_none=True)


def test_stronger_branch_is_the_one_with_the_better_validation_dice(mmcml_trainer):
    t = mmcml_trainer
    log = t.logger.local_logger.my_fantastic_logging
    saved = {k: list(log.get(k, [])) for k in ("mean_fg_dice_a", "mean_fg_dice_b")}
    try:
        log["mean_fg_dice_a"], log["mean_fg_dice_b"] = [], []
        assert t.stronger_branch() is None  # not validated yet: no PReL
        log["mean_fg_dice_a"], log["mean_fg_dice_b"] = [0.2, 0.9], [0.6, 0.1]
        # moving averages: a 0.27, b 0.55 (the last epoch alone would say a)
        assert t.stronger_branch() == "b"
        log["mean_fg_dice_b"] = [0.1, 0.1]
        assert t.stronger_branch() == "a"
        t.prel_stronger = "entropy"
        assert t.stronger_branch() == "entropy"
    finally:
        t.prel_stronger = "val_dice"
        log.update(saved)


def test_validation_scores_the_fused_output_and_each_branch_from_its_own(mmcml_trainer):
    t = mmcml_trainer
    net = unwrap(t.network)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    try:
        with torch.no_grad():  # branch a: foreground everywhere, branch b: background everywhere, b stronger
            for branch, bias in ((net.branch_a, (-1.0, 1.0)), (net.branch_b, (3.0, -3.0))):
                for seg in branch.decoder.seg_layers:
                    seg.weight.zero_()
                    seg.bias.copy_(torch.tensor(bias))
        batch = next(t.dataloader_val)
        result = t.validation_step(batch)
    finally:
        net.load_state_dict(state)
    target = batch["target"][0] if isinstance(batch["target"], list) else batch["target"]
    n_fg, n_all = int((target == 1).sum()), target.numel()
    assert n_fg > 0
    assert result["tp_hard_a"][0] == n_fg and result["fp_hard_a"][0] == n_all - n_fg
    assert result["tp_hard_b"][0] == 0 and result["fn_hard_b"][0] == n_fg
    assert result["tp_hard"][0] == 0 and result["fn_hard"][0] == n_fg and result["fp_hard"][0] == 0  # fused


def test_checkpoint_loads_into_the_predictor_network(mmcml_trainer, monkeypatch):
    t = mmcml_trainer
    n_out = t.label_manager.num_segmentation_heads
    net = type(t).build_network_architecture(t.plans_manager, t.configuration_manager, 2, n_out, False)
    net.load_state_dict(unwrap(t.network).state_dict())  # strict
    net.eval()
    x = torch.randn(1, 2, *t.configuration_manager.patch_size)
    with torch.no_grad():
        out = net(x)
        out_a, out_b = unwrap(t.network).eval().forward_branches(x)
    t.network.train()
    assert isinstance(out, torch.Tensor) and out.shape == (1, n_out, *t.configuration_manager.patch_size)
    torch.testing.assert_close(out, (out_a[0] + out_b[0]) / 2)
    monkeypatch.setenv("nnUNet_smms_output_branch", "a")
    net_a = type(t).build_network_architecture(t.plans_manager, t.configuration_manager, 2, n_out, False)
    net_a.load_state_dict(unwrap(t.network).state_dict())
    with torch.no_grad():
        torch.testing.assert_close(net_a.eval()(x), out_a[0])
    assert unwrap(t.network).output_branch == "fused"
    np.testing.assert_equal(t.unsup_rampup, 1.0)
