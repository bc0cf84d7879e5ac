"""Validation loss on a fixed set of rows (trainer/data/validation.py reads them): token losses and counts
summed over ranks.
"""
from __future__ import annotations

import torch

from trainer.parallel import Dist, all_reduce_sum


@torch.no_grad()
def validation_loss(model, rows: torch.Tensor, micro_batch: int, d: Dist, autocast, boundaries=None) -> float:
    """Mean next-token loss over all ranks' rows (each row predicts its own tokens 1..L-1).

    boundaries: for varlen runs, a function from a [rows, L] int array to the cu_seqlens of its
    documents (trainer.data.loader.cu_seqlens); the model then sees each document on its own, as in
    training. None: each row is one sequence."""
    was_training = model.training
    model.eval()
    loss_sum = tokens = 0.0
    for i in range(0, rows.shape[0], micro_batch):
        x = rows[i:i + micro_batch].to(d.device)
        with autocast():
            if boundaries is None:
                logits = model(input_ids=x).logits
            else:
                cu = torch.from_numpy(boundaries(rows[i:i + micro_batch].numpy())).to(d.device)
                logits = model(input_ids=x.reshape(1, -1), cu_seqlens=cu).logits.view(*x.shape, -1)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), x[:, 1:].flatten(),
                                                 reduction="sum")
        loss_sum += loss.item()
        tokens += x[:, 1:].numel()
    model.train(was_training)
    loss_sum, tokens = all_reduce_sum([loss_sum, tokens], d)
    return loss_sum / tokens
