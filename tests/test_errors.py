"""One place decides which errors are the user's (aol_dist/errors.py): the command line and the training
entry point both say those in one line and keep the traceback of everything else."""

from __future__ import annotations

import types
from unittest import mock

import pytest

from aol_dist.audit.command import AuditError
from aol_dist.checkpoint import RunRefused, WeightsMismatch
from aol_dist.config import ConfigError
from aol_dist.data.convert.common import ConversionError
from aol_dist.data.convert.tokenize import TokenizerMismatch
from aol_dist.data.shards import ShardError
from aol_dist.errors import UserError
from aol_dist.finished_run import RunInputError
from aol_dist.writes import WriteError

USERS = [(AuditError, ValueError), (RunRefused, ValueError), (WeightsMismatch, ValueError), (ConfigError, ValueError),
         (ConversionError, ValueError), (TokenizerMismatch, ValueError), (ShardError, RuntimeError),
         (RunInputError, ValueError), (WriteError, OSError)]


@pytest.mark.parametrize("error, builtin", USERS, ids=[e.__name__ for e, _ in USERS])
def test_each_user_error_is_one_and_keeps_its_builtin(error, builtin):
    """Callers that catch the built-in by name (``except ValueError``) still do."""
    assert issubclass(error, UserError) and issubclass(error, builtin)


@pytest.mark.parametrize("error", [e for e, _ in USERS], ids=[e.__name__ for e, _ in USERS])
def test_the_command_line_says_a_user_error_in_one_line(error, capsys):
    from aol_dist import cli

    with mock.patch.object(cli, "_shards_verify", side_effect=error("shards/x/manifest.json: what is wrong")):
        assert cli.main(["shards", "verify", "shards/x"]) == 1
    assert capsys.readouterr().err == "aol shards: shards/x/manifest.json: what is wrong\n"


def test_the_command_line_keeps_the_traceback_of_a_bug():
    from aol_dist import cli

    with mock.patch.object(cli, "_shards_verify", side_effect=KeyError("splits")):
        with pytest.raises(KeyError):
            cli.main(["shards", "verify", "shards/x"])


@pytest.mark.parametrize("error, traceback", [(RunRefused("runs/r exists"), False), (WriteError("disk full"), False),
                                              (KeyError("splits"), True), (ValueError("a bug"), True)])
def test_training_fails_in_one_line_on_a_user_error_and_with_its_traceback_otherwise(error, traceback, capsys):
    from aol_dist import train

    world = types.SimpleNamespace(rank=0, world_size=2, is_main=True)
    try:
        raise error
    except Exception as raised:  # noqa: BLE001 - as the entry point catches it, traceback and all
        error = raised
    with mock.patch.object(train.os, "_exit", side_effect=SystemExit) as leave, pytest.raises(SystemExit):
        train.fail(world, error)
    leave.assert_called_once_with(1)
    err = capsys.readouterr().err
    assert ("Traceback" in err) == traceback
    assert err.splitlines()[-1] == f"aol_dist.train: rank 0 of 2 failed: {type(error).__name__}: {error}"
