"""Errors a user can act on. Entry points print them as one clear message instead of a stack trace."""

import errno
import functools
import sys

_DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES}


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
            # A stop on request (training.signals.TrainingInterrupted) is no error and has its own exit status.
            code = getattr(err, "exit_code", 2)
            print(f"error: {err}" if code == 2 else str(err), file=sys.stderr)
            sys.exit(code)
        except KeyboardInterrupt:  # Ctrl-C outside a training loop (those checkpoint and stop by themselves)
            print("interrupted; nothing written so far is lost (caches and checkpoints are written atomically): "
                  "rerun the same command to continue.", file=sys.stderr)
            sys.exit(130)
        except OSError as err:
            if err.errno not in _DISK_ERRORS:
                raise
            print(f"error: {err.strerror}: {err.filename or '(no file name)'}. Free disk space or fix the "
                  "permissions, or point paths.output_root / paths.cache_dir elsewhere.", file=sys.stderr)
            sys.exit(2)

    return wrapper
