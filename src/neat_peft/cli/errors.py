"""The one exception the CLI shows to users: a one-paragraph message, no traceback, exit code 2."""


class CliError(Exception):
    """Bad input or a stopped run, explained for a person: what is wrong and how to fix it."""

    exit_code = 2
