"""fedfm: federated foundation models — fine-tune, pre-train and serve models across data owners."""

__version__ = "0.1.0"
