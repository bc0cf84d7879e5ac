"""`python tests/fault_trainer.py CONFIG [overrides]`: the trainer, with one rank's checkpoint write failing
as on a full disk. FAULT_RANK's RNG-state file of checkpoint FAULT_STEP raises ENOSPC; everything else
is the real trainer. Used by the checkpoint-failure tests (run it under torchrun for several ranks)."""
import errno
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from shards.storage import LocalStorage  # noqa: E402

_put_bytes = LocalStorage.put_bytes
_rank, _fault_rank = int(os.environ.get("RANK", "0")), int(os.environ["FAULT_RANK"])
_victim = f"step-{int(os.environ['FAULT_STEP']):06d}.tmp/rng/rank-{_fault_rank:05d}.pt"


def _failing_put_bytes(self, name, data):
    if _rank == _fault_rank and name == _victim:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.where(name))
    return _put_bytes(self, name, data)


LocalStorage.put_bytes = _failing_put_bytes

if __name__ == "__main__":
    from trainer.__main__ import main
    sys.exit(main())
