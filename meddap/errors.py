"""The one exception type users see without a stack trace: it says what, where, and how to fix."""

__all__ = ["MeddapError", "DamagedFileError"]


class MeddapError(RuntimeError):
    """A problem with the user's inputs or environment (missing file, missing weights, bad data)."""


class DamagedFileError(MeddapError, ValueError):
    """A file that exists but cannot be parsed (cut short, overwritten, not the format its name says).
    Also a ValueError, so code that treats an unreadable partial output as "not finished" still does."""
