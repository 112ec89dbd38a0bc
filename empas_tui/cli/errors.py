"""The CLI's own user error (the engine's are ValueError subclasses and StorageError)."""


class UserError(ValueError):
    """An error with a one-line message that names the fix."""
