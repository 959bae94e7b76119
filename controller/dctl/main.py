"""Entry point of `dctl`: builds the argparse tree from the subcommand modules and maps errors to
exit codes in one place.

Exit codes: 0 success; 1 a run finished but failed its own check (e.g. validation above target);
2 bad arguments or bad input files (argparse's convention); 3 a needed resource is unavailable;
4 internal error (a bug: please report).
Subcommand modules expose `register(subparsers)`; each registered parser sets `func(args) -> int`.
Heavy imports (numpy-bound simulator, cvxpy later) happen inside `func`, keeping `dctl --help` fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from agent.api.errors import DynamoError, InternalError, UnavailableError
from agent.api.log import configure_logging

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_UNAVAILABLE = 3
EXIT_INTERNAL = 4


def build_parser() -> argparse.ArgumentParser:
    from controller.dctl import cmd_model, cmd_node, cmd_profile, cmd_simulate

    parser = argparse.ArgumentParser(
        prog="dctl", description="Operate and simulate dynamollm energy-managed LLM inference clusters."
    )
    parser.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (cmd_simulate, cmd_profile, cmd_model, cmd_node):
        module.register(sub)
    return parser


def exit_code_for(err: DynamoError) -> int:
    if isinstance(err, InternalError):
        return EXIT_INTERNAL
    if isinstance(err, UnavailableError):
        return EXIT_UNAVAILABLE
    return EXIT_BAD_INPUT


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    try:
        code: int = args.func(args)
    except DynamoError as err:
        print(f"dctl {args.command}: error: {err}", file=sys.stderr)
        return exit_code_for(err)
    except OSError as err:  # unreadable input or unwritable output named on the command line
        print(f"dctl {args.command}: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"dctl {args.command}: interrupted", file=sys.stderr)
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
