"""The one exception type that the CLI turns into a one-line message and a non-zero exit."""


class UserError(ValueError):
    """A problem with the user's input (config, data, checkpoint) that they can fix.

    The message must say what is wrong and what to do about it, in one line.
    """
