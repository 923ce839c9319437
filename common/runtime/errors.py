"""The one exception type whose message is shown to the user as a single line."""


class UserError(ValueError):
    """Bad input or a missing file: the scripts print the message and exit non-zero."""
