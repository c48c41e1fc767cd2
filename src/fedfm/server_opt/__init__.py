"""Server optimizers: how the round's aggregated update moves the global model (``fedfm.registry`` names them)."""
