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
