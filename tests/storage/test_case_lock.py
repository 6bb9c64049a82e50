"""One writer per case folder: a second training (or --evaluate, or launch_ddp.py) in a folder where a run is
writing is refused with one line naming that run, and the first one finishes intact; a lock left by a process that
died is no obstacle."""
import errno
import importlib.util
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, write_case
from modules.errors import InputError
from modules.storage import case_lock
from modules.storage.case_lock import LOCK_FILE, case_folder_lock, check_case_folder_free

spec = importlib.util.spec_from_file_location("launch_ddp", REPO / "launch_ddp.py")
launch_ddp = importlib.util.module_from_spec(spec)
spec.loader.exec_module(launch_ddp)

ENVIRONMENT = {**os.environ, "OMP_NUM_THREADS": "1"}


def start(folder, *flags):
    return subprocess.Popen([sys.executable, str(REPO / "SimulGen-VAE.py"), *flags], cwd=folder, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=ENVIRONMENT)


def wait_for_lock(folder, pid, process):
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if f"pid {pid} " in (folder / LOCK_FILE).read_text() if (folder / LOCK_FILE).exists() else False:
            return
        assert process.poll() is None, process.communicate()
        time.sleep(0.05)
    pytest.fail("the first run never took the case folder's lock")


@pytest.mark.slow
def test_a_second_writer_is_refused_and_the_first_run_finishes_intact(tmp_path, monkeypatch, capsys):
    write_case(tmp_path, n=16, epochs=30)
    first = start(tmp_path)
    wait_for_lock(tmp_path, first.pid, first)
    first.send_signal(signal.SIGSTOP)  # frozen while it holds the lock, so that it is still running below
    for flags in ([], ["--evaluate"], ["--lc_only=1"], ["--checkpoints=clean"]):
        second = subprocess.run([sys.executable, str(REPO / "SimulGen-VAE.py"), *flags], cwd=tmp_path, text=True,
                                capture_output=True, stdin=subprocess.DEVNULL, env=ENVIRONMENT, timeout=120)
        assert second.returncode == 2, (flags, second.stderr)
        assert second.stderr.count("\n") == 1 and "Traceback" not in second.stderr
        assert f"another SimulGenVAE process is writing in this case folder (pid {first.pid} " in second.stderr
        assert "SimulGen-VAE.py, since " in second.stderr  # says what that process runs, and since when
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(launch_ddp, "run_forwarding_sigterm", lambda command: pytest.fail("torchrun was started"))
    assert launch_ddp.main(["--gpus=2"]) == 2
    assert f"(pid {first.pid} " in capsys.readouterr().err
    first.send_signal(signal.SIGCONT)
    output, errors = first.communicate(timeout=600)
    assert first.returncode == 0, errors
    assert "moved to" not in output  # nothing archived the first run's files under it
    assert len(list((tmp_path / "runs").iterdir())) == 1 and not (tmp_path / "archive").exists()
    payload = torch.load(tmp_path / "model_save" / "SimulGen-VAE", weights_only=True)
    assert payload["format"]
    assert not list(tmp_path.rglob("*.tmp"))
    check_case_folder_free()  # released when the run ended


def test_the_lock_of_a_killed_process_is_no_obstacle(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", (
        f"import sys, time; sys.path.insert(0, {str(REPO)!r})\n"
        "from modules.storage.case_lock import case_folder_lock\n"
        "with case_folder_lock('test holder'):\n"
        "    print('locked', flush=True); time.sleep(600)")], cwd=tmp_path, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(InputError) as refused:
        check_case_folder_free()
    assert f"pid {holder.pid} " in refused.value.problem and "test holder" in refused.value.problem
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert f"pid {holder.pid} " in LOCK_FILE.read_text()  # a killed process leaves its record, not its lock
    with case_folder_lock("the next run"):
        assert LOCK_FILE.read_text().startswith(f"pid {os.getpid()} ")
    assert LOCK_FILE.read_text() == ""  # let go: nobody holds it


def test_a_file_system_without_locks_is_said_once_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)

    def unsupported(handle):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(case_lock, "_lock", unsupported)
    with case_folder_lock("a run on Lustre"):
        assert LOCK_FILE.read_text().startswith(f"pid {os.getpid()} ")
    assert capsys.readouterr().err == (f"note: this file system cannot lock {LOCK_FILE} (No locks available): nothing "
                                       "stops a second run in this case folder meanwhile\n")
