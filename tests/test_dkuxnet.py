"""What defines DK-UXNet (trainers/dkuxnet.py), each pinned by a test that fails when the behaviour is removed:
shapes for several plans (3D 32^3 and odd patches padded inside the network, 2D, 1 or 2 channels, 2 or 3 classes, all
three mask strides; a bad configuration is a clear error); the k-means assignment is hard (one-hot), carries no
gradient and the query update is the sum over the assigned voxels; the query-group distribution and the semantic
logits come from the queries' responses; QD by hand; L_segc's pseudo-labels and L_qdc's targets carry no gradient,
L_qdc bypasses the semantic head; each term moves the weights and weight 0 equals the supervised-only step; network 1
predicts (one eval tensor, nnU-Net's number of classes, the checkpoint loads into build_network_architecture);
nnUNetv2_train + nnUNetv2_predict end to end (light variant)."""
import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager

from conftest import DATASET_ID, make_trainer, run, smms_cli
from _step_helpers import fixed_step_inputs, step_update
from nnunetv2_smms.architectures.dkuxnet import DKUXNet, DKUXNetConfig
from nnunetv2_smms.architectures.dual_branch import unwrap
from nnunetv2_smms.architectures.kmax_decoder import KMaXLayer, hard_assignment, split_query_groups
from nnunetv2_smms.architectures.uxnet import pad_to_multiple
from nnunetv2_smms.trainers.dkuxnet import (nnUNetTrainerDKUXNet, query_distribution_consistency,
                                            query_distribution_loss, segmentation_consistency)

TINY = DKUXNetConfig(dims=(4, 8, 16, 16), depths=(1, 1, 1, 1), hidden_size=16, num_queries=6, query_dim=8,
                     base_filters=4, num_heads=2, ffn_dim=8, pixel_head_channels=4, mask_embed_dim=4,
                     semantic_hidden=8, mask_stride=1)


def configuration(patch, config=TINY) -> ConfigurationManager:
    """A plans configuration as the trainer records it (only what build_network_architecture reads)."""
    return ConfigurationManager({"patch_size": list(patch), "architecture": {
        "network_class_name": "unused", "arch_kwargs": {}, "_kw_requires_import": []},
        "semi_supervised": {"dkuxnet": {"network": config.to_dict()}}})


def build(patch, in_channels, classes, config=TINY):
    return nnUNetTrainerDKUXNet.build_network_architecture(None, configuration(patch, config), in_channels, classes,
                                                           False)


def grads_of(module):
    return [p.grad for p in module.parameters() if p.requires_grad]


def has_gradient(module) -> bool:
    return any(g is not None and bool(g.abs().sum() > 0) for g in grads_of(module))


def no_gradient(module) -> bool:
    return all(g is None or not g.any() for g in grads_of(module))


# ================================================================================================== shapes
@pytest.mark.parametrize("patch, in_channels, classes, stride", [
    ((32, 32, 32), 1, 2, 1), ((32, 32, 32), 2, 3, 4), ((20, 12, 9), 2, 2, 2), ((20, 12, 9), 1, 3, 1),
    ((24, 20), 2, 3, 1), ((20, 36), 1, 2, 4)])
