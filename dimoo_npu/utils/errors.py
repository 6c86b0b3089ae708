"""Errors the user can act on: each message names the problem and the fix."""


class DimooError(ValueError):
    """Base class for input, config and checkpoint problems the user can fix."""


class ConfigError(DimooError):
    """A config.json or run config that this package cannot use."""


class CheckpointError(DimooError):
    """A checkpoint folder or file that is missing, truncated or does not match the model."""


class InputError(DimooError):
    """Token ids, masks, images or settings that the model or a sampler cannot take."""


class BackendUnavailableError(RuntimeError):
    """Raised when a backend is asked for on a machine that cannot run it (torch-free, so the CLI can name it)."""
