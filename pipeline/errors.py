"""The project's error types. Each means bad input or a state the user can fix, and carries a one-line message naming
the file, key or task at fault; the CLI prints exactly these as `saepipe CMD: error: ...` and exits 2. Anything else
is a bug or a transient failure and keeps its traceback."""
from __future__ import annotations


class SaepipeError(Exception):
    """Base class: a user-fixable problem with a one-line message."""


class ConfigError(SaepipeError):
    """A config that does not validate or does not fit the data it names."""


class CorpusError(SaepipeError):
    """Bad corpus input (no matching file, a damaged compressed file, an unreadable dataset)."""


class StoreError(SaepipeError):
    """A dataset that cannot be read or written as it is."""


class ModelError(SaepipeError):
    """A model that cannot be found or loaded, or is not a Llama-style causal LM."""


class SAEFormatError(SaepipeError):
    """An SAE directory (saepipe's own or SAELens's) that cannot be read as one."""


class CheckpointError(SaepipeError):
    """A checkpoint that cannot be resumed from with this config."""


class LeaseHeldError(SaepipeError):
    """Another live process holds the lease on this task or run."""
