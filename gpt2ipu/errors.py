"""Errors a user can cause (bad config, bad input file, missing vocab, checksum mismatch).

They are raised as `UserError` with one message that names the file or key and says what to
do; the command line and the Snakemake adapters print that message and exit non-zero, with no
traceback. Anything else is a bug and may traceback.
"""


class UserError(Exception):
    """A problem the user can fix; `str(err)` is the whole message shown to them."""
