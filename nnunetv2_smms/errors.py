"""Errors a user can fix (bad input, missing step, wrong setting) and how the console command reports them.

Every such error type of the package derives from ``SMMSUserError``; ``cli_command`` wraps a subcommand so
that one prints as a single ``error: ...`` line on stderr with exit code 2 instead of a traceback.
"""
import functools
import sys


class SMMSUserError(Exception):
    """Bad input or state that the message tells the user how to fix."""


def cli_command(func):
    """Subcommand wrapper: SMMSUserError -> 'error: <message>' on stderr and 2; otherwise the function's code."""
    @functools.wraps(func)
    def wrapper(args) -> int:
        try:
            return int(func(args) or 0)
        except SMMSUserError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    return wrapper
