"""Every exception falconet raises, in one place."""


class FalconetError(Exception):
    """Base class of falconet's own errors."""


class ProtocolError(FalconetError):
    """A frame or message that does not follow falconet.protocol."""


class JournalError(FalconetError):
    """The state directory's journal cannot be used (locked, foreign, or another format)."""


class JournalWriteError(JournalError):
    """The journal could not be written (a full disk, a quota, an I/O error); what was to be
    written is kept and written again by the next commit."""


class TaskError(FalconetError):
    """A task could not run to an outcome (executor lost, wall time, bad body)."""

    def __init__(self, reason: str, *, executor: str = "", attempts: int = 0):
        super().__init__(reason)
        self.reason = reason
        self.executor = executor
        self.attempts = attempts


class RemoteTraceback(Exception):
    """Carries a task's remote traceback text as the __cause__ of its exception."""

    def __init__(self, tb: str):
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


class TaskFileError(FalconetError):
    """A task file line that cannot be read; the message names the line."""


class AddressError(FalconetError, ValueError):
    """An address that is not tcp://HOST:PORT; the message shows a right one."""


class DispatcherUnavailable(FalconetError):
    """The dispatcher did not answer within the timeout."""


class RefusedError(FalconetError):
    """The dispatcher refused this peer (version, role or limits)."""


class MetadataError(FalconetError):
    """The instance metadata service is unreachable, disabled, or lacks what we need."""


class UserDataError(FalconetError):
    """The user-data is missing, malformed, or names a field wrongly."""


class KeyFileError(FalconetError):
    """A key file is missing, malformed, or readable by others."""


class StagingError(FalconetError):
    """A staging spec, file or transfer that cannot be used; the message says why."""


class InputNotFound(StagingError, FileNotFoundError):
    """A local input file named by a task does not exist."""


class BindRefused(FalconetError):
    """The dispatcher will not listen where it was asked to."""


class LaunchError(FalconetError):
    """A cloud call failed; the message says why in one line (capacity, limits, bad image...).

    A FalconetError, so a failed describe or terminate is reported and the next round
    tries again, and a failure at start is one 'error:' line, not a traceback.
    """


class IllegalTransition(RuntimeError):
    """A transition the table does not allow: a bug in the dispatcher, never input."""
