"""Errors a user can cause (bad config, bad input file, missing vocab, checksum mismatch).

They are raised as `UserError` with one message that names the file or key and says what to
do; the command line and the Snakemake adapters print that message and exit non-zero, with no
traceback. Anything else is a bug and may traceback.
"""


class UserError(Exception):
    """A problem the user can fix; `str(err)` is the whole message shown to them."""


class StorageError(UserError):
    """Writing an output failed for lack of space or permission (ENOSPC, EDQUOT, EFBIG, EACCES,
    EPERM, EROFS). `errno` is the error number, `path` the output (or file) that could not be
    written; the message (built by `gpt2ipu.fsutil.storage_error`) also says what to do."""

    def __init__(self, message: str, errno: int, path: str, written: str | None = None):
        super().__init__(message)
        self.errno = errno
        self.path = path
        self.written = written
