"""Errors a run reports to its user as one line (the CLI's exit code 2),
not as a traceback: the input or the state is wrong, not the code."""


class RunRefused(RuntimeError):
    """A run that cannot go on, with a message that says what to do."""
