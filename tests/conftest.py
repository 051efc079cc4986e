"""Fixtures for every test module."""

import pytest

from charrnn import threads


@pytest.fixture
def restore_threads():
    """Put the thread count back as it was after a test that changes it."""
    n = threads.get_threads()
    yield
    threads.set_threads(n)
