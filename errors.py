"""User-facing errors: one line saying what was wrong and what to do; the CLI exits 2 on them."""


class UserError(Exception):
    """Bad input from the user (a path, a flag, a file's contents). Never a bug in dsv3c."""


class ConfigError(UserError):
    """A config.json field is missing, mistyped or inconsistent with another."""


class CheckpointError(UserError):
    """A checkpoint folder is missing, truncated or does not match its config."""
