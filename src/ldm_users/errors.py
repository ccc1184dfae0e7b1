"""Errors a user can act on. Entry points print them as one clear message instead of a stack trace."""

import errno
import functools
import sys

_DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES}


def os_error_fix(err: OSError, folder) -> str:
    """What to do about `err`, met while writing under `folder`, by its real cause: a full disk, missing
    permissions, or a file that vanished mid-write (another process moving or deleting it) need different fixes."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"Free disk space under {folder}, or point paths.output_root / paths.cache_dir at a larger disk."
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"Fix the permissions of {folder}, or point paths.output_root / paths.cache_dir at a writable dir."
    if err.errno == errno.ENOENT:
        return (f"A file or folder under {folder} vanished while it was being written: another process is writing "
                f"there too (two jobs on one run dir?), or something deleted it. Let one job write there at a time.")
    return f"Check the disk and the file system of {folder}."


class LdmUsersError(Exception):
    """Base class: the message names the file or config key and the fix."""


class ConfigError(LdmUsersError):
    pass


class DataError(LdmUsersError):
    pass


class CheckpointError(LdmUsersError):
    pass


class WriteConflict(LdmUsersError):
    """A file vanished while it was being written: another process writes to the same place."""


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
            where = err.filename or "(no file name)"
            print(f"error: {err.strerror}: {where}. {os_error_fix(err, where)}", file=sys.stderr)
            sys.exit(2)

    return wrapper
