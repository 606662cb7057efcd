"""One error type for everything a user can get wrong, so the CLI can print one line and exit.

Each error names the file (or argument) at fault first: on a device nobody can attach a
debugger, and the line in the log is all a user gets.
"""

EXIT_BAD_INPUT = 2


class EdgeLoraError(Exception):
    """A bad input or an unsupported case; the message is one line that names the file."""

    exit_code = EXIT_BAD_INPUT

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class UnknownAdapterError(EdgeLoraError):
    """An adapter name the model does not have: a server answers it as 404, like any name it may not show."""


class BusyError(EdgeLoraError):
    """The batching engine's rows and queue are full: a server answers it as 429, a caller retries later."""

    def __init__(self, message: str, retry_after_s: float = 1.0):
        super().__init__(message)
        self.retry_after_s = retry_after_s
