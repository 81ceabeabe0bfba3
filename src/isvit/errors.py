"""The one exception type the CLI turns into a one-sentence message."""


class IsvitError(Exception):
    """A problem with the user's input (file, model name, option), stated in one sentence."""


class DataError(IsvitError):
    """An image folder, labels file or image that cannot be used."""
