"""What defines Mean Teacher, each pinned by a test that fails when the behaviour is removed: the EMA update
(hand computation, after every optimizer step, the teacher never gets a gradient), the consistency term (MSE of
probabilities to the noisy-input teacher's detached ones), the term moves the weights (weight 0 vs default), and
what predicts (one eval tensor; nnU-Net's checkpoint loads into a freshly built network whose output is the
chosen sub-model's; validation scores that one). In-process trainers on the session's prepared dataset."""
import itertools

import numpy as np
import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from torch import nn

from _step_helpers import fixed_step_inputs, started_trainer, step_update
from nnunetv2_smms.architectures.ema_teacher import EMATeacherNetwork
from nnunetv2_smms.trainers.mean_teacher import SETTINGS_KEY, recorded_method_settings


def tiny_unet(ds=True):
    return PlainConvUNet(2, 2, [4, 8], nn.Conv2d, 3, [1, 2], 1, 3, 1, conv_bias=True, norm_op=nn.InstanceNorm2d,
                         norm_op_kwargs={"affine": True}, nonlin=nn.LeakyReLU, deep_supervision=ds)


def perturbed(params, scale=0.05):
    with torch.no_grad():
        for p in params:
            p.add_(scale * torch.randn_like(p))


def lagging_teacher(state: dict, scale=0.02) -> dict:
    """A copy of a network state whose teacher differs from the student (as after some training)."""
    state = {k: v.clone() for k, v in state.items()}
    for k, v in state.items():
        if k.startswith("teacher.") and v.is_floating_point():
            v.add_(scale * torch.randn_like(v))
    return state


def grads(module):
    """Each parameter's gradient (zeros where none, e.g. the deep-supervision heads a full-resolution loss does
    not use)."""
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in module.parameters()]


def updates(trainer, fixed, **attrs):
    """step_update, then the class attributes again."""
    try:
        return step_update(trainer, *fixed, **attrs)
    finally:
        for k in attrs:
            trainer.__dict__.pop(k, None)


# ---------------------------------------------------------------------------------------------------- the module
def test_ema_update_matches_hand_computation():
    torch.manual_seed(0)
    net = EMATeacherNetwork(tiny_unet())
    assert all(not p.requires_grad for p in net.teacher.parameters())
    assert all(p.requires_grad for p in net.student.parameters())
    decay = 0.99
    for step, expected_alpha in enumerate([0.0, 0.5, 2 / 3, 0.75]):  # min(1 - 1/(t+1), decay), t = 0, 1, 2, 3
        perturbed(net.student.parameters())
        teacher = [p.clone() for p in net.teacher.parameters()]
        student = [p.clone() for p in net.student.parameters()]
        alpha = net.update_teacher(decay)
        assert alpha == pytest.approx(expected_alpha) and int(net.ema_updates) == step + 1
        for t_new, t_old, s in zip(net.teacher.parameters(), teacher, student):
            torch.testing.assert_close(t_new, expected_alpha * t_old + (1 - expected_alpha) * s)
    net.ema_updates.fill_(1000)  # late in training: the decay caps the factor
    teacher = [p.clone() for p in net.teacher.parameters()]
    perturbed(net.student.parameters())
    assert net.update_teacher(decay) == pytest.approx(decay)
    for t_new, t_old, s in zip(net.teacher.parameters(), teacher, net.student.parameters()):
        torch.testing.assert_close(t_new, decay * t_old + (1 - decay) * s)


