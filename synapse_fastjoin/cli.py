"""The ``synapse-fastjoin`` command line.

Three command groups: ``rooms`` talks to a running Synapse's admin API (see
:mod:`synapse_fastjoin.cli_rooms`); ``schema drop`` removes the module's
tables from Synapse's database for good (see :mod:`synapse_fastjoin.cli_schema`);
``patches`` manages the patch series this project carries against Synapse
(see :mod:`synapse_fastjoin.patching`)::

    synapse-fastjoin patches status [--site-packages DIR] [--series DIR]
    synapse-fastjoin patches apply  [--site-packages DIR] [--series DIR]
    synapse-fastjoin patches revert [--site-packages DIR] [--series DIR]

By default the commands act on the Synapse installed in the Python
environment running the command, so run them with the Python that runs
Synapse (``/path/to/venv/bin/synapse-fastjoin`` or
``/path/to/venv/bin/python -m synapse_fastjoin.cli``).

This module must stay cheap to import and must not import Synapse.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence, TextIO

from synapse_fastjoin import patching
from synapse_fastjoin.cli_rooms import add_rooms_parser
from synapse_fastjoin.cli_schema import add_schema_parser

__all__ = ["main", "build_parser"]

PROG = "synapse-fastjoin"

#: Exit codes.
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2  # argparse's own
EXIT_NONE_APPLIED = 3
EXIT_PARTIALLY_APPLIED = 4

_EXIT_CODES_HELP = f"""\
exit status:
  {EXIT_OK}  success (for `status`: every patch is applied)
  {EXIT_ERROR}  error: wrong Synapse version, a patch in conflict with the
     installed files, unreadable series, failed write (nothing is changed)
  {EXIT_USAGE}  invalid command line
  {EXIT_NONE_APPLIED}  `status` only: no patch is applied
  {EXIT_PARTIALLY_APPLIED}  `status` only: some but not all patches are applied
