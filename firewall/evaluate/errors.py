"""The one error type the command reports as a one-line message and exit status 2."""


class EvaluationError(Exception):
    """Something the user can fix: an unreachable endpoint, a wrong data path, an unknown option value."""
