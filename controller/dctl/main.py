"""Entry point of `dctl`: builds the argparse tree from the subcommand modules, keeps stdout for the
command's own output, and maps errors to exit codes in one place.

Exit codes: 0 success; 1 a run finished but failed its own check (e.g. validation above target, or a
policy of `dctl simulate --compare` that could not run); 2 bad arguments or bad input files (argparse's
convention); 3 a needed resource is unavailable; 4 internal error (a bug: please report); 141 stdout
was closed by its reader (`dctl ... | head`: 128 + SIGPIPE, what a shell reports for a process that
SIGPIPE ended; nothing is printed).
Subcommand modules expose `register(subparsers)`; each registered parser sets `func(args) -> int` and
writes its output with `controller.dctl.output.echo` (docs/architecture.md, the operator CLI).
Heavy imports (numpy-bound simulator, cvxpy) happen inside `func`, keeping `dctl --help` fast.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Sequence
from typing import TYPE_CHECKING

from agent.api.errors import DynamoError, InternalError, UnavailableError
from agent.api.log import configure_logging
from controller.dctl import output

if TYPE_CHECKING:
    from _typeshed import SupportsWrite

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_UNAVAILABLE = 3
EXIT_INTERNAL = 4
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE (13)

EXIT_CODES_HELP = (
    "exit codes: 0 success; 1 the command ran but its own check failed (simulate --compare: a policy "
    "could not run); 2 bad arguments or input files; 3 a needed resource is unavailable; 4 internal "
    "error; 141 stdout closed by its reader (e.g. | head)"
)


class _Parser(argparse.ArgumentParser):
    """argparse with help and usage written to the command-output stream (stdout is redirected to stderr
    while a command runs, see controller.dctl.output); errors still go to stderr."""

    def print_help(self, file: SupportsWrite[str] | None = None) -> None:
        super().print_help(output.stdout() if file is None else file)

    def print_usage(self, file: SupportsWrite[str] | None = None) -> None:
        super().print_usage(output.stdout() if file is None else file)


def build_parser() -> argparse.ArgumentParser:
    from controller.dctl import (
        cmd_cluster,
        cmd_load,
        cmd_model,
        cmd_node,
        cmd_profile,
        cmd_simulate,
        cmd_sweep,
        cmd_top,
    )

    parser = _Parser(
        prog="dctl",
        description="Operate and simulate dynamollm energy-managed LLM inference clusters.",
        epilog=EXIT_CODES_HELP,
    )
    parser.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (cmd_simulate, cmd_sweep, cmd_profile, cmd_model, cmd_node, cmd_cluster, cmd_top, cmd_load):
        module.register(sub)
    return parser


def exit_code_for(err: DynamoError) -> int:
    if isinstance(err, InternalError):
        return EXIT_INTERNAL
    if isinstance(err, UnavailableError):
        return EXIT_UNAVAILABLE
    return EXIT_BAD_INPUT


def main(argv: Sequence[str] | None = None) -> int:
    try:
        with output.reserved_stdout():
            return _main(argv)
    except BrokenPipeError:
        return EXIT_BROKEN_PIPE  # the reader has gone: nothing to tell it, and stderr is not an error channel


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    try:
        code: int = args.func(args)
    except BrokenPipeError:
        raise
    except DynamoError as err:
        print(f"dctl {args.command}: error: {err}", file=sys.stderr)
        return exit_code_for(err)
    except OSError as err:  # unreadable input or unwritable output named on the command line
        print(f"dctl {args.command}: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"dctl {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # a bug: one line, the traceback only when asked for
        if args.log_level == "debug":
            traceback.print_exc(file=sys.stderr)
        print(
            f"dctl {args.command}: internal error (a bug, please report it): {type(err).__name__}: {err}"
            + ("" if args.log_level == "debug" else "; --log-level debug shows the traceback"),
            file=sys.stderr,
        )
        return EXIT_INTERNAL
    output.stdout().flush()
    return code


if __name__ == "__main__":
    sys.exit(main())