"""

_PATCHES_DESCRIPTION = """\
Manage the synapse-fastjoin patch series against an installed matrix-synapse.
The series targets one exact Synapse release (its `# synapse-version:` header);
commands refuse to touch any other release. `apply` and `revert` are all or
nothing and idempotent; `revert` restores the original files byte for byte.
"""


def _print(message: str, stream: Optional[TextIO] = None) -> None:
    """Print and flush, so output interleaves sensibly with stderr."""
    stream = stream or sys.stdout
    print(message, file=stream, flush=True)


def _error(message: str) -> int:
    """Report an error on stderr and return the error exit code."""
    _print(f"{PROG}: error: {message}", sys.stderr)
    return EXIT_ERROR


def _load(args: argparse.Namespace) -> tuple[patching.SynapseInstall, patching.Series]:
    """Locate the series and the installation named on the command line."""
    series = patching.read_series(args.series)
    install = patching.locate_synapse(args.site_packages)
    return install, series


def _where(install: patching.SynapseInstall, args: argparse.Namespace) -> str:
    """Describe the target installation for summaries."""
    where = f"Synapse {install.version} at {install.package_dir}"
    if args.site_packages is None:
        where += f" (Python environment: {sys.prefix})"
    return where


def _plural(count: int, word: str = "patch") -> str:
    """``1 patch``, ``2 patches``."""
    return f"{count} {word}{'' if count == 1 else 'es'}"


def _line(state: str, name: str, note: str = "") -> str:
    """One per-patch output line: the state in a fixed-width column."""
    return f"{state:<10} {name}{note}"


def _cmd_status(args: argparse.Namespace) -> int:
    """``patches status``: print the state of every patch."""
    install, series = _load(args)
    states = patching.status(install, series)
    for state in states:
        _print(
            _line(state.state, state.name, f": {state.detail}" if state.detail else "")
        )
    applied = sum(1 for s in states if s.state == "applied")
    conflicts = [s for s in states if s.state == "conflict"]
    _print(
        f"{applied} of {_plural(len(states))} applied to {_where(install, args)}"
        f"; series {series.directory} targets Synapse {series.target_version}"
    )
    if conflicts:
        return _error(
            f"{_plural(len(conflicts))} in conflict with the installed files "
            f"({', '.join(s.name for s in conflicts)}); reinstall matrix-synapse=="
            f"{series.target_version} and run `{patching.APPLY_COMMAND}`"
        )
    if applied == len(states):
        return EXIT_OK
    if applied == 0:
        return EXIT_NONE_APPLIED
    return EXIT_PARTIALLY_APPLIED


def _cmd_apply(args: argparse.Namespace) -> int:
    """``patches apply``: apply whatever is not applied yet."""
    install, series = _load(args)
    newly = set(patching.apply(install, series))
    for patch in series.patches:
        if patch.name in newly:
            _print(_line("applied", patch.name))
        else:
            _print(_line("unchanged", patch.name, " (already applied)"))
    where = _where(install, args)
    if newly:
        _print(
            f"Applied {_plural(len(newly))} to {where}; the whole series "
            f"({_plural(len(series.patches))}) is applied now."
        )
    else:
        _print(
            f"Nothing to do: all {_plural(len(series.patches))} of the series "
            f"are already applied to {where}."
        )
    return EXIT_OK


def _cmd_revert(args: argparse.Namespace) -> int:
    """``patches revert``: revert every applied patch."""
    install, series = _load(args)
    reverted = patching.revert(install, series)
    for name in reverted:
        _print(_line("reverted", name))
    for patch in reversed(series.patches):
        if patch.name not in reverted:
            _print(_line("unchanged", patch.name, " (not applied)"))
    where = _where(install, args)
    if reverted:
        _print(
            f"Reverted {_plural(len(reverted))} from {where}; its files are "
            "back to their original content."
        )
    else:
        _print(f"Nothing to do: no patch of the series is applied to {where}.")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser (top-level command groups as subcommands)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Tools for synapse-fastjoin, fast partial-state room joins "
        "for Synapse.",
        epilog=_EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    patches = commands.add_parser(
        "patches",
        help="apply, revert or check the patch series against Synapse",
        description=_PATCHES_DESCRIPTION,
        epilog=_EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--site-packages",
        metavar="DIR",
        type=Path,
        default=None,
        help="the directory holding the synapse package and its "
        "matrix_synapse-*.dist-info (default: the Synapse importable by the "
        "Python running this command)",
    )
    common.add_argument(
        "--series",
        metavar="DIR",
        type=Path,
        default=None,
        help="the directory holding the `series` file and the patches "
        "(default: the series shipped with synapse-fastjoin)",
    )

    actions = patches.add_subparsers(dest="action", metavar="ACTION", required=True)
    handlers: dict[str, tuple[Callable[[argparse.Namespace], int], str]] = {
        "status": (
            _cmd_status,
            "show which patches are applied (exit 0: all, 3: none, 4: some, 1: conflict)",
        ),
        "apply": (_cmd_apply, "apply every patch not applied yet (all or nothing)"),
        "revert": (
            _cmd_revert,
            "revert every applied patch, restoring the original files",
        ),
    }
    for name, (handler, help_text) in handlers.items():
        action = actions.add_parser(
            name,
            parents=[common],
            help=help_text,
            description=help_text[0].upper() + help_text[1:] + ".",
            epilog=_EXIT_CODES_HELP,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        action.set_defaults(func=handler)

    add_rooms_parser(commands, _error)
    add_schema_parser(commands, _error)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line.

    Args:
        argv: the arguments (without the program name); default ``sys.argv[1:]``.

    Returns:
        The exit status (see the ``--help`` epilog).
    """
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.func
    try:
        return handler(args)
    except patching.PatchSeriesError as e:
        return _error(str(e))
    except OSError as e:
        return _error(
            f"{str(e.filename) + ': ' if e.filename else ''}{e.strerror or e}"
        )


if __name__ == "__main__":
    sys.exit(main())
