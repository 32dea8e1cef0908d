"""Errors a user can act on.

Every error raised to the user is one of these; ``str(err)`` is one sentence that names
the problem and the fix. The CLI prints it and exits with status 2.
"""


class OmniliteError(Exception):
    """Base: a problem the user can fix; str() names the problem and the fix."""


class AudioError(OmniliteError):
    """The input audio is empty, silent, corrupt or not audio at all."""


class BundleError(OmniliteError):
    """A bundle is missing a file, has an altered file, or is of an unknown format version."""


class CheckpointError(OmniliteError):
    """A source checkpoint is missing a file or tensor, or a tensor has the wrong shape."""


class DeviceError(OmniliteError):
    """The requested device or execution provider is not available here."""
