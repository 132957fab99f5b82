"""WSGI applications the tests serve through doordown (test support, not part of doordown)."""

import hashlib
import json
import os
import threading
import time
from wsgiref.validate import validator

_local = threading.local()


def _reply(start_response, body, status="200 OK", content_type="application/json", length=True):
    if not isinstance(body, bytes):
        body = json.dumps(body, sort_keys=True).encode()
    headers = [("Content-Type", content_type)]
    if length:
        headers.append(("Content-Length", str(len(body))))
    start_response(status, headers)
    return [body]


def echo(environ, start_response):
    """Answers with what the app saw: method, paths, selected environ keys, body digest."""
    body = environ["wsgi.input"].read()
    seen = {k: v for k, v in environ.items() if isinstance(v, str)}
    seen.update(body_len=len(body), body_sha256=hashlib.sha256(body).hexdigest(),
                body_head=body[:64].decode("latin-1"), pid=os.getpid(),
                multithread=environ["wsgi.multithread"], version=list(environ["wsgi.version"]))
    return _reply(start_response, seen)


def _simple(environ, start_response):
    body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
    if environ["PATH_INFO"] == "/stream":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return iter([b"one ", b"two ", b"three"])
    if environ["PATH_INFO"] == "/write":
        write = start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "11")])
        write(b"hello ")
        return [b"world"]
    return _reply(start_response, {"len": len(body), "method": environ["REQUEST_METHOD"],
                                   "path": environ["PATH_INFO"], "query": environ["QUERY_STRING"]})


validated = validator(_simple)


def slow(environ, start_response):
    """Sleeps ?s seconds (default 0.5) and says which door thread served it."""
    seconds = float(environ.get("QUERY_STRING", "").partition("s=")[2] or 0.5)
    time.sleep(seconds)
    return _reply(start_response, {"slept": seconds, "thread": threading.get_ident(), "pid": os.getpid()})


def counter(environ, start_response):
    """A threading.local counter: proof that door server threads keep their state."""
    _local.count = getattr(_local, "count", 0) + 1
    return _reply(start_response, {"thread": threading.get_ident(), "count": _local.count,
                                   "pid": os.getpid()})


def crash(environ, start_response):
    raise RuntimeError("the app fell over on purpose")


class _Closing:
    closed = []

    def __init__(self, chunks):
        self.chunks = chunks

    def __iter__(self):
        return iter(self.chunks)

    def close(self):
        _Closing.closed.append(1)


def closing(environ, start_response):
    """/count reports how many iterables were closed; other paths return a closable one."""
    if environ["PATH_INFO"] == "/count":
        return _reply(start_response, {"closed": len(_Closing.closed)})
    start_response("200 OK", [("Content-Type", "text/plain")])
    if environ["PATH_INFO"] == "/fail":
        class Failing(_Closing):
            def __iter__(self):
                yield b"partial"
                raise ValueError("failed mid-body")
        return Failing([])
    return _Closing([b"closed later"])


