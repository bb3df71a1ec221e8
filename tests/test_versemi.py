"""What defines VerSemi, each pinned by a test that fails when the behaviour is removed.
Network: the prompt changes the output from the same trunk features, the trunk (encoder, decoder) runs once per
input whatever the number of prompts, the controller's parameters come from GAP(bottleneck) and the prompt (hand
computation of the head), eval mode returns ONE tensor of nnU-Net's outputs built by the stated rule (2D, 3D,
regions). CutMix: a box of the configured fraction of the patch, a outside / b inside, per-class mixed labels and
the union target. Terms: Dice as the source, the aggregate (max over class prompts) is NOT detached, the in-cube
GT term reads the labeled box only. Trainer (the session's prepared dataset): the unlabeled terms change the
update and weight 0 equals the step without them, stage 1 draws no unlabeled batch, settings recorded and the
network rebuilt from them. End to end: nnUNetv2_train + nnUNetv2_predict on a dataset with two foreground
labels."""
import itertools
import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from _step_helpers import fixed_step_inputs, started_trainer, step_update
from conftest import nnunet_env, prepare_synthetic, run, smms_cli
from test_network import PLAIN, RESENC, REQ_IMPORT, arch_kwargs

from nnunetv2_smms.architectures.cutmix import check_ratio, cube_mask, draw_ratio, mix, partner_index
from nnunetv2_smms.architectures.dual_branch import unwrap
from nnunetv2_smms.architectures.dynamic_head import (DynamicHeadConfig, VerSemiNetwork, build_versemi_network,
                                                      combine_class_logits)
from nnunetv2_smms.trainers.versemi import (aggregate_consistency, binary_ce, cube_gt_consistency, mixed_pairs,
                                            soft_dice_loss)


def build(dim=3, k=2, regions=False, residual=False, **cfg) -> VerSemiNetwork:
    config = DynamicHeadConfig(n_class_prompts=k, regions=regions, **cfg)
    return build_versemi_network(RESENC if residual else PLAIN, arch_kwargs(dim, 3, residual), REQ_IMPORT, 2,
                                 config.num_output_channels(), config)


# ================================================================================================ the network
def test_prompts_change_the_output_from_the_same_trunk_features():
    torch.manual_seed(0)
    net = build().train()
    x = torch.randn(2, 2, 16, 16, 16)
    with torch.no_grad():
        bottleneck, features = net.trunk(x)
        per_prompt = [net.head(bottleneck, features, [t]) for t in range(3)]
        together = net.forward_prompts(x)
    assert together.shape == (2, 3, 16, 16, 16)
    for t in range(3):
        torch.testing.assert_close(together[:, t:t + 1], per_prompt[t])  # prompt t's channel = prompt t alone
    for a, b in itertools.combinations(range(3), 2):
        assert (per_prompt[a] - per_prompt[b]).abs().max() > 1e-4, (a, b)
    torch.testing.assert_close(net.forward_prompts(x, [2, 0]), together[:, [2, 0]])


def test_the_trunk_runs_once_per_input_whatever_the_number_of_prompts():
    net = build(k=3)
    calls = {"encoder": 0, "decoder": 0, "head": 0}

    def counter(name):
        def hook(*_):
            calls[name] += 1
        return hook
    net.encoder.register_forward_hook(counter("encoder"))
    net.decoder.register_forward_hook(counter("decoder"))
    net.head.register_forward_hook(counter("head"))
    x = torch.randn(1, 2, 16, 16, 16)
    out = net.train()(x)
    assert out.shape[1] == 4 and calls == {"encoder": 1, "decoder": 1, "head": 1}
    with torch.no_grad():
        net.eval()(x)
    assert calls == {"encoder": 2, "decoder": 2, "head": 2}
    # the decoder itself (nnU-Net's forward) returns the last stage's features: the seg layers are identities
    skips = net.encoder(x)
    assert net.decoder(skips).shape == (1, net.encoder.output_channels[0], 16, 16, 16)
    assert all(isinstance(m, torch.nn.Identity) for m in net.decoder.seg_layers)