def test_shapes_for_several_plans(patch, in_channels, classes, stride):
    torch.manual_seed(0)
    net = build(patch, in_channels, classes, replace(TINY, mask_stride=stride))
    assert net.net1.dim == len(patch) and net.net1.num_classes == classes
    padded = tuple(p + (-p) % 16 for p in patch)
    x = torch.randn(1, in_channels, *patch)
    with torch.no_grad():
        out1, out2 = net.train()(x)
        net.eval()
        y = net(x)
    for out in (out1, out2):
        assert out["semantic"].shape == out["distribution"].shape == (1, classes, *patch)
        assert out["mask_logits"].shape == (1, TINY.num_queries, *(p // stride for p in padded))
        torch.testing.assert_close(out["distribution"].sum(1), torch.ones(1, *patch))
    assert isinstance(y, torch.Tensor) and y.shape == (1, classes, *patch)


def test_an_odd_patch_is_padded_to_a_multiple_of_16_and_cropped_back():
    x = torch.randn(1, 2, 20, 12, 9)
    padded, crop = pad_to_multiple(x, 16)
    assert padded.shape == (1, 2, 32, 16, 16)
    torch.testing.assert_close(padded[crop], x)                          # the input, unchanged, in the middle
    assert padded.abs().sum() == x.abs().sum()                          # zeros around it
    assert pad_to_multiple(torch.randn(1, 1, 16, 32), 16)[0].shape == (1, 1, 16, 32)


def test_bad_configurations_are_clear_errors():
    with pytest.raises(ValueError, match=r"2D or 3D configuration.*\[8, 8, 8, 8\]"):
        build((8, 8, 8, 8), 1, 2)
    with pytest.raises(ValueError, match=r"patch \[16, 12, 9\] is padded to \[16, 16, 16\].*larger than 16"):
        build((16, 12, 9), 1, 2)(torch.randn(1, 1, 16, 12, 9))
    with pytest.raises(ValueError, match="mask_stride must be one of"):
        build((16, 16, 16), 1, 2, replace(TINY, mask_stride=3))
    with pytest.raises(ValueError, match=r"query_groups=\[4, 1\].*3 classes"):
        build((16, 16, 16), 1, 3, replace(TINY, query_groups=(4, 1)))
    with pytest.raises(ValueError, match="num_queries=2 is smaller than the number of classes"):
        build((16, 16, 16), 1, 3, replace(TINY, num_queries=2))
    with pytest.raises(ValueError, match=r"kmax_levels=\[0\]"):
        build((16, 16, 16), 1, 2, replace(TINY, kmax_levels=(0,), mask_stride=2))
    with pytest.raises(ValueError, match="unknown DK-UXNet network settings"):
        DKUXNetConfig.from_dict({"num_querys": 8})


def test_lower_mask_strides_build_no_full_resolution_blocks():
    """Stride 2 or 4: the UNETR blocks of the finer levels do not exist (and so cannot leave DDP parameters
    without gradient)."""
    for stride, levels in ((1, {"0", "1", "2", "3"}), (2, {"1", "2", "3"}), (4, {"2", "3"})):
        net = DKUXNet(1, 2, replace(TINY, mask_stride=stride))
        assert set(net.decoder.skips) == set(net.decoder.ups) == levels


# ================================================================================================== k-means
def tiny_layer(pixel_channels=4, query_dim=8, n=5):
    torch.manual_seed(0)
    layer = KMaXLayer(pixel_channels, query_dim, dim=3, num_heads=2, base_filters=4, ffn_dim=8, pixel_head_channels=4,
                      embed_dim=4)
    pixel = torch.randn(2, pixel_channels, 4, 4, 3)
    queries = torch.randn(2, query_dim, n, requires_grad=True)
    return layer, pixel, queries


def test_kmeans_assignment_is_hard_and_carries_no_gradient():
    layer, pixel, queries = tiny_layer()
    for p in layer.predictor.parameters():   # even a trainable predictor must get nothing through the assignment
        p.requires_grad_(True)
    torch.nn.init.ones_(layer.kmeans_out.norm.weight)  # initialised to 0 (source): no gradient would pass it
    new_queries, mask_logits, assignment = layer(pixel, queries)
    assert assignment.shape == (2, 5, 4 * 4 * 3) and not assignment.requires_grad and not mask_logits.requires_grad
    assert set(assignment.unique().tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(assignment.sum(1), torch.ones(2, 48))     # exactly one query per voxel
    torch.testing.assert_close(assignment, F.one_hot(mask_logits.flatten(2).argmax(1), 5).transpose(1, 2).float())
    torch.testing.assert_close(hard_assignment(mask_logits), assignment)
    new_queries.square().sum().backward()
    assert all(p.grad is None for p in layer.predictor.parameters()), "the assignment passed a gradient"
    assert has_gradient(layer.pixel_value) and has_gradient(layer.kmeans_out) and queries.grad.abs().sum() > 0


def test_kmeans_update_is_the_sum_of_the_assigned_voxels_values():
    layer, pixel, queries = tiny_layer()
    layer.eval()     # BatchNorm with its initial running statistics: the identity up to eps and affine
    values = torch.randn(2, layer.value_depth, 48)
    assignment = hard_assignment(torch.randn(2, 5, 48))
    update = layer.kmeans_update(assignment, values)
    by_hand = torch.zeros(2, layer.value_depth, 5)
    for b in range(2):
        for v in range(48):
            by_hand[b, :, int(assignment[b, :, v].argmax())] += values[b, :, v]
    expected = layer.kmeans_out(layer.kmeans_norm(by_hand))
    torch.testing.assert_close(update, expected, rtol=1e-5, atol=1e-5)


def test_query_update_uses_the_assignment():
    layer, pixel, queries = tiny_layer()
    # the k-means update enters through a BatchNorm initialised to weight 0 (as the source): give it a weight
    torch.nn.init.ones_(layer.kmeans_out.norm.weight)
    with torch.no_grad():
        default, _, assignment = layer(pixel, queries)
        same, _, _ = layer(pixel, queries, assignment=assignment.clone())
        other, _, _ = layer(pixel, queries, assignment=assignment.roll(1, dims=1))
    torch.testing.assert_close(same, default)
    assert (other - default).abs().max() > 1e-3, "another assignment did not change the query update"


# ================================================================================================== outputs, QD
def test_query_groups_and_the_head_outputs():
    assert split_query_groups(7, 3) == [3, 2, 2] and split_query_groups(6, 2, (1, 5)) == [1, 5]
    torch.manual_seed(0)
    net = DKUXNet(1, 3, replace(TINY, query_groups=(1, 2, 3))).eval()
    x = torch.randn(1, 1, 16, 16, 32)   # a multiple of 16: the mask logits cover exactly the input
    captured = {}
    net.head.semantic_mlp.register_forward_hook(lambda m, i, o: captured.update(classes=o))
    with torch.no_grad():
        out = net.outputs(x)
    response = torch.softmax(out["mask_logits"], 1)
    groups = torch.stack([response[:, :1].sum(1), response[:, 1:3].sum(1), response[:, 3:].sum(1)], 1)
    torch.testing.assert_close(out["distribution"], groups)
    classes = captured["classes"].reshape(1, 6, 3)
    torch.testing.assert_close(out["semantic"], torch.einsum("bnk,bnxyz->bkxyz", classes, response))


def test_query_distribution_loss_by_hand():
    g = torch.tensor([[0.7, 0.2, 0.5], [0.3, 0.8, 0.5]])[None, :, :, None]         # B=1, K=2, 3 voxels
    y = torch.tensor([[0.0, 1.0, 1.0]])[None, :, :, None]
    nll = [-math.log(0.7), -math.log(0.8), -math.log(0.5)]
    assert query_distribution_loss(g, y).item() == pytest.approx(sum(nll) / 3, rel=1e-6)
    assert query_distribution_loss(g, y, "sum").item() == pytest.approx(sum(nll), rel=1e-6)
    y_ignore = torch.tensor([[0.0, 1.0, 2.0]])[None, :, :, None]
    assert query_distribution_loss(g, y_ignore, ignore_label=2).item() == pytest.approx(sum(nll[:2]) / 2, rel=1e-6)


def test_consistency_terms_by_hand():
    torch.manual_seed(0)
    z1, z2 = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    segc = segmentation_consistency(z1, z2)
    assert segc["loss_segc_1"].item() == pytest.approx(F.cross_entropy(z1, z2.argmax(1)).item(), rel=1e-6)
    assert segc["loss_segc_2"].item() == pytest.approx(F.cross_entropy(z2, z1.argmax(1)).item(), rel=1e-6)
    g1, g2 = torch.softmax(torch.randn(2, 3, 4), 1), torch.softmax(torch.randn(2, 3, 4), 1)
    mse = query_distribution_consistency(g1, g2, "mse")
    assert mse["loss_qdc_1"].item() == pytest.approx(((g1 - g2) ** 2).mean().item(), rel=1e-6)
    kl = query_distribution_consistency(g1, g2, "kl")
    assert kl["loss_qdc_1"].item() == pytest.approx((g2 * (g2.log() - g1.log())).sum(1).mean().item(), rel=1e-5)
    assert kl["loss_qdc_2"].item() == pytest.approx((g1 * (g1.log() - g2.log())).sum(1).mean().item(), rel=1e-5)


# ================================================================================================== gradients
@pytest.fixture(scope="module")
def pair_outputs():
    torch.manual_seed(0)
    pair = build((12, 12, 20), 2, 2).train()
    return pair, torch.randn(2, 2, 12, 12, 20)


def test_segc_pseudo_labels_carry_no_gradient(pair_outputs):
    pair, x = pair_outputs
    for own, other, name in ((pair.net1, pair.net2, "loss_segc_1"), (pair.net2, pair.net1, "loss_segc_2")):
        pair.zero_grad(set_to_none=True)
        out1, out2 = pair(x)
        segmentation_consistency(out1["semantic"], out2["semantic"])[name].backward()
        assert no_gradient(other), f"{name}: the pseudo-labels passed a gradient to the network that made them"
        assert has_gradient(own.head.semantic_mlp) and has_gradient(own.encoder)
    pair.zero_grad(set_to_none=True)


def test_qdc_gradient_only_into_the_pulled_networks_mask_path(pair_outputs):
    """L_qdc,1 = D(G_1, sg G_2): network 2 gets nothing; in network 1 the gradient reaches the mask logits' path
    (final predictor, queries, decoder, encoder) and not the semantic MLP (G does not depend on it)."""
    pair, x = pair_outputs
    for mode in ("mse", "kl"):
        for own, other, name in ((pair.net1, pair.net2, "loss_qdc_1"), (pair.net2, pair.net1, "loss_qdc_2")):
            pair.zero_grad(set_to_none=True)
            out1, out2 = pair(x)
            query_distribution_consistency(out1["distribution"], out2["distribution"], mode)[name].backward()
            assert no_gradient(other), f"{name} ({mode}): the target distribution passed a gradient"
            assert no_gradient(own.head.semantic_mlp)
            for part in (own.head.predictor, own.kmax, own.decoder, own.encoder):
                assert has_gradient(part), f"{name} ({mode}) did not reach {type(part).__name__}"
    pair.zero_grad(set_to_none=True)


def test_supervised_qd_reaches_the_mask_path_and_not_the_semantic_head(pair_outputs):
    pair, x = pair_outputs
    pair.zero_grad(set_to_none=True)
    out1, _ = pair(x)
    query_distribution_loss(out1["distribution"], torch.randint(0, 2, (2, 1, 12, 12, 20)).float()).backward()
    assert no_gradient(pair.net1.head.semantic_mlp) and no_gradient(pair.net2)
    assert has_gradient(pair.net1.head.predictor) and has_gradient(pair.net1.encoder)
    pair.zero_grad(set_to_none=True)


def test_every_trainable_parameter_gets_a_gradient_in_each_pass(pair_outputs):
    """DDP (find_unused_parameters=False) needs a gradient for every trainable parameter in every backward: the
    labeled pass (DC+CE + QD) and the unlabeled pass (L_segc + L_qdc) each reach all of them; the kMaX layers'
    predictors (no-grad assignment only) are frozen."""
    pair, x = pair_outputs
    y = torch.randint(0, 2, (2, 1, 12, 12, 20)).float()
    for name in ("labeled", "unlabeled"):
        pair.zero_grad(set_to_none=True)
        out1, out2 = pair(x)
        if name == "labeled":
            loss = sum(F.cross_entropy(o["semantic"], y[:, 0].long()) + query_distribution_loss(o["distribution"], y)
                       for o in (out1, out2))
        else:
            loss = sum(segmentation_consistency(out1["semantic"], out2["semantic"]).values()) + sum(
                query_distribution_consistency(out1["distribution"], out2["distribution"]).values())
        loss.backward()
        missing = [n for n, p in pair.named_parameters() if p.requires_grad and p.grad is None]
        assert not missing, f"{name} pass: no gradient for {missing[:5]}"
    frozen = [n for n, p in pair.named_parameters() if not p.requires_grad]
    assert frozen and all(".kmax.layers." in n and ".predictor." in n for n in frozen)
    pair.zero_grad(set_to_none=True)


def test_network_1_predicts_in_eval_mode(pair_outputs):
    pair, x = pair_outputs
    pair.eval()
    try:
        with torch.no_grad():
            y, (o1, o2) = pair(x), pair.forward_both(x)
    finally:
        pair.train()
    assert isinstance(y, torch.Tensor) and y.shape == (2, 2, 12, 12, 20)
    torch.testing.assert_close(y, o1["semantic"])
    assert not torch.allclose(y, o2["semantic"])


# ================================================================================================== trainer
@pytest.fixture(scope="module")
def dk_trainer(prepared_dataset, tmp_path_factory):
    """The method's trainer on the prepared dataset with a tiny network (set before the network is built: it is
    recorded in the plans and read back by build_network_architecture). SGD: AdamW's first step is about
    lr * sign(gradient), where a small term changes only the signs it flips; the term's gradient is the same."""
    mp = pytest.MonkeyPatch()
    t = make_trainer(prepared_dataset, mp, tmp_path_factory.mktemp("dkuxnet"), trainer="nnUNetTrainerDKUXNet",
                     start=False)
    t.network_config = replace(TINY, mask_stride=2)
    t.optimizer_name = "sgd"
    t.initial_lr = 1e-2
    t.on_train_start()
    yield t
    t.on_train_end()
    mp.undo()


def test_trainer_builds_the_recorded_network_without_deep_supervision(dk_trainer):
    t = dk_trainer
    net = unwrap(t.network)
    assert net.net1.config == t.network_config and net.net1.num_classes == t.label_manager.num_segmentation_heads
    recorded = t.configuration_manager.configuration["semi_supervised"]["dkuxnet"]
    assert recorded["network"] == t.network_config.to_dict() and recorded["qd_weight"] == 0.1
    assert t.enable_deep_supervision is False and isinstance(next(t.dataloader_train)["target"], torch.Tensor)
    assert all(not p.requires_grad for layer in net.net1.kmax.layers for p in layer.predictor.parameters())


def test_each_term_changes_the_update_and_weight_0_is_the_supervised_step(dk_trainer):
    t = dk_trainer
    assert (t.segc_weight, t.qdc_weight, t.qd_weight, t.unsup_weight, t.unsup_rampup) == (1.0, 0.1, 0.1, 1.0, 0.4)
    fixed = fixed_step_inputs(t)

    def update(**attrs):
        try:
            return step_update(t, *fixed, unsup_rampup=0.0, **attrs)
        finally:
            for k in ("unsup_rampup", *attrs):
                t.__dict__.pop(k, None)
    out_sup, u_sup = update(uses_unlabeled=False)
    out0, u0 = update(segc_weight=0.0, qdc_weight=0.0)
    out_segc, u_segc = update(qdc_weight=0.0)
    out_qdc, u_qdc = update(segc_weight=0.0)
    out_qd0, u_qd0 = update(uses_unlabeled=False, qd_weight=0.0)
    assert "loss_segc_1" not in out_sup and all(o["skipped"] == 0 for o in (out_sup, out0, out_segc, out_qdc))
    torch.testing.assert_close(u0, u_sup, rtol=0, atol=1e-7)      # weight 0: exactly the supervised-only step
    for name, u in (("L_segc", u_segc), ("L_qdc", u_qdc), ("supervised QD", u_qd0)):
        ref = u_sup
        assert (u - ref).norm() > 1e-5 * ref.norm(), f"{name} at its weight did not change the update"
    assert out_qdc["loss_qdc_1"] > 0 and out_segc["loss_segc_1"] > 0
    np.testing.assert_allclose(out_segc["loss"], sum(out_segc[k] for k in out_segc if k.startswith("loss_")
                                                     and k != "loss"), rtol=1e-5)


def test_trainer_checkpoint_loads_into_the_predictors_network(dk_trainer, tmp_path):
    t = dk_trainer
    t.save_checkpoint(str(tmp_path / "checkpoint.pth"))
    ckpt = torch.load(tmp_path / "checkpoint.pth", map_location="cpu", weights_only=False)
    net = type(t).build_network_architecture(t.plans_manager, t.configuration_manager, t.num_input_channels,
                                             t.label_manager.num_segmentation_heads, False)
    net.load_state_dict(ckpt["network_weights"])
    x = torch.randn(1, t.num_input_channels, *t.configuration_manager.patch_size)
    net.eval()
    t.network.eval()
    try:
        with torch.no_grad():
            y, reference = net(x), unwrap(t.network).net1(x)
    finally:
        t.network.train()
    assert y.shape == (1, 2, *t.configuration_manager.patch_size)
    torch.testing.assert_close(y, reference)


# ================================================================================================== end to end
def test_nnunetv2_train_and_predict_end_to_end(prepared_dataset, tmp_path):
    """nnunetv2_smms compare -tr nnUNetTrainerDKUXNet_Light (it trains through nnUNetv2_train - CPU, 2 iterations,
    its final validation predicts with mirroring - predicts and evaluates: a row of compare's table), then
    nnUNetv2_predict on the test images."""
    import SimpleITK as sitk
    env = dict(prepared_dataset["env"], nnUNet_results=str(tmp_path / "results"))
    trainer, raw = "nnUNetTrainerDKUXNet_Light", prepared_dataset["raw"]
    run(smms_cli("compare", "-d", DATASET_ID, "-c", "3d_fullres", "-f", "0", "-tr", trainer,
                         "-i", raw / "imagesTs", "-r", raw / "labelsTs", "-o", tmp_path / "compare", "--epochs", "1",
                         "--iterations-per-epoch", "2", "--val-iterations", "1", "--device", "cpu",
                         "--disable-tta"), env)
    summary = json.loads((tmp_path / "compare" / "summary.json").read_text(encoding="utf-8"))
    assert summary["results"][trainer]["fused"]["1"]["n_cases"] == len(list((raw / "labelsTs").iterdir()))
    model = tmp_path / "results" / raw.name / f"{trainer}__nnUNetPlans__3d_fullres"
    assert (model / "fold_0" / "checkpoint_final.pth").is_file()
    log = next((model / "fold_0").glob("training_log_*.txt")).read_text(encoding="utf-8")
    assert "loss_qdc_1" in log and "loss_segc_1" in log
    plans = json.loads((model / "plans.json").read_text(encoding="utf-8"))
    recorded = plans["configurations"]["3d_fullres"]["semi_supervised"]["dkuxnet"]["network"]
    assert recorded["num_queries"] == 16 and recorded["mask_stride"] == 2
    out = tmp_path / "pred"
    run(["nnUNetv2_predict", "-i", raw / "imagesTs", "-o", out, "-d", DATASET_ID, "-c", "3d_fullres", "-f", "0",
         "-tr", trainer, "-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1"], env)
    labels = sorted((raw / "labelsTs").iterdir())
    assert labels
    for label in labels:
        pred, ref = sitk.ReadImage(str(out / label.name)), sitk.ReadImage(str(label))
        assert pred.GetSize() == ref.GetSize() and pred.GetSpacing() == ref.GetSpacing()
        assert set(np.unique(sitk.GetArrayFromImage(pred)).tolist()) <= {0, 1}