def test_eval_mode_returns_the_predicting_model_and_deep_supervision_reaches_both():
    torch.manual_seed(0)
    for predict in ("student", "teacher"):
        net = EMATeacherNetwork(tiny_unet(ds=False), predict=predict)
        perturbed(net.teacher.parameters(), 0.2)
        x = torch.randn(2, 2, 16, 16)
        with torch.no_grad():
            net.eval()
            out = net(x)
            assert isinstance(out, torch.Tensor) and out.shape == (2, 3, 16, 16)
            torch.testing.assert_close(out, getattr(net, predict)(x))
            other = "teacher" if predict == "student" else "student"
            assert (out - getattr(net, other)(x)).abs().max() > 1e-3
            net.train()
            torch.testing.assert_close(net(x), net.student(x))  # training: the student's output
    net.set_deep_supervision(True)
    assert net.student.decoder.deep_supervision and net.teacher.decoder.deep_supervision
    with pytest.raises(ValueError):
        EMATeacherNetwork(tiny_unet(), predict="ema")


# ---------------------------------------------------------------------------------------------------- the trainer
@pytest.fixture(scope="module")
def mt_trainer(prepared_dataset, tmp_path_factory):
    with started_trainer(prepared_dataset, tmp_path_factory, "nnUNetTrainerMeanTeacher") as t:
        t.network.train()
        yield t


@pytest.fixture(scope="module")
def fixed_step(mt_trainer):
    torch.manual_seed(0)
    weights = lagging_teacher(mt_trainer.network.state_dict())
    weights["ema_updates"].fill_(1000)  # late in training: alpha = ema_decay
    return fixed_step_inputs(mt_trainer, weights)


def test_defaults_are_ssl4mis(mt_trainer):
    t = mt_trainer
    assert (t.unsup_weight, t.unsup_rampup, t.ema_decay, t.predict_with) == (0.1, 1.0, 0.99, "student")
    assert (t.teacher_noise_std, t.teacher_noise_clip) == (0.1, 0.2)
    assert isinstance(t.network, EMATeacherNetwork)
    assert recorded_method_settings(t.plans_manager.plans["configurations"]["3d_fullres"], SETTINGS_KEY)["predict"] \
        == "student"


def test_teacher_moves_by_ema_after_every_optimizer_step_and_gets_no_gradient(mt_trainer, fixed_step):
    t = mt_trainer
    batch, unlabeled, weights, optimizer = fixed_step
    t.network.load_state_dict(weights)
    t.optimizer.load_state_dict(optimizer)
    t.network.ema_updates.fill_(3)
    t.dataloader_unlabeled = itertools.repeat(unlabeled)
    for expected_alpha in (0.75, 0.8):  # two steps in a row: t = 3, then 4
        teacher = [p.detach().clone() for p in t.network.teacher.parameters()]
        student_before = [p.detach().clone() for p in t.network.student.parameters()]
        out = t.train_step(batch)
        assert out["skipped"] == 0 and out["loss_consistency"] > 0
        student = list(t.network.student.parameters())
        assert any(not torch.equal(a, b) for a, b in zip(student_before, student)), "the student did not move"
        for t_new, t_old, s in zip(t.network.teacher.parameters(), teacher, student):
            assert t_new.grad is None and not t_new.requires_grad
            torch.testing.assert_close(t_new, expected_alpha * t_old + (1 - expected_alpha) * s.detach())
    assert int(t.network.ema_updates) == 5


def test_consistency_is_the_mse_to_the_noisy_input_teachers_detached_probabilities(mt_trainer, fixed_step):
    t = mt_trainer
    _, unlabeled, weights, _ = fixed_step
    unlabeled = unlabeled["data"]
    t.network.load_state_dict(weights)
    net = t.network
    torch.manual_seed(5)
    loss = t.unlabeled_losses(unlabeled)["loss_consistency"]
    torch.manual_seed(5)
    noise = torch.clamp(torch.randn_like(unlabeled) * 0.1, -0.2, 0.2)
    with torch.no_grad():
        p_t = torch.softmax(net.teacher(unlabeled + noise)[0], 1)
        p_t_clean = torch.softmax(net.teacher(unlabeled)[0], 1)
    p_s = torch.softmax(net.student(unlabeled)[0], 1)  # full resolution
    hand = torch.mean((p_s - p_t) ** 2)
    torch.testing.assert_close(loss, hand)
    assert abs(loss.item() - torch.mean((p_s - p_t_clean) ** 2).item()) > 1e-7, "no noise on the teacher's input"
    # the gradient: only the student's, the same as the hand formula's with a constant target
    net.zero_grad(set_to_none=True)
    loss.backward()
    assert all(p.grad is None for p in net.teacher.parameters())
    got = grads(net.student)
    net.zero_grad(set_to_none=True)
    hand.backward()
    for g, h in zip(got, grads(net.student)):
        torch.testing.assert_close(g, h)
    assert sum(float(g.abs().sum()) for g in got) > 0
    net.zero_grad(set_to_none=True)


