"""pytest plugin: a native crash of the pytest process always leaves the Python traceback of every thread
(the running test's among them) in the log.

pytest's faulthandler plugin arms :mod:`faulthandler` once, at start-up, but a library can take the fatal
signals over later without faulthandler noticing (``faulthandler.is_enabled()`` stays True): ``ray.init()``
installs Abseil's failure handler, and ``ray.shutdown()`` resets SIGSEGV, SIGABRT, SIGFPE and SIGILL to the
default action, after which a segfault kills pytest with no output at all (``make: *** [test] Segmentation
fault``). This plugin reads the native handlers before each test and after each of its phases and re-arms
faulthandler (all threads, to the stderr pytest started with) when something replaced them; the terminal
summary names the tests that did. Loaded by tests/conftest.py; alone: ``pytest -p tests.crashlog``.
"""

from __future__ import annotations

import ctypes
import faulthandler
import os
import signal
import sys

import pytest

FATAL = tuple(getattr(signal, n) for n in ("SIGSEGV", "SIGFPE", "SIGABRT", "SIGBUS", "SIGILL") if hasattr(signal, n))


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc if hasattr(libc, "sigaction") else None
    except OSError:
        return None


_LIBC = _libc()


def native_handlers() -> dict[str, int] | None:
    """Each fatal signal's handler address as the kernel has it (0: default action, 1: ignored), or None
    where it cannot be read (not Linux)."""
    if _LIBC is None:
        return None
    buf = ctypes.create_string_buffer(512)  # larger than struct sigaction; glibc's starts with the handler
    out = {}
    for sig in FATAL:
        if _LIBC.sigaction(int(sig), None, buf) != 0:
            return None
        out[sig.name] = int.from_bytes(buf.raw[:ctypes.sizeof(ctypes.c_void_p)], sys.byteorder)
    return out


def _describe(address: int) -> str:
    return {0: "the default action", 1: "ignored"}.get(address, "another handler")


class CrashLog:
    """Keeps faulthandler armed on the fatal signals for the whole session."""

    def __init__(self):
        self.fd = os.dup(sys.__stderr__.fileno() if sys.__stderr__ is not None else 2)
        self.armed: dict[str, int] | None = None
        self.rearmed: list[str] = []
        self.arm()

    def arm(self) -> None:
        faulthandler.disable()  # enable() on an enabled faulthandler keeps its stale view of the handlers
        faulthandler.enable(file=self.fd, all_threads=True)
        now = native_handlers()
        # faulthandler puts one function on every fatal signal: anything else means the read is not reliable,
        # and then it is re-armed before and after every test phase regardless
        self.armed = now if now and len(set(now.values())) == 1 and min(now.values()) > 1 else None

    def check(self, where: str) -> None:
        now = native_handlers()
        if self.armed is not None and now == self.armed:
            return
        if self.armed is not None and now is not None:
            changed = sorted({_describe(a) for a in now.values() if a != next(iter(self.armed.values()))})
            names = [n for n, a in now.items() if a != self.armed[n]]
            self.rearmed.append(f"{where}: {', '.join(names)} had {' / '.join(changed)}")
        self.arm()

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_logstart(self, nodeid, location):
        self.check(f"before {nodeid}")

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_logreport(self, report):
        self.check(f"{report.nodeid} ({report.when})")

    def pytest_terminal_summary(self, terminalreporter):
        if self.rearmed:
            terminalreporter.write_sep("-", "faulthandler re-armed (a test replaced the native crash handlers)")
            for line in self.rearmed[:20]:
                terminalreporter.write_line(line)

    @pytest.hookimpl(tryfirst=True)
    def pytest_unconfigure(self, config):
        faulthandler.disable()  # pytest's own faulthandler plugin then restores what was there before it
        os.close(self.fd)


@pytest.hookimpl(trylast=True)
def pytest_configure(config):
    if faulthandler.is_enabled() and not config.pluginmanager.has_plugin("crashlog-session"):
        config.pluginmanager.register(CrashLog(), "crashlog-session")  # not under -p no:faulthandler
