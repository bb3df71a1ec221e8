"""The update one train_step makes, for tests that compare the same step under different settings (a
semi-supervised term at weight 0 and at its default must give different updates)."""
import contextlib
import itertools

import pytest
import torch


def step_update(trainer, batch, unlabeled, weights, optimizer, **attrs):
    """The parameter change of one train_step from the same weights, optimizer state and batches."""
    trainer.network.load_state_dict(weights)
    trainer.optimizer.load_state_dict(optimizer)
    for k, v in attrs.items():
        setattr(trainer, k, v)
    trainer._iteration = 0
    trainer.dataloader_unlabeled = itertools.repeat(unlabeled)
    out = trainer.train_step(batch)
    return out, torch.cat([(p.detach() - weights[n]).flatten() for n, p in trainer.network.named_parameters()])


@contextlib.contextmanager
def started_trainer(prepared_dataset, tmp_path_factory, trainer="nnUNetTrainerSMMS", end=True):
    """A trainer of the prepared dataset started in this process (conftest.make_trainer) for a module-scoped
    fixture: ``with started_trainer(...) as t: yield t``; its workers are stopped and the environment restored
    afterwards."""
    from conftest import make_trainer
    mp = pytest.MonkeyPatch()
    t = make_trainer(prepared_dataset, mp, tmp_path_factory.mktemp(trainer), trainer=trainer)
    try:
        yield t
    finally:
        if end:
            t.on_train_end()
        mp.undo()


def fixed_step_inputs(trainer, weights=None):
    """(labeled batch, unlabeled batch, weights, optimizer state) for step_update: one batch of each drawn once,
    the current weights (or ``weights``) and optimizer state copied."""
    if weights is None:
        weights = {k: v.clone() for k, v in trainer.network.state_dict().items()}
    return next(trainer.dataloader_train), next(trainer.dataloader_unlabeled), weights, trainer.optimizer.state_dict()
