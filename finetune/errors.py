"""The error types of fine-tuning whose messages are shown to users as they are (one line each)."""


class DataError(ValueError):
    """A dataset or archive that cannot be used.

    The message is one line naming the file (and the entry or image) at fault, so it can be shown to a user as is.
    """


class DiskFullError(OSError):
    """The disk filled up while a run saved its files; the message is one line naming the folder and the bytes
    needed. What was saved before is intact (every write is atomic), so the run can be resumed once there is room."""


class ConfigError(ValueError):
    """A setting that cannot work (image size, missing data, nothing to resume, a run folder already in use); the
    message is one line."""
