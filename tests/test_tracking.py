"""flows.tracking's process identity: how a stage run left RUNNING by a killed process is told apart from
one whose process still works (tests/test_stage_kill_resume.py has the whole path on MLflow)."""

from __future__ import annotations

import socket
import subprocess
import sys

from flows.tracking import is_gone, this_process


def test_this_process_is_not_gone():
    assert not is_gone(this_process())


def test_an_ended_process_is_gone_and_its_recycled_pid_is_another_process():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    host = socket.gethostname()
    start = this_process().rsplit(":", 1)[1]
    assert is_gone(f"{host}:{child.pid}:{start}")
    # A live pid whose start time differs: the pid was recycled, the run's process is gone.
    own_pid = this_process().split(":")[1]
    assert is_gone(f"{host}:{own_pid}:{int(start) + 1}")


def test_a_process_on_another_host_is_never_declared_gone():
    assert not is_gone(f"not-{socket.gethostname()}:1:0")
