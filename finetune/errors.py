"""The one error type of the data layer."""


class DataError(ValueError):
    """A dataset or archive that cannot be used.

    The message is one line naming the file (and the entry or image) at fault, so it can be shown to a user as is.
    """
