"""Errors a user can act on. Entry points print them as one clear message instead of a stack trace."""

import functools
import sys


class LdmUsersError(Exception):
    """Base class: the message names the file or config key and the fix."""


class ConfigError(LdmUsersError):
    pass


class DataError(LdmUsersError):
    pass


class CheckpointError(LdmUsersError):
    pass


def exit_on_user_error(fn):
    """Wrap an entry point so our own errors end the program with their message and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except LdmUsersError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)

    return wrapper
