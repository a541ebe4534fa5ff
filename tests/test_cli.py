"""nclib/cli.py: run_main, how every entry script turns its outcome into an exit status and one line."""

from helpers import refused
from nclib import cli
from nclib.base import UserError


def test_a_user_error_is_one_line_and_exit_status_2(capsys):
    def main(argv):
        raise UserError(f"--flag {argv[0]} is wrong: give another")
    assert refused(capsys, main, ["x"]) == "error: --flag x is wrong: give another"


def test_main_returning_normally_exits_nothing(capsys):
    seen = []
    cli.run_main(lambda argv: seen.append(argv), ["--a"])
    assert seen == [["--a"]]
