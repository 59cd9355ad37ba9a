"""The one exception type of the converters: a clear message for the user, no traceback needed."""


class ConversionError(ValueError):
    """A checkpoint cannot be converted: unsupported architecture, bad layout, missing file, ..."""
