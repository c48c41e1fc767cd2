"""The round loop (``loop``), its stages (``stages``) and the groups a method trains (``groups``)."""
