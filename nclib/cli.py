"""How every entry script ends: run_main turns bad input, a refused write and Ctrl-C into one line
on stderr and an exit status, and lets a real bug show its traceback."""
import sys
import warnings

from nclib.base import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_INTERRUPTED, WRITE_FIX, RefusedOnRankZero, UserError
from nclib.distributed import torchrun_env


def _interrupted(e):
    """Whether e is, or was raised while handling, a Ctrl-C (torch.save wraps it in a RuntimeError)."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, KeyboardInterrupt):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def run_main(main, *args):
    """Call main(*args) as a script does: a UserError becomes a one-line message on stderr and exit
    status 2; a file-system error one line and status 1; Ctrl-C one line and status 130, however
    deep inside a save it struck."""
    try:
        return main(*args)
    except UserError as e:
        # under torchrun every rank meets the same bad input; rank 0 says it once
        if not isinstance(e, RefusedOnRankZero) and (torchrun_env() or (0,))[0] == 0:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    except OSError as e:  # the file system refused: a full disk, a folder where a file should be, ...
        if _interrupted(e):
            raise
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}; files written before this are complete: "
              f"{getattr(e, 'fix', None) or WRITE_FIX}", file=sys.stderr)
        sys.exit(EXIT_FAILED)
    except BaseException as e:
        if not _interrupted(e):
            raise
        print("interrupted: files written so far are complete", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)


def one_line_warnings():
    """Warnings as 'warning: message', one line each, as the scripts print them."""
    warnings.formatwarning = lambda message, category, *args, **kwargs: f"warning: {message}\n"
