"""A native crash of the pytest process leaves a traceback in the log even after a test reset the crash
handlers (as ``ray.shutdown()`` does): tests/crashlog.py re-arms faulthandler. Real pytest processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

TESTS = '''
import faulthandler, signal

def test_resets_the_handlers():  # what ray.shutdown() does to the process's fatal signals
    for sig in (signal.SIGSEGV, signal.SIGABRT, signal.SIGFPE, signal.SIGILL):
        signal.signal(sig, signal.SIG_DFL)

def test_passes():
    assert True

def test_crashes():
    faulthandler._sigsegv()
'''


def _pytest(tmp_path, *args):
    (tmp_path / "test_native.py").write_text(TESTS)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.crashlog",
                           "--rootdir", str(tmp_path), "-c", os.devnull, *args, str(tmp_path / "test_native.py")],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the handlers through glibc's sigaction")
def test_segfault_after_a_test_reset_the_handlers_still_prints_the_traceback(tmp_path):
    r = _pytest(tmp_path)
    out = r.stdout + r.stderr
    assert r.returncode == -signal.SIGSEGV, out[-3000:]
    assert "Fatal Python error: Segmentation fault" in out, out[-3000:]
    assert "in test_crashes" in out and "test_native.py" in out, out[-3000:]  # which test was running


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the handlers through glibc's sigaction")
def test_summary_names_the_test_that_replaced_the_handlers(tmp_path):
    r = _pytest(tmp_path, "-k", "not crashes")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "faulthandler re-armed" in r.stdout
    line = next(x for x in r.stdout.splitlines() if "test_resets_the_handlers" in x and " had " in x)
    assert "SIGSEGV" in line and "SIGABRT" in line and "the default action" in line and "SIGBUS" not in line
