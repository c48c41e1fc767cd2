"""Federated retrieval-augmented generation: owners keep their documents; questions go to them.

``store`` (an owner's FAISS index), ``owner`` (what an owner releases, per privacy mode, with its audit
log), ``federation`` (the server: fan-out with a deadline, merge, answer), ``merge`` (exact and RRF
merges, recall and MRR), ``generate`` (SmolLM2 answers), ``evaluate`` (``fedfm rag eval``), ``questions``
(a user's own evaluation file).
"""
