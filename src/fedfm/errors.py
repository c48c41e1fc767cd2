"""User-facing errors. The CLI prints their message on one line and exits with code 2."""


class FedFMError(Exception):
    """Base of errors caused by user input (config, data, model path) rather than by a bug."""


class ConfigError(FedFMError):
    """The run configuration is malformed or inconsistent."""


class DataError(FedFMError):
    """A dataset is missing, malformed, or leaves a client without data."""


class ModelError(FedFMError):
    """A model cannot be found or loaded."""


class TrainingError(FedFMError):
    """Training diverged (NaN/Inf loss); the run directory is left resumable and marked incomplete."""


class ClientDropout(Exception):
    """A client vanished mid-round (simulated fault, or a lost connection); engines report it as missing."""
