"""Door servers for the native-backend tests, run as `python3 native_probe.py MODE PATH`.

MODE trampoline: doordown's own native server; each call answers with the Python frame
depth of the handler, a threading.local counter, the thread and the process RSS.
MODE naive: the wrong way, a ctypes callback that calls door_return itself; it answers
with a call counter and the frame depth, until CPython's thread state gives way.
MODE failures: doordown's native server answering commands that exercise the failure
paths: sleep:S (a slow call), hold:S (a thread holds the GIL for S seconds, as a C
extension may), fd (a reply carrying a descriptor; so is the answer to an empty call,
which is what door_call(d, NULL) sends), fds (the open descriptor count), calls (how
many calls reached the handler), big:N (an N-byte reply), bigfd:N (an N-byte reply
carrying a descriptor), nomemory (a reply carrying a descriptor that the server runs out
of memory copying out), pid (the server's process id).
All print READY once the door is attached, and serve until stdin closes.
"""

import ctypes
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import doordown  # noqa: E402

_local = threading.local()


def frame_depth(limit=100000):
    """Length of the caller's frame chain; -1 past `limit` (a broken chain can be cyclic)."""
    frame, depth = sys._getframe(1), 0
    while frame is not None:
        depth += 1
        if depth > limit:
            return -1
        frame = frame.f_back
    return depth


def rss_kib():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def probe(data, fds, caller):
    _local.count = getattr(_local, "count", 0) + 1
    return b"%d %d %d %d" % (frame_depth(), _local.count, threading.get_ident(), rss_kib()), []


class Failures:
    """The handler of MODE failures (a class: doordown asks it for refused_reply)."""

    def __init__(self):
        self.calls = 0

    def __call__(self, data, fds, caller):
        self.calls += 1
        for fd in fds:
            os.close(fd)
        command, _, argument = data.partition(b":")
        if command == b"sleep":
            time.sleep(float(argument))
        elif command == b"hold":
            pause = ctypes.PyDLL(None).usleep  # PyDLL: the GIL stays held during the call
            pause.argtypes = [ctypes.c_uint]
            def hold(seconds=float(argument)):
                time.sleep(0.05)  # this call's answer first
                pause(int(seconds * 1e6))
            threading.Thread(target=hold).start()
        elif command in (b"fd", b"", b"bigfd"):
            read, write = os.pipe()
            os.close(write)
            return (b"b" * int(argument) if argument else b"with a descriptor"), [read]
        elif command == b"nomemory":
            server = self.server

            def out_of_memory(*args):
                del server._leave_reply  # once
                raise MemoryError

            server._leave_reply = out_of_memory
            read, write = os.pipe()
            os.close(write)
            return b"with a descriptor", [read]
        elif command == b"pid":
            return b"%d" % os.getpid(), []
        elif command == b"fds":
            return b"%d" % len(os.listdir("/proc/self/fd")), []
        elif command == b"calls":
            return b"%d" % self.calls, []
        elif command == b"big":
            return b"b" * int(argument), []
        return b"ok", []

    @staticmethod
    def refused_reply(number):
        return b"refused %d" % number


def serve_naive(path):
    lib = doordown._load_door_library()
    calls = [0]

    def naive(cookie, argp, size, descriptors, count):
        calls[0] += 1
        answer = b"%d %d" % (calls[0], frame_depth())
        buffer = ctypes.create_string_buffer(answer, len(answer))
        lib.door_return(ctypes.addressof(buffer), len(answer), None, 0)  # never returns

    procedure = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t,
                                 ctypes.c_void_p, ctypes.c_uint)(naive)
    fd = lib.door_create(ctypes.cast(procedure, ctypes.c_void_p).value, None, 0)
    open(path, "w").close()
    if fd < 0 or lib.fattach(fd, path.encode()) != 0:
        raise OSError(ctypes.get_errno(), "naive door")
    return procedure


if __name__ == "__main__":
    mode, path = sys.argv[1], sys.argv[2]
    handler = Failures() if mode == "failures" else probe
    keep = serve_naive(path) if mode == "naive" else doordown.NativeDoors().serve(path, handler)
    if mode == "failures":
        handler.server = keep
    print("READY", flush=True)
    sys.stdin.read()
    os._exit(0)  # parked door threads own Python thread states: no interpreter finalization
