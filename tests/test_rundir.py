"""The run directory's own rules (nclib/rundir.py), without training anything."""
import json
import os
import pickle

import pytest

from nclib import rundir
from nclib.base import UserError


def touch(path, data=b"x"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def test_only_the_names_written_here_are_checkpoints(tmp_path):
    for name in ("epoch_001.pth", "epoch_1.pth", "epoch_0002.pth", "epoch_003.pth", "epoch_1000.pth",
                 "epoch_004.pth.bak", ".tmp_epoch_005.pth.x", "last.pth"):
        touch(str(tmp_path / name))
    assert [e for e, _ in rundir.list_checkpoints(str(tmp_path))] == [1, 3, 1000]
    assert [e for e, _ in rundir.list_checkpoints(str(tmp_path), max_epoch=3)] == [1, 3]
    assert rundir.checkpoint_path("r", 7) == os.path.join("r", "epoch_007.pth")


def test_state_of_a_run(tmp_path):
    run = str(tmp_path / "run")
    assert rundir.state(run, 2) == "new"
    touch(os.path.join(run, rundir.ARGS), b"{}")
    assert rundir.state(run, 2) == "partial"
    touch(rundir.checkpoint_path(run, 2))
    assert rundir.state(run, 2) == "trained"
    with open(os.path.join(run, rundir.INFO), "wb") as f:
        pickle.dump({"collapse_metric": [0.5], "epochs": [1]}, f)
    assert rundir.state(run, 2) == "trained"  # info.pkl covers epoch 1 only
    with open(os.path.join(run, rundir.INFO), "wb") as f:
        pickle.dump({"collapse_metric": [0.5, 0.4], "epochs": [1, 2]}, f)
    assert rundir.state(run, 2) == "done"


@pytest.mark.parametrize("content, needle", [(b'{"model": "MLP", "data', "cannot read"), (b"[1, 2]", "not a run's"),
                                             (b'{"x": 1}', "no model"), (b"", "cannot read")])
def test_damaged_arguments_are_one_line_errors(tmp_path, content, needle):
    touch(str(tmp_path / rundir.ARGS), content)
    with pytest.raises(UserError, match=needle) as e:
        rundir.read_args(str(tmp_path))
    assert "\n" not in str(e.value) and rundir.ARGS in str(e.value)
    assert rundir.read_args(str(tmp_path / "nothing")) is None


def test_info_lists_of_different_lengths_are_refused(tmp_path):
    with open(tmp_path / rundir.INFO, "wb") as f:
        pickle.dump({"collapse_metric": [1, 2, 3], "ETF_metric": [1, 2], "epochs": [1, 2, 3]}, f)
    with pytest.raises(ValueError, match="differ in length"):
        rundir.read_info(str(tmp_path))
    assert rundir.validated_epochs(str(tmp_path)) == set()


def test_a_run_has_one_owner_at_a_time(tmp_path):
    run = str(tmp_path / "run")
    with rundir.locked(run):
        # a second owner, even in this process (an flock belongs to an open file), is refused
        with pytest.raises(UserError, match=f"being trained by another process \\(pid {os.getpid()}\\)"):
            with rundir.locked(run):
                pass
        with rundir.locked(run, rundir.VALIDATE_LOCK, "validated"):  # validation has a lock of its own
            pass
    with rundir.locked(run):  # released when its owner is done (or dead: the kernel drops an flock)
        pass


def test_a_refusal_names_what_the_holder_does(tmp_path):
    run = str(tmp_path / "run")
    with rundir.locked(run, rundir.VALIDATE_LOCK, "started over"):  # as a --force restart holds it
        with pytest.raises(UserError, match=f"being started over by another process \\(pid {os.getpid()}\\)"):
            with rundir.locked(run, rundir.VALIDATE_LOCK, "validated"):
                pass


def test_a_refused_start_leaves_no_folder_behind(tmp_path):
    run = tmp_path / "new" / "deeper" / "run"
    with pytest.raises(UserError):
        with rundir.locked(str(run)):
            raise UserError("refused")
    assert not (tmp_path / "new").exists()
    with pytest.raises(UserError):  # a start over holds validation's lock too
        with rundir.locked(str(run)), rundir.locked(str(run), rundir.VALIDATE_LOCK, "started over"):
            raise UserError("refused")
    assert not (tmp_path / "new").exists()
    os.makedirs(run)
    touch(str(run / "keep.txt"))
    with pytest.raises(UserError):
        with rundir.locked(str(run)):
            raise UserError("refused")
    assert sorted(os.listdir(run)) == [rundir.TRAIN_LOCK, "keep.txt"]  # what was there stays


def test_a_file_in_the_way_is_named(tmp_path):
    touch(str(tmp_path / "file"))
    with pytest.raises(UserError, match="is a file"):
        rundir.check_is_dir_or_absent(str(tmp_path / "file"), "--save_dir")
    with pytest.raises(UserError, match="cannot create the run directory"):
        with rundir.locked(str(tmp_path / "file" / "run")):
            pass
    touch(str(tmp_path / "run" / rundir.RESULTS))
    with pytest.raises(UserError, match="move the file away"):
        rundir.results_dir(str(tmp_path / "run"))


def test_a_former_metrics_file_is_read_with_the_loop_accuracies_named(tmp_path):
    """metrics.jsonl once held the training loop's accuracies under train_acc1/5, the names of the
    measured ones now (as in info.pkl): a record without loop_acc1 is read with them renamed, and
    a resume's truncation writes the file back in the new names."""
    run = str(tmp_path)
    former = {"epoch": 1, "loss": 0.5, "train_acc1": 40.0, "train_acc5": 90.0, "lr": 0.1, "seconds": 1.0}
    current = {"epoch": 2, "loss": 0.4, "loop_acc1": 50.0, "loop_acc5": 95.0, "lr": 0.1, "seconds": 1.0,
               "NC1": 0.3, "train_acc1": 60.0, "train_acc5": 99.0}
    for record in (former, current):
        rundir.append_metrics(run, record)
    renamed = {"epoch": 1, "loss": 0.5, "loop_acc1": 40.0, "loop_acc5": 90.0, "lr": 0.1, "seconds": 1.0}
    assert rundir.read_metrics(run) == [renamed, current]
    rundir.truncate_metrics(run, 1)
    with open(os.path.join(run, rundir.METRICS)) as f:
        assert [json.loads(line) for line in f] == [renamed]


def test_each_writer_removes_only_the_temporaries_of_its_kind(tmp_path):
    """A killed write leaves .tmp_<file>.<random>. Training (holding its lock) removes those of its own
    files; those of the results, which a validation may be writing now, go when the results' lock is taken."""
    run = tmp_path / "run"
    results = [".tmp_info.pkl.a", ".tmp_test_log.txt.b", "nc_results/.tmp_epoch_002.pkl.c"]
    training = [".tmp_last.pth.d", ".tmp_epoch_002.pth.e", ".tmp_args.json.f", ".tmp_metrics.jsonl.g"]
    for name in results + training:
        touch(str(run / name))
    rundir.clear_stale_training(str(run))
    assert [n for n in results + training if (run / n).exists()] == results
    with rundir.results_locked(str(run)):
        assert not [n for n in results if (run / n).exists()]


def test_an_error_with_an_empty_message_in_last_pth_is_named_by_its_type_and_previous_pth_is_used(tmp_path,
                                                                                                  monkeypatch):
    import torch
    run = str(tmp_path / "run")
    os.makedirs(run)
    for name, epoch in ((rundir.LAST, 2), (rundir.PREVIOUS, 1)):
        torch.save({"epoch": epoch, "checkpoint_kept": False}, os.path.join(run, name))
    real_load = torch.load

    def load(path, *args, **kwargs):
        if os.path.basename(path) == rundir.LAST:
            raise RuntimeError()  # no message: first_line once raised IndexError on it
        return real_load(path, *args, **kwargs)
    monkeypatch.setattr(rundir.torch, "load", load)
    warned = []
    state = rundir.load_state(run, warn=warned.append)
    assert state == {"epoch": 1, "checkpoint_kept": False}
    assert warned == [f"warning: cannot resume from {os.path.join(run, rundir.LAST)} (RuntimeError); "
                      "trying an older state"]
    assert not os.path.exists(os.path.join(run, rundir.PREVIOUS))  # previous.pth became last.pth
