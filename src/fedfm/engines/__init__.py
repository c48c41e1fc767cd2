"""Engines move client tasks and updates; they never contain training or aggregation logic."""

from fedfm.engines.embedded import EmbeddedEngine

ENGINES = {"embedded": EmbeddedEngine}


def build_engine(name: str, app):
    return ENGINES[name](app)


__all__ = ["ENGINES", "EmbeddedEngine", "build_engine"]
