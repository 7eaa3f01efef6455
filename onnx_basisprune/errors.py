"""The one exception type that reaches the user as a one-line message (exit code 2)."""


class BasisPruneError(Exception):
    """A problem with the user's input: the CLI prints it on one line and exits with code 2."""
