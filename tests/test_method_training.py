"""What defines the semi-supervised training, each pinned by a test that fails when the behaviour is removed:
the unsupervised term moves the weights (weight 0 vs default) and its ramp-up is applied; the unlabeled batch is
augmented by nnU-Net's transforms and changes from step to step; validation scores the fused output and each branch
from its own output; every Table-2 ablation trainer builds exactly its modules and trains; the output-branch
variable never reaches training. In-process trainers on the session's prepared synthetic dataset."""
import math

import numpy as np
import pytest
import torch

from conftest import make_trainer
from _step_helpers import step_update as _step_update
from _step_helpers import fixed_step_inputs, started_trainer
from nnunetv2_smms.architectures import unwrap


@pytest.fixture(scope="module")
def smms_trainer(prepared_dataset, tmp_path_factory):
    with started_trainer(prepared_dataset, tmp_path_factory) as t:
        unwrap(t.network).dropout = torch.nn.Identity()  # the same forward in every repetition of the step
        yield t


@pytest.fixture(scope="module")
def fixed_step(smms_trainer):
    return fixed_step_inputs(smms_trainer)


def test_unsupervised_term_changes_the_update(smms_trainer, fixed_step):
    t = smms_trainer
    assert t.unsup_weight == 1.0 and t.uses_unlabeled
    out0, u0 = _step_update(t, *fixed_step, unsup_weight=0.0)
    out1, u1 = _step_update(t, *fixed_step, unsup_weight=1.0)
    assert out0["skipped"] == 0 and out1["skipped"] == 0 and out1["loss_unsup"] > 0
    assert (u1 - u0).norm() > 1e-3 * u0.norm(), "L_unsup at weight 1 did not change the update"
    # at weight 0 the step is the supervised-only step: the unlabeled pass adds nothing else
    t.use_mcml = False
    try:
        out_sup, u_sup = _step_update(t, *fixed_step, unsup_weight=1.0)
    finally:
        t.use_mcml = True
    torch.testing.assert_close(u0, u_sup, rtol=1e-4, atol=1e-9)
    assert "loss_unsup" not in out_sup
    np.testing.assert_allclose(out1["loss"], out1["loss_sup_a"] + out1["loss_sup_b"] + out1["loss_unsup"], rtol=1e-5)


def test_rampup_is_applied_to_the_unsupervised_term(smms_trainer, fixed_step):
    t = smms_trainer
    start = math.exp(-5)  # the sigmoid ramp-up at the first iteration
    _, u_ramp = _step_update(t, *fixed_step, unsup_weight=1.0, unsup_rampup=0.5)
    assert t._current_unsup_weight == pytest.approx(start)
    _, u_fixed = _step_update(t, *fixed_step, unsup_weight=start, unsup_rampup=0.0)
    _, u_full = _step_update(t, *fixed_step, unsup_weight=1.0, unsup_rampup=0.0)
    t.unsup_rampup = 0.0
    torch.testing.assert_close(u_ramp, u_fixed, rtol=1e-4, atol=1e-9)
    assert (u_full - u_ramp).norm() > 1e-3 * u_ramp.norm()
    # halfway through the ramp (a fraction of ALL iterations) the weight is exp(-5 (1 - 0.5)^2)
    t.unsup_rampup = 0.5
    assert t.unsup_weight_at(int(0.25 * t.num_epochs * t.num_iterations_per_epoch)) == \
        pytest.approx(math.exp(-5 * 0.25), rel=0.2)
    t.unsup_rampup = 0.0


