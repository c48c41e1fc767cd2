"""Shared test helpers."""

from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    # two test workers on CI's two cores: one torch thread each (and in every subprocess a test starts), instead of
    # two workers x two threads spinning on two cores. Bitwise comparisons hold: both sides of each run in one worker.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

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
