"""Modality dropout (trainers/modality_dropout.py), each behaviour pinned by a test that fails without it: per sample
at most one branch's input is zero, never both, at the rate p; off (p = 0, every SMMS trainer's default) the update
is bit-for-bit the one with the dropout code bypassed; on, the labeled pass sees the dropped input (the unlabeled
pass only with modality_dropout_unlabeled, the joint pass likewise) and the update changes; validation never drops;
p travels with the model (recorded settings, checked on resume). In-process trainers on the prepared dataset."""
import json
from pathlib import Path

import pytest
import torch

from _step_helpers import step_update, started_trainer, fixed_step_inputs
from nnunetv2_smms.trainers.modality_dropout import DROPPED_A, DROPPED_B, KEPT, drop_modalities
from nnunetv2_smms.trainers.recorded_settings import SettingsMismatchError


def _which_zero(x, out, channels_a, channels_b):
    """Per sample: which branch's channels were set to zero (the others must be untouched)."""
    result = []
    for i in range(x.shape[0]):
        zero_a = bool((out[i, channels_a] == 0).all()) and not bool((x[i, channels_a] == 0).all())
        zero_b = bool((out[i, channels_b] == 0).all()) and not bool((x[i, channels_b] == 0).all())
        assert not (zero_a and zero_b), f"sample {i}: both branches dropped"
        if zero_a:
            torch.testing.assert_close(out[i, channels_b], x[i, channels_b], rtol=0, atol=0)
        elif zero_b:
            torch.testing.assert_close(out[i, channels_a], x[i, channels_a], rtol=0, atol=0)
        else:
            torch.testing.assert_close(out[i], x[i], rtol=0, atol=0)
        result.append(DROPPED_A if zero_a else (DROPPED_B if zero_b else KEPT))
    return torch.tensor(result)


def test_one_branch_per_sample_is_zero_never_both_at_rate_p():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 3, 2, 3, 2, generator=g) + 5  # no zeros of its own
    a, b = [0, 2], [1]                                   # a branch may have several channels
    out, which = drop_modalities(x, a, b, 0.5, generator=g)
    assert torch.equal(_which_zero(x, out, a, b), which)
    n_a, n_b = int((which == DROPPED_A).sum()), int((which == DROPPED_B).sum())
    # p / 2 each: 500 expected of 2000, binomial sd ~19
    assert 420 < n_a < 580 and 420 < n_b < 580
    out1, which1 = drop_modalities(x, a, b, 1.0, generator=g)
    assert bool((which1 != KEPT).all()) and torch.equal(_which_zero(x, out1, a, b), which1)
    assert 850 < int((which1 == DROPPED_A).sum()) < 1150
    assert torch.equal(x, torch.randn(2000, 3, 2, 3, 2, generator=torch.Generator().manual_seed(0)) + 5)  # not in place


def test_off_returns_the_batch_and_draws_no_random_numbers():
    x = torch.randn(4, 2, 3, 3)
    state = torch.get_rng_state()
    out, which = drop_modalities(x, [0], [1], 0.0)
    assert out is x and bool((which == KEPT).all())
    assert torch.equal(torch.get_rng_state(), state)
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        drop_modalities(x, [0], [1], 1.5)


@pytest.fixture(scope="module")
def trainer(prepared_dataset, tmp_path_factory):
    with started_trainer(prepared_dataset, tmp_path_factory) as t:
        yield t


@pytest.fixture(scope="module")
def fixed_step(trainer):
    return fixed_step_inputs(trainer)


def _seeded_update(t, fixed_step, **attrs):
    torch.manual_seed(123)  # the network's own dropout draws the same masks in every repetition
    return step_update(t, *fixed_step, **attrs)


