"""Errors that are the user's to fix: the command line prints the one-line message, no traceback."""


class UserError(Exception):
    """Bad input from the user (a path, a flag, a config key): the message says what is wrong and how to fix it."""