def big(environ, start_response):
    """A response of ?n bytes (default 3 MiB), a repeating pattern."""
    size = int(environ.get("QUERY_STRING", "").partition("n=")[2] or 3 << 20)
    body = (b"0123456789abcdef" * (size // 16 + 1))[:size]
    return _reply(start_response, body, content_type="application/octet-stream")


def warn(environ, start_response):
    """Writes a line to wsgi.errors (FastCGI sends it back as FCGI_STDERR)."""
    environ["wsgi.errors"].write("warned about %s\n" % environ["PATH_INFO"])
    return _reply(start_response, b"warned", content_type="text/plain")


def bad_headers(environ, start_response):
    start_response("200 OK", [("X-Evil", "a\r\nSet-Cookie: injected=1")])
    return [b"never sent"]


def exiter(environ, start_response):
    """Takes its whole process down on every request: a crash loop for the spawn score."""
    os._exit(3)


def versioned(environ, start_response):
    """Answers with the VERSION in version.py beside the app: proof that a reload loads new code."""
    import version
    return _reply(start_response, {"version": version.VERSION, "pid": os.getpid()})


def _endless():
    while True:
        yield b"x" * 65536


def misbehaving(environ, start_response):
    """Headers an application should leave to the server, and errors on demand.

    /            sets its own Date and Server: the front's must replace them, never join them
    /dup-length  two Content-Length fields: the gateway answers 500
    /bad-length-stream  an endless body under a Content-Length that is no number: 500 too,
                 at once (the body is not collected)
    /crash...    raises: the error line in the log names the path, escaped
    """
    path = environ["PATH_INFO"]
    if path.startswith("/crash"):
        raise RuntimeError("misbehaving on purpose")
    if path == "/dup-length":
        start_response("200 OK", [("Content-Length", "2"), ("Content-Length", "2")])
        return [b"ok"]
    if path == "/bad-length-stream":
        start_response("200 OK", [("Content-Length", "ten")])
        return _endless()
    start_response("200 OK", [("Date", "Thu, 01 Jan 1970 00:00:00 GMT"), ("Server", "app/1.0"),
                              ("Content-Type", "text/plain"), ("Content-Length", "2")])
    return [b"ok"]


def interpreter(environ, start_response):
    """Which interpreter, user, directory and environment the app process runs with."""
    import sys
    return _reply(start_response, {"prefix": sys.prefix, "uid": os.getuid(), "cwd": os.getcwd(),
                                   "greeting": os.environ.get("GREETING"), "pid": os.getpid(),
                                   "script_name": environ["SCRIPT_NAME"], "path_info": environ["PATH_INFO"]})


def _query(environ):
    return dict(item.partition("=")[::2] for item in environ.get("QUERY_STRING", "").split("&") if item)


def streams(environ, start_response):
    """Streaming bodies.  /events?n=N&every=S: server-sent events, one every S seconds;
    /big?mib=N: N MiB generated in 64 KiB chunks, no Content-Length; /file?mib=N: a file of
    N MiB through wsgi.file_wrapper; /bytesio: a file-like with no descriptor; /lazy?s=S: the
    first chunk after S seconds; /idle?s=S: "first", then S seconds of silence (?length=N: with
    a Content-Length of N).  ?mark=PATH: close() writes PATH (seen from any process)."""
    query = _query(environ)
    path = environ["PATH_INFO"]

    def closed():
        if query.get("mark"):
            with open(query["mark"], "w") as f:
                f.write("closed")

    if path == "/events":
        start_response("200 OK", [("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache")])

        def events():
            try:
                for i in range(int(query.get("n", 4))):
                    if i:
                        time.sleep(float(query.get("every", 0.2)))
                    yield b"data: %d %.3f\n\n" % (i, time.time())
            finally:
                closed()
        return events()
    if path == "/big":
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        block = bytes(range(256)) * 256

        def big():
            try:
                for _ in range(int(query.get("mib", 1)) * 16):
                    yield block
            finally:
                closed()
        return big()
    if path == "/file":
        name = os.path.join(query["dir"], "file-%s" % query.get("mib", "1"))
        if not os.path.exists(name):
            with open(name + ".tmp", "wb") as f:
                f.truncate(int(query.get("mib", 1)) << 20)  # sparse: quick to make, all zeros
            os.rename(name + ".tmp", name)
        f = _NoReadFile(name)
        start_response("200 OK", [("Content-Type", "application/octet-stream"),
                                  ("Content-Length", str(os.path.getsize(name)))])
        return environ["wsgi.file_wrapper"](f, 65536)
    if path == "/bytesio":
        import io
        start_response("200 OK", [("Content-Type", "text/plain")])
        return environ["wsgi.file_wrapper"](io.BytesIO(b"no descriptor " * 1000), 1000)
    if path == "/lazy":
        def lazy():
            time.sleep(float(query.get("s", 1)))
            start_response("200 OK", [("Content-Type", "text/plain")])
            yield b"late"
        return lazy()
    if path == "/idle":
        headers = [("Content-Type", "text/plain")]
        if query.get("length"):
            headers.append(("Content-Length", query["length"]))
        start_response("200 OK", headers)

        def idle():
            try:
                yield b"first"
                time.sleep(float(query.get("s", 30)))
                yield b"never"
            finally:
                closed()
        return idle()
    return _reply(start_response, {"pid": os.getpid()})


import io as _io  # noqa: E402


class _NoReadFile(_io.FileIO):
    """A file whose bytes Python must never read: the server is to pass its descriptor."""

    def read(self, *args):
        raise AssertionError("the file was read through Python")

    readinto = readall = read


def lean(environ, start_response):
    """How doordown runs in this process: the heavy modules loaded, and how the file was started."""
    import sys
    main = sys.modules["__main__"]
    heavy = ("http.server", "http.client", "email", "xml", "argparse", "subprocess")
    return _reply(start_response, {
        "heavy": sorted(name for name in sys.modules if name.split(".")[0] in heavy or name in heavy),
        "compiled": getattr(main, "_compiled_from", None), "file": getattr(main, "__file__", None),
        "argv0": sys.argv[0], "same_module": sys.modules.get("doordown") is main, "pid": os.getpid()})


def big_first_chunk(environ, start_response):
    """A generator whose first chunk is over the door's inline limit (2 MiB), then 1 MiB more,
    with the Content-Length of both: ?length=0 leaves the Content-Length out."""
    first, rest = b"a" * (2 << 20), b"b" * (1 << 20)
    headers = [("Content-Type", "application/octet-stream")]
    if _query(environ).get("length") != "0":
        headers.append(("Content-Length", str(len(first) + len(rest))))
    start_response("200 OK", headers)

    def body():
        yield first
        yield rest
    return body()


_huge_head_closed = []


def huge_head(environ, start_response):
    """A response head over the door's 64 KiB bound: /stream with a generator body, /file
    with wsgi.file_wrapper; /closed says how many of those bodies were closed."""
    if environ["PATH_INFO"] == "/closed":
        return _reply(start_response, {"closed": len(_huge_head_closed)})
    start_response("200 OK", [("Content-Type", "text/plain"), ("X-Big", "x" * 70000)])
    if environ["PATH_INFO"] == "/file":
        class Closing(_io.FileIO):
            def close(self):
                if not self.closed:
                    _huge_head_closed.append(1)
                super().close()
        return environ["wsgi.file_wrapper"](Closing(__file__), 65536)

    def body():
        try:
            yield b"first"
            yield b"second"
        finally:
            _huge_head_closed.append(1)
    return body()


def lazy_echo(environ, start_response):
    """Echoes the request body as it reads it, 1000 bytes a chunk, from inside its iterable."""
    start_response("200 OK", [("Content-Type", "application/octet-stream")])
    body = environ["wsgi.input"]

    def chunks():
        while True:
            piece = body.read(1000)
            if not piece:
                return
            yield piece
    return chunks()


def slow_stream(environ, start_response):
    """A stream whose first chunk takes ?s seconds (default 0.5); close() writes ?mark."""
    query = _query(environ)

    def body():
        try:
            time.sleep(float(query.get("s", 0.5)))
            start_response("200 OK", [("Content-Type", "text/plain")])
            yield b"first"
            yield b"second"
        finally:
            if query.get("mark"):
                with open(query["mark"], "w") as f:
                    f.write("closed")
    return body()
