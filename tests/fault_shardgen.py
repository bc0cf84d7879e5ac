"""`python tests/fault_shardgen.py ARGS...`: shardgen, with the worker that runs task STALL_TASK stopping after
its first block: the block is flushed to the half-written shard, the worker's pid goes to STALL_MARKER
(written atomically), and the worker waits to be killed. Everything else is the real shardgen. The
workers are spawned, so each imports this file as its main module and gets the same patch."""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from shardgen.tasks import TaskShards  # noqa: E402

_add_block = TaskShards.add_block
_task, _marker = os.environ["STALL_TASK"], os.environ["STALL_MARKER"]


def _stalling_add_block(self, rows):
    if str(self.task) != _task:
        return _add_block(self, rows)
    _add_block(self, rows)
    self.file.flush()
    with open(_marker + ".tmp", "w") as m:
        m.write(str(os.getpid()))
    os.replace(_marker + ".tmp", _marker)
    time.sleep(3600)


TaskShards.add_block = _stalling_add_block

if __name__ == "__main__":
    from shardgen.cli import main
    sys.exit(main())
