"""Engines move client tasks and updates; they never contain training or aggregation logic.

``embedded`` runs every client in this process; ``ray`` runs them in parallel on Ray actors; ``flower`` sends
them to the owners' Flower SuperNodes (see ``fedfm.engines.flower_engine``). Ray and Flower are imported only when
their engine is chosen.
"""



def _embedded(app):
    from fedfm.engines.embedded import EmbeddedEngine

    return EmbeddedEngine(app)


def _ray(app):
    from fedfm.engines.ray_engine import RayEngine

    return RayEngine(app)


def _flower(app):
    from fedfm.engines.flower_engine import FlowerEngine

    return FlowerEngine(app)


ENGINES = {"embedded": _embedded, "ray": _ray, "flower": _flower}  # imported only when chosen


def engine_for(app):
    """The app's engine, built on first use and kept for every method run on that app (Ray actors and a Flower
    connection are set up once per process, not once per method); ``close_engine`` releases it."""
    engine = getattr(app, "_engine", None)
    if engine is None or engine.name != app.cfg.engine.name:
        close_engine(app)
        engine = app._engine = ENGINES[app.cfg.engine.name](app)
    return engine


def close_engine(app) -> None:
    engine = getattr(app, "_engine", None)
    if engine is not None:
        app._engine = None
        engine.close()


__all__ = ["ENGINES", "close_engine", "engine_for"]
