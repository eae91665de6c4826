"""Errors a run reports to its user as one line (the CLI's exit code 2),
not as a traceback: the input or the state is wrong, not the code."""


class RunRefused(RuntimeError):
    """A run that cannot go on, with a message that says what to do."""


def mark_agreed(error: BaseException) -> BaseException:
    """Marks `error` as raised on every rank at the same point, so that the
    ranks may meet once more to tear the process group down cleanly."""
    error.agreed_by_all_ranks = True  # type: ignore[attr-defined]
    return error


def is_agreed(error: BaseException) -> bool:
    return bool(getattr(error, "agreed_by_all_ranks", False))
