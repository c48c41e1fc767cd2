"""Shared test helpers."""

from __future__ import annotations

import pytest

from fedfm import server


@pytest.fixture
def power_cut_in_round_2(monkeypatch):
    """Make Runner.round raise in round 2 (a simulated power cut); returns a function that undoes it."""
    original = server.Runner.round

    def crashing(self, states, progress):
        if states[0].round == 1:
            raise RuntimeError("simulated power cut")
        return original(self, states, progress)

    monkeypatch.setattr(server.Runner, "round", crashing)
    return lambda: monkeypatch.setattr(server.Runner, "round", original)
