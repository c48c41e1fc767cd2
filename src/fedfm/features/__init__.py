"""Features: capabilities that plug into named stages of the round and of a client's training.

One module each (``fedfm.features.base.Feature`` lists the stages); ``fedfm.registry.FEATURES`` names them in the
order their hooks run. Their compatibility rules come from the capabilities the config declares for them
(``fedfm.config.rules``).
"""
