"""Each process's share of a batch: a global batch that does not split evenly over the processes is
a clear error, and the shares of a list cover it once, in order, with the same length everywhere.
(Training on two real processes is checked in test_multiprocess.py.)"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from cai.distributed import local_rows, padded_share, per_process


def test_a_global_batch_that_does_not_split_evenly_is_a_clear_error():
    two = SimpleNamespace(num_processes=2, process_index=1)
    assert per_process(8, two, "pm.batch_size") == 4
    for bad in (7, 1):
        with pytest.raises(ValueError, match=r"pm.batch_size \(\d\) is the global batch.*multiple of 2"):
            per_process(bad, two, "pm.batch_size")


def test_shares_of_a_list_cover_it_once_in_order_with_equal_lengths():
    items = list(range(7))
    shares = [padded_share(items, SimpleNamespace(num_processes=3, process_index=r)) for r in range(3)]
    assert {len(s) for s, _ in shares} == {3}  # the same number of forward passes everywhere
    assert [x for s, real in shares for x in s[:real]] == items
    assert [list(local_rows(list(range(8)), SimpleNamespace(num_processes=2, process_index=r))) for r in (0, 1)] \
        == [[0, 1, 2, 3], [4, 5, 6, 7]]
