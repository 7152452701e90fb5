"""User-facing errors."""


class SafeError(Exception):
    """A user mistake or missing resource; the CLI prints its one-sentence message without a traceback."""
