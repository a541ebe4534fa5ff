"""nclib/base.py: the small helpers at the bottom of the library (errors, atomic files, seeds, devices)."""
import os

import pytest

from helpers import load_pickle
from nclib import base


def test_first_line_of_an_empty_message_is_the_type_name():
    assert base.first_line(Exception()) == "Exception"
    assert base.first_line(RuntimeError("")) == "RuntimeError"
    assert base.first_line(OSError("  \n ")) == "OSError"


def test_first_line_is_the_first_line_of_the_message_cut_to_the_limit():
    assert base.first_line(ValueError("one\ntwo")) == "one"
    assert base.first_line(ValueError("x" * 200), limit=10) == "x" * 10


@pytest.mark.slow  # as it was among the resume tests
def test_atomic_write_keeps_the_old_file_when_the_write_fails(tmp_path):
    path = tmp_path / "f.pkl"
    base.save_pickle({"old": 1}, path)

    def half_then_fail(f):
        f.write(b"half a pickle")
        raise OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        base.atomic_write(path, half_then_fail)
    assert load_pickle(path) == {"old": 1}
    assert os.listdir(tmp_path) == ["f.pkl"]
