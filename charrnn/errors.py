"""The exceptions charrnn raises on purpose; the CLI turns each into a one-line message and an exit code.

Anything else that escapes is a bug and is allowed to show a traceback.
"""


class CharrnnError(Exception):
    """Base class: an operation failed for a reason the user can act on (exit status 1)."""

    exit_code = 1


class UsageError(CharrnnError):
    """The command line asked for something inconsistent (exit status 2, like Click's own usage errors)."""

    exit_code = 2


class DataError(CharrnnError):
    """A corpus or text could not be read or used: missing, empty, binary, not decodable.

    `hint` is advice that names an option of the commands that read corpora (--encoding); it
    follows the message after "; ". A caller without that option reports `reason`, the message
    without the hint."""

    def __init__(self, message, hint: str = ""):
        super().__init__(f"{message}; {hint}" if hint else message)
        self.reason = message
        self.hint = hint


class VocabError(CharrnnError):
    """Text contains characters the vocabulary does not know (and the caller asked for an error)."""

    def __init__(self, message, unknown=()):
        super().__init__(message)
        self.unknown = tuple(unknown)


class CheckpointError(CharrnnError):
    """A checkpoint is missing, corrupt, truncated, foreign or of an unsupported version."""


class TrainingError(CharrnnError):
    """Training cannot go on (for example, the loss kept diverging)."""


class Interrupted(CharrnnError):
    """Stopped by SIGINT (exit 130) or SIGTERM (exit 143) after saving what had to be saved."""

    def __init__(self, message, exit_code=130):
        super().__init__(message)
        self.exit_code = exit_code
