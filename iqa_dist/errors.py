"""The one exception type that reaches the user as a message instead of a traceback."""


class UserError(Exception):
    """Bad input or configuration: the CLI prints the message and exits non-zero.

    The message must name the file, row or field at fault and say why.
    """

    exit_code = 2