def test_controller_parameters_come_from_the_bottleneck_gap_and_the_prompt():
    torch.manual_seed(0)
    net = build()
    head = net.head
    c = net.encoder.output_channels[-1]
    bottleneck = torch.randn(2, c, 4, 4, 4)
    with torch.no_grad():
        params = head.params(bottleneck, [0, 1, 2])
        assert params.shape == (2, 3, head.n_params) and head.n_params == 64 + 8 + 64 + 8 + 8 + 1
        for b in range(2):
            for t in range(3):
                cond = torch.cat((bottleneck[b].mean((1, 2, 3)), F.one_hot(torch.tensor(t), 3).float()))
                torch.testing.assert_close(params[b, t], head.controller(cond))
        # only the GAP matters: a spatial permutation of the bottleneck gives the same parameters ...
        torch.testing.assert_close(head.params(bottleneck.flip(2, 4), [0, 1, 2]), params)
        # ... another mean gives others; another prompt too
        assert (head.params(bottleneck + 0.5, [0, 1, 2]) - params).abs().max() > 1e-4
        assert (params[:, 0] - params[:, 1]).abs().max() > 1e-4
    # and the logits depend on the bottleneck only through those parameters, with gradient
    b = bottleneck.clone().requires_grad_(True)
    features = torch.randn(2, net.encoder.output_channels[0], 8, 8, 8)
    head(b, features, [1]).sum().backward()
    assert b.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="prompts"):
        head.params(bottleneck, [3])


