"""`UsageError`: a mistake in the command's input, reported in one line with exit code 2."""


class UsageError(Exception):
    """The message says what is wrong and what to pass instead."""
