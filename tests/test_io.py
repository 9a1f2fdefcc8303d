"""Shared-filesystem primitives: temp names unique across hosts, atomic replacement of files and directories, and the
lease that keeps a second process off a task (taken over when its holder is gone, restarted or silent)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.errors import LeaseHeldError
from pipeline.io import Lease, atomic_replace_dir, atomic_write_json, read_holder, tmp_path
from pipeline.io.atomic import host_name, install_dir, remove_orphaned_tmps, tmp_is_orphaned, tmp_owner


def test_temp_names_are_unique_and_say_whose_they_are(tmp_path):
    names = {tmp_path_name for tmp_path_name in (tmp_path_for(tmp_path) for _ in range(50))}
    assert len(names) == 50
    name = next(iter(names))
    assert name.startswith(".tmp-x.json") and tmp_owner(name) == (host_name(), os.getpid())
    assert tmp_owner("x.json") is None and tmp_owner(".tmp-x.json.123") is None  # the old pid-only form


def tmp_path_for(directory: Path) -> str:
    return tmp_path(directory / "x.json").name


def test_a_dead_writers_temp_file_is_recognised(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    mine = tmp_path_for(tmp_path)
    theirs = mine.replace(f"~{os.getpid()}~", f"~{pid}~")
    other_host = mine.replace(f"~{host_name()}~", "~elsewhere~").replace(f"~{os.getpid()}~", f"~{pid}~")
    assert tmp_is_orphaned(theirs) and not tmp_is_orphaned(mine) and not tmp_is_orphaned(other_host)


def test_only_a_dead_writers_temps_of_that_path_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    target = tmp_path / "analysis-work"
    orphan = Path(str(tmp_path_for(tmp_path)).replace("x.json", target.name).replace(f"~{os.getpid()}~", f"~{pid}~"))
    (tmp_path / orphan / "spill").mkdir(parents=True)
    live = tmp_path / tmp_path_for(tmp_path).replace("x.json", target.name)  # this process's: still being written
    live.mkdir()
    other = tmp_path / orphan.name.replace("analysis-work", "analysis-work2")
    other.mkdir()
    assert remove_orphaned_tmps(target) == [tmp_path / orphan.name]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name])


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    path = tmp_path / "a.json"
    atomic_write_json(path, {"v": 1})
    atomic_write_json(path, {"v": 2})
    assert json.loads(path.read_text()) == {"v": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_replacing_a_directory_keeps_the_old_one_until_the_new_one_is_whole(tmp_path):
    target = tmp_path / "final"
    atomic_replace_dir(target, lambda d: (d / "w").write_text("old"))

    def failing(d: Path) -> None:
        (d / "w").write_text("half")
        raise RuntimeError("killed while writing")

    with pytest.raises(RuntimeError):
        atomic_replace_dir(target, failing)
    assert (target / "w").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["final"]
    atomic_replace_dir(target, lambda d: (d / "w2").write_text("new"))
    assert sorted(p.name for p in target.iterdir()) == ["w2"] and sorted(p.name for p in tmp_path.iterdir()) == ["final"]
    complete = tmp_path / "ready"
    complete.mkdir()
    (complete / "z").write_text("z")
    install_dir(complete, target)
    assert [p.name for p in target.iterdir()] == ["z"] and not complete.exists()


def test_a_second_holder_is_refused_with_one_line_naming_the_first(tmp_path):
    path = tmp_path / "lease.json"
    with Lease(path, what="task 3 of 8"):
        with pytest.raises(LeaseHeldError) as err:
            Lease(path, what="task 3 of 8").acquire()
        message = str(err.value)
        assert "\n" not in message and "task 3 of 8 is held by" in message and f"pid {os.getpid()}" in message
        assert host_name() in message
    assert not path.exists()  # released


def _dead_holder(path: Path, **changes) -> None:
    with Lease(path, what="t") as lease:
        data = json.loads(path.read_text())
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    data.update({"pid": int(dead.stdout), **changes})
    path.write_text(json.dumps(data))
    assert lease.holder is None


def test_the_lease_of_a_process_gone_from_this_host_is_taken_over(tmp_path, caplog):
    path = tmp_path / "lease.json"
    _dead_holder(path)
    with Lease(path, what="t") as lease:
        assert read_holder(path).token == lease.holder.token
    assert "taking over the lease" in caplog.text and "its process is gone" in caplog.text


def test_a_silent_holder_elsewhere_is_taken_over_after_the_timeout(tmp_path, caplog):
    path = tmp_path / "lease.json"
    _dead_holder(path, host="node-17", heartbeat=time.time() - 5)
    with pytest.raises(LeaseHeldError, match="node-17"):
        Lease(path, what="t", timeout_s=60).acquire()
    with Lease(path, what="t", timeout_s=2):
        pass
    assert "no heartbeat for" in caplog.text


def test_a_requeued_slurm_job_takes_over_its_predecessors_lease(tmp_path, monkeypatch):
    path = tmp_path / "lease.json"
    _dead_holder(path, host="node-17", job="4242_3", restarts=0, heartbeat=time.time())
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    with pytest.raises(LeaseHeldError):  # the same job, not restarted: a duplicate
        Lease(path, what="t").acquire()
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    with Lease(path, what="t") as lease:
        assert lease.holder.job == "4242_3" and lease.holder.restarts == 1


def test_the_heartbeat_keeps_a_lease_live_and_a_takeover_is_noticed(tmp_path):
    path = tmp_path / "lease.json"
    lease = Lease(path, what="t", timeout_s=0.5, heartbeat_s=0.05).acquire()
    first = read_holder(path).heartbeat
    time.sleep(0.3)
    assert read_holder(path).heartbeat > first and not lease.lost
    with pytest.raises(LeaseHeldError):  # still beating: not stale however short the timeout
        Lease(path, what="t", timeout_s=0.5).acquire()
    # Someone removes it and takes it (as after a hang past the timeout): the old holder learns it has lost it.
    path.unlink()
    other = Lease(path, what="t", timeout_s=60).acquire()
    deadline = time.time() + 5
    while not lease.lost and time.time() < deadline:
        time.sleep(0.02)
    assert lease.lost
    with pytest.raises(LeaseHeldError, match="taken over"):
        lease.check()
    lease.release()
    assert read_holder(path).token == other.holder.token  # the loser does not delete the winner's lease
    other.release()