def test_the_dynamic_head_is_a_per_sample_per_prompt_stack_of_1x1_convolutions():
    torch.manual_seed(0)
    net = build(dim=2)
    head = net.head
    bottleneck = torch.randn(2, net.encoder.output_channels[-1], 4, 4)
    features = torch.randn(2, net.encoder.output_channels[0], 6, 6)
    with torch.no_grad():
        out = head(bottleneck, features, [0, 2])
        params = head.params(bottleneck, [0, 2])
        h = head.precls(features)
        for b in range(2):
            for i in range(2):
                theta, pos = params[b, i], 0
                shapes = [(8, 8), (8, 8), (1, 8)]
                weights = []
                for o, n in shapes:
                    weights.append(theta[pos:pos + o * n].reshape(o, n))
                    pos += o * n
                x = h[b].reshape(8, -1)
                for layer, (o, n) in enumerate(shapes):
                    x = weights[layer] @ x + theta[pos:pos + o][:, None]
                    pos += o
                    if layer < 2:
                        x = torch.relu(x)
                torch.testing.assert_close(out[b, i], x.reshape(6, 6), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dim", [2, 3])
def test_eval_mode_returns_one_tensor_of_nnunet_outputs_from_the_class_prompts(dim):
    torch.manual_seed(0)
    x = torch.randn(2, 2, *([16] * dim))
    net = build(dim=dim, k=2).eval()
    with torch.no_grad():
        out = net(x)
        z = net.forward_prompts(x, [0, 1])
    assert isinstance(out, torch.Tensor) and out.shape == (2, 3, *([16] * dim))
    p = torch.sigmoid(z)
    scores = torch.cat((1 - p.amax(1, keepdim=True), p), 1)
    torch.testing.assert_close(torch.softmax(out, 1), scores / scores.sum(1, keepdim=True))  # the stated rule
    rule = torch.where(p.amax(1) < 0.5, 0, p.argmax(1) + 1)
    assert torch.equal(out.argmax(1), rule)
    zero = combine_class_logits(z, combination="zero_logit")
    assert torch.equal(zero.argmax(1), rule)
    # regions: the region logits themselves
    net_r = build(dim=dim, k=2, regions=True).eval()
    with torch.no_grad():
        out_r = net_r(x)
        torch.testing.assert_close(out_r, net_r.forward_prompts(x, [0, 1]))
    assert out_r.shape == (2, 2, *([16] * dim))


def test_network_settings_errors_and_state_dict_round_trip():
    with pytest.raises(ValueError, match="output channels"):
        build_versemi_network(PLAIN, arch_kwargs(3, 3), REQ_IMPORT, 2, 4, DynamicHeadConfig(2))
    with pytest.raises(ValueError, match="combination"):
        DynamicHeadConfig(2, combination="mean")
    with pytest.raises(ValueError, match="Unknown VerSemi"):
        DynamicHeadConfig.from_dict({"n_class_prompts": 2, "heads": 3})
    net = build(residual=True)
    with pytest.raises(ValueError, match="deep supervision"):
        net.set_deep_supervision(True)
    other = build(residual=True)
    other.load_state_dict(net.state_dict())  # strict: the predictor's build loads the training network


# ================================================================================================ CutMix
@pytest.mark.parametrize("spatial,ratio", [((16, 12, 8), 0.5), ((10, 16), 2 / 3), ((16, 16, 16), 0.3)])
def test_cube_mask_is_one_box_per_sample_of_the_configured_fraction(spatial, ratio):
    torch.manual_seed(0)
    inside = cube_mask(64, spatial, ratio)
    assert inside.shape == (64, *spatial) and inside.dtype == torch.bool
    sides = [int(ratio * s) for s in spatial]
    starts = []
    for m in inside:
        idx = m.nonzero()
        lo, hi = idx.min(0).values, idx.max(0).values
        assert (hi - lo + 1).tolist() == sides                   # a box of side int(r * size) per axis ...
        assert int(m.sum()) == int(np.prod(sides))               # ... filled
        starts.append(lo.tolist())
    starts = np.array(starts)
    assert len({tuple(s) for s in starts}) > 1                   # one random position per sample
    for a, (s, side) in enumerate(zip(spatial, sides)):          # every position where the box fits
        assert starts[:, a].min() == 0 and starts[:, a].max() == s - side
    with pytest.raises(ValueError, match="cube ratio"):
        check_ratio(1.5)
    with pytest.raises(ValueError, match="low <= high"):
        check_ratio((0.6, 0.3))
    torch.manual_seed(1)
    drawn = [draw_ratio((0.3, 0.6)) for _ in range(50)]
    assert min(drawn) >= 0.3 and max(drawn) <= 0.6 and len(set(drawn)) > 1 and draw_ratio(2 / 3) == 2 / 3


def test_mix_takes_a_outside_and_b_inside():
    torch.manual_seed(0)
    a, b = torch.randn(3, 2, 8, 8, 8), torch.randn(3, 2, 8, 8, 8)
    inside = cube_mask(3, (8, 8, 8), 0.5)
    m = mix(a, b, inside)
    box = inside[:, None].expand_as(a)
    assert torch.equal(m[box], b[box]) and torch.equal(m[~box], a[~box])
    with pytest.raises(ValueError, match="cannot mix"):
        mix(a, b[:, :1], inside)
    assert partner_index(3).tolist() == [1, 2, 0]


def test_mixed_labels_per_class_and_the_union_target():
    torch.manual_seed(0)
    labels = torch.randint(0, 3, (2, 1, 8, 8, 8))
    y = torch.cat([labels == 1, labels == 2], 1).float()          # per class prompt
    data = torch.randn(2, 2, 8, 8, 8)
    x_mix, y_mix, valid_mix, inside = mixed_pairs(data, y, None, 0.5)
    label_mix = torch.where(inside[:, None], labels[[1, 0]], labels)  # case i+1 pasted into case i
    assert valid_mix is None
    torch.testing.assert_close(x_mix, torch.where(inside[:, None], data[[1, 0]], data))
    torch.testing.assert_close(y_mix, torch.cat([label_mix == 1, label_mix == 2], 1).float())
    # the synthetic prompt's target: the union of the pasted foregrounds
    torch.testing.assert_close(y_mix.amax(1, keepdim=True), (label_mix > 0).float())
    valid = torch.rand(2, 1, 8, 8, 8) > 0.3
    torch.manual_seed(0)
    _, _, valid_mix, inside = mixed_pairs(data, y, valid, 0.5)
    assert torch.equal(valid_mix, torch.where(inside[:, None], valid[[1, 0]], valid))


# ================================================================================================ the terms
def test_soft_dice_is_the_source_formula_and_the_mask_restricts_it():
    torch.manual_seed(0)
    p, t = torch.rand(2, 2, 4, 4), (torch.rand(2, 2, 4, 4) > 0.5).float()
    per_channel = [(2 * (p[:, c] * t[:, c]).sum() + 1e-5) / ((p[:, c] ** 2).sum() + (t[:, c] ** 2).sum() + 1e-5)
                   for c in range(2)]
    assert soft_dice_loss(p, t).item() == pytest.approx(1 - float(sum(per_channel)) / 2, rel=1e-6)
    mask = torch.zeros(2, 1, 4, 4, dtype=torch.bool)
    mask[..., :2] = True
    torch.testing.assert_close(soft_dice_loss(p, t, mask), soft_dice_loss(p[..., :2], t[..., :2]))
    z = torch.randn(2, 2, 4, 4)
    torch.testing.assert_close(binary_ce(z, t, mask), F.binary_cross_entropy_with_logits(z[..., :2], t[..., :2]))


def test_the_aggregate_of_the_class_prompts_is_not_detached():
    torch.manual_seed(0)
    z = torch.randn(2, 3, 4, 4, 4, requires_grad=True)            # 2 class prompts + the synthetic one
    loss = aggregate_consistency(z, 2)
    s, a = torch.sigmoid(z[:, 2:]), torch.sigmoid(z[:, :2]).amax(1, keepdim=True)
    assert loss.item() == pytest.approx(soft_dice_loss(s, a).item(), rel=1e-6)
    (grad,) = torch.autograd.grad(loss, z)
    winner = z[:, :2].argmax(1)
    for c in range(2):
        g = grad[:, c]
        assert g[winner == c].abs().sum() > 0                     # the class prompts are trained too ...
        assert g[winner != c].abs().sum() == 0                    # ... through the max: the largest one per voxel
    assert grad[:, 2].abs().sum() > 0
    (grad_detached,) = torch.autograd.grad(aggregate_consistency(z, 2, detach=True), z)
    assert grad_detached[:, :2].abs().sum() == 0 and grad_detached[:, 2].abs().sum() > 0


def test_the_in_cube_gt_term_reads_the_labeled_box_only():
    torch.manual_seed(0)
    inside = cube_mask(2, (8, 8, 8), 0.5)
    box = inside[:, None]
    s = torch.randn(2, 1, 8, 8, 8, requires_grad=True)
    union = (torch.rand(2, 1, 8, 8, 8) > 0.5).float()
    loss = cube_gt_consistency(s, union, inside)
    torch.testing.assert_close(loss, soft_dice_loss(torch.sigmoid(s) * box, union * box))
    # the unlabeled part (outside the box) changes neither the value nor gets a gradient
    other = torch.where(box, union, 1 - union)
    torch.testing.assert_close(cube_gt_consistency(s, other, inside), loss)
    (grad,) = torch.autograd.grad(loss, s)
    assert grad[~box].abs().sum() == 0 and grad[box].abs().sum() > 0
    assert (cube_gt_consistency(s, torch.where(box, 1 - union, union), inside) - loss).abs() > 1e-3
    valid = torch.ones_like(box)
    valid[:, :, :4] = False
    torch.testing.assert_close(cube_gt_consistency(s, union, inside, valid),
                               soft_dice_loss(torch.sigmoid(s) * (box & valid), union * (box & valid)))


@pytest.mark.parametrize("kind", ["labels", "labels+ignore", "regions", "regions+ignore"])
def test_class_targets_one_binary_target_per_label_or_region(kind):
    """The prompts' targets from what nnU-Net's loader delivers: a label map, or its region channels (nnU-Net's
    own ConvertSegmentationToRegionsTransform, the ignore label appended as the last channel)."""
    from types import SimpleNamespace

    from batchgeneratorsv2.transforms.utils.seg_to_regions import ConvertSegmentationToRegionsTransform
    from nnunetv2.utilities.label_handling.label_handling import LabelManager
    from nnunetv2_smms.trainers.versemi import nnUNetTrainerVerSemi
    ignore = kind.endswith("ignore")
    labels = {"background": 0, "whole": [1, 2], "core": 2} if kind.startswith("regions") else \
        {"background": 0, "rim": 1, "core": 2}
    if ignore:
        labels["ignore"] = 3
    lm = LabelManager(labels, [1, 2] if kind.startswith("regions") else None)
    torch.manual_seed(0)
    seg = torch.randint(0, 4 if ignore else 3, (2, 1, 4, 4, 4))
    if lm.has_regions:
        regions = list(lm.foreground_regions) + ([3] if ignore else [])
        target = torch.stack([ConvertSegmentationToRegionsTransform(regions)(segmentation=s)["segmentation"]
                              for s in seg])
        expected = torch.cat([(seg == 1) | (seg == 2), seg == 2], 1)
    else:
        target = seg.float()
        expected = torch.cat([seg == 1, seg == 2], 1)
    y, valid = nnUNetTrainerVerSemi.class_targets(SimpleNamespace(label_manager=lm), target)
    assert torch.equal(y, expected.float())
    assert (valid is None) if not ignore else torch.equal(valid, seg != 3)


# ================================================================================================ the trainer
@pytest.fixture(scope="module")
def versemi_trainer(prepared_dataset, tmp_path_factory):
    with started_trainer(prepared_dataset, tmp_path_factory, "nnUNetTrainerVerSemi") as t:
        yield t


@pytest.fixture(scope="module")
def fixed_step(versemi_trainer):
    return fixed_step_inputs(versemi_trainer)


def seeded_update(t, fixed, **attrs):
    torch.manual_seed(0)
    try:
        return step_update(t, *fixed, **attrs)
    finally:
        for k in attrs:
            t.__dict__.pop(k, None)


def test_trainer_records_its_settings_and_rebuilds_the_network_from_them(versemi_trainer, fixed_step):
    t = versemi_trainer
    assert t.enable_deep_supervision is False and isinstance(fixed_step[0]["target"], torch.Tensor)
    recorded = t.plans_manager.plans["configurations"]["3d_fullres"]["semi_supervised"]["versemi"]
    assert recorded["network"]["n_class_prompts"] == 1 and recorded["network"]["combination"] == "one_minus_max"
    assert recorded["labeled_only_fraction"] == 0.5 and recorded["cutmix"]["stage2_cube_ratio"] == [0.3, 0.6]
    assert recorded["losses"]["detach_aggregate"] is False
    n_out = t.label_manager.num_segmentation_heads
    net = type(t).build_network_architecture(t.plans_manager, t.configuration_manager, t.num_input_channels, n_out,
                                             False)
    net.load_state_dict(unwrap(t.network).state_dict())  # strict
    x = fixed_step[0]["data"][:1]
    with torch.no_grad():
        out = net.eval()(x)
    assert isinstance(out, torch.Tensor) and out.shape == (1, n_out, *t.configuration_manager.patch_size)


def test_unlabeled_terms_change_the_update_and_weight_zero_equals_the_step_without_them(versemi_trainer, fixed_step):
    t = versemi_trainer
    out1, u1 = seeded_update(t, fixed_step, labeled_only_fraction=0.0)
    out0, u0 = seeded_update(t, fixed_step, labeled_only_fraction=0.0, unsup_weight=0.0)
    out_none, u_none = seeded_update(t, fixed_step, labeled_only_fraction=0.0, uses_unlabeled=False)
    assert out1["skipped"] == 0 and out1["loss_aggregate"] > 0 and out1["loss_cube_gt"] > 0
    assert np.isnan(out_none["loss_aggregate"]) and out_none["loss_specific"] > 0
    assert (u1 - u0).norm() > 1e-3 * u0.norm(), "the unlabeled terms at weight 1 did not change the update"
    torch.testing.assert_close(u0, u_none, rtol=1e-4, atol=1e-9)  # weight 0 = the step without them
    assert out1["loss"] == pytest.approx(sum(out1[k] for k in t.TERMS), rel=1e-5)
    # the labeled CutMix terms move the weights too
    _, u_no_mix = seeded_update(t, fixed_step, labeled_only_fraction=0.0, uses_unlabeled=False,
                                synthetic_weight=0.0, specific_weight=0.0)
    assert (u_no_mix - u_none).norm() > 1e-3 * u_none.norm()


def box_of(x, a, b):
    """The per-sample box in which x comes from b (x = a outside it), found from the data."""
    from_b = (x == b).all(1) & (x != a).any(1)
    box = torch.zeros_like(from_b)
    for i in range(x.shape[0]):
        idx = from_b[i].nonzero()
        lo, hi = idx.min(0).values.tolist(), (idx.max(0).values + 1).tolist()
        box[i][tuple(slice(l, h) for l, h in zip(lo, hi))] = True
    assert torch.equal(mix(a, b, box), x)  # a outside the box, b inside it: nothing else
    return box


def test_the_trainer_terms_on_what_the_network_sees(versemi_trainer, fixed_step):
    """Stage 2, as computed in labeled_losses / unlabeled_losses, recomputed from the network's inputs and
    outputs: the labeled mix (case i+1 pasted into case i), its per-class and union targets, and the unlabeled
    mix (unlabeled outside, labeled inside a box of U(0.3, 0.6) of the patch) with the in-box GT term."""
    t = versemi_trainer
    batch, unlabeled = fixed_step[0], fixed_step[1]["data"]
    data, k = batch["data"], t.n_class_prompts
    seen = []
    hook = t.network.register_forward_hook(lambda m, inp, out: seen.append((inp[0], out)))
    t._stage = 2
    try:
        with torch.no_grad():
            sup = t.labeled_losses(data, batch["target"])
            unsup = t.unlabeled_losses(unlabeled)
    finally:
        hook.remove()
        t._stage = 1
    (x_l, z_l), (x_u, z_u) = seen
    n = data.shape[0]
    assert n >= 2 and torch.equal(x_l[:n], data)
    j = partner_index(n)
    box = box_of(x_l[n:], data, data[j])
    y, _ = t.class_targets(batch["target"])
    y_mix = mix(y, y[j], box)
    torch.testing.assert_close(sup["loss_sup"], soft_dice_loss(torch.sigmoid(z_l[:n, :k]), y)
                               + binary_ce(z_l[:n, :k], y))
    torch.testing.assert_close(sup["loss_synthetic"], soft_dice_loss(torch.sigmoid(z_l[n:, k:]),
                                                                     y_mix.amax(1, keepdim=True)))
    torch.testing.assert_close(sup["loss_specific"], soft_dice_loss(torch.sigmoid(z_l[n:, :k]), y_mix))
    idx = torch.arange(unlabeled.shape[0]) % n
    box_u = box_of(x_u, unlabeled, data[idx])
    size = np.array(t.configuration_manager.patch_size)
    for b in box_u:
        side = b.nonzero().max(0).values.numpy() + 1 - b.nonzero().min(0).values.numpy()
        assert np.all(side >= np.floor(0.3 * size)) and np.all(side <= np.floor(0.6 * size))
    torch.testing.assert_close(unsup["loss_aggregate"], aggregate_consistency(z_u, k))
    torch.testing.assert_close(unsup["loss_cube_gt"], cube_gt_consistency(z_u[:, k:], y.amax(1, keepdim=True)[idx],
                                                                          box_u))


def test_stage_one_draws_no_unlabeled_batch(versemi_trainer, fixed_step):
    t = versemi_trainer

    def never():
        raise AssertionError("an unlabeled batch was drawn in stage 1")
        yield
    out, _ = seeded_update(t, fixed_step)  # iteration 0 < 0.5 of training: stage 1
    assert t._stage == 1 and np.isnan(out["loss_aggregate"]) and out["loss_specific"] > 0
    t.dataloader_unlabeled = never()
    t._iteration = int(0.5 * t.num_epochs * t.num_iterations_per_epoch) - 1
    assert t.next_unlabeled_batch() is None
    t.dataloader_unlabeled = itertools.repeat(fixed_step[1])
    t._iteration += 1
    assert t.next_unlabeled_batch() is not None and t._stage == 2


def test_detaching_the_aggregate_changes_the_update_and_the_variant_sets_it(versemi_trainer, fixed_step):
    from nnunetv2_smms.trainers import TRAINERS, nnUNetTrainerVerSemi_DetachedAggregate
    t = versemi_trainer
    _, u_attached = seeded_update(t, fixed_step, labeled_only_fraction=0.0)
    out, u_detached = seeded_update(t, fixed_step, labeled_only_fraction=0.0, detach_aggregate=True)
    _, u_no_aggregate = seeded_update(t, fixed_step, labeled_only_fraction=0.0, aggregate_weight=0.0)
    assert out["loss_aggregate"] > 0
    assert (u_detached - u_attached).norm() > 1e-4 * u_attached.norm(), "the class prompts' gradient is unchanged"
    assert (u_detached - u_no_aggregate).norm() > 1e-4 * u_no_aggregate.norm(), "detached, the term trains nothing"
    assert nnUNetTrainerVerSemi_DetachedAggregate.detach_aggregate is True
    assert nnUNetTrainerVerSemi_DetachedAggregate in TRAINERS


def test_the_stage_one_only_variant_uses_no_unlabeled_cases(prepared_dataset, tmp_path_factory):
    from nnunetv2_smms.trainers import TRAINERS, nnUNetTrainerVerSemi, nnUNetTrainerVerSemi_Stage1Only
    assert nnUNetTrainerVerSemi_Stage1Only in TRAINERS
    assert nnUNetTrainerVerSemi.supervised_only_alternative.split()[0] == "nnUNetTrainerVerSemi_Stage1Only"
    with started_trainer(prepared_dataset, tmp_path_factory, "nnUNetTrainerVerSemi_Stage1Only") as t:
        assert t.uses_unlabeled is False and t.dataloader_unlabeled is None and t._stage == 1
        t._iteration = t.num_epochs * t.num_iterations_per_epoch - 1  # the last step is still stage 1
        assert t.next_unlabeled_batch() is None and t._stage == 1
        out = t.train_step(next(t.dataloader_train))
        assert np.isnan(out["loss_aggregate"]) and out["loss_specific"] > 0 and out["loss_sup"] > 0
        recorded = t.plans_manager.plans["configurations"]["3d_fullres"]["semi_supervised"]["versemi"]
        assert recorded["labeled_only_fraction"] == 1.0


def test_validation_scores_the_combined_class_prompts(versemi_trainer):
    t = versemi_trainer
    batch = next(t.dataloader_val)
    t.network.eval()
    try:
        with torch.no_grad():
            result = t.validation_step(batch)
            out = t.network(batch["data"])
    finally:
        t.network.train()
    for name, value in zip(("tp", "fp", "fn"), t._hard_tp_fp_fn(out, batch["target"])):
        np.testing.assert_array_equal(result[f"{name}_hard"], value)
    assert np.isfinite(result["loss"])


# ================================================================================================ end to end
E2E_ID = 512


@pytest.fixture(scope="module")
def two_label_model(tmp_path_factory):
    """A 2-foreground-label dataset (rim 1, core 2), trained with nnUNetv2_train (both stages: 2 iterations,
    stage 2 from the second) and predicted with nnUNetv2_predict."""
    root = tmp_path_factory.mktemp("versemi_e2e")
    prepared = prepare_synthetic(root, dataset_id=E2E_ID, name="VerSemiTest", shape=(16, 16, 16), n_labeled=5,
                                 n_unlabeled=4, n_test=2, core_label=True)
    env = nnunet_env(root)
    raw = prepared["raw"]
    # trained through compare (a row of its table; compare runs nnUNetv2_train with the schedule)
    run(smms_cli("compare", "-d", E2E_ID, "-c", "3d_fullres", "-f", "0", "-tr", "nnUNetTrainerVerSemi",
                 "-i", raw / "imagesTs", "-r", raw / "labelsTs", "-o", root / "compare", "--epochs", "1",
                 "--iterations-per-epoch", "2", "--val-iterations", "1", "--device", "cpu", "--disable-tta"), env)
    pred = root / "pred"
    run(["nnUNetv2_predict", "-i", prepared["raw"] / "imagesTs", "-o", pred, "-d", E2E_ID, "-c", "3d_fullres",
         "-f", "0", "-tr", "nnUNetTrainerVerSemi", "-device", "cpu", "--save_probabilities"], env)
    folder = root / "results" / prepared["raw"].name / "nnUNetTrainerVerSemi__nnUNetPlans__3d_fullres"
    return {"folder": folder, "pred": pred, "raw": prepared["raw"], "compare": root / "compare"}


@pytest.mark.slow
def test_train_and_predict_end_to_end_on_two_foreground_labels(two_label_model):
    import SimpleITK as sitk
    folder, pred = two_label_model["folder"], two_label_model["pred"]
    assert (folder / "fold_0" / "checkpoint_final.pth").is_file()
    log = next((folder / "fold_0").glob("training_log_*.txt")).read_text()
    assert "VerSemi: 2 class prompts" in log
    aggregate = re.findall(r"loss_aggregate (\S+?),", log)
    assert aggregate and np.isfinite(float(aggregate[-1]))  # stage 2 was reached (iteration 2 of 2)
    plans = json.loads((folder / "plans.json").read_text())
    recorded = plans["configurations"]["3d_fullres"]["semi_supervised"]["versemi"]
    assert recorded["network"]["n_class_prompts"] == 2
    cases = sorted(p.name for p in (two_label_model["raw"] / "imagesTs").glob("*_0000.nii.gz"))
    assert len(cases) == 2
    for case in cases:
        name = case[:-len("_0000.nii.gz")]
        seg = sitk.GetArrayFromImage(sitk.ReadImage(str(pred / f"{name}.nii.gz")))
        assert seg.shape == (16, 16, 16) and set(np.unique(seg)) <= {0, 1, 2}
        probs = np.load(pred / f"{name}.npz")["probabilities"]
        assert probs.shape[0] == 3                                   # nnU-Net's labels: background, rim, core
        np.testing.assert_allclose(probs.sum(0), 1, atol=1e-4)
    summary = json.loads((two_label_model["compare"] / "summary.json").read_text(encoding="utf-8"))
    row = summary["results"]["nnUNetTrainerVerSemi"]["fused"]
    assert set(row) >= {"1", "2"} and all(row[c]["n_cases"] == 2 for c in ("1", "2"))
