"""nclib/base.py: the small helpers at the bottom of the library (errors, atomic files, seeds, devices)."""
import pytest

from nclib import base


def test_first_line_of_an_empty_message_is_the_type_name():
    assert base.first_line(Exception()) == "Exception"
    assert base.first_line(RuntimeError("")) == "RuntimeError"
    assert base.first_line(OSError("  \n ")) == "OSError"


def test_first_line_is_the_first_line_of_the_message_cut_to_the_limit():
    assert base.first_line(ValueError("one\ntwo")) == "one"
    assert base.first_line(ValueError("x" * 200), limit=10) == "x" * 10
