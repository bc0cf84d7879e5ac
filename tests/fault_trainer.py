"""`python tests/fault_trainer.py CONFIG [overrides]`: the trainer, with one rank's checkpoint write failing
as on a full disk. FAULT_RANK's RNG-state file of checkpoint FAULT_STEP raises ENOSPC; everything else
is the real trainer. Used by the checkpoint-failure tests (run it under torchrun for several ranks)."""
import errno
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

_save = torch.save
_rank, _fault_rank = int(os.environ.get("RANK", "0")), int(os.environ["FAULT_RANK"])
_marker = f"step-{int(os.environ['FAULT_STEP']):06d}.tmp"


def _failing_save(obj, f, *args, **kwargs):
    if _rank == _fault_rank and isinstance(f, str) and _marker in f:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f)
    return _save(obj, f, *args, **kwargs)


torch.save = _failing_save

if __name__ == "__main__":
    from trainer.__main__ import main
    sys.exit(main())