def test_unlabeled_batches_are_augmented_and_change_from_step_to_step(smms_trainer):
    from nnunetv2_smms.unlabeled.loader import UnlabeledDataLoader
    t = smms_trainer
    loader = t.get_unlabeled_dataloader(0)
    inner = loader.data_loader
    assert isinstance(inner, UnlabeledDataLoader)
    patch = tuple(t.configuration_manager.patch_size)
    # the loader crops the larger initial patch (room for rotation and scaling); nnU-Net's spatial transform
    # brings it to the planned patch: without the transforms the batch would keep the initial size
    assert tuple(inner.patch_size) != patch
    torch.manual_seed(0)
    np.random.seed(0)
    batches = [next(loader) for _ in range(6)]
    assert all(tuple(b["data"].shape) == (t.global_unlabeled_batch_size(), 2, *patch) for b in batches)
    assert all(not torch.equal(batches[i]["data"], batches[i + 1]["data"]) for i in range(len(batches) - 1))
    assert len({k for b in batches for k in b["keys"]}) > 1  # more than one case
    # un-augmented crops of the planned size: none of the augmented patches is one of them
    plain = UnlabeledDataLoader(inner._data, inner.batch_size, patch, patch, t.label_manager, transforms=None)
    crops = [plain.generate_train_batch()["data"] for _ in range(6)]
    assert not any(torch.allclose(b["data"][j], c[k]) for b in batches for j in range(len(b["data"]))
                   for c in crops for k in range(len(c)))


def test_validation_scores_the_fused_output_and_each_branch_from_its_own(smms_trainer):
    t = smms_trainer
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
    assert result["tp_hard_a"][0] == n_fg and result["fp_hard_a"][0] == n_all - n_fg  # all foreground
    assert result["tp_hard_b"][0] == 0 and result["fn_hard_b"][0] == n_fg            # all background
    # fused = mean of logits = (1 - 3) / 2 for foreground vs (-1 + 3) / 2: background wins, as in branch b
    assert result["tp_hard"][0] == 0 and result["fn_hard"][0] == n_fg and result["fp_hard"][0] == 0


@pytest.mark.parametrize("name", ["nnUNetTrainerSMMS_Baseline", "nnUNetTrainerSMMS_MMF", "nnUNetTrainerSMMS_MMF_MAE",
                                  "nnUNetTrainerSMMS_MMF_MCML", "nnUNetTrainerSMMS", "nnUNetTrainerSMMS_LightMMF"])
def test_each_ablation_trainer_builds_its_modules_and_takes_a_step(name, prepared_dataset, monkeypatch, tmp_path):
    from nnunetv2_smms.trainers import TABLE2_ABLATIONS, TRAINERS
    cls = {c.__name__: c for c in TRAINERS}[name]
    t = make_trainer(prepared_dataset, monkeypatch, tmp_path, trainer=name)
    try:
        net = unwrap(t.network)
        assert (len(net.mmf) > 0) == cls.use_mmf and (len(net.mae_levels) > 0) == cls.use_mae
        assert t.uses_unlabeled == cls.use_mcml and (t.dataloader_unlabeled is not None) == cls.use_mcml
        if cls.use_mmf:
            k = 1 if cls.mmf_kernel_size == 1 else 3
            assert net.mmf[0].conv1.kernel_size == (k, k, k)
        before = [p.detach().clone() for p in t.network.parameters()]
        out = t.train_step(next(t.dataloader_train))
        assert out["skipped"] == 0 and ("loss_unsup" in out) == cls.use_mcml
        moved = [not torch.equal(b, p) for b, p in zip(before, t.network.parameters())]
        assert sum(moved) > 0.9 * len(moved)
    finally:
        t.on_train_end()
    assert [c.__name__ for c in TABLE2_ABLATIONS] == ["nnUNetTrainerSMMS_Baseline", "nnUNetTrainerSMMS_MMF",
                                                      "nnUNetTrainerSMMS_MMF_MAE", "nnUNetTrainerSMMS_MMF_MCML",
                                                      "nnUNetTrainerSMMS"]


def test_output_branch_variable_never_reaches_training(prepared_dataset, monkeypatch, tmp_path):
    t = make_trainer(prepared_dataset, monkeypatch, tmp_path, nnUNet_smms_output_branch="b")
    try:
        assert unwrap(t.network).output_branch == "fused"
        plans = t.plans_manager.plans["configurations"]["3d_fullres"]
        assert plans["smms"]["output_branch"] == "fused"
        # the predictor's path (the static build) does honour it
        net = type(t).build_network_architecture(t.plans_manager, t.configuration_manager, 2, 2, False)
        assert net.output_branch == "b"
    finally:
        t.on_train_end()