def test_consistency_term_changes_the_update(mt_trainer, fixed_step):
    t = mt_trainer
    n = sum(p.numel() for p in t.network.student.parameters())  # step_update's vector: student first, then teacher
    out0, u0 = updates(t, fixed_step, unsup_weight=0.0, unsup_rampup=0.0)
    out1, u1 = updates(t, fixed_step, unsup_rampup=0.0)  # the default weight 0.1
    assert out0["skipped"] == 0 and out1["skipped"] == 0 and out1["loss_consistency"] > 0
    assert (u1 - u0)[:n].norm() > 1e-3 * u0[:n].norm(), \
        "the consistency term at its default weight did not change the student's update"
    # at weight 0 the step is the supervised-only step (the unlabeled pass adds nothing else)
    out_sup, u_sup = updates(t, fixed_step, uses_unlabeled=False)
    torch.testing.assert_close(u0, u_sup, rtol=1e-4, atol=1e-9)
    assert "loss_consistency" not in out_sup
    np.testing.assert_allclose(out1["loss"], out1["loss_sup"] + 0.1 * out1["loss_consistency"], rtol=1e-5)


def test_checkpoint_loads_into_a_fresh_network_that_returns_the_chosen_model(mt_trainer, fixed_step, tmp_path):
    t = mt_trainer
    t.network.load_state_dict(fixed_step[2])  # teacher != student
    t.network.ema_updates.fill_(7)
    t.save_checkpoint(str(tmp_path / "checkpoint.pth"))
    weights = torch.load(tmp_path / "checkpoint.pth", map_location="cpu", weights_only=False)["network_weights"]
    x = next(t.dataloader_val)["data"][:1]
    n_out = t.label_manager.num_segmentation_heads
    try:
        for predict in ("student", "teacher"):
            t.predict_with = predict
            t._record_settings()  # what initialize() writes into the plans (and so the model folder's plans.json)
            assert recorded_method_settings(t.configuration_manager.configuration, SETTINGS_KEY)["predict"] == predict
            net = type(t).build_network_architecture(t.plans_manager, t.configuration_manager,
                                                     x.shape[1], n_out, enable_deep_supervision=False)
            net.load_state_dict(weights)  # strict
            assert int(net.ema_updates) == 7
            net.eval()
            with torch.no_grad():
                out = net(x)
                expected = getattr(net, predict)(x)
                other = net.teacher(x) if predict == "student" else net.student(x)
            assert isinstance(out, torch.Tensor) and out.shape == (1, n_out, *t.configuration_manager.patch_size)
            torch.testing.assert_close(out, expected)
            assert (out - other).abs().max() > 1e-4
    finally:
        t.__dict__.pop("predict_with", None)
        t._record_settings()


def test_validation_scores_the_predicting_model_and_reports_the_other(mt_trainer, fixed_step):
    t = mt_trainer
    t.network.load_state_dict(fixed_step[2])
    batch = next(t.dataloader_val)
    t.network.eval()
    try:
        with torch.no_grad():
            _, outputs = t.validation_outputs(batch["data"], batch["target"])
            student, teacher = t.network.student(batch["data"]), t.network.teacher(batch["data"])
    finally:
        t.network.train()
    assert set(outputs) == {"", "_teacher"}
    torch.testing.assert_close(outputs[""][0], student[0])
    torch.testing.assert_close(outputs["_teacher"][0], teacher[0])
