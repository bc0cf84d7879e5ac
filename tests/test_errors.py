"""Every CLI prints a UserError as one line and lets any other exception (a bug) keep its traceback."""
from __future__ import annotations

import pytest

from models.build import ModelConfigError
from shardgen.inputs import InputError
from shardgen.output import BuildError
from shardgen.tokenizer import TokenizerError
from shardgen.workers import WorkerError
from shards.errors import NotFoundError, UserError
from shards.format import FormatError
from shards.s3server import S3ServerError
from shards.storage import S3ConfigError, StorageError
from trainer.checkpoint import CheckpointError
from trainer.config import ConfigError
from trainer.data.loader import DataStateError
from trainer.data.plan import PlanError
from trainer.loop import TrainingDiverged


@pytest.mark.parametrize("cls", [StorageError, S3ConfigError, FormatError, InputError, BuildError, TokenizerError,
                                 WorkerError, ConfigError, PlanError, DataStateError, CheckpointError,
                                 ModelConfigError, TrainingDiverged, S3ServerError, NotFoundError])
def test_every_user_facing_error_is_a_user_error(cls):
    assert issubclass(cls, UserError)


def _raiser(exc):
    def f(*_a, **_k):
        raise exc
    return f


def test_shardgen_cli(monkeypatch, capsys):
    import shardgen.cli as cli
    monkeypatch.setitem(cli.COMMANDS, "verify", _raiser(FormatError("OUT/shard-000000.tar: damaged; rebuild")))
    assert cli.main(["verify", "x"]) == 1
    assert capsys.readouterr().err == "shardgen verify: error: OUT/shard-000000.tar: damaged; rebuild\n"
    monkeypatch.setitem(cli.COMMANDS, "verify", _raiser(FileNotFoundError("a bug's missing file")))
    with pytest.raises(FileNotFoundError):
        cli.main(["verify", "x"])


def test_trainer_data_cli(monkeypatch, capsys):
    import trainer.data.__main__ as data_cli
    monkeypatch.setattr(data_cli, "open_storage", _raiser(StorageError("s3://b/p: no such bucket")))
    assert data_cli.main(["stats", "--shards", "s3://b/p", "--global-batch", "2"]) == 2
    assert capsys.readouterr().err == "error: s3://b/p: no such bucket\n"
    monkeypatch.setattr(data_cli, "open_storage", _raiser(FileNotFoundError("a bug's missing file")))
    with pytest.raises(FileNotFoundError):
        data_cli.main(["stats", "--shards", "x", "--global-batch", "2"])


def test_export_cli(monkeypatch, capsys, tmp_path):
    import trainer.export as export
    assert export.main([str(tmp_path / "nothing"), str(tmp_path / "out")]) == 1
    assert f"{tmp_path / 'nothing'} does not exist: give a run's out_dir" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert export.main([str(tmp_path / "empty"), str(tmp_path / "out")]) == 1
    assert "neither a run directory" in capsys.readouterr().err
    monkeypatch.setattr(export, "export", _raiser(FileNotFoundError("a bug's missing file")))
    with pytest.raises(FileNotFoundError):
        export.main([str(tmp_path / "nothing"), str(tmp_path / "out")])


def test_trainer_cli_keeps_a_bugs_file_not_found_traceback(monkeypatch, capsys, tmp_path):
    # It used to print every FileNotFoundError as one line, hiding where a bug's came from.
    import trainer.loop
    from trainer.__main__ import main
    cfg = tmp_path / "run.toml"
    cfg.write_text("")
    monkeypatch.setattr(trainer.loop, "train", _raiser(NotFoundError("data.shards=x: no such directory")))
    assert main([str(cfg)]) == 1 and capsys.readouterr().err == "error: data.shards=x: no such directory\n"
    monkeypatch.setattr(trainer.loop, "train", _raiser(FileNotFoundError("[Errno 2] /tmp/torch_extensions/x")))
    with pytest.raises(FileNotFoundError):
        main([str(cfg)])
