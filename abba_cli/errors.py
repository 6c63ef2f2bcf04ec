"""The one exception type for bad user input.

The CLI prints a `UserError` as a single line and exits with code 2 (no traceback unless --debug).
Raise it for anything the user can fix: a bad config value, a missing file, a run directory that exists.
"""


class UserError(Exception):
    """Input the user can fix. The message names the file/key/value and says what would be valid."""
