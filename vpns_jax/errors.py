"""Error types that carry a user-facing message (what went wrong and how to fix it)."""


class VpnsError(ValueError):
    """Base class of errors whose message is meant for the user, not a traceback."""


class ConfigError(VpnsError):
    """A configuration field has a value outside its allowed set."""


class WeightsError(VpnsError):
    """A weights file is missing, corrupt, unsafe or of the wrong architecture."""


class DataError(VpnsError):
    """A dataset is unknown, unprepared, or its manual files are missing."""


class CheckpointError(VpnsError):
    """A checkpoint in the workdir cannot be restored."""


class Diverged(VpnsError):
    """A non-finite loss or parameter stopped the run (config.on_nonfinite='stop')."""
