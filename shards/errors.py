"""The one base of every error a user causes and can fix (a bad path, config, dataset, checkpoint).

Each CLI (`python -m shardgen`, `python -m trainer`, `trainer.export`, `trainer.data`, `shards.s3server`)
catches `UserError` alone and prints its message as one line; anything else is a bug and keeps its
traceback. A message names the thing (file, key, shard, block) and says what to do. Subclasses keep the
builtin base they had (ValueError, RuntimeError) so older `except` clauses still match.
"""
from __future__ import annotations


class UserError(Exception):
    """An error the user can fix; its message is the whole report."""


class NotFoundError(UserError, FileNotFoundError):
    """A path the user named (or that a run needs) is not there: a FileNotFoundError that prints as one
    line. A bug's own FileNotFoundError is not one and keeps its traceback."""
