"""The update one train_step makes, for tests that compare the same step under different settings (a
semi-supervised term at weight 0 and at its default must give different updates)."""
import itertools

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
