"""``ra``: the command-line tool. Each subcommand lives in its own module and is imported on demand.

User errors (any :class:`~.errors.UserError`, a missing or unreadable path, an unknown command) print one line,
``ra: error: <message>``, to stderr and exit 2, as argparse does for bad options. ``--debug`` anywhere on the
command line (or ``RA_DEBUG=1``) shows their traceback instead; any other exception is a bug and always shows it.
"""

from __future__ import annotations

import importlib
import os
import sys

from .errors import RunStopped, UserError

# subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "check": ("reciprocal_attention.lab.check", "check every variant and backend against the float64 reference"),
    "bench": ("reciprocal_attention.lab.bench_cli", "benchmark RA against the baseline block (docs/RA-SPEC.md section 4)"),
    "data": ("reciprocal_attention.lab.data.cli", "build the offline corpus: `ra data prepare --out DIR`"),
    "train": ("reciprocal_attention.lab.train", "train GPT-2 with RA"),
    "quality": ("reciprocal_attention.lab.quality", "paired multi-seed quality study (docs/RA-SPEC.md section 5)"),
    "generate": ("reciprocal_attention.lab.generate", "sample text from a trained run or a Hugging Face GPT-2"),
    "compare": ("reciprocal_attention.lab.compare", "the main job: speed table + short quality comparison"),
}
DEBUG_FLAG = "--debug"
DEBUG_ENV = "RA_DEBUG"
# Errors about paths the user gave (a missing corpus, an unwritable output directory): one line, exit 2.
PATH_ERRORS = (FileNotFoundError, PermissionError)


def usage() -> str:
    """The top-level help text: the commands and the error convention."""
    lines = ["usage: ra [--debug] COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<9} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`ra COMMAND --help` for a command's options.",
              f"A user error prints one line and exits 2; {DEBUG_FLAG} (or {DEBUG_ENV}=1) shows its traceback."]
    return "\n".join(lines)


def error_line(exc: BaseException) -> str:
    """``exc``'s message on one line (an ``OSError`` as ``path: reason``)."""
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        msg = f"{exc.filename}: {exc.strerror}"
    else:
        msg = str(exc) or type(exc).__name__
    return " ".join(part.strip() for part in msg.splitlines() if part.strip())


def fail(message: str) -> int:
    """Print ``ra: error: <message>`` to stderr; the exit code of a user error (2)."""
    print(f"ra: error: {message}", file=sys.stderr)
    return 2


def _debug_requested(argv: list[str]) -> bool:
    return DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``ra COMMAND ...`` to ``<module>.main(argv)``; user errors become one line and exit code 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = _debug_requested(argv)
    argv = [a for a in argv if a != DEBUG_FLAG]
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        return fail(f"unknown command {name!r}; valid commands: {', '.join(COMMANDS)} (`ra --help` lists them)")
    try:
        module = importlib.import_module(COMMANDS[name][0])
        return int(module.main(rest) or 0)
    except RunStopped as e:  # a stop signal ended a training run after a checkpoint: not an error
        print(f"ra: {e}", file=sys.stderr)
        return 128 + e.signum
    except (UserError, *PATH_ERRORS) as e:
        if debug:
            raise
        return fail(error_line(e))


if __name__ == "__main__":
    sys.exit(main())