def test_default_is_off_on_every_smms_trainer_and_the_variant_turns_it_on():
    from nnunetv2_smms.trainers import TRAINERS, nnUNetTrainerSMMS, nnUNetTrainerSMMS_ModalityDropout
    smms = [c for c in TRAINERS if issubclass(c, nnUNetTrainerSMMS)]
    assert all(c.modality_dropout_p == 0 for c in smms if c is not nnUNetTrainerSMMS_ModalityDropout)
    assert 0.25 <= nnUNetTrainerSMMS_ModalityDropout.modality_dropout_p <= 0.5
    assert nnUNetTrainerSMMS_ModalityDropout in TRAINERS


def test_off_is_bit_for_bit_the_update_without_the_dropout_code(trainer, fixed_step):
    t = trainer
    assert t.modality_dropout_p == 0
    out_off, u_off = _seeded_update(t, fixed_step)
    t.drop_modalities = lambda data: data  # the code path bypassed
    try:
        out_bypassed, u_bypassed = _seeded_update(t, fixed_step)
    finally:
        del t.drop_modalities
    assert torch.equal(u_off, u_bypassed)
    assert all(float(out_off[k]) == float(out_bypassed[k]) for k in out_off)
    # p > 0 changes the update
    _, u_on = _seeded_update(t, fixed_step, modality_dropout_p=1.0)
    t.modality_dropout_p = 0.0
    assert (u_on - u_off).norm() > 1e-3 * u_off.norm()


def _network_inputs(t, fixed_step, **attrs):
    seen = []
    handle = t.network.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    try:
        out, _ = _seeded_update(t, fixed_step, **attrs)
    finally:
        handle.remove()
        for k in attrs:
            setattr(t, k, getattr(type(t), k))
    assert out["skipped"] == 0
    return seen


def test_the_labeled_pass_sees_the_dropped_input_the_unlabeled_one_only_when_asked(trainer, fixed_step):
    t = trainer
    labeled, unlabeled = fixed_step[0]["data"], fixed_step[1]["data"]
    a, b = t.smms_config.channels_a, t.smms_config.channels_b
    seen = _network_inputs(t, fixed_step, modality_dropout_p=1.0)
    assert len(seen) == 2  # separate passes: labeled, then unlabeled
    assert bool((_which_zero(labeled, seen[0], a, b) != KEPT).all())
    assert torch.equal(seen[1], unlabeled)
    seen = _network_inputs(t, fixed_step, modality_dropout_p=1.0, modality_dropout_unlabeled=True)
    assert bool((_which_zero(unlabeled, seen[1], a, b) != KEPT).all())
    # the joint pass (one forward over labeled + unlabeled): the labeled part only
    seen = _network_inputs(t, fixed_step, modality_dropout_p=1.0, separate_unlabeled_pass=False)
    assert len(seen) == 1
    n = labeled.shape[0]
    assert bool((_which_zero(labeled, seen[0][:n], a, b) != KEPT).all())
    assert torch.equal(seen[0][n:], unlabeled)


def test_validation_never_drops(trainer):
    t = trainer
    batch = next(t.dataloader_val)
    t.network.eval()
    try:
        off = t.validation_step(batch)
        t.modality_dropout_p = 1.0
        on = t.validation_step(batch)
    finally:
        t.modality_dropout_p = 0.0
        t.network.train()
    assert all((off[k] == on[k]).all() for k in off)


def test_p_is_recorded_and_a_resume_with_another_p_stops(trainer):
    t = trainer
    assert "modality_dropout" not in t.recorded_settings()["semi_supervised"]  # off: as before the option
    t.modality_dropout_p = 0.5
    try:
        recorded = t.recorded_settings()["semi_supervised"]["modality_dropout"]
        assert recorded == {"p": 0.5, "unlabeled": False}
        # the model folder's plans.json (written by on_train_start) says p = 0: a --c with p = 0.5 stops
        plans = json.loads(Path(t.output_folder_base, "plans.json").read_text(encoding="utf-8"))
        assert "modality_dropout" not in plans["configurations"]["3d_fullres"]["semi_supervised"]
        with pytest.raises(SettingsMismatchError, match="modality_dropout"):
            t.load_checkpoint("never_read.pth")
    finally:
        t.modality_dropout_p = 0.0
