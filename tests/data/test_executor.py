from __future__ import annotations

import pytest

from llmkernel.data.executor import InlineExecutor, LocalExecutor, default_workers, make_executor


def square_plus(x: int, offset: int) -> int:
    return x * x + offset


def test_executors_keep_order_and_agree():
    expected = [x * x + 1 for x in range(20)]
    inline = make_executor("local", workers=1)
    assert isinstance(inline, InlineExecutor)
    assert list(inline.imap(square_plus, range(20), 1)) == expected
    pool = LocalExecutor(2)
    try:
        assert list(pool.imap(square_plus, range(20), 1, window=3)) == expected
    finally:
        pool.close()
    assert default_workers(0) >= 1 and default_workers(3) == 3


@pytest.mark.e2e
def test_ray_executor_matches_local():
    pytest.importorskip("ray", reason="the 'ray' extra is not installed")
    from llmkernel.data.executor import RayExecutor

    executor = RayExecutor(workers=2)
    try:
        assert list(executor.imap(square_plus, range(20), 1, window=4)) == [x * x + 1 for x in range(20)]
    finally:
        executor.close()
