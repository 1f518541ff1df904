"""The one exception type for mistakes a user can fix (bad recipe, missing file, wrong column).

The CLI prints its message as a single line and exits with status 2, without a traceback.
"""


class PipelineError(Exception):
    """A user-facing error: the message names the file/key/column and says how to fix it."""

    exit_code = 2
