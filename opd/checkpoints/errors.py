"""Errors raised when a checkpoint cannot be used."""


class CheckpointError(ValueError):
    """A checkpoint is missing, malformed, unsupported or does not match what it is used with."""
