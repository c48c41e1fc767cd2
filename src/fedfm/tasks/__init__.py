"""Learning tasks: how a batch is built from a client's data, what loss is trained, what is measured."""
