"""WSGI applications for the tests of the native door backend (test support, not doordown).

They report what an application sees on a door server thread: the C stack left to it,
the signal mask it and its children run with, whether its own signal handler survived.
"""

import ctypes
import json
import os
import signal
import subprocess


def _json(start_response, value):
    body = json.dumps(value).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]


def stack(environ, start_response):
    """The bytes of stack left below this frame (the door model's count) and the body size."""
    body = environ["wsgi.input"].read()
    model = ctypes.CDLL(os.environ["DOORDOWN_LIBDOOR"])  # the same library doordown loaded
    model.doormodel_stack_left.restype = ctypes.c_long
    return _json(start_response, {"left": model.doormodel_stack_left(), "body": len(body)})


def _blocked(status_text):
    return int(next(line for line in status_text.splitlines() if line.startswith("SigBlk:")).split()[1], 16)


def sigmask(environ, start_response):
    """The signals blocked in the thread running the app, and in a process it starts."""
    with open("/proc/thread-self/status") as status:
        mine = _blocked(status.read())
    child = subprocess.run(["cat", "/proc/self/status"], capture_output=True, check=True).stdout.decode()
    return _json(start_response, {"thread": mine, "child": _blocked(child)})


def _own_usr2(signum, frame):
    pass


signal.signal(signal.SIGUSR2, _own_usr2)  # at import, as an app that uses SIGUSR2 would


def own_signal(environ, start_response):
    """Whether the handler this module installed for SIGUSR2 is still the one installed."""
    return _json(start_response, {"kept": signal.getsignal(signal.SIGUSR2) is _own_usr2})


def big_head(environ, start_response):
    """A 2 MiB body under a head of about 70 KiB."""
    body = b"b" * (2 << 20)
    headers = [("X-Filler-%d" % i, "f" * 1000) for i in range(70)]
    start_response("200 OK", headers + [("Content-Length", str(len(body)))])
    return [body]
