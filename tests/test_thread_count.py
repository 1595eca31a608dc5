"""tests/conftest.py restores torch's thread count after every test, so that one test's set_num_threads does not
change the tests after it (the two tests run in this order)."""

import torch

THREADS_AT_COLLECTION = torch.get_num_threads()


def test_a_test_may_change_the_thread_count():
    torch.set_num_threads(THREADS_AT_COLLECTION + 1)
    assert torch.get_num_threads() == THREADS_AT_COLLECTION + 1


def test_the_next_test_runs_with_the_count_restored():
    assert torch.get_num_threads() == THREADS_AT_COLLECTION
