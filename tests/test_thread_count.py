"""tests/conftest.py restores torch's thread count after every test, so that one test's set_num_threads does not
change the tests after it. Checked in a pytest session of its own, whose two tests run in a fixed order under the
suite's conftest, whatever order the suite itself runs in."""

from pathlib import Path

TWO_TESTS_IN_ORDER = """
import torch

THREADS_AT_COLLECTION = torch.get_num_threads()


def test_a_test_may_change_the_thread_count():
    torch.set_num_threads(THREADS_AT_COLLECTION + 1)
    assert torch.get_num_threads() == THREADS_AT_COLLECTION + 1


def test_the_next_test_runs_with_the_count_restored():
    assert torch.get_num_threads() == THREADS_AT_COLLECTION
"""


def test_a_thread_count_set_by_one_test_is_restored_before_the_next(pytester):
    pytester.makeconftest((Path(__file__).parent / "conftest.py").read_text())
    pytester.makepyfile(test_thread_count_in_order=TWO_TESTS_IN_ORDER)
    result = pytester.runpytest_inprocess("-v", "-p", "no:randomly", "-p", "no:xdist", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*::test_a_test_may_change_the_thread_count PASSED*",  # in this order
                                 "*::test_the_next_test_runs_with_the_count_restored PASSED*"])
