"""Scheduler-test helpers: the pool-is-free invariant every engine test ends with."""

from __future__ import annotations

import pytest


def check_pool_free(engine) -> None:
    """No request left, every block back in the pool (free or cached-free), ref counts sane."""
    assert not engine.has_unfinished_requests()
    bm = engine.block_manager
    bm.check_integrity()
    assert bm.num_free_blocks == bm.num_total_blocks, (
        f"{bm.num_total_blocks - bm.num_free_blocks} of {bm.num_total_blocks} blocks still in use"
    )


@pytest.fixture
def assert_pool_free():
    """`assert_pool_free(engine)`: free + cached-free == total once the engine is idle."""
    return check_pool_free


from tests.model.conftest import family_checkpoint  # noqa: E402, F401  (tiny Mistral, Gemma 3)
