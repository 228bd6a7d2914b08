"""Errors that stop a job before any work. Each message names the path or field at fault.

Per-image problems (an undecodable image, a bad label) are not here: they become
error rows and the job goes on.
"""


class SegpipeError(Exception):
    """Base of the errors a user can act on; the CLI prints the message alone and exits 2."""


class ConfigError(SegpipeError, ValueError):
    """An invalid configuration value or file."""


class InputError(SegpipeError, FileNotFoundError):
    """An input, labels or output location that does not exist or cannot be used."""


class CheckpointError(SegpipeError, ValueError):
    """A checkpoint that cannot be used: unreadable, unsafe, or for another model."""


class DeviceError(SegpipeError, RuntimeError):
    """A device the configuration asks for that this machine does not have (e.g. CUDA on a CPU-only host)."""


class StorageUnavailable(OSError):
    """A store that did not answer (refused, timed out, failing) past its client's own retries.

    Deliberately not a SegpipeError: nothing is wrong with the configuration, the outage may pass, so the
    step that met it is retried (the Prefect tasks' retry condition), where a SegpipeError fails at once.
    """
