"""User-facing errors. The CLI prints these as one clear line instead of a traceback."""


class KbricksError(Exception):
    """Base class for errors caused by user input (configs, data, checkpoints, names)."""


class ConfigError(KbricksError):
    """A config file or override is invalid; the message names the offending key path."""


class DataError(KbricksError):
    """A dataset is missing, malformed or refused (e.g. an unsafe pickle)."""


class CheckpointError(KbricksError):
    """A checkpoint is missing, corrupt, or does not match the model it is loaded into."""


class TrainingDiverged(KbricksError):
    """The loss became NaN or infinite."""


class StorageError(KbricksError, OSError):
    """A file could not be written (full disk, directory not writable). Also an ``OSError``, so code that shrugs
    off an unwritable cache keeps doing so."""

    def __str__(self) -> str:  # the message alone, not OSError's "[Errno N] ..." form
        return str(self.args[0]) if self.args else ""
