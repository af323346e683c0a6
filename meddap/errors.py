"""The one exception type users see without a stack trace: it says what, where, and how to fix."""

__all__ = ["MeddapError"]


class MeddapError(RuntimeError):
    """A problem with the user's inputs or environment (missing file, missing weights, bad data)."""
