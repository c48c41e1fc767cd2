"""Aggregators: how a round's client updates become one update (``base`` explains folds; ``fedfm.registry`` names them)."""
