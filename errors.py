"""User-facing errors: one line saying what was wrong and what to do; the CLI exits 2 on them."""

import re

_LINE_BREAKS = re.compile(r"\s*[\n\r\v\f\x1c-\x1e\x85\u2028\u2029]+\s*")  # what str.splitlines breaks at


class UserError(Exception):
    """Bad input from the user (a path, a flag, a file's contents). Never a bug in dsv3c.

    The message is kept to one line: text quoted from a library or from the bad file itself (a JSON parser
    echoing a header that holds a newline) is folded, so the CLI never prints a second, unexplained line.
    """

    def __init__(self, message: object = "", *rest: object) -> None:
        super().__init__(_LINE_BREAKS.sub(" ", str(message)), *rest)


class ConfigError(UserError):
    """A config.json field is missing, mistyped or inconsistent with another."""


class CheckpointError(UserError):
    """A checkpoint folder is missing, truncated or does not match its config."""
