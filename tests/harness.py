"""Run a script of the repository as `python SCRIPT ARGS...` would, under test conditions: the
tests' small CIFAR-10 files are accepted (see fake_data.skip_cifar10_checksums), and with --kill
the process SIGKILLs itself at a chosen instant, so crash safety is tested from the outside with
nothing in the product that knows about it.

    python tests/harness.py [--kill FAULT] SCRIPT [ARGUMENTS...]

FAULT is one of
    before_rename@N   right before the N-th file of this process is renamed into place
                      (the os.replace of a .tmp_ file by base.atomic_write); N defaults to 1
    batch:E:B         right before the B-th batch (1-based) of epoch E is trained
"""
import os
import runpy
import signal
import sys

TESTS = os.path.dirname(os.path.abspath(__file__))


def command(script, *arguments, kill=None):
    """The command line that runs `script arguments...` through this harness."""
    return [sys.executable, os.path.join(TESTS, "harness.py")] + (["--kill", kill] if kill else []) + \
        [str(script)] + [str(a) for a in arguments]


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def kill_before_rename(n):
    real, count = os.replace, [0]

    def replace(src, dst, *args, **kwargs):
        if os.path.basename(src).startswith(".tmp_"):
            count[0] += 1
            if count[0] == n:
                die()
        return real(src, dst, *args, **kwargs)
    os.replace = replace


def kill_before_batch(epoch, batch):
    from nclib import training
    real = training.train_one_epoch

    def train_one_epoch(model, loader, step, optimizer, objective, e, *args, **kwargs):
        if e == epoch:
            count, inner = [0], step

            def step(*step_args):
                count[0] += 1
                if count[0] == batch:
                    die()
                return inner(*step_args)
        return real(model, loader, step, optimizer, objective, e, *args, **kwargs)
    training.train_one_epoch = train_one_epoch


def kill_at(fault):
    if fault.startswith("before_rename"):
        _, _, n = fault.partition("@")
        kill_before_rename(int(n or 1))
    elif fault.startswith("batch:"):
        _, epoch, batch = fault.split(":")
        kill_before_batch(int(epoch), int(batch))
    else:
        raise SystemExit(f"unknown fault {fault!r}")


if __name__ == "__main__":
    arguments = sys.argv[1:]
    fault = None
    if arguments[:1] == ["--kill"]:
        fault, arguments = arguments[1], arguments[2:]
    import fake_data  # from this folder, the first on sys.path now
    fake_data.skip_cifar10_checksums(setattr)
    script = os.path.abspath(arguments[0])
    sys.argv = arguments
    sys.path[0] = os.path.dirname(script)  # what `python script` puts first
    if fault:
        kill_at(fault)
    runpy.run_path(script, run_name="__main__")
