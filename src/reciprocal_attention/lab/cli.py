"""``ra``: the command-line tool. Each subcommand lives in its own module and is imported on demand."""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "check": ("reciprocal_attention.lab.check", "check every variant and backend against the float64 reference"),
    "bench": ("reciprocal_attention.lab.bench", "benchmark RA against the baseline block (RA-SPEC section 4)"),
    "data": ("reciprocal_attention.lab.data", "build the offline corpus: `ra data prepare --out DIR`"),
    "train": ("reciprocal_attention.lab.train", "train GPT-2 with RA"),
    "quality": ("reciprocal_attention.lab.quality", "paired multi-seed quality study (RA-SPEC section 5)"),
    "compare": ("reciprocal_attention.lab.compare", "the main job: speed table + short quality comparison"),
}


def usage() -> str:
    lines = ["usage: ra COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<9} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`ra COMMAND --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``ra COMMAND ...`` to ``<module>.main(argv)``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"ra: unknown command {name!r}; valid commands: {', '.join(COMMANDS)}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
