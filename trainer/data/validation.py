"""The validation set: the first M sequences of the validation dataset, in manifest order.

Rank r of R takes an equal slice of M // R sequences (the remainder is left out, so every rank runs
the same number of forward passes, which FSDP requires).
"""
from __future__ import annotations

import logging

import numpy as np
import torch

from shards.backends import open_storage
from shards.format import read_manifest
from trainer.config import ConfigError
from trainer.data.fetch import BlockIndex, BlockReader
from shards.progress import plural
from trainer.parallel import Dist

log = logging.getLogger(__name__)


def load_val_rows(url: str, count: int, d: Dist) -> torch.Tensor:
    """This rank's slice of the first `count` sequences of the dataset at `url`: int64 [rows, seq_len]."""
    storage = open_storage(url)
    try:
        manifest = read_manifest(storage)
        total = manifest.totals()["sequences"]
        if count > total:
            log.warning("data.val_sequences=%d but %s holds %s: using %d", count, url, plural(total, "sequence"), total)
            count = total
        per_rank = count // d.world_size
        if per_rank == 0:
            fix = "raise it" if count < total else "use a larger validation set"
            raise ConfigError(f"data.val_sequences={count} ({url} holds {total}) is fewer than the {d.world_size} "
                             f"ranks: {fix}")
        lo, hi = d.rank * per_rank, (d.rank + 1) * per_rank
        # the blocks holding sequences [lo, hi) in manifest order, read as the loader reads them
        index = BlockIndex(manifest, storage)
        read = BlockReader(storage, index)
        rows, seen = [], 0
        for i, shard in enumerate(manifest.shards):
            if seen >= hi:
                break
            if seen + shard.sequences <= lo:  # skipped without reading its block index
                seen += shard.sequences
                continue
            for j, n in enumerate(index.table(0, i)["rows"].tolist()):
                if lo < seen + n and seen < hi:
                    block = np.empty((n, manifest.seq_len), dtype=manifest.np_dtype)
                    read(int(index.first_block[i]) + j, block)
                    rows.append(block[max(0, lo - seen):hi - seen])
                seen += n
        return torch.from_numpy(np.concatenate(rows).astype(np.int64))
    finally:
        storage.close()
