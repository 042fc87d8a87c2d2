"""The one exception type for errors a user can cause."""


class BonsaiError(Exception):
    """Bad input a user can fix: a missing file, a wrong format, an invalid size.

    The message names the file or value and says what to do. The CLI prints it as one
    line and exits with status 2.
    """
