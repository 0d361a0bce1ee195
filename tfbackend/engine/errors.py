"""Errors the engine raises to its callers (the server among them) beyond plain ValueErrors for bad input."""


class EngineDeadError(RuntimeError):
    """A rank of a multi-rank engine failed: the engine cannot run another step and must be shut down."""
