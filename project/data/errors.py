"""What goes wrong reading data."""


class DataError(Exception):
    """Raised for a missing, corrupt or malformed data file; the message names the file."""


class ChecksumError(DataError):
    pass
