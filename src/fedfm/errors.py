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


class RoundSkipped(FedFMError):
    """A round that cannot aggregate: too few clients sampled or reporting, or a secure sum that cannot be recovered.

    Every stage of the round raises this one exception for it; the round loop then keeps the model as it was, logs
    and records the skip, drops what the reporters saved that round, and the run goes on (a seeded run would meet
    the same round again on every resume if it stopped here). ``counted=False``: nothing was due to train (a continual
    learning owner sitting out a stage), which the record does not call a skipped round."""

    def __init__(self, reason: str, counted: bool = True):
        super().__init__(reason)
        self.counted = counted


class ClientDropout(Exception):
    """A client vanished mid-round (simulated fault, or a lost connection); engines report it as missing."""
