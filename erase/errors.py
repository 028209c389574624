"""The one exception type for mistakes a user can fix."""


class EraseError(Exception):
    """A user-facing error: its message is one sentence that says what to do.

    The command-line tools print it as one line on stderr and exit with code 2.
    """
