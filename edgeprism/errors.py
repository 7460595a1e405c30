"""Typed errors of edgeprism.

Every error a user can cause is one of these, and its message says what is wrong and what to do.
They all derive from :class:`EdgeprismError`, so an app can catch one type.
"""

from __future__ import annotations


class EdgeprismError(Exception):
    """Base class of every error edgeprism raises on purpose."""


class ModelNotFoundError(EdgeprismError, FileNotFoundError):
    """The model directory (or a file it must hold) does not exist."""


class ConfigError(EdgeprismError, ValueError):
    """`config.json` is missing, unreadable, or has values edgeprism cannot use."""


class UnsupportedModelError(EdgeprismError, ValueError):
    """The checkpoint's architecture or one of its features is not supported."""


class CheckpointError(EdgeprismError, ValueError):
    """The weights are unreadable: corrupt or truncated file, missing tensor, wrong shape."""


class TokenizerMissingError(EdgeprismError, RuntimeError):
    """A text call was made on a checkpoint that ships no tokenizer files."""


class InputError(EdgeprismError, ValueError):
    """A call's arguments are invalid (empty prompt, prompt too long, bad sampling values...)."""


class BudgetError(EdgeprismError, ValueError):
    """The VRAM budget is invalid or too small for the part of the model that must stay resident."""


class HostMemoryError(EdgeprismError, MemoryError):
    """Host RAM cannot hold the experts, even unpinned."""


class CacheFullError(EdgeprismError, RuntimeError):
    """Every cache slot is pinned by the current step: the cache is smaller than one step's working set."""


class GenerationInterrupted(EdgeprismError, RuntimeError):
    """A paused `stream` was superseded by a newer call on the same engine and cannot continue."""


class ArtifactError(EdgeprismError, ValueError):
    """A refactored-model artifact is unreadable, of another version, or does not match its source."""


class OutputError(EdgeprismError, OSError):
    """An output directory cannot be created or written (exists already, not writable)."""


class EngineClosedError(EdgeprismError, RuntimeError):
    """A call was made on an engine after `Engine.close()`."""


class ExpertDtypeError(EdgeprismError, ValueError):
    """`expert_dtype` is unknown, or the model's shapes do not allow it (int4 group size)."""


class ProfileError(EdgeprismError, ValueError):
    """An operating-points table (`edgeprism profile`'s JSON) is missing, unreadable, of another version, or invalid."""


class DecodeSyncError(EdgeprismError, RuntimeError):
    """A side of the CPU share of decode gave up waiting for the other (schedule/cpu_share.py)."""
