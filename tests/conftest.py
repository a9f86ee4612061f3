"""Fixtures shared by the parameter-server tests (test_ps, test_ps_frames, test_ps_limits)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from easgd.comm.ps import PSClient


@pytest.fixture
def clients() -> Iterator[Callable[..., PSClient]]:
    """Make ``PSClient``s; every one is closed (without goodbye) when the test ends."""
    made: list[PSClient] = []

    def make(*args: Any, **kwargs: Any) -> PSClient:
        made.append(PSClient(*args, **kwargs))
        return made[-1]

    yield make
    for client in made:
        client.close(clean=False)
