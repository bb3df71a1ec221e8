"""Run by tests/test_reliability.py as a subprocess (nnU-Net reads nnUNet_raw/... when it is imported, so the
environment must be set before this process starts): create the real nnUNetTrainerSMMS on the prepared
dataset, start it as nnUNetv2_train does, and feed train_step batches whose images contain NaN / inf.
Prints one JSON line with what happened (prefixed 'RESULT ')."""
import json
import os
import sys

import torch
from nnunetv2.run.run_training import get_trainer_from_args


def params(trainer):
    return [p.detach().clone() for p in trainer.network.parameters()]


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def main(dataset: str) -> dict:
    trainer = get_trainer_from_args(dataset, "3d_fullres", 0, "nnUNetTrainerSMMS", "nnUNetPlans",
                                    device=torch.device("cpu"))
    trainer.on_train_start()  # initialize(), data loaders (labeled + unlabeled), plans copied to the model folder
    trainer.on_epoch_start()
    trainer.on_train_epoch_start()
    good = next(trainer.dataloader_train)
    nan_batch = dict(good, data=good["data"].clone())
    nan_batch["data"][0, 0, :2] = float("nan")
    inf_batch = dict(good, data=good["data"].clone())
    inf_batch["data"][-1, -1, -2:] = float("inf")
    result = {}

    w0 = params(trainer)
    out_nan = trainer.train_step(nan_batch)
    w1 = params(trainer)
    result["nan_step"] = {k: float(v) for k, v in out_nan.items()}
    result["nan_step_weights_unchanged"] = same(w0, w1)
    result["bad_in_a_row_after_nan"] = trainer._bad_steps_in_a_row

    out_good = trainer.train_step(good)
    result["good_step"] = {k: float(v) for k, v in out_good.items()}
    result["good_step_weights_changed"] = not same(w1, params(trainer))
    result["bad_in_a_row_after_good"] = trainer._bad_steps_in_a_row

    out_inf = trainer.train_step(inf_batch)
    result["inf_step"] = {k: float(v) for k, v in out_inf.items()}

    # NaN only in the unlabeled batch: the labeled pass has already put gradients in place; they are dropped
    real_unlabeled = trainer.dataloader_unlabeled
    unl = next(real_unlabeled)
    unl_nan = dict(unl, data=unl["data"].clone())
    unl_nan["data"][0, 0, :2] = float("nan")
    trainer.dataloader_unlabeled = iter([unl_nan])
    w2 = params(trainer)
    out_unl = trainer.train_step(good)
    result["unlabeled_nan_step"] = {k: float(v) for k, v in out_unl.items()}
    result["unlabeled_nan_weights_unchanged"] = same(w2, params(trainer))
    trainer.dataloader_unlabeled = real_unlabeled
    trainer.on_train_epoch_end([out_nan, out_good, out_inf])
    result["logged_skipped_steps"] = trainer.logger.get_value("skipped_steps", -1)
    result["logged_train_loss"] = float(trainer.logger.get_value("train_losses", -1))
    result["logged_loss_sup_a"] = float(trainer.logger.get_value("train_loss_sup_a", -1))

    # the default, then a low limit on this instance: the run stops after that many bad steps in a row
    result["default_max_consecutive_bad_steps"] = trainer.max_consecutive_bad_steps
    trainer._bad_steps_in_a_row = 0
    trainer.max_consecutive_bad_steps = 3
    returned, w_before = 0, params(trainer)
    try:
        for _ in range(10):
            trainer.train_step(nan_batch)
            returned += 1
        result["stop_error"] = None
    except RuntimeError as e:
        result["stop_error"] = str(e)
    result["bad_steps_returned_before_stop"] = returned
    result["weights_unchanged_by_bad_steps"] = same(w_before, params(trainer))
    result["log_file"] = trainer.log_file
    result["output_folder"] = trainer.output_folder
    return result


if __name__ == "__main__":
    res = main(sys.argv[1])
    print("RESULT " + json.dumps(res), flush=True)
    sys.stdout.flush()
    os._exit(0)  # no data-loader clean-up needed (nnUNet_n_proc_DA=0: no worker processes)
