"""``ra``'s user-error convention: one stderr line ``ra: error: <message>`` and exit code 2; ``--debug`` or
``RA_DEBUG=1`` shows the traceback; internal errors always keep theirs. Every ``ra data``/``ra check`` option has
help text.

In-process ``main([...])`` calls where possible; one subprocess checks the installed entry point end to end.
"""

import argparse
import os
import subprocess
import sys
import types

import pytest
import torch

from reciprocal_attention.lab import cli
from reciprocal_attention.lab.errors import UserError


def run(capsys, *argv):
    """``ra ARGV`` in process: (exit code, stdout, stderr lines)."""
    try:
        code = cli.main(list(argv))
    except SystemExit as e:  # argparse's own errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, [line for line in err.splitlines() if line.strip()]


def assert_user_error(capsys, *argv, match: str) -> str:
    """``ra ARGV`` must fail with exactly one stderr line ``ra: error: ...`` containing ``match``, exit 2."""
    code, _, err = run(capsys, *argv)
    errors = [line for line in err if line.startswith("ra: error:")]
    assert code == 2, (code, err)
    assert len(errors) == 1 and errors[0] == err[-1], err
    assert not any("Traceback" in line for line in err), err
    assert match in errors[0], errors[0]
    return errors[0]


@pytest.fixture(autouse=True)
def _no_debug_env(monkeypatch):
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)


def test_help_and_unknown_command(capsys):
    code, out, err = run(capsys, "--help")
    assert code == 0 and "commands:" in out and "--debug" in out and not err
    code, _, err = run(capsys)
    assert code == 0
    line = assert_user_error(capsys, "nope", match="unknown command 'nope'")
    assert "train" in line and "data" in line
    assert run(capsys, "nope")[2] == [line]  # nothing but the one line


def test_debug_shows_the_traceback(capsys, monkeypatch, tmp_path):
    missing = str(tmp_path / "none")
    assert_user_error(capsys, "data", "info", missing, match=f"data directory {missing} does not exist")
    with pytest.raises(UserError, match="does not exist"):
        cli.main(["--debug", "data", "info", missing])
    with pytest.raises(UserError):
        cli.main(["data", "info", missing, "--debug"])
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    with pytest.raises(UserError):
        cli.main(["data", "info", missing])
    monkeypatch.setenv(cli.DEBUG_ENV, "0")
    assert run(capsys, "data", "info", missing)[0] == 2


def test_internal_errors_keep_their_traceback(monkeypatch, capsys):
    fake = types.ModuleType("ra_fake_command")

    def main(argv):
        raise KeyError("a bug, not the user's mistake")

    fake.main = main
    monkeypatch.setitem(sys.modules, "ra_fake_command", fake)
    monkeypatch.setitem(cli.COMMANDS, "fake", ("ra_fake_command", "raises a bug"))
    with pytest.raises(KeyError, match="a bug"):
        cli.main(["fake"])
    assert "ra: error" not in capsys.readouterr().err


def test_os_errors_on_user_paths_are_one_line():
    e = FileNotFoundError(2, "No such file or directory", "/no/such/file")
    assert cli.error_line(e) == "/no/such/file: No such file or directory"
    assert cli.error_line(UserError("first\n  second\n")) == "first second"


# ------------------------------------------------------------------------------------------------------------------
# ra train (config and run-directory errors)
# ------------------------------------------------------------------------------------------------------------------

def test_train_unknown_preset(capsys):
    assert_user_error(capsys, "train", "--preset", "nope", "--print-config", match="unknown preset 'nope'")


def test_train_unknown_set_key(capsys):
    assert_user_error(capsys, "train", "--preset", "tiny", "--set", "model.bogus=1", "--print-config",
                      match="model.bogus")


def test_train_unparsable_value(capsys):
    assert_user_error(capsys, "train", "--preset", "tiny", "--set", "optim.lr=abc", "--print-config",
                      match="optim.lr")


@pytest.mark.parametrize("preset", ["small-cpu", "tiny"])  # tiny's preset fixture gives way to an explicit data.dir
def test_train_missing_data_dir(capsys, tmp_path, preset):
    missing = str(tmp_path / "nonexistent")
    assert_user_error(capsys, "train", "--preset", preset, "--set", f"data.dir={missing}",
                      "--set", "budget.max_steps=1", "--out", str(tmp_path / "run"), match=missing)


def test_train_resume_on_an_empty_dir(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    assert_user_error(capsys, "train", "--resume", str(tmp_path / "empty"), match=str(tmp_path / "empty"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda(capsys, tmp_path):
    assert_user_error(capsys, "check", "--device", "cuda", match="CUDA is not available")
    assert_user_error(capsys, "check", "--device", "tpu", match="--device 'tpu'")
    assert_user_error(capsys, "train", "--preset", "tiny", "--set", "system.device=cuda", "--set",
                      "budget.max_steps=1", "--out", str(tmp_path / "run"), match="system.device")


# ------------------------------------------------------------------------------------------------------------------
# ra data
# ------------------------------------------------------------------------------------------------------------------

def test_data_user_errors(capsys, tmp_path):
    code, _, err = run(capsys, "data", "prepare")  # argparse: a missing required option
    assert code == 2 and err[-1].startswith("ra data prepare: error:")
    assert_user_error(capsys, "data", "prepare", "--out", str(tmp_path / "c"), "--sources", "wikipedia",
                      match="sources must be")
    assert_user_error(capsys, "data", "prepare", "--out", str(tmp_path / "c"), "--sources", "kjv",
                      "--val-fraction", "0.7", match="val_fraction must be in (0, 0.5)")
    out = tmp_path / "fx"
    assert run(capsys, "data", "prepare", "--fixture", "--tokenizer", "byte", "--out", str(out))[0] == 0
    (out / "train.bin").write_bytes(b"")
    assert_user_error(capsys, "data", "info", str(out), match=f"train.bin in {out} is empty")


def _options(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _options(sub)
        elif not isinstance(action, argparse._HelpAction):
            yield parser.prog, action


def test_every_data_and_check_option_has_help():
    from reciprocal_attention.lab import check
    from reciprocal_attention.lab.data import cli as data_cli

    seen = 0
    for parser in (data_cli.build_parser(), check.build_parser()):
        for prog, action in _options(parser):
            seen += 1
            assert action.help and action.help.strip(), f"{prog} {action.option_strings or action.dest}: no help"
    assert seen >= 9


def test_entry_point_prints_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop(cli.DEBUG_ENV, None)
    proc = subprocess.run([sys.executable, "-m", "reciprocal_attention.lab.cli", "train", "--preset", "nope"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [proc.stderr.strip()] and proc.stderr.startswith("ra: error: unknown preset")
    assert proc.stdout == ""


def test_every_option_of_every_command_has_help():
    """`ra COMMAND --help` explains every option of every command."""
    import argparse
    import importlib

    from reciprocal_attention.lab.cli import COMMANDS

    missing = []
    for name, (module, _) in COMMANDS.items():
        parser = importlib.import_module(module).build_parser()
        stack = [parser]
        while stack:
            p = stack.pop()
            for a in p._actions:
                if isinstance(a, argparse._SubParsersAction):
                    stack.extend(a.choices.values())
                elif not a.help and not isinstance(a, argparse._HelpAction):
                    missing.append(f"ra {name} {a.option_strings or a.dest}")
    assert not missing, missing
