"""Exceptions raised by the engine. Every user-facing failure is one of these."""


class EngineError(Exception):
    """Base class of every error the engine raises on purpose."""


class ModelLoadError(EngineError):
    """The model could not be resolved, converted or loaded (path, format, files)."""


class UnsupportedModelError(ModelLoadError):
    """The model's architecture (or a tensor type in it) is not supported."""


class InvalidRequestError(EngineError, ValueError):
    """A request or its sampling parameters are invalid."""


class QueueFullError(EngineError):
    """The waiting queue is at capacity; retry later."""


class EngineClosedError(EngineError):
    """The engine was closed (or its thread died) and cannot take requests."""


class NoDraftHeadError(EngineError):
    """The model has no MTP draft head (native or trained) for drafter='mtp'."""


class DistributedGroupError(EngineClosedError):
    """A rank of a distributed group died, hung or lost its connection: the group is down
    and the engine takes no more requests (the server answers 503)."""
