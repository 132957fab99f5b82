"""End-to-end tests of doordown: real processes, real sockets, real (emulated or modelled) doors.

Every server listens on a free port (bind to port 0, read the port from the start-up
line), every wait is bounded, and every process started is killed at teardown.
"""

import atexit
import concurrent.futures
import ctypes
import errno
import glob
import hashlib
import importlib.util
import http.client
import json
import os
import random
import re
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time

import pytest

import doordown

HERE = os.path.dirname(os.path.abspath(__file__))
DOORDOWN = os.path.join(HERE, "doordown.py")
SUPPORT = os.path.join(HERE, "support")
DOORS = os.environ.get("DOORDOWN_TEST_DOORS", "emulated")


# -- harness ---------------------------------------------------------------------------

def compile_door_model(directory):
    """Build support/doormodel.c, the illumos door ABI model; None without a C compiler."""
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        return None
    library = os.path.join(directory, "libdoormodel.so")
    subprocess.run([compiler, "-shared", "-fPIC", "-O2", "-pthread", "-o", library,
                    os.path.join(SUPPORT, "doormodel.c")], check=True, timeout=120)
    return library


@pytest.fixture(scope="session")
def door_model(tmp_path_factory):
    library = compile_door_model(str(tmp_path_factory.mktemp("doormodel")))
    if library is None:
        pytest.skip("no C compiler (cc) to build the illumos door model")
    return library


@pytest.fixture(scope="session", autouse=True)
def native_doors_under_the_model(request):
    """With DOORDOWN_TEST_DOORS=native every process uses the native backend on the model."""
    if DOORS == "native" and not os.environ.get("DOORDOWN_LIBDOOR"):
        os.environ["DOORDOWN_LIBDOOR"] = request.getfixturevalue("door_model")
    yield


# -- nothing left behind ------------------------------------------------------------------
#
# Every process the suite starts carries DOORDOWN_TEST_RUN in its environment and its
# temporary files (doors, sockets, spooled bodies) under a directory of the run's own.
# A process the harness SIGKILLs cannot clean up after itself, so the harness does it;
# a process that ended by itself must have cleaned up: at the end of the session, any
# process still carrying the mark or any file left in the run's directory fails the run.

RUN_MARK = "doordown-test-run-%d-%d" % (os.getpid(), time.time_ns())
tempfile.gettempdir()  # pytest's own directories stay where they are
RUN_TMP = tempfile.mkdtemp(prefix="doordown-suite-")
os.chmod(RUN_TMP, 0o711)  # apps run as another user pass through to their doors
os.environ["DOORDOWN_TEST_RUN"] = RUN_MARK
os.environ["TMPDIR"] = RUN_TMP  # for every process the tests start
atexit.register(shutil.rmtree, RUN_TMP, True)  # also when no test ran, so no fixture did


def _marked_processes(mark):
    """Pids of live processes (not this one) whose environment holds `mark`."""
    needle, found = mark.encode(), []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                with open("/proc/%s/environ" % entry, "rb") as f:
                    if needle in f.read() and _pid_alive(int(entry)):
                        found.append(int(entry))
            except OSError:
                pass
    return found


@pytest.fixture(scope="session", autouse=True)
def nothing_left_behind():
    yield
    stray = _marked_processes("DOORDOWN_TEST_RUN=" + RUN_MARK)
    for pid in stray:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    left = []
    for folder, folders, files in os.walk(RUN_TMP):
        left += [os.path.join(folder, name) for name in files]
        left += [os.path.join(folder, name) for name in folders if name.startswith("doordown-")]
    shutil.rmtree(RUN_TMP, ignore_errors=True)
    assert not stray and not left, "the suite left behind processes %s and files %s" % (stray, left)


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is as good as gone
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


class Process:
    """A doordown process started for a test; its stderr is collected line by line."""

    def __init__(self, *args, cwd=SUPPORT, env=None, ready=r"serving .* at http://[^ ]+:(\d+)/",
                 pass_fds=(), python=sys.executable, script=True, tmp_mode=0o711):
        """`args` for doordown.py (for the interpreter itself with script=False); `tmp_mode`
        the mode of its TMPDIR (0o1777, as /tmp, for a serve --user to write in it)."""
        self.lines = []
        self.changed = threading.Condition()
        # Its own temporary directory and mark: what it leaves when killed can be found.
        self.tmp = tempfile.mkdtemp(dir=RUN_TMP)
        os.chmod(self.tmp, tmp_mode)
        self.mark = "DOORDOWN_TEST_PROCESS=%s" % self.tmp
        env = dict(env or os.environ, TMPDIR=self.tmp, DOORDOWN_TEST_PROCESS=self.tmp)
        self.proc = subprocess.Popen([python, DOORDOWN, *args] if script else [python, *args], cwd=cwd,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env, pass_fds=pass_fds)
        threading.Thread(target=self._collect, daemon=True).start()
        self.port = None
        self.app_pids = set()
        if ready:
            match = self.wait_for(ready)
            self.port = int(match.group(1)) if match.re.groups else None

    def _collect(self):
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace")
            with self.changed:
                self.lines.append(line)
                found = re.search(r"\[doordown app (\d+)\]", line)
                if found:
                    self.app_pids.add(int(found.group(1)))
                self.changed.notify_all()

    @property
    def log(self):
        with self.changed:
            return "".join(self.lines)

    def wait_for(self, pattern, timeout=20):
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                match = re.search(pattern, "".join(self.lines))
                if match:
                    return match
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self.changed.wait(0.2)):
                    raise AssertionError("no %r in the log:\n%s" % (pattern, "".join(self.lines)))
                self.changed.wait(min(left, 0.2))

    def app_pid(self):
        return int(self.wait_for(r"app pid (\d+)").group(1))

    def door_path(self):
        return self.wait_for(r"on door (\S+) \(").group(1)

    def stats(self):
        return doordown.app_stats(self.door_path(), DOORS)

    def connect(self, timeout=10):
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def get(self, path="/", method="GET", body=None, headers=None):
        conn = self.connect()
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            conn.close()

    def raw(self, data, timeout=5):
        """Send raw bytes; return everything the server sends until it closes."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as sock:
            sock.sendall(data)
            chunks = []
            while True:
                try:
                    chunk = sock.recv(65536)
                except socket.timeout:
                    chunks.append(b"<timeout>")
                    break
                if not chunk:
                    break
                chunks.append(chunk)
            return b"".join(chunks)

    def kill(self):
        """SIGKILL it and all it started, and clean up for them; what a process that ended
        by itself left is its own fault, and left for the session's check."""
        killed = self.proc.poll() is None
        if killed:
            self.proc.kill()
        self.proc.wait(10)
        children = set(self.app_pids) | set(_marked_processes(self.mark))
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
                killed = True
            except ProcessLookupError:
                pass
        if killed:
            # Gone for sure before their files go, and before the session's check: that
            # includes a child the log has not named yet (one being started as its front died).
            for pid in children:
                deadline = time.monotonic() + 5
                while _pid_alive(pid) and time.monotonic() < deadline:
                    time.sleep(0.01)
            shutil.rmtree(self.tmp, ignore_errors=True)
        else:
            try:
                os.rmdir(self.tmp)
            except OSError:
                pass


@pytest.fixture
def started():
    """Start doordown processes with started(*args); all are killed at the end of the test."""
    processes = []

    def start(*args, **kwargs):
        process = Process(*args, **kwargs)
        processes.append(process)
        return process

    yield start
    for process in processes:
        process.kill()


def serve(started, *args, **kwargs):
    return started("serve", "--bind", "127.0.0.1:0", "--doors", DOORS, "--access-log", "off",
                   *args, **kwargs)


@pytest.fixture(scope="module")
def echo_server():
    process = Process("serve", "apps:echo", "--bind", "127.0.0.1:0", "--doors", DOORS,
                      "--access-log", "off", "--max-body", "8M")
    yield process
    process.kill()


def status_of(raw_response):
    match = re.match(rb"HTTP/1\.1 (\d{3}) ", raw_response)
    return int(match.group(1)) if match else None


# -- the two README commands' promise ------------------------------------------------------

def test_hello_end_to_end(started):
    server = serve(started)
    status, headers, body = server.get("/")
    assert (status, body) == (200, b"Well, hello to you too!\n")
    assert headers["Content-Type"] == "text/plain" and headers["Content-Length"] == "24"
    assert headers["Server"] == "doordown" and headers["Date"].endswith(" GMT")
    assert server.app_pid() not in (server.proc.pid, os.getpid())
    assert server.stats()["pid"] == server.app_pid()
    assert re.search(r"through (native illumos|emulated) doors", server.log).group(1).startswith(DOORS[:6])


def test_default_bind_and_access_log(started, tmp_path):
    log = tmp_path / "access.log"
    server = started("serve", "--bind", "127.0.0.1:0", "--doors", DOORS, "--access-log", str(log))
    server.get("/a?b=c", headers={"User-Agent": "pytest-ua", "Referer": "http://r/"})
    deadline = time.monotonic() + 5
    while not log.read_text().endswith("\n") and time.monotonic() < deadline:
        time.sleep(0.01)  # the line is written just after the response is sent
    line = log.read_text()
    assert re.fullmatch(r'127\.0\.0\.1 - - \[\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d [+-]\d{4}\] '
                        r'"GET /a\?b=c HTTP/1\.1" 200 24 "http://r/" "pytest-ua"\n', line), line


def _read(path):
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def test_ci_runs_the_readme_test_command_verbatim():
    readme = _read(os.path.join(HERE, "README.md"))
    commands = re.search(r"```sh\n(.*?)```", readme, re.S).group(1).splitlines()
    assert commands[1].startswith("python3 -m venv .venv && ")  # PEP 668: no pip outside a venv
    assert commands[1] in _read(os.path.join(HERE, ".ci", "run")).splitlines()


# -- WSGI ------------------------------------------------------------------------------

def test_wsgi_validator_clean(started):
    server = serve(started, "apps:validated")
    for method, path, body in (("GET", "/x?q=1", None), ("POST", "/p", b"abc"), ("HEAD", "/h", None)):
        status, headers, got = server.get(path, method, body)
        assert status == 200, server.log
        if method == "HEAD":
            assert got == b"" and int(headers["Content-Length"]) > 0
        else:
            assert json.loads(got)["method"] == method
    status, headers, got = server.get("/stream")
    assert (status, got, headers.get("Transfer-Encoding")) == (200, b"one two three", "chunked")
    status, headers, got = server.get("/write")
    assert (status, got) == (200, b"hello world")
    assert "Traceback" not in server.log and "Warning" not in server.log


def test_environ(echo_server):
    status, _, body = echo_server.get("/a%20b/%C3%A9?x=1&y=%20", "POST", b"payload",
                                      {"Content-Type": "text/x-test", "X-Custom": "v1"})
    env = json.loads(body)
    assert status == 200
    assert env["PATH_INFO"] == "/a b/\xc3\xa9"  # latin-1 of the raw bytes, as PEP 3333 says
    assert env["QUERY_STRING"] == "x=1&y=%20"
    assert env["SCRIPT_NAME"] == "" and env["REQUEST_METHOD"] == "POST"
    assert env["CONTENT_TYPE"] == "text/x-test" and env["CONTENT_LENGTH"] == "7"
    assert env["HTTP_X_CUSTOM"] == "v1" and "HTTP_CONTENT_TYPE" not in env
    assert env["SERVER_PROTOCOL"] == "HTTP/1.1" and env["wsgi.url_scheme"] == "http"
    assert env["REMOTE_ADDR"] == "127.0.0.1" and env["REMOTE_PORT"].isdigit()
    assert env["SERVER_NAME"] == "127.0.0.1" and env["SERVER_PORT"] == str(echo_server.port)
    assert env["multithread"] is True and env["version"] == [1, 0]
    assert env["body_head"] == "payload" and env["pid"] != echo_server.proc.pid


def test_underscore_header_never_aliases_dash(echo_server):
    reply = echo_server.raw(b"GET / HTTP/1.1\r\nHost: x\r\nX-Auth: good\r\nX_Auth: evil\r\n"
                            b"Connection: close\r\n\r\n")
    env = json.loads(reply.split(b"\r\n\r\n", 1)[1])
    assert env["HTTP_X_AUTH"] == "good"


def test_flask_app_unchanged(started):
    pytest.importorskip("flask", reason="Flask is a test dependency: pip install flask")
    server = serve(started, "flask_app:app")
    assert server.get("/")[::2] == (200, b"Hello from Flask")
    status, _, body = server.get("/items/7?x=y", "POST", json.dumps({"k": [1, 2]}),
                                 {"Content-Type": "application/json"})
    assert status == 200
    data = json.loads(body)
    assert (data["item"], data["method"], data["payload"], data["args"]) == (7, "POST", {"k": [1, 2]}, {"x": "y"})
    assert server.get("/boom")[0] == 500
    assert server.get("/missing")[0] == 404
    assert "flask view failed" in server.log


def test_django_app_unchanged(started):
    pytest.importorskip("django", reason="Django is a test dependency: pip install django")
    server = serve(started, "django_app")
    status, _, body = server.get("/some/path?a=1", "POST", b"form-data")
    assert status == 200, server.log
    assert json.loads(body) == {"path": "/some/path", "method": "POST", "query": {"a": "1"},
                                "body": "form-data"}


def _collectstatic(root):
    """Django's collectstatic for support/django_app.py (the admin's files) into `root`."""
    subprocess.run([sys.executable, "-c", "import django_app, django.core.management as m; "
                    "m.call_command('collectstatic', interactive=False, verbosity=0)"],
                   cwd=SUPPORT, env=dict(os.environ, DOORDOWN_STATIC_ROOT=str(root)), check=True,
                   timeout=60)


def test_static_map_serves_django_admin_css_with_validators_ranges_and_no_escape(started, tmp_path):
    django = pytest.importorskip("django", reason="Django is a test dependency: pip install django")
    root = tmp_path / "static"
    _collectstatic(root)
    (tmp_path / "secret.txt").write_bytes(b"outside the root")
    (root / "out").symlink_to(tmp_path / "secret.txt")
    (root / "in.css").symlink_to(root / "admin" / "css" / "base.css")
    (root / "site").mkdir()
    (root / "site" / "index.html").write_bytes(b"<p>index</p>")
    server = serve(started, "django_app", "--static-map", "/static=%s" % root,
                   "--static-index", "index.html")
    with open(os.path.join(os.path.dirname(django.__file__), "contrib", "admin", "static", "admin",
                           "css", "base.css"), "rb") as f:
        css = f.read()
    status, headers, body = server.get("/static/admin/css/base.css")
    assert (status, body, headers["Content-Type"]) == (200, css, "text/css; charset=utf-8")
    assert int(headers["Content-Length"]) == len(css) and headers["Accept-Ranges"] == "bytes"
    etag, modified = headers["ETag"], headers["Last-Modified"]
    status, head_headers, body = server.get("/static/admin/css/base.css", "HEAD")
    assert (status, body, head_headers["ETag"], head_headers["Content-Length"]) == (200, b"", etag, str(len(css)))
    for validators in ({"If-None-Match": etag}, {"If-None-Match": 'W/%s, "other"' % etag},
                       {"If-Modified-Since": modified}):
        status, headers, body = server.get("/static/admin/css/base.css", headers=validators)
        assert (status, body, headers["ETag"]) == (304, b"", etag), validators
    for validators in ({"If-None-Match": '"other"', "If-Modified-Since": modified},
                       {"If-Modified-Since": "Sun, 06 Nov 1994 08:49:37 GMT"}):
        assert server.get("/static/admin/css/base.css", headers=validators)[::2] == (200, css)
    status, headers, body = server.get("/static/admin/css/base.css", headers={"Range": "bytes=10-19"})
    assert (status, body, headers["Content-Range"]) == (206, css[10:20], "bytes 10-19/%d" % len(css))
    status, headers, body = server.get("/static/in.css", headers={"Range": "bytes=-7"})
    assert (status, body, headers["Content-Range"]) == (206, css[-7:], "bytes %d-%d/%d"
                                                         % (len(css) - 7, len(css) - 1, len(css)))
    status, headers, _ = server.get("/static/admin/css/base.css", headers={"Range": "bytes=%d-" % len(css)})
    assert (status, headers["Content-Range"]) == (416, "bytes */%d" % len(css))
    for ignored in ({"Range": "bytes=0-1,5-6"}, {"Range": "bytes=5-1"}, {"Range": "lines=1-2"},
                    {"Range": "bytes=0-1", "If-Range": '"stale"'}):
        assert server.get("/static/admin/css/base.css", headers=ignored)[::2] == (200, css), ignored
    assert server.get("/static/admin/css/base.css", headers={"Range": "bytes=0-1", "If-Range": etag})[0] == 206
    for path in (b"/static/../doordown.py", b"/static/%2e%2e/%2e%2e/etc/passwd", b"/static/admin%2fcss%2fbase.css",
                 b"/static/admin/css/base.css%00", b"/static/admin\\css\\base.css", b"/static/out",
                 b"/static/./admin/css/base.css", b"/static/admin/", b"/static/admin", b"/static/nope.css"):
        reply = server.raw(b"GET %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % path)
        assert status_of(reply) == 404 and b"outside the root" not in reply and b"DJANGO" not in reply, path
    reply = server.raw(b"GET /static/site?a=1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status_of(reply) == 301 and b"\r\nLocation: /static/site/?a=1\r\n" in reply
    assert server.get("/static/site/")[::2] == (200, b"<p>index</p>")
    status, headers, _ = server.get("/static/admin/css/base.css", "POST", b"x")
    assert (status, headers["Allow"]) == (405, "GET, HEAD")
    pipelined = server.raw(b"GET /static/in.css HTTP/1.1\r\nHost: x\r\n\r\n"
                           b"GET /app HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert pipelined.count(b"HTTP/1.1 200 OK") == 2 and css in pipelined and b'"path": "/app"' in pipelined


def test_iterable_close_always_called(started):
    server = serve(started, "apps:closing")
    assert server.get("/")[::2] == (200, b"closed later")
    # Failing after its first chunk: the response has started, so the client sees the body
    # break off (no last chunk, then the close) instead of a 500.
    reply = server.raw(b"GET /fail HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status_of(reply) == 200 and reply.endswith(b"\r\n\r\n7\r\npartial\r\n"), reply
    assert json.loads(server.get("/count")[2])["closed"] == 2
    server.wait_for(r"ValueError: failed mid-body")


def test_invalid_response_headers_become_500(started):
    server = serve(started, "apps:bad_headers")
    reply = server.raw(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status_of(reply) == 500 and b"injected" not in reply


# -- bodies and framing ------------------------------------------------------------------

def test_content_length_and_chunked_bodies(echo_server):
    payload = os.urandom(100000)
    env = json.loads(echo_server.get("/", "POST", payload)[2])
    assert env["body_sha256"] == hashlib.sha256(payload).hexdigest()
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in (b"hello ", b"chunked ", b"world"))
    reply = echo_server.raw(b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                            b"Connection: close\r\n\r\n" + chunked + b"0\r\nX-Trailer: t\r\n\r\n")
    env = json.loads(reply.split(b"\r\n\r\n", 1)[1])
    assert env["body_head"] == "hello chunked world" and env["CONTENT_LENGTH"] == "19"


def test_large_bodies_travel_by_descriptor(echo_server, started):
    payload = os.urandom(3 << 20)  # over the inline limit: spooled, passed as a descriptor
    status, _, body = echo_server.get("/", "POST", payload)
    assert status == 200 and json.loads(body)["body_sha256"] == hashlib.sha256(payload).hexdigest()
    server = serve(started, "apps:big")
    status, headers, body = server.get("/?n=%d" % (5 << 20))
    assert status == 200 and len(body) == 5 << 20 and headers["Content-Length"] == str(5 << 20)
    assert body == (b"0123456789abcdef" * (len(body) // 16 + 1))[:len(body)]


def test_expect_100_continue(echo_server):
    with socket.create_connection(("127.0.0.1", echo_server.port), timeout=5) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        assert sock.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(b"hello")
        reply = sock.recv(65536)
        assert status_of(reply) == 200 and b'"body_head": "hello"' in reply


def test_keep_alive_reuses_connection(echo_server):
    conn = echo_server.connect()
    ports = set()
    for i in range(20):
        conn.request("GET", "/%d" % i)
        response = conn.getresponse()
        ports.add(json.loads(response.read())["REMOTE_PORT"])
    conn.close()
    assert len(ports) == 1


def test_pipelined_requests(echo_server):
    reply = echo_server.raw(b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\nGET /2 HTTP/1.1\r\nHost: x\r\n"
                            b"Connection: close\r\n\r\n")
    assert reply.count(b"HTTP/1.1 200 OK") == 2 and b'"PATH_INFO": "/2"' in reply


def test_http10_framing(started):
    server = serve(started, "apps:validated")
    reply = server.raw(b"GET /stream HTTP/1.0\r\n\r\n")  # no length, 1.0: the close frames it
    head, body = reply.split(b"\r\n\r\n", 1)
    assert b"Connection: close" in head and b"chunked" not in head and body == b"one two three"
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(b"GET /write HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        first = sock.recv(65536)
        assert b"Connection: keep-alive" in first and first.endswith(b"hello world")


# -- door semantics through the whole stack -------------------------------------------------

def test_concurrent_slow_requests_get_threads_on_demand(started):
    server = serve(started, "apps:slow")
    begin = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        results = list(pool.map(lambda _: server.get("/?s=0.5"), range(64)))
    elapsed = time.monotonic() - begin
    assert all(status == 200 for status, _, _ in results)
    assert elapsed < 3.0, "64 requests of 0.5 s took %.1fs: calls were serialised" % elapsed
    threads = {json.loads(body)["thread"] for _, _, body in results}
    assert len(threads) >= 32 and server.stats()["threads"] >= 32


def test_sequential_requests_reuse_one_thread_and_its_locals(started):
    server = serve(started, "apps:counter")
    conn = server.connect()
    seen = []
    for _ in range(1000):
        conn.request("GET", "/")
        seen.append(json.loads(conn.getresponse().read()))
    conn.close()
    # The requests' hot thread, the one of the supervisor's health checks, this stats call's.
    assert server.stats()["threads"] <= 3
    by_thread = {}
    for item in seen:
        by_thread.setdefault(item["thread"], []).append(item["count"])
    counts = max(by_thread.values(), key=len)
    # Most on the hot thread: a health check (one a second) that takes it sends the request
    # arriving meanwhile to another, which then leads for a while; on a slow machine, more of
    # them fall within the run (899 of 1000 were seen on the hot thread once).
    assert counts == list(range(counts[0], counts[0] + len(counts))) and len(counts) > 700


def test_front_for_separately_started_app(started, tmp_path):
    door = str(tmp_path / "app.door")
    app = started("app", "apps:counter", "--door", door, "--doors", DOORS, ready=r"serving apps:counter")
    front = serve(started, "--app-door", door)
    status, _, body = front.get("/")
    assert status == 200 and json.loads(body)["pid"] == app.proc.pid
    app.proc.send_signal(signal.SIGTERM)
    assert app.proc.wait(10) == 0 and not os.path.exists(door)
    assert front.get("/")[0] == 502


# -- command line ---------------------------------------------------------------------------

@pytest.mark.parametrize("args,says", [
    (["serve", "--bind", "nonsense:port"], "expected HOST:PORT"), (["serve", "--timeout", "-1"], ""),
    (["serve", "--doors", "magic"], ""), (["serve", "not a spec"], ""), (["bogus"], ""), ([], ""),
    (["app"], ""), (["serve", "--max-body", "lots"], ""),
    (["serve", "--bind", "[::1]8000"], "expected HOST:PORT, [IPv6]:PORT"),
    (["serve", "--bind", "::1:8000"], "in brackets: [::1]:8000"),
    (["serve", "--bind", "[nonsense]:80"], "not an IPv6 address"),
    (["serve", "--bind", "127.0.0.1:65536"], "out of range"),
    (["serve", "--bind", "unix:"], "unix: needs a path"), (["serve", "--bind", "fd://x"], "fd://N"),
    (["serve", "--frobnicate", "x.pid"], "unknown option --frobnicate"),
    (["serve", "apps:echo", "--frob=1"], "unknown option --frob"),
    (["serve", "headers.py"], "name the module without .py, as in 'headers'"),
    (["serve", "./site/wsgi.py:app"], "as in 'site.wsgi:app'"),
    (["serve", "-w", "4"], "no worker count to set"), (["serve", "--workers=4"], "no worker count"),
    (["serve", "-w4"], "no worker count"),
    (["serve", "--threads", "8"], "no thread count to set"), (["serve", "-k", "gevent"], "one model"),
    (["serve", "--worker-class", "gthread"], "one model"), (["serve", "--daemon"], "doordown systemd"),
    (["serve", "apps:create(os.system('x'))"], "must be literals"),
    (["serve", "--access-logformat", "%(h)s %(nope)s"], "unknown atom %(nope)s"),
    (["serve", "--access-logformat", "%({nope}e)s"], "no such variable"),
    (["serve", "--env", "NOEQUALS"], "expected NAME=VALUE"),
    (["serve", "--unix-socket-perms", "9"], "octal mode"),
    (["serve", "--keyfile", "key.pem"], "need --certfile"),
    (["serve", "--certfile", "/nonexistent/cert.pem"], "TLS: cannot load /nonexistent/cert.pem"),
    (["serve", "--user", "no-such-user-here"], "no such user"),
    (["serve", "-b", "127.0.0.1:0", "--smart-spawn"], "--smart-spawn needs --config"),
    (["serve", "--chdir", "/nonexistent/dir"], "--chdir /nonexistent/dir"),
    (["systemd", "--service", "bad name"], "--service"), (["smf", "--bogus"], "unknown option --bogus"),
    (["systemd", "--smart-spawn"], "--smart-spawn needs --config"),  # a unit that could not start
    (["smf", "--control", "/run/x.door"], "--control needs --config"),
    (["systemd", "--app-door", "/run/x.door", "--transport", "cgi"], "--app-door needs --transport"),
    (["serve", "-b", "127.0.0.1:0", "--min-body-rate", "0"], "--min-body-rate"),
    (["serve", "-b", "127.0.0.1:0", "--keep-alive", "nan"], "positive"),
    (["serve", "-b", "127.0.0.1:0", "--timeout", "inf"], "positive"),
    (["serve", "-b", "127.0.0.1:0", "--header-timeout", "NaN"], "positive"),
    (["serve", "-b", "127.0.0.1:0", "--max-requests", "5", "--max-requests-jitter", "-1"], "jitter"),
    (["serve", "-b", "127.0.0.1:0", "--max-requests", "-5"], "max-requests"),
    (["serve", "-b", "127.0.0.1:0", "--max-headers", "1500"], "at most 1024"),
    (["serve", "-b", "127.0.0.1:0", "--max-header-size", "2M"], "--max-header-size: at most"),
    (["serve", "-b", "127.0.0.1:0", "--static-map", "/s=/nonexistent/dir"], "is not a directory"),
])
def test_bad_command_line_exits_2_with_one_line(args, says):
    result = subprocess.run([sys.executable, DOORDOWN, *args], capture_output=True, timeout=20)
    assert result.returncode == 2
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("doordown") and says in lines[0], lines


def test_largest_max_header_size_allowed_fits_a_door_call(started):
    # The most --max-header-size allows, filled by the most header fields: still one door call.
    most = doordown.MAX_HEADER_SIZE_MOST
    server = serve(started, "apps:echo", "--max-header-size", str(most), "--max-headers", "1024",
                   "--max-line", str(most))
    start = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
    count = 1024 - 2
    value = b"v" * ((most - len(start) - 2) // count - len(b"X-0000:\r\n"))
    head = start + b"".join(b"X-%04d:%s\r\n" % (i, value) for i in range(count)) + b"\r\n"
    assert most - 20000 < len(head) <= most
    assert status_of(server.raw(head, timeout=20)) == 200


@pytest.mark.parametrize("command", ["serve", "app", "cgi", "bench", "check", "smf", "systemd"])
def test_version_on_every_subcommand(command):
    result = subprocess.run([sys.executable, DOORDOWN, command, "--version"], capture_output=True, timeout=20)
    assert (result.returncode, result.stdout.decode()) == (0, doordown.SERVER_SOFTWARE + "\n")


def test_port_in_use_fails_before_the_app_is_imported(tmp_path):
    (tmp_path / "marked.py").write_text("open('imported', 'w').close()\n"
                                        "from apps import echo as application\n")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, DOORDOWN, "serve", "marked", "--doors", DOORS,
                                 "--bind", "127.0.0.1:0", "--bind", "127.0.0.1:%d" % port],
                                cwd=str(tmp_path), capture_output=True, timeout=20,
                                env=dict(os.environ, PYTHONPATH=SUPPORT))
    lines = result.stderr.decode().strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, lines
    assert "cannot listen on 127.0.0.1:%d: Address already in use" % port in lines[0]
    assert not (tmp_path / "imported").exists()


@pytest.mark.parametrize("spec,message", [("no_such_module", "no module named 'no_such_module'"),
                                          ("apps:no_such_app", "has no attribute 'no_such_app'")])
def test_app_that_cannot_load_stops_serve(spec, message):
    result = subprocess.run([sys.executable, DOORDOWN, "serve", spec, "--bind", "127.0.0.1:0",
                             "--doors", DOORS], cwd=SUPPORT, capture_output=True, timeout=30)
    assert result.returncode == doordown.EXIT_APP_LOAD
    assert message in result.stderr.decode()


def test_import_error_inside_app_shows_traceback(tmp_path):
    (tmp_path / "broken.py").write_text("import json\nraise ImportError('missing dependency xyz')\n")
    result = subprocess.run([sys.executable, DOORDOWN, "serve", "broken", "--bind", "127.0.0.1:0",
                             "--doors", DOORS], cwd=str(tmp_path), capture_output=True, timeout=30)
    assert result.returncode == doordown.EXIT_APP_LOAD
    assert "Traceback" in result.stderr.decode() and "missing dependency xyz" in result.stderr.decode()


def test_app_that_dies_before_its_door_is_ready_stops_serve_saying_so(tmp_path):
    (tmp_path / "dies.py").write_text("import os\nos._exit(3)\n")
    result = subprocess.run([sys.executable, DOORDOWN, "serve", "dies", "--bind", "127.0.0.1:0",
                             "--doors", DOORS], cwd=str(tmp_path), capture_output=True, timeout=30)
    lines = result.stderr.decode().strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, lines
    assert "the app exited before its door was ready (exit code 3)" in lines[0], lines


# -- the operator's front: binds, TLS, signals, access log, options, service files --------------

def _wait_for_lines(path, count, timeout=10):
    """The lines of `path` once it has `count` (the access log is written within a second)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = path.read_text().splitlines() if path.exists() else []
        if len(lines) >= count or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


def _pids_alive(server):
    return _pid_alive(server.proc.pid) and all(_pid_alive(pid) for pid in [server.app_pid()])


def test_usr1_reopens_the_access_log_other_signals_do_not_kill(started, tmp_path):
    log = tmp_path / "access.log"
    server = started("serve", "--bind", "127.0.0.1:0", "--doors", DOORS, "--access-log", str(log))
    assert server.get("/first")[0] == 200
    assert len(_wait_for_lines(log, 1)) == 1
    os.rename(str(log), str(tmp_path / "access.log.1"))  # what logrotate does
    os.kill(server.proc.pid, signal.SIGUSR1)
    for signum in (signal.SIGUSR2, signal.SIGTTIN, signal.SIGTTOU, signal.SIGWINCH):
        os.kill(server.proc.pid, signum)
    server.wait_for("SIGTTOU ignored")
    assert server.get("/second")[0] == 200
    assert [line.split('"')[1] for line in _wait_for_lines(log, 1)] == ["GET /second HTTP/1.1"]
    assert "GET /first " in (tmp_path / "access.log.1").read_text()
    assert server.proc.poll() is None and _pids_alive(server)
    door_dir = os.path.dirname(server.door_path())
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(30) == 0 and not os.path.exists(door_dir)


def test_access_log_atoms_and_no_line_lost_at_stop(started, tmp_path):
    log = tmp_path / "access.log"
    atoms = ("h l u t r m U q H s B b f a T M D L p {x-test}i {content-type}o {wsgi.url_scheme}e "
             "{query_string}e").split()
    server = started("serve", "apps:echo", "--bind", "127.0.0.1:0", "--doors", DOORS, "--access-log",
                     str(log), "--access-logformat", "|".join("%%(%s)s" % atom for atom in atoms) + "|%%")
    headers = {"X-Test": 'say "hi"\\ \xe9', "Referer": "http://r/", "User-Agent": "ua/1",
               "Authorization": "Basic YWxpY2U6c2VjcmV0"}  # alice:secret
    status, reply_headers, body = server.get("/p/a?x=1&y=2", headers=headers)
    assert status == 200
    assert server.get("/empty", headers={"Referer": "", "User-Agent": "", "X-Test": ""})[0] == 200
    for _ in range(198):
        assert server.get("/more")[0] == 200
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(30) == 0
    lines = log.read_text().splitlines()
    assert len(lines) == 200  # all of them, though the last were still in the buffer at SIGTERM
    # A line is written once its response is sent, so the next request's may come first.
    by_line = {fields["r"]: fields for fields in (dict(zip(atoms + ["%"], line.split("|"))) for line in lines)}
    fields = by_line["GET /p/a?x=1&y=2 HTTP/1.1"]
    assert fields["t"][0] == "[" and re.fullmatch(r"\[\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d [+-]\d{4}\]", fields["t"])
    assert float(fields["L"]) < 10 and int(fields["D"]) >= int(fields["M"]) * 1000 >= int(fields["T"]) * 10 ** 6
    del fields["t"], fields["T"], fields["M"], fields["D"], fields["L"]
    assert fields == {"h": "127.0.0.1", "l": "-", "u": "alice", "r": "GET /p/a?x=1&y=2 HTTP/1.1",
                      "m": "GET", "U": "/p/a", "q": "x=1&y=2", "H": "HTTP/1.1", "s": "200",
                      "B": str(len(body)), "b": str(len(body)), "f": "http://r/", "a": "ua/1",
                      "p": "<%d>" % server.proc.pid, "{x-test}i": 'say \\"hi\\"\\\\ \\xe9',
                      "{content-type}o": "application/json", "{wsgi.url_scheme}e": "http",
                      "{query_string}e": "x=1&y=2", "%": "%"}
    # As gunicorn: an empty query string, or a header sent empty, logs as empty; what is
    # absent logs as "-".
    fields = by_line["GET /empty HTTP/1.1"]
    assert [fields[atom] for atom in ("u", "f", "a", "{x-test}i")] == ["-", "", "", ""]
    fields = by_line["GET /more HTTP/1.1"]
    assert (fields["r"], fields["q"], fields["{query_string}e"]) == ("GET /more HTTP/1.1", "", "")
    assert [fields[atom] for atom in ("u", "f", "a", "{x-test}i")] == ["-"] * 4


def test_access_log_says_what_the_front_refused(started, tmp_path):
    log = tmp_path / "access.log"
    server = started("serve", "--bind", "127.0.0.1:0", "--doors", DOORS, "--access-log", str(log),
                     "--max-body", "1K", "--header-timeout", "1")
    refused = [(b"POST /big HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n", 413),
               (b"GET /bad HTTP/1.1\r\nHost: x\r\nBad Header: 1\r\n\r\n", 400),
               (b"GET /slow HTTP/1.1\r\nHost: x\r\n", 408),
               (b"GET /new HTTP/2.1\r\nHost: x\r\n\r\n", 505)]
    for raw, status in refused:
        assert status_of(server.raw(raw)) == status
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
    assert server.raw(preface) == doordown._H2_GOAWAY  # SETTINGS, then GOAWAY(HTTP_1_1_REQUIRED)
    lines = _wait_for_lines(log, 5)
    logged = [re.search(r'"([^"]*)" (\d{3}) (\S+)', line).groups() for line in lines]
    assert [(request, int(status)) for request, status, _ in logged] == [
        ("POST /big HTTP/1.1", 413), ("GET /bad HTTP/1.1", 400), ("GET /slow HTTP/1.1", 408),
        ("GET /new HTTP/2.1", 505), ("PRI * HTTP/2.0", 505)]
    assert all(int(sent) > 0 for _, _, sent in logged[:4]) and logged[4][2] == str(len(doordown._H2_GOAWAY))


def test_several_binds_unix_socket_and_ipv6(started, tmp_path):
    path = str(tmp_path / "front.sock")
    binds = ["--bind", "127.0.0.1:0", "--bind", "unix:" + path]
    ipv6 = socket.has_ipv6 and _can_bind(socket.AF_INET6, "::1")
    if ipv6:
        binds += ["--bind", "[::1]:0"]
    server = started("serve", "apps:echo", "--doors", DOORS, "--access-log", "off",
                     "--unix-socket-perms", "660", *binds)
    urls = server.wait_for(r"at (.*) through").group(1).split(" and ")
    assert urls[1] == "http (unix:%s)" % path and len(urls) == len(binds) // 2
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
    environ = json.loads(server.get("/tcp")[2])
    assert (environ["REMOTE_ADDR"], environ["SERVER_PORT"]) == ("127.0.0.1", str(server.port))
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(path)
        sock.sendall(b"GET /unix HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 10.1.2.3\r\nConnection: close\r\n\r\n")
        reply = b"".join(iter(lambda: sock.recv(65536), b""))
    environ = json.loads(reply.partition(b"\r\n\r\n")[2])
    assert environ["PATH_INFO"] == "/unix" and environ["REMOTE_ADDR"] == "10.1.2.3"  # a local proxy
    if ipv6:
        port = int(re.search(r"\[::1\]:(\d+)", urls[2]).group(1))
        conn = http.client.HTTPConnection("::1", port, timeout=10)
        conn.request("GET", "/v6")
        assert json.loads(conn.getresponse().read())["REMOTE_ADDR"] == "::1"
        conn.close()
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(30) == 0 and not os.path.exists(path)  # the socket file goes with it


def _can_bind(family, host):
    try:
        with socket.socket(family) as sock:
            sock.bind((host, 0))
        return True
    except OSError:
        return False


def test_a_stale_unix_socket_is_replaced_a_live_one_is_not(started, tmp_path):
    path = str(tmp_path / "front.sock")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()  # the file stays: a server that died
    server = started("serve", "--doors", DOORS, "--access-log", "off", "--bind", "unix:" + path,
                     ready=r"serving .* at http \(unix:")
    result = subprocess.run([sys.executable, DOORDOWN, "serve", "--bind", "unix:" + path, "--doors", DOORS],
                            capture_output=True, timeout=20)
    assert result.returncode == 1 and b"another server is listening there" in result.stderr
    assert server.proc.poll() is None


def test_inherited_sockets_fd_and_systemd_listen_fds(started):
    with socket.socket() as inherited, socket.socket() as activated:
        for sock in (inherited, activated):
            sock.bind(("127.0.0.1", 0))
            sock.listen()
            sock.set_inheritable(True)
        server = started("serve", "--doors", DOORS, "--access-log", "off",
                         "--bind", "fd://%d" % inherited.fileno(), pass_fds=(inherited.fileno(),))
        assert server.port == inherited.getsockname()[1] and server.get("/")[0] == 200
        # systemd: the sockets are descriptors 3.. and LISTEN_PID is the server's own pid
        launcher = ("import os, sys; os.dup2(%d, 3); os.environ.update(LISTEN_PID=str(os.getpid()), "
                    "LISTEN_FDS='1'); os.execv(sys.executable, [sys.executable] + sys.argv[1:])"
                    % activated.fileno())
        server = started("-c", launcher, DOORDOWN, "serve", "--doors", DOORS, "--access-log", "off",
                         pass_fds=(activated.fileno(),), script=False)
        assert server.port == activated.getsockname()[1] and server.get("/")[0] == 200
        app_environ = _read("/proc/%d/environ" % server.app_pid()).split("\0")
        assert not [item for item in app_environ if item.startswith("LISTEN_")]


def _certificate(directory, name):
    """A self-signed certificate for localhost and 127.0.0.1 (also usable as its own CA)."""
    cert, key = str(directory / (name + ".pem")), str(directory / (name + ".key"))
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=" + name, "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                    "-keyout", key, "-out", cert], check=True, capture_output=True, timeout=60)
    return cert, key


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl (to make a test certificate) is not installed")
def test_tls_https_handshake_timeout_and_reload_on_sighup(started, tmp_path):
    import ssl
    cert, key = _certificate(tmp_path, "first")
    server = started("serve", "apps:echo", "--bind", "127.0.0.1:0", "--doors", DOORS, "--access-log", "off",
                     "--certfile", cert, "--keyfile", key, "--header-timeout", "1",
                     ready=r"serving .* at https://[^ ]+:(\d+)/")

    def get(path, context):
        conn = http.client.HTTPSConnection("127.0.0.1", server.port, context=context, timeout=10)
        try:
            conn.request("GET", path)
            reply = conn.getresponse()
            return reply.status, reply.read(), conn.sock.version(), conn.sock.getpeercert(binary_form=True)
        finally:
            conn.close()
    trusting = ssl.create_default_context(cafile=cert)
    status, body, version, peer = get("/secure", trusting)
    assert status == 200 and json.loads(body)["wsgi.url_scheme"] == "https"
    assert version in ("TLSv1.2", "TLSv1.3")
    sent = server.get  # a plain-HTTP client on the TLS port gets no HTTP answer
    with pytest.raises((http.client.HTTPException, OSError)):
        sent("/plain")
    # A client that trickles its handshake is dropped after --header-timeout, however it
    # paces the bytes (a timeout per read would wait for ever) ...
    stalled = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    started_at = time.monotonic()
    stalled.sendall(b"\x16\x03\x01\x02\x00")  # a ClientHello record of 512 bytes, to come
    with pytest.raises(OSError):
        while time.monotonic() - started_at < 10:
            stalled.sendall(b"\x00")
            time.sleep(0.2)
    assert time.monotonic() - started_at < 5
    stalled.close()
    # ... and meanwhile nobody else waited.  SIGHUP: new connections get the new certificate.
    new_cert, new_key = _certificate(tmp_path, "second")
    shutil.copy(new_cert, cert)
    shutil.copy(new_key, key)
    server.proc.send_signal(signal.SIGHUP)
    server.wait_for("TLS certificate reloaded")
    status, _, _, new_peer = get("/after", ssl.create_default_context(cafile=new_cert))
    assert status == 200 and new_peer != peer


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl (to make a test certificate) is not installed")
def test_tls_static_files_passed_files_and_streams(started, tmp_path):
    import ssl
    cert, key = _certificate(tmp_path, "server")
    root = tmp_path / "static"
    root.mkdir()
    (root / "a.css").write_bytes(b"body {}\n" * 1000)
    server = started("serve", "apps:streams", "--bind", "127.0.0.1:0", "--doors", DOORS, "--access-log", "off",
                     "--certfile", cert, "--keyfile", key, "--static-map", "/static=%s" % root,
                     ready=r"serving .* at https://[^ ]+:(\d+)/")
    conn = http.client.HTTPSConnection("127.0.0.1", server.port, timeout=10,
                                       context=ssl.create_default_context(cafile=cert))
    try:  # a stream over TLS, whose client socket cannot be peeked at while the app is silent
        for path, expected in (("/static/a.css", b"body {}\n" * 1000),
                               ("/file?mib=2&dir=%s" % tmp_path, bytes(2 << 20)),
                               ("/events?n=3&every=0.05", None)):
            conn.request("GET", path)
            response = conn.getresponse()
            body = response.read()
            assert response.status == 200 and (body == expected if expected else body.count(b"data: ") == 3)
        # A TLS client that leaves in the middle of a stream, the app silent in between:
        mark = str(tmp_path / "closed")
        conn.request("GET", "/events?n=100000&every=0.3&mark=" + mark)
        response = conn.getresponse()
        assert response.status == 200 and b"data: 0" in response.read1()
    finally:
        conn.close()
    assert _wait_for_file(mark, 3) and "Traceback" not in server.log, server.log


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl (to make a test certificate) is not installed")
def test_tls_client_certificates_required_with_ca_certs(started, tmp_path):
    import ssl
    cert, key = _certificate(tmp_path, "server")
    server = started("serve", "--bind", "127.0.0.1:0", "--doors", DOORS, "--access-log", "off",
                     "--certfile", cert, "--keyfile", key, "--ca-certs", cert,
                     ready=r"serving .* at https://[^ ]+:(\d+)/")
    for with_certificate in (True, False):
        context = ssl.create_default_context(cafile=cert)
        if with_certificate:
            context.load_cert_chain(cert, key)  # signed by the CA the server was given
        conn = http.client.HTTPSConnection("127.0.0.1", server.port, context=context, timeout=10)
        try:  # with TLS 1.3 a refused client certificate shows on the first read
            conn.request("GET", "/")
            status = conn.getresponse().status
        except (OSError, http.client.HTTPException):  # ssl.SSLError is an OSError
            status = None
        finally:
            conn.close()
        assert status == (200 if with_certificate else None)


def test_log_level_warning_hides_the_info_lines_of_front_and_app(started, tmp_path):
    path = str(tmp_path / "front.sock")
    server = started("serve", "--bind", "unix:" + path, "--doors", DOORS, "--access-log", "off",
                     "--log-level", "warning", "--max-requests", "1", ready=None)
    deadline = time.monotonic() + 20
    while True:
        try:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(10)
                sock.connect(path)
                sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                assert b"".join(iter(lambda: sock.recv(65536), b"")).endswith(b"hello to you too!\n")
                break
        except (FileNotFoundError, ConnectionRefusedError):
            assert time.monotonic() < deadline
            time.sleep(0.05)
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(30) == 0
    time.sleep(0.2)  # the last of the output, read by the collecting thread
    assert server.log == "", server.log  # no serving, replacing, stopping lines: all are info


def test_pid_chdir_env_backlog_and_a_factory(started, tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "factory.py").write_text(
        "import os\n"
        "def create_app(greeting='hello', punctuation='.'):\n"
        "    def app(environ, start_response):\n"
        "        body = ('%s %s %s%s' % (greeting, os.environ['WHO'], os.getcwd(), punctuation)).encode()\n"
        "        start_response('200 OK', [('Content-Length', str(len(body)))])\n"
        "        return [body]\n"
        "    return app\n")
    pid_file = tmp_path / "serve.pid"
    server = started("serve", "factory:create_app('bonjour', punctuation='!')", "--chdir", str(site),
                     "--env", "WHO=world", "--pid", str(pid_file), "--backlog", "37",
                     "--bind", "127.0.0.1:0", "--doors", DOORS, "--access-log", "off", cwd=str(tmp_path))
    assert server.get("/")[2] == ("bonjour world %s!" % site).encode()
    assert pid_file.read_text() == "%d\n" % server.proc.pid
    if shutil.which("ss"):
        listening = subprocess.run(["ss", "-Hltn", "sport = :%d" % server.port], capture_output=True,
                                   text=True, timeout=10).stdout.split()
        assert listening[2] == "37", listening  # Send-Q of a listening socket: its backlog
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(30) == 0 and not pid_file.exists()
    server = started("serve", "factory:create_app()", "--chdir", str(site), "--env", "WHO=you",
                     "--bind", "127.0.0.1:0", "--doors", DOORS, "--access-log", "off")
    assert server.get("/")[2] == ("hello you %s." % site).encode()


def test_reload_restarts_the_app_when_its_source_changes(started, tmp_path):
    source = tmp_path / "changing.py"
    source.write_text("def application(environ, start_response):\n"
                      "    start_response('200 OK', [])\n"
                      "    return [b'one']\n")
    server = started("serve", "changing", "--reload", "--bind", "127.0.0.1:0", "--doors", DOORS,
                     "--access-log", "off", cwd=str(tmp_path))
    first_app = server.app_pid()
    assert server.get("/")[2] == b"one"
    source.write_text(source.read_text().replace("b'one'", "b'two'"))
    later = time.time() + 5
    os.utime(str(source), (later, later))  # a new mtime, however coarse the file system's clock
    server.wait_for(r"changing\.py changed")
    deadline = time.monotonic() + 20
    while server.get("/")[2] != b"two":
        assert time.monotonic() < deadline, server.log
        time.sleep(0.1)
    server.wait_for(r"replacing app pid %d: SIGHUP" % first_app)


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")
@pytest.mark.skipif(not os.access("/usr/bin/python3", os.X_OK), reason="needs a Python every user may run")
@pytest.mark.skipif(DOORS == "native", reason="the door model is built where only root may read it")
def test_user_and_group_dropped_after_binding_a_privileged_port(started, tmp_path):
    import pwd
    nobody = pwd.getpwnam("nobody")
    with socket.socket() as probe:  # a port under 1024 that is free
        for port in range(900, 1000):
            try:
                probe.bind(("127.0.0.1", port))
                break
            except OSError:
                continue
    server = started("serve", "--user", "nobody", "--bind", "127.0.0.1:%d" % port, "--doors", DOORS,
                     "--access-log", "off", python="/usr/bin/python3", tmp_mode=0o1777)
    assert server.port == port and server.get("/")[0] == 200

    def ids(pid):
        status = _read("/proc/%d/status" % pid)
        return [int(re.search(r"^%s:\s+(\d+)" % key, status, re.M).group(1)) for key in ("Uid", "Gid")]
    assert ids(server.proc.pid) == ids(server.app_pid()) == [nobody.pw_uid, nobody.pw_gid]
    # its private directory is made in its TMPDIR, not in /tmp where a SIGKILL would leave it
    [private] = glob.glob(os.path.join(server.tmp, "doordown-*"))
    assert os.stat(private).st_uid == nobody.pw_uid
    # and a clean stop removes it
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(20) == 0
    assert os.listdir(server.tmp) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")
@pytest.mark.skipif(not os.access("/usr/bin/python3", os.X_OK), reason="needs a Python every user may run")
@pytest.mark.skipif(DOORS == "native", reason="the door model is built where only root may read it")
def test_user_who_may_not_write_tmpdir_is_refused_in_one_line(started, tmp_path):
    # serve's private directory goes in TMPDIR, owned by --user: one that user may not write
    # (the harness's own, root's and 0711) is one from which it could not remove it at
    # stop.  It is refused at start, and nothing is left in it (not even the pid file).
    pid_file = str(tmp_path / "serve.pid")  # written before the drop, as root
    server = started("serve", "--user", "nobody", "--bind", "127.0.0.1:0", "--doors", DOORS,
                     "--access-log", "off", "--pid", pid_file, python="/usr/bin/python3", ready=None)
    assert server.proc.wait(30) == 1
    line = server.wait_for(r"doordown: error: .*\n").group(0)
    assert server.log == line and "--user nobody may not write TMPDIR %s" % server.tmp in line, server.log
    assert os.listdir(server.tmp) == [] and not os.path.exists(pid_file)


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")
@pytest.mark.skipif(not os.access("/usr/bin/python3", os.X_OK), reason="needs a Python every user may run")
@pytest.mark.skipif(DOORS == "native", reason="the door model is built where only root may read it")
def test_user_dropped_to_need_not_read_the_front_interpreters_library(started, tmp_path):
    # The front runs this suite's interpreter (where it is a pyenv under /root, mode 0700,
    # user nobody can read none of its library); the app, an interpreter everyone may run.
    # What the front imports after the drop (subprocess, to start the app) it imported before.
    # The test above runs the front itself on /usr/bin/python3, whose library nobody reads.
    _skip_unless_nobody_reads(DOORDOWN, os.path.join(SUPPORT, "apps.py"))  # the app as nobody runs them
    config = _site(tmp_path, "[serve]\nbind = 127.0.0.1:0\naccess-log = off\nuser = nobody\n\n"
                   "[app:a]\nwsgi = apps:interpreter\npython = /usr/bin/python3\nspawn = eager\n")
    server = site_serve(started, config, tmp_mode=0o1777)
    status, _, body = server.get("/")
    assert status == 200 and json.loads(body)["prefix"] != sys.prefix, server.log
    assert "Traceback" not in server.log, server.log


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")
@pytest.mark.skipif(DOORS == "native", reason="the door model is built where only root may read it")
def test_user_who_may_not_run_the_interpreter_stops_serve(tmp_path):
    # The front runs its interpreter through a 0700 directory: root may, user nobody, who
    # must then start the app with it, may not.  That app cannot boot even once: serve
    # stops with one line and the code of an app that cannot load (gunicorn's arbiter
    # stops on a worker that fails to boot), not retrying it for ever.
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    os.chmod(hidden, 0o700)
    python = hidden / "python3"
    python.symlink_to(sys.executable)
    tmp = tempfile.mkdtemp(dir=RUN_TMP)
    os.chmod(tmp, 0o1777)  # a TMPDIR nobody may write, as /tmp
    try:
        result = subprocess.run([str(python), DOORDOWN, "serve", "--user", "nobody", "--bind", "127.0.0.1:0",
                                 "--doors", DOORS, "--access-log", "off"], cwd=SUPPORT, capture_output=True,
                                timeout=30, env=dict(os.environ, TMPDIR=tmp))
        left = os.listdir(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    lines = result.stderr.decode().strip().splitlines()
    assert result.returncode == doordown.EXIT_APP_LOAD, lines
    assert len(lines) == 1 and "cannot start the app" in lines[0], lines
    assert "Permission denied: '%s'" % python in lines[0], lines
    assert left == []


def test_readiness_is_notified_to_systemd(started, tmp_path):
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(path)
        notify.settimeout(20)
        server = started("serve", "--bind", "127.0.0.1:0", "--doors", DOORS, "--access-log", "off",
                         env=dict(os.environ, NOTIFY_SOCKET=path))
        assert notify.recv(100) == b"READY=1"
        app_environ = _read("/proc/%d/environ" % server.app_pid()).split("\0")
        assert not [item for item in app_environ if item.startswith("NOTIFY_SOCKET=")]
        server.proc.send_signal(signal.SIGTERM)
        assert notify.recv(100) == b"STOPPING=1" and server.proc.wait(30) == 0


DTD = os.path.join(SUPPORT, "service_bundle.dtd.1")  # illumos' usr/src/cmd/svc/dtd/service_bundle.dtd.1


@pytest.mark.skipif(shutil.which("xmllint") is None, reason="xmllint is not installed (Debian package libxml2-utils)")
def test_smf_manifest_is_valid_against_the_service_bundle_dtd(tmp_path):
    result = subprocess.run([sys.executable, DOORDOWN, "smf", "--service", "myapp", "apps:echo", "--bind",
                             "0.0.0.0:80", "--user", "webservd", "--graceful-timeout", "20"],
                            cwd=SUPPORT, capture_output=True, text=True, timeout=20, check=True)
    manifest = tmp_path / "myapp.xml"
    manifest.write_text(result.stdout)
    check = subprocess.run(["xmllint", "--noout", "--dtdvalid", DTD, str(manifest)], capture_output=True,
                           text=True, timeout=20)
    assert check.returncode == 0, check.stderr
    assert 'working_directory="%s"' % SUPPORT in result.stdout and 'value="child"' in result.stdout
    start = re.search(r'name="start"[^>]*exec="([^"]*)"', result.stdout).group(1)
    assert start == "%s %s serve apps:echo --bind 0.0.0.0:80 --user webservd --graceful-timeout 20 " \
                    "--pid /var/run/myapp.pid" % (sys.executable, DOORDOWN)
    stop = re.search(r'name="stop" timeout_seconds="(\d+)"\s+exec="([^"]*)"', result.stdout).groups()
    assert stop == ("35", "/usr/bin/kill -TERM $(/usr/bin/cat /var/run/myapp.pid)")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed (Debian package systemd)")
def test_systemd_unit_passes_systemd_analyze_verify(tmp_path):
    result = subprocess.run([sys.executable, DOORDOWN, "systemd", "apps:create('%s')", "--bind",
                             "unix:/run/my app.sock", "--access-log", "/var/log/a.log"], cwd=SUPPORT,
                            capture_output=True, text=True, timeout=20, check=True)
    unit = tmp_path / "doordown-apps.service"
    unit.write_text(result.stdout)
    check = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0 and str(unit) not in check.stderr, check.stderr
    assert "Type=notify\n" in result.stdout and "KillMode=mixed\n" in result.stdout
    assert "ExecStart=%s %s serve \"apps:create('%%%%s')\" --bind \"unix:/run/my app.sock\" --access-log " \
           "/var/log/a.log\n" % (sys.executable, DOORDOWN) in result.stdout


def test_service_files_of_a_site_take_its_timeouts_and_name_it(tmp_path):
    # `doordown systemd|smf --config FILE`: the stop timeout is the site's graceful timeout
    # plus 15 s (not the default's 45 s, which would SIGKILL requests still in their grace),
    # the title names the site (not "the built-in hello app"), and a bad file is one line.
    config = _site(tmp_path, "[serve]\nbind = 127.0.0.1:0\ngraceful-timeout = 100\nboot-timeout = 90\n\n"
                             "[app:a]\nwsgi = apps:echo\n")
    unit = doordown_command("systemd", "--config", config)
    assert unit.returncode == 0, unit.stderr
    assert "TimeoutStopSec=115\n" in unit.stdout.decode()
    assert "Description=doordown: the applications of %s\n" % config in unit.stdout.decode()
    manifest = doordown_command("smf", "--service", "site", "--config", config).stdout.decode()
    assert re.search(r'name="start" timeout_seconds="120"', manifest)
    assert re.search(r'name="stop" timeout_seconds="115"', manifest)
    assert '<loctext xml:lang="C">doordown: the applications of %s</loctext>' % config in manifest
    bad = doordown_command("systemd", "--config", _site(tmp_path, "[app:a]\nwsgi = apps:echo\nbogus = 1\n"))
    lines = bad.stderr.decode().strip().splitlines()
    assert bad.returncode == 2 and bad.stdout == b"" and len(lines) == 1, lines
    assert re.search(r"^doordown: error: \S*site.ini: \[app:a\] bogus: unknown key", lines[0]), lines[0]


# -- the door layer and the wire format on their own ------------------------------------------

def test_wire_format_round_trip_and_rejects_damage():
    fields = [b"GET", b"/", b"HTTP/1.1", b"", b"x" * 70000]
    message = doordown.pack_message(doordown.KIND_REQUEST, 1, fields)
    assert doordown.unpack_message(message, (doordown.KIND_REQUEST,)) == (doordown.KIND_REQUEST, 1, fields)
    for damaged in (message[:3], message[:10], message[:-1], message + b"x", b"Z" + message[1:],
                    doordown.pack_message(doordown.KIND_REQUEST, 0, [b""] * 5000)):
        with pytest.raises(doordown.WireError):
            doordown.unpack_message(damaged, (doordown.KIND_REQUEST,))


def test_garbage_on_the_door_gets_an_error_reply(started):
    server = serve(started)
    client = doordown.door_backend(DOORS).open(server.door_path())
    for garbage in (b"", b"Q", b"Q\x00\x00\x05", os.urandom(300)):
        reply, fds = client.call(garbage)
        assert doordown.unpack_message(reply, (doordown.KIND_FAIL,))[2][0] == b"400"
    client.close()
    assert server.get("/")[0] == 200


def _door_handler(data, fds, caller):
    if data == b"fds":  # read the passed file, answer with a new one
        with os.fdopen(fds[0], "rb") as passed:
            content = passed.read()
        read_end, write_end = os.pipe()
        os.write(write_end, b"from the server: " + content)
        os.close(write_end)
        return b"ok", [read_end]
    if data == b"sleep":
        time.sleep(30)
    if data == b"tid":
        return str(threading.get_native_id()).encode(), []
    return json.dumps([caller.euid, caller.pid, threading.get_ident()]).encode(), []


def _serve_door_in_child(path):
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            doordown.door_backend(DOORS).serve(path, _door_handler)
            time.sleep(60)
        finally:
            os._exit(0)
    deadline = time.monotonic() + 10
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.01)
    return pid


@pytest.mark.skipif(DOORS != "emulated", reason="the door API test forks a server of the emulated backend")
def test_door_api_semantics(tmp_path):
    path = str(tmp_path / "t.door")
    pid = _serve_door_in_child(path)
    try:
        assert os.stat(path).st_mode & 0o777 == 0o600
        client = doordown.door_backend(DOORS).open(path)
        assert client.server_pid() == pid
        euid, caller_pid, _ = json.loads(client.call(b"who")[0])
        assert (euid, caller_pid) == (os.geteuid(), os.getpid())
        read_end, write_end = os.pipe()
        os.write(write_end, b"client data")
        os.close(write_end)
        reply, fds = client.call(b"fds", [read_end])
        os.close(read_end)
        assert reply == b"ok" and len(fds) == 1
        with os.fdopen(fds[0], "rb") as returned:
            assert returned.read() == b"from the server: client data"
        pending = concurrent.futures.ThreadPoolExecutor(1).submit(client.call, b"sleep")
        time.sleep(0.3)
        begin = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(doordown.DoorGone):
            pending.result(5)
        assert time.monotonic() - begin < 2
        with pytest.raises(doordown.DoorGone):
            client.call(b"who")
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.waitpid(pid, 0)



def _voluntary_switches(pid, tid):
    with open("/proc/%d/task/%d/status" % (pid, tid)) as status:
        for line in status:
            if line.startswith("voluntary_ctxt_switches:"):
                return int(line.split()[1])
    raise AssertionError("no voluntary_ctxt_switches for %d/%d" % (pid, tid))


@pytest.mark.skipif(DOORS != "emulated" or not os.path.isdir("/proc/self/task"),
                    reason="the emulated door's sockets, through Linux's /proc")
def test_emulated_door_server_thread_is_not_woken_when_its_reply_is_read(tmp_path):
    # Calls and replies travel on a socket each: a server thread asleep, waiting for the
    # next call, is not woken when its caller reads the reply (on one socket it was).
    path = str(tmp_path / "t.door")
    pid = _serve_door_in_child(path)
    try:
        client = doordown.door_backend("emulated").open(path, timeout=10)
        tid = int(client.call(b"tid")[0])
        connection = client._pool.get()
        woken = 0
        for _ in range(20):
            doordown._send_message(connection.calls, b"tid")
            time.sleep(0.01)  # the reply is sent and the thread is waiting again
            before = _voluntary_switches(pid, tid)
            reply, _, _ = doordown._recv_message(connection.replies, 1 << 20, connection.buffer)
            assert int(reply) == tid
            time.sleep(0.01)
            woken += _voluntary_switches(pid, tid) - before
        assert woken <= 2  # 20 of 20 on one socket
        connection.close()
        client.close()
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def _failing_thread_starts(monkeypatch, name_part, times=1):
    """Make the next `times` starts of threads whose name holds `name_part` fail as an
    exhausted system does (RuntimeError: can't start new thread)."""
    real_start, failures = threading.Thread.start, []

    def start(thread):
        if name_part in thread.name and len(failures) < times:
            failures.append(thread.name)
            raise RuntimeError("can't start new thread")
        return real_start(thread)
    monkeypatch.setattr(threading.Thread, "start", start)
    return failures


@pytest.mark.skipif(DOORS != "emulated", reason="the emulated door server's own accept loop")
def test_emulated_door_server_survives_emfile_and_failed_thread_starts(tmp_path, monkeypatch):
    import resource
    path = str(tmp_path / "t.door")
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child: a door server that runs out of descriptors
        try:
            doordown.door_backend("emulated").serve(path, _door_handler)
            highest = max(int(fd) for fd in os.listdir("/proc/self/fd"))
            resource.setrlimit(resource.RLIMIT_NOFILE,
                               (highest + 8, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
            hog = []
            try:
                while True:
                    hog.append(os.open(os.devnull, os.O_RDONLY))
            except OSError:  # EMFILE: not one descriptor left
                pass
            time.sleep(1.0)  # accept() fails with EMFILE meanwhile
            for fd in hog:
                os.close(fd)
            time.sleep(30)
        finally:
            os._exit(0)
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(path) and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.3)
        client = doordown.door_backend("emulated").open(path, timeout=10)
        begin = time.monotonic()
        assert json.loads(client.call(b"who")[0])[1] == os.getpid()  # served once fds are free
        assert time.monotonic() - begin < 5
        client.close()
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    # A failed thread start: the connection waits for a thread instead of being dropped.
    failures = _failing_thread_starts(monkeypatch, "door-server", times=2)
    server = doordown.door_backend("emulated").serve(str(tmp_path / "u.door"), _door_handler)
    try:
        client = doordown.door_backend("emulated").open(str(tmp_path / "u.door"), timeout=10)
        assert json.loads(client.call(b"who")[0])[1] == os.getpid()
        assert len(failures) == 2 and server.threads == 1
        client.close()
    finally:
        server.close(1)


def test_front_thread_start_failure_frees_the_connection_slot(monkeypatch):
    failures = _failing_thread_starts(monkeypatch, "front-connection")
    listeners = doordown.open_listeners([("tcp", "127.0.0.1", 0)])
    front = doordown.FrontServer(listeners, [doordown.Mount("", doordown.InProcessUpstream(None))],
                                 doordown.Limits(max_connections=1))
    threading.Thread(target=front.serve_forever, daemon=True).start()
    try:
        port = listeners[0].sock.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=5) as first:
            first.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert first.recv(100) == b""  # no thread for it: closed
        assert failures and front.open_connections == 0
        with socket.create_connection(("127.0.0.1", port), timeout=5) as second:
            second.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert status_of(second.recv(100)) == 200  # the one slot is free again
    finally:
        front.stop_accepting()

# -- hostile clients ---------------------------------------------------------------------------

sys.path.insert(0, SUPPORT)
import http_corpus  # noqa: E402


@pytest.mark.parametrize("name,request_bytes,status", http_corpus.REFUSED,
                         ids=[case[0] for case in http_corpus.REFUSED])
def test_corpus_refused_then_closed(echo_server, name, request_bytes, status):
    smuggled = b"GET /smuggled HTTP/1.1\r\nHost: example\r\n\r\n"
    reply = echo_server.raw(request_bytes + smuggled)
    assert status_of(reply) == status, reply[:300]
    assert not reply.endswith(b"<timeout>"), "the connection was left open"
    assert b"Connection: close" in reply.split(b"\r\n\r\n", 1)[0]
    assert reply.count(b"HTTP/1.1 ") == 1 and b"smuggled" not in reply


@pytest.mark.parametrize("name,request_bytes,seen", http_corpus.ACCEPTED,
                         ids=[case[0] for case in http_corpus.ACCEPTED])
def test_corpus_accepted(echo_server, name, request_bytes, seen):
    reply = echo_server.raw(request_bytes)
    assert status_of(reply) == 200 and not reply.endswith(b"<timeout>"), reply[:300]
    env = json.loads(reply.split(b"\r\n\r\n", 1)[1])
    body = seen.pop("body")
    assert (env["body_head"], env["body_len"]) == (body[:64], len(body))
    assert {key: env.get(key) for key in seen} == seen


def test_bare_lf_head_refused_at_once(echo_server):
    """Nothing pipelined behind it: the front must not wait for a CRLF CRLF that never comes."""
    for head in (b"GET / HTTP/1.1\nHost: example\n\n", b"GET / HTTP/1.1\r\nHost: example\n\n"):
        begin = time.monotonic()
        reply = echo_server.raw(head, timeout=5)
        assert status_of(reply) == 400 and not reply.endswith(b"<timeout>"), reply[:300]
        assert time.monotonic() - begin < 3  # the header timeout is 10 s


def _read_to_close(sock):
    """Everything the peer sends until it closes the connection."""
    chunks = []
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def _round_trip(port, data):
    begin = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(data)
        reply = _read_to_close(sock)
    return time.perf_counter() - begin, reply


def test_head_cost_is_linear_in_blank_runs(echo_server):
    """A head of long legal runs of blanks costs about what a plain head of the same size does.

    A ratio measured side by side, not a time: a parser that backtracks over each run
    (quadratic) takes hundreds of times longer on the blank head.
    """
    def head(filler):
        fields = b"".join(b"X-Pad-%d: a%sb\r\n" % (i, filler) for i in range(8))
        return b"GET / HTTP/1.1\r\nHost: example\r\n" + fields + b"Connection: close\r\n\r\n"
    blank, plain = head(b" \t" * 3500), head(b"xy" * 3500)
    assert len(blank) == len(plain) > 56000
    costs = {}
    for name, data in (("plain", plain), ("blank", blank)) * 3:
        seconds, reply = _round_trip(echo_server.port, data)
        assert status_of(reply) == 200, reply[:300]
        costs[name] = min(costs.get(name, seconds), seconds)
    assert costs["blank"] < 10 * costs["plain"], costs


def test_limits_refuse_unknown_names():
    assert doordown.Limits(max_body=5).max_body == 5
    with pytest.raises(TypeError):
        doordown.Limits(max_bdy=5)
    with pytest.raises(TypeError):
        doordown.Limits(__class__=5)


def _mutate(rng, data):
    data = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        where = rng.randrange(len(data) + 1)
        choice = rng.random()
        if choice < 0.3 and data:
            data[min(where, len(data) - 1)] = rng.randrange(256)
        elif choice < 0.6:
            data[where:where] = rng.choice([b"\r", b"\n", b"\x00", b" ", b"\t", b":", b",", b"0",
                                            b"\r\n", b"-1", b"chunked", b"\xff", b";"])
        elif choice < 0.7 and data:
            del data[where:where + rng.randint(1, 8)]
        elif choice < 0.8:  # long runs of blanks: what a backtracking parser pays for
            data[where:where] = rng.choice([b" ", b"\t", b" \t"]) * rng.randint(500, 9000)
        elif choice < 0.85:  # a huge number of header fields
            data[where:where] = b"X-Many: v\r\n" * rng.randint(50, 6000)
        else:
            line = rng.choice(bytes(data).split(b"\r\n") or [b""])
            data[where:where] = line + b"\r\n"
    return bytes(data)


def test_fuzzed_requests_never_crash_hang_or_5xx(echo_server):
    rng = random.Random(20261126)
    seeds = [b"GET /a?b=c HTTP/1.1\r\nHost: example\r\nUser-Agent: fuzz\r\n\r\n",
             b"POST /p HTTP/1.1\r\nHost: example\r\nContent-Length: 5\r\n\r\nhello",
             b"POST /c HTTP/1.1\r\nHost: example\r\nTransfer-Encoding: chunked\r\n\r\n"
             b"5\r\nhello\r\n0\r\nX-T: v\r\n\r\n",
             b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
             b"GET / HTTP/1.1\r\nHost: example\r\nX-Blank: a" + b" \t" * 2000 + b"b\r\n\r\n"]
    deadline = time.monotonic() + 20
    cases = 0
    while cases < 1500 and time.monotonic() < deadline:
        data = _mutate(rng, rng.choice(seeds))
        with socket.create_connection(("127.0.0.1", echo_server.port), timeout=5) as sock:
            reply = b""
            try:
                sock.sendall(data)
                sock.shutdown(socket.SHUT_WR)  # end of input: the front must decide, not wait
            except socket.timeout:
                raise
            except OSError:  # a front that refused a huge head and closed reset the rest of it
                pass
            try:
                while True:
                    chunk = sock.recv(65536)  # a hang raises socket.timeout: a failure
                    if not chunk:
                        break
                    reply += chunk
            except ConnectionResetError:
                pass
        statuses = [int(s) for s in re.findall(rb"(?:^|\r\n\r\n|\n)HTTP/1\.1 (\d{3}) ", reply)]
        assert reply == b"" or statuses, (data, reply[:200])
        assert not [s for s in statuses if s in (500, 502, 503, 504)], (data, reply[:300])
        cases += 1
    assert cases >= 200
    assert echo_server.get("/")[0] == 200 and echo_server.proc.poll() is None
    assert "Traceback" not in echo_server.log


def test_forwarded_headers_trusted_only_from_allowed_peers(echo_server, started):
    headers = {"X-Forwarded-For": "203.0.113.9, 198.51.100.7", "X-Forwarded-Proto": "https"}
    env = json.loads(echo_server.get("/", headers=headers)[2])  # 127.0.0.1 is allowed by default
    assert env["REMOTE_ADDR"] == "198.51.100.7" and env["wsgi.url_scheme"] == "https"
    strict = serve(started, "apps:echo", "--forwarded-allow-ips", "192.0.2.1")
    env = json.loads(strict.get("/", headers=headers)[2])
    assert env["REMOTE_ADDR"] == "127.0.0.1" and env["wsgi.url_scheme"] == "http"
    assert "HTTP_X_FORWARDED_FOR" not in env and "HTTP_X_FORWARDED_PROTO" not in env


def test_slow_clients_do_not_starve_others(started):
    server = serve(started, "apps:counter", "--header-timeout", "3", "--body-timeout", "1",
                   "--min-body-rate", "1000")
    slow = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(500)]
    try:
        for tick in range(2):  # one byte a second from each of 500 connections
            for sock in slow:
                sock.send(b"GET / HTTP/1.1\r\n"[tick:tick + 1])
            begin = time.monotonic()
            assert server.get("/")[0] == 200
            assert time.monotonic() - begin < 2.0, "a normal client waited behind slow ones"
            time.sleep(1)
        # The head deadline passes: each slow connection gets 408 and is closed.
        replies = []
        for sock in slow[:20]:
            reply = sock.recv(4096)
            replies.append(status_of(reply))
            assert sock.recv(4096) == b""
        assert set(replies) == {408}
    finally:
        for sock in slow:
            sock.close()
    # A body trickling in below --min-body-rate is cut off with 408 as well.
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n")
        begin = time.monotonic()
        reply = b""
        while not reply and time.monotonic() - begin < 8:
            sock.send(b"x")
            try:
                sock.settimeout(0.2)
                reply = sock.recv(4096)
            except socket.timeout:
                pass
        assert status_of(reply) == 408


def test_every_byte_of_a_chunked_body_earns_body_time_as_it_arrives(started):
    # --min-body-rate counts the bytes received (as mod_reqtimeout does), framing included:
    # a long chunk extension or trailer field earns as it arrives, not once its line is whole.
    server = serve(started, "apps:echo", "--body-timeout", "0.5", "--min-body-rate", "1000")
    chunks = [b"1;ext=" + b"e" * 4000 + b"\r\nx\r\n"] + [b"1\r\ny\r\n"] * 200
    body = b"".join(chunks) + b"0\r\nX-Trailer: " + b"t" * 4000 + b"\r\n\r\n"
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                     b"Connection: close\r\n\r\n")
        begin = time.monotonic()
        try:
            for at in range(0, len(body), 200):  # 4000 bytes/s, four times the rate
                sock.sendall(body[at:at + 200])
                time.sleep(0.05)
        except OSError:
            pass  # refused: the reply says why
        took = time.monotonic() - begin
        reply = _read_to_close(sock)
    assert status_of(reply) == 200 and took > 2, (took, reply[:200])
    env = json.loads(reply.split(b"\r\n\r\n", 1)[1])
    assert env["body_head"] == "x" + "y" * 63 and env["body_len"] == 201


# -- failing apps --------------------------------------------------------------------------------

class Load:
    """Keep-alive GETs from `threads` threads until stopped; counts outcomes per kind."""

    def __init__(self, server, threads=6, path="/"):
        self.server, self.path = server, path
        self.lock = threading.Lock()
        self.outcomes = {}
        self.bodies = []
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]
        for thread in self.threads:
            thread.start()

    def _count(self, kind, body=None):
        with self.lock:
            self.outcomes[kind] = self.outcomes.get(kind, 0) + 1
            if body is not None:
                self.bodies.append((time.monotonic(), body))

    def _run(self):
        conn = None
        while not self.stopping.is_set():
            try:
                if conn is None:
                    conn = self.server.connect(timeout=15)
                    conn.connect()
                    answered = False
            except (ConnectionRefusedError, ConnectionResetError):
                # Not accepted: the server has stopped listening (a reset: it closed its
                # listening socket with this connection still in the backlog).
                self._count("refused")
                conn = None
                time.sleep(0.02)
                continue
            try:
                conn.request("GET", self.path)
                response = conn.getresponse()
                body = response.read()
                answered = True
                self._count(response.status, body if response.status == 200 else None)
                if response.getheader("Connection") == "close":
                    conn.close()
                    conn = None
            except (ConnectionResetError, http.client.RemoteDisconnected) as exc:
                # On a connection that never got an answer this is the kernel resetting a
                # handshake it completed after the server closed its listening socket:
                # a connection the server never accepted.  Counted apart from failures.
                self._count("reset-unaccepted" if not answered else type(exc).__name__)
                conn.close()
                conn = None
            except Exception as exc:
                self._count(type(exc).__name__)
                conn.close()
                conn = None

    def stop(self):
        self.stopping.set()
        for thread in self.threads:
            thread.join(20)
        return dict(self.outcomes)


def test_timeout_gives_504_and_stuck_app_is_replaced(started):
    server = serve(started, "apps:slow", "--timeout", "1", "--max-stuck", "2", "--graceful-timeout", "1")
    first_pid = server.app_pid()
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        stuck = [pool.submit(server.get, "/?s=20") for _ in range(2)]
        time.sleep(0.2)
        status, _, body = server.get("/?s=0.01")  # other requests are not blocked by stuck ones
        assert status == 200
        assert [f.result(10)[0] for f in stuck] == [504, 504]
    server.wait_for(r"replacing app pid %d: 2 requests ran past --timeout" % first_pid, timeout=10)
    deadline = time.monotonic() + 10
    while _pid_alive(first_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _pid_alive(first_pid), "the stuck app was not forced out after its grace"
    assert server.get("/?s=0")[0] == 200


def test_app_killed_under_load_fails_only_requests_in_flight(started):
    server = serve(started, "apps:counter")
    load = Load(server, threads=6)
    time.sleep(1)
    victim = server.stats()["pid"]
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()
    time.sleep(2)
    outcomes = load.stop()
    failed = {k: v for k, v in outcomes.items() if k != 200}
    # In flight: the 6 calls under way, and at most one more per thread sent into the
    # dying process's socket before the kernel closed it.
    assert set(failed) <= {502} and sum(failed.values()) <= 12, outcomes
    after = [t for t, body in load.bodies if t > killed_at and json.loads(body)["pid"] != victim]
    assert after and after[0] - killed_at < 2.0, "service did not come back promptly"


def test_crash_loop_is_braked_by_the_spawn_score(started):
    server = serve(started, "apps:exiter")
    deadline = time.monotonic() + 20
    statuses = []
    while time.monotonic() < deadline:
        status, _, body = server.get("/")
        statuses.append(status)
        if status == 503 and b"restarts paused" in body:
            break
    assert statuses[-1] == 503, statuses
    server.wait_for(r"restarts paused \(spawn score")
    spawned = len(re.findall(r"\[doordown app \d+\] serving", server.log))
    assert 3 <= spawned <= 10, spawned  # +3 a cycle against -1 a second: a few, not a spin
    assert server.proc.poll() is None  # serve itself keeps running


def _which_app(name):
    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [name.encode()]
    return app


_APP_SERVERS = {"proxy": (doordown.ProxyAppServer, doordown.ProxyUpstream),
                "fastcgi": (doordown.FastCGIAppServer, doordown.FastCGIUpstream)}


@pytest.mark.parametrize("how", ["closed-unread", "pooled-connection", "new-connection"])
@pytest.mark.parametrize("transport", sorted(_APP_SERVERS))
def test_a_request_to_a_stopped_socket_app_goes_to_its_replacement(tmp_path, transport, how):
    """The app stopped between the front's choice of it and the request's arrival: its
    socket refuses the connection, the pooled connection the write, or the app closes the
    connection with the request unread (a stand-in app here).  Nothing ran there,
    so the front waits for the replacement, as it does for a revoked door (not a 502)."""
    app_server, upstream = _APP_SERVERS[transport]
    if how == "closed-unread":
        old = socket.socket(socket.AF_UNIX)
        old.bind(str(tmp_path / "old.sock"))
        old.listen()

        def close_unread():
            with old, old.accept()[0] as connection:
                select.select([connection], [], [], 10)
        threading.Thread(target=close_unread, daemon=True).start()
    else:
        old = app_server(str(tmp_path / "old.sock"), doordown.WSGIGateway(_which_app("old")))
    mount = doordown.Mount("", upstream(str(tmp_path / "old.sock"), timeout=10))
    listeners = doordown.open_listeners([("tcp", "127.0.0.1", 0)])
    front = doordown.FrontServer(listeners, [mount], upstream_wait=10)
    threading.Thread(target=front.serve_forever, daemon=True).start()
    new = None

    def get():
        connection = http.client.HTTPConnection("127.0.0.1", listeners[0].sock.getsockname()[1], timeout=10)
        try:
            connection.request("GET", "/")
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()
    try:
        if how != "closed-unread":
            assert get() == (200, b"old")  # a connection in the pool
            old.close(0)
            if how == "new-connection":
                mount.upstream.pool.close()
            time.sleep(0.2)  # the old app's connection thread has seen its end
        replacement = threading.Timer(0.5, lambda: mount.replace(upstream(str(tmp_path / "new.sock"), timeout=10)))
        new = app_server(str(tmp_path / "new.sock"), doordown.WSGIGateway(_which_app("new")))
        replacement.start()
        assert get() == (200, b"new")
    finally:
        front.stop_accepting()
        mount.upstream.close()
        if new is not None:
            new.close(0)


@pytest.mark.parametrize("transport", ["door", "proxy", "fastcgi"])
def test_max_requests_replaces_the_app_without_losing_one(started, transport):
    """Replacements under load lose no request, on every transport whose app process
    lives on between requests."""
    server = serve(started, "apps:counter", "--max-requests", "40", "--max-requests-jitter", "10",
                   "--transport", transport)
    load = Load(server, threads=4)
    deadline = time.monotonic() + 30
    pids = set()
    while time.monotonic() < deadline and len(pids) < 4:
        time.sleep(0.1)
        with load.lock:
            pids = {json.loads(body)["pid"] for _, body in load.bodies}
    outcomes = load.stop()
    assert set(outcomes) == {200}, (outcomes, server.log)
    assert len(pids) >= 4, (pids, server.log)


def test_sighup_reloads_new_code_under_load_without_failures(started, tmp_path):
    (tmp_path / "version.py").write_text("VERSION = 1\n")
    server = serve(started, "apps:versioned", env=dict(os.environ, PYTHONPATH=SUPPORT + os.pathsep + str(tmp_path)))
    load = Load(server, threads=6)
    time.sleep(0.5)
    for version in (2, 3):
        (tmp_path / "version.py").write_text("VERSION = %d\n" % version)
        server.proc.send_signal(signal.SIGHUP)
        server.wait_for(r"app pid \d+ \S* ?exited|replacing app pid \d+: SIGHUP", timeout=10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with load.lock:
                if load.bodies and json.loads(load.bodies[-1][1])["version"] == version:
                    break
            time.sleep(0.05)
    time.sleep(0.5)
    outcomes = load.stop()
    assert set(outcomes) == {200}, (outcomes, server.log)
    versions = [json.loads(body)["version"] for _, body in load.bodies]
    # In order, but for requests that were still running on the old app when the new one came.
    assert versions[0] == 1 and versions[-1] == 3 and set(versions) == {1, 2, 3}
    assert server.log.count("replacing app pid") == 2


def test_sigterm_under_load_fails_no_accepted_request(started):
    server = serve(started, "apps:counter")
    app_pid = server.app_pid()
    load = Load(server, threads=6)
    time.sleep(1)
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(15) == 0
    outcomes = load.stop()
    assert outcomes.get(200, 0) > 50
    assert set(outcomes) <= {200, "refused", "reset-unaccepted"}, (outcomes, server.log)
    assert not _pid_alive(app_pid)


@pytest.mark.skipif(os.geteuid() != 0, reason="calling the door as another user needs root")
def test_door_refuses_other_users(started, tmp_path):
    import pathlib
    base = pathlib.Path(tempfile.mkdtemp(dir="/tmp"))  # pytest's own tmp_path is root-only
    os.chmod(str(base), 0o755)
    door_dir = base / "private"
    door_dir.mkdir(mode=0o700)
    door = str(door_dir / "app.door")
    app = started("app", "apps:counter", "--door", door, "--doors", DOORS, ready=r"serving apps:counter")

    backend = doordown.door_backend(DOORS)  # loaded as root, like the front's

    def call_as_nobody(door=door):
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            try:
                os.setgid(65534)
                os.setuid(65534)
                try:
                    reply, _ = backend.open(door).call(
                        doordown.pack_message(doordown.KIND_PING, 0, []))
                    outcome = doordown.unpack_message(reply, (doordown.KIND_FAIL, doordown.KIND_STATS))[2][0]
                except doordown.DoorError as exc:  # a door may be there: not DoorRevoked
                    outcome = ("%s %s" % (type(exc).__name__, errno_name(exc.errno))).encode()
                os.write(write_end, outcome)
            finally:
                os._exit(0)
        os.close(write_end)
        os.waitpid(pid, 0)
        with os.fdopen(read_end, "rb") as result:
            return result.read()

    assert call_as_nobody() == b"DoorError EACCES"  # the private directory keeps others out
    os.chmod(str(door_dir), 0o777)
    os.chmod(door, 0o777)
    assert call_as_nobody() == b"403"  # and the credential check refuses them anyway
    app.wait_for(r"refused a door call from euid 65534")
    # --allow-uid lets that user in, and the app's own euid (the front's) stays allowed.
    allowed = str(door_dir / "allowed.door")
    started("app", "apps:counter", "--door", allowed, "--doors", DOORS, "--allow-uid", "65534",
            ready=r"serving apps:counter")
    os.chmod(allowed, 0o777)
    assert json.loads(call_as_nobody(allowed))["pid"] > 0
    assert doordown.app_stats(allowed, DOORS)["pid"] > 0
    shutil.rmtree(str(base), ignore_errors=True)


def errno_name(number):
    import errno
    return errno.errorcode.get(number, str(number))


@pytest.mark.parametrize("how", ["second-signal", "grace-ends"])
def test_stop_is_forced_by_a_second_signal_or_the_grace_end(started, how):
    server = serve(started, "apps:slow", "--graceful-timeout", "30" if how == "second-signal" else "1")
    app_pid = server.app_pid()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(server.get, "/?s=20")
        time.sleep(0.3)
        begin = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        if how == "second-signal":
            server.wait_for(r"SIGTERM: finishing 1 request")
            server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(15) == 0
        assert time.monotonic() - begin < 8
        try:  # the request is cut off: that is what forcing means
            assert pending.result(10)[0] >= 500
        except (ConnectionError, http.client.HTTPException):
            pass
    deadline = time.monotonic() + 10
    while _pid_alive(app_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _pid_alive(app_pid)



# -- the supervisor never blocks -----------------------------------------------------------------

def _slow_app_env(tmp_path, boot="0", stop="0"):
    """support/slow_start_stop.py's settings: the boot delay file (rewritable) and the env."""
    delay = tmp_path / "boot-delay"
    delay.write_text(boot)
    return delay, dict(os.environ, BOOT_DELAY_FILE=str(delay), STOP_DELAY=stop)


@pytest.mark.parametrize("which", ["first", "replacement"])
def test_sigterm_during_a_slow_boot_stops_promptly(started, tmp_path, which):
    delay, env = _slow_app_env(tmp_path, boot="20" if which == "first" else "0")
    options = ("slow_start_stop", "--graceful-timeout", "1")
    if which == "first":
        server = serve(started, *options, env=env, ready=None)
        deadline = time.monotonic() + 10
        while not _children(server.proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
    else:
        server = serve(started, *options, env=env)
        delay.write_text("20")
        server.proc.send_signal(signal.SIGHUP)
        server.wait_for(r"replacing app pid \d+: SIGHUP")
        time.sleep(0.5)
        assert server.get("/")[0] == 200  # the old app serves while its replacement boots
    booting = _children(server.proc.pid)
    assert booting
    begin = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(30) == 0
    elapsed = time.monotonic() - begin
    assert elapsed < 2.0, "SIGTERM took %.1f s during a boot (grace 1 s)" % elapsed
    deadline = time.monotonic() + 5
    while any(_pid_alive(pid) for pid in booting) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_pid_alive(pid) for pid in booting)


def test_stop_waits_for_every_app_at_once(started, tmp_path):
    _, env = _slow_app_env(tmp_path, stop="4")  # each app takes 4 s to close its resource
    server = serve(started, "slow_start_stop", env=env)
    old = server.app_pid()
    assert server.get("/")[0] == 200
    server.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        status, _, body = server.get("/")
        if status == 200 and json.loads(body)["pid"] != old:
            break
        time.sleep(0.05)
    assert json.loads(body)["pid"] != old and _pid_alive(old)  # one app retiring, one serving
    begin = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(30) == 0
    elapsed = time.monotonic() - begin
    assert elapsed < 6.5, "two apps stopping took %.1f s: one after the other" % elapsed


def test_stuck_app_is_replaced_on_every_transport(started):
    servers = {transport: serve(started, "apps:counter", "--transport", transport)
               for transport in APP_PROCESS_TRANSPORTS}
    stuck = {transport: server.app_pid() for transport, server in servers.items()}
    for pid in stuck.values():
        os.kill(pid, signal.SIGSTOP)
    try:
        for transport, server in servers.items():
            server.wait_for(r"replacing app pid %d: it does not answer" % stuck[transport], timeout=30)
            statuses, deadline = [], time.monotonic() + 15
            while time.monotonic() < deadline:
                # One sent to the stuck app is answered once it wakes to stop, or fails (502).
                status, _, body = server.get("/")
                statuses.append(status)
                if status == 200 and json.loads(body)["pid"] != stuck[transport]:
                    break
            assert statuses[-1] == 200 and set(statuses[:-1]) <= {200, 502}, (transport, statuses)
            assert server.proc.poll() is None, (transport, server.log)
    finally:
        for pid in stuck.values():  # replaced, woken (SIGCONT) and stopped, or still stuck
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_signals_during_health_checks_replace_nothing(started):
    server = serve(started, "apps:counter")
    deadline = time.monotonic() + 4  # four health checks, each hit by signals
    while time.monotonic() < deadline:
        os.kill(server.proc.pid, signal.SIGCHLD)
        time.sleep(0.001)
    assert server.get("/")[0] == 200
    assert "replacing" not in server.log, server.log

# -- native doors under the illumos ABI model ----------------------------------------------------

def test_door_struct_layouts_match_illumos_amd64():
    import ctypes
    assert [ctypes.sizeof(t) for t in (doordown.door_arg_t, doordown.door_desc_t, doordown.door_info_t)] \
        == [48, 24, 48]
    assert [getattr(doordown.door_arg_t, f).offset for f in
            ("data_ptr", "data_size", "desc_ptr", "desc_num", "rbuf", "rsize")] == [0, 8, 16, 24, 32, 40]
    assert doordown.door_desc_t.d_data.offset == 4
    assert [getattr(doordown.door_info_t, f).offset for f in
            ("di_target", "di_proc", "di_data", "di_attributes", "di_uniquifier", "di_resv")] \
        == [0, 4, 12, 20, 24, 32]


@pytest.fixture
def probe_server(door_model, tmp_path):
    """Start support/native_probe.py MODE on the door model; yields a native client."""
    children = []

    def start(mode, timeout=None, path=None, **env):
        path = path or str(tmp_path / ("%s.door" % mode))
        env = dict(os.environ, DOORDOWN_LIBDOOR=door_model, **env)
        child = subprocess.Popen([sys.executable, os.path.join(SUPPORT, "native_probe.py"), mode, path],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        children.append(child)
        assert child.stdout.readline() == b"READY\n"
        child.door = path
        os.environ["DOORDOWN_LIBDOOR"], saved = door_model, os.environ.get("DOORDOWN_LIBDOOR")
        try:
            child.doors = doordown.NativeDoors()
            return child, child.doors.open(path, timeout)
        finally:
            if saved is None:
                del os.environ["DOORDOWN_LIBDOOR"]
            else:
                os.environ["DOORDOWN_LIBDOOR"] = saved

    yield start
    for child in children:
        child.kill()
        child.wait()


def test_naive_binding_fails_under_the_model(probe_server):
    """Proof that the model is strict: door_return called from Python breaks CPython."""
    child, client = probe_server("naive")
    depths, failure = set(), None
    for _ in range(1500):
        try:
            reply = client.call(b"x")[0]
        except doordown.DoorError as exc:
            failure = exc
            break
        depths.add(int(reply.split()[1]))
    assert failure is not None or len(depths) > 1, "the naive binding survived: the model is too lenient"


def test_trampoline_serves_20000_calls_on_one_thread(probe_server):
    child, client = probe_server("trampoline")
    # Warm up, then let the spare thread libc made on depletion park: a thread parking for
    # the first time goes on top of the LIFO pool and would take the next call.
    for _ in range(100):
        client.call(b"x")
    time.sleep(0.5)
    replies = [client.call(b"x")[0].split() for _ in range(20000)]
    depths = {int(r[0]) for r in replies}
    counts = [int(r[1]) for r in replies]
    threads = {r[2] for r in replies}
    rss = [int(r[3]) for r in replies]
    assert len(depths) == 1 and depths != {-1}, depths  # constant Python frame depth
    assert len(threads) == 1, threads  # one hot thread ...
    assert counts == list(range(counts[0], counts[0] + 20000))  # ... whose thread-local lives on
    assert rss[-1] - rss[2000] < 1024, "RSS grew by %d KiB" % (rss[-1] - rss[2000])


# -- the failure paths, under a model as strict as illumos (usr/src/uts/common/fs/doorfs) ------

def test_timed_call_with_no_free_server_thread_times_out(probe_server):
    """EAGAIN (a signal while waiting for a server thread) past the deadline is DoorTimeout."""
    child, client = probe_server("failures", DOORMODEL_MAX_LWPS="1")  # thread creation refused
    timed = child.doors.open(child.door, 0.3)
    busy = threading.Thread(target=client.call, args=(b"sleep:3",))
    busy.start()
    time.sleep(0.3)
    started = time.monotonic()
    with pytest.raises(doordown.DoorTimeout, match="did not run"):
        timed.call(b"hello")
    assert time.monotonic() - started < 1.5
    busy.join()
    assert client.call(b"calls")[0] == b"2"  # the timed call never reached the app


def test_call_whose_caller_left_is_dropped_and_its_descriptors_closed(probe_server):
    """door_ucred fails (EINVAL) once the caller detached: the app is skipped, fds closed."""
    child, client = probe_server("failures")
    timed = child.doors.open(child.door, 0.2)
    client.call(b"hold:1.5")  # the server's GIL is held: the next call waits for it
    time.sleep(0.2)
    read, write = os.pipe()
    try:
        with pytest.raises(doordown.DoorTimeout):
            timed.call(b"with a pipe", [write])
        os.close(write)
        write = None
        ready, _, _ = select.select([read], [], [], 5)
        assert ready and os.read(read, 1) == b"", "the server kept the request's descriptor"
    finally:
        _close_all([read, write])
    assert client.call(b"calls")[0] == b"2"  # hold, calls: the abandoned call never ran


_FULL_TABLE_CLIENT = """
import os, resource, sys
import doordown
doors = doordown.NativeDoors()
first = doors.open(sys.argv[1])
first.call(b"fds")
resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
try:
    while True:
        os.open(os.devnull, os.O_RDONLY)
except OSError:
    pass
print(first.call(b"fd")[0].decode())
try:
    doors.open(sys.argv[1]).call(b"fds")
except doordown.DoorError as exc:
    print(type(exc).__name__, exc.errno)
"""


def test_reply_descriptors_the_caller_cannot_take(probe_server, door_model):
    """door_return fails back to the server (EMFILE): it closes them, the caller is told."""
    child, client = probe_server("failures")
    before = client.call(b"fds")[0]
    for _ in range(3):
        result = subprocess.run([sys.executable, "-c", _FULL_TABLE_CLIENT, child.door], cwd=HERE,
                                capture_output=True, timeout=60,
                                env=dict(os.environ, DOORDOWN_LIBDOOR=door_model))
        out = result.stdout.decode().splitlines()
        assert out == ["refused %d" % errno.EMFILE, "DoorError %d" % errno.EMFILE], \
            result.stdout.decode() + result.stderr.decode()
    assert client.call(b"fds")[0] == before  # no descriptor left behind in the server


def test_reply_the_server_cannot_copy_out_closes_its_descriptors(probe_server):
    """The handler answered with a descriptor, and copying the answer out failed (a
    MemoryError): the caller gets an empty answer and the descriptor is closed, not leaked."""
    child, client = probe_server("failures")
    before = client.call(b"fds")[0]
    for _ in range(3):
        assert client.call(b"nomemory") == (b"", [])
    assert client.call(b"fds")[0] == before


def test_reply_to_a_caller_that_wants_no_results(probe_server):
    """door_call(d, NULL) takes no results: door_return fails (E2BIG) back to the server,
    which closes the reply's descriptors instead of leaking one per call."""
    child, client = probe_server("failures")
    before = client.call(b"fds")[0]
    door = os.open(child.door, os.O_RDONLY)
    try:
        for _ in range(3):  # each answered with a descriptor, each refused
            assert child.doors.lib.door_call(door, None) == 0
    finally:
        os.close(door)
    assert client.call(b"fds")[0] == before


def test_reply_that_faults_in_the_caller(probe_server):
    """door_return fails (EFAULT) when the reply cannot be copied into the caller: the
    server closes the reply's descriptors and tells the caller why."""
    child, client = probe_server("failures", DOORMODEL_REPLY_FAULTS_ABOVE="20000")
    before = client.call(b"fds")[0]
    for _ in range(3):
        assert client.call(b"bigfd:30000") == (b"refused %d" % errno.EFAULT, [])
    assert client.call(b"fds")[0] == before


def test_late_watchdog_signal_never_interrupts_the_next_call(probe_server, door_model, monkeypatch):
    """The watchdog decides to interrupt an overdue call, and is descheduled before its
    signal goes out; the call finishes meanwhile.  However late, that signal must not
    land in the thread's next call (EINTR there reads as a dead server: a 502)."""
    child, client = probe_server("failures")
    timed = child.doors.open(child.door, 0.3)
    model, calls = ctypes.CDLL(door_model), (ctypes.c_ulong * 2)()
    real_kill, decided = signal.pthread_kill, []

    def kill_once_the_next_call_waits(thread, signum):
        # The watchdog stalls right before its kill until the thread's next door call
        # is waiting for its reply (the model counts calls started and waiting), or 2 s.
        decided.append(thread)
        model.doormodel_calls(calls)
        started, deadline = calls[0], time.monotonic() + 2.0
        while time.monotonic() < deadline and not (calls[0] > started and calls[1] > 0):
            time.sleep(0.001)
            model.doormodel_calls(calls)
        real_kill(thread, signum)

    monkeypatch.setattr(signal, "pthread_kill", kill_once_the_next_call_waits)
    assert timed.call(b"sleep:1.2")[0] == b"ok"  # overdue, but answered before any signal
    assert decided, "the watchdog never meant to interrupt the overdue call"
    assert timed.call(b"sleep:0.2")[0] == b"ok"


def test_reopened_door_descriptor_is_not_closed_under_a_call_about_to_use_it(probe_server, door_model,
                                                                             tmp_path):
    """One thread holds the door's descriptor number, about to call; another finds the door
    replaced and opens the path again.  The old number must stay open until the held call
    is done with it: closed, the next open() in the process takes it, and the held call
    goes wherever that descriptor leads (another application's door, a socket...)."""
    door = str(tmp_path / "replaced.door")
    first, client = probe_server("failures", path=door)
    model = ctypes.CDLL(door_model)
    assert client.call(b"pid")[0] == b"%d" % first.pid
    answers = []
    model.doormodel_hold_next_call()  # the model holds the next door_call at its entry
    held = threading.Thread(target=lambda: answers.append(client.call(b"pid")[0]))
    held.start()
    try:
        deadline = time.monotonic() + 10
        while model.doormodel_held_call() < 0 and time.monotonic() < deadline:
            time.sleep(0.005)
        number = model.doormodel_held_call()
        assert number >= 0, "the call never reached the model's gate"
        opened_on = os.fstat(number)
        first.kill()
        first.wait()
        second, _ = probe_server("failures", path=door)
        assert client.call(b"pid")[0] == b"%d" % second.pid  # EBADF: the path opened again
        try:
            now = os.fstat(number)
        except OSError:
            now = None
        assert now is not None and (now.st_dev, now.st_ino) == (opened_on.st_dev, opened_on.st_ino), \
            "the held call's descriptor was closed under it (%s)" % ("and taken by another open()"
                                                                 if now else "its number free for any open()")
    finally:
        model.doormodel_release_call()
        held.join(15)
    assert answers == [b"%d" % second.pid]


def test_reply_of_64k_lands_in_the_reply_buffer(probe_server, door_model):
    child, client = probe_server("failures")
    model = ctypes.CDLL(door_model)
    overflows = model.doormodel_overflows()
    assert len(client.call(b"big:%d" % (65536 + 400))[0]) == 65536 + 400
    assert model.doormodel_overflows() == overflows
    assert len(client.call(b"big:%d" % (1 << 20))[0]) == 1 << 20  # larger: a mapping of its own
    assert model.doormodel_overflows() == overflows + 1


def _close_all(fds):
    for fd in fds:
        if fd is not None:
            os.close(fd)


@pytest.fixture
def native(door_model):
    """serve(...) arguments and environment for the native backend on the model."""
    return dict(env=dict(os.environ, DOORDOWN_LIBDOOR=door_model))


def test_app_keeps_its_stack_with_a_large_request(started, native):
    """libc's door threads have 2,088,960 bytes of stack, and the request is copied onto it."""
    server = started("serve", "native_apps:stack", "--bind", "127.0.0.1:0", "--doors", "native",
                     "--access-log", "off", **native)
    for size in (0, 900 * 1024):
        status, _, body = server.get("/", "POST", b"r" * size)
        seen = json.loads(body)
        assert status == 200 and seen["body"] == size
        assert seen["left"] > 1900 * 1024, "%d bytes of stack left with a %d-byte body" % (seen["left"], size)


@pytest.mark.parametrize("transport", ["door", "cgi"])
def test_app_and_its_children_run_with_no_signal_blocked(started, native, transport):
    server = started("serve", "native_apps:sigmask", "--bind", "127.0.0.1:0", "--doors", "native",
                     "--transport", transport, "--access-log", "off", **native)
    status, _, body = server.get("/")
    assert status == 200 and json.loads(body) == {"thread": 0, "child": 0}


def test_app_keeps_its_own_signal_handlers(started, native):
    server = started("serve", "native_apps:own_signal", "--bind", "127.0.0.1:0", "--doors", "native",
                     "--access-log", "off", **native)
    assert json.loads(server.get("/")[2]) == {"kept": True}


def test_response_head_too_large_for_the_reply_buffer_is_500(started, native):
    server = started("serve", "native_apps:big_head", "--bind", "127.0.0.1:0", "--doors", "native",
                     "--access-log", "off", **native)
    assert server.get("/")[0] == 500
    server.wait_for(r"response head of GET / over 65536 bytes")


def test_app_door_path_is_replaced_only_if_a_stale_door(tmp_path, native):
    """--door PATH: a file with data is refused; the door is 0600 whatever the umask."""
    precious = tmp_path / "precious"
    precious.write_bytes(b"data")
    command = [sys.executable, DOORDOWN, "app", "--doors", "native", "--door", str(precious)]
    result = subprocess.run(command, capture_output=True, timeout=30, cwd=SUPPORT, **native)
    assert result.returncode == 5 and precious.read_bytes() == b"data"
    assert "not a stale door: not replacing it" in result.stderr.decode()
    door = tmp_path / "app.door"
    for attempt in range(2):  # the second finds the first one's stale door and replaces it
        app = subprocess.Popen(command[:-1] + [str(door)], cwd=SUPPORT, umask=0o377,
                               stderr=subprocess.PIPE, **native)
        try:
            assert b"serving" in app.stderr.readline()
            assert stat.S_IMODE(os.stat(door).st_mode) == 0o600
        finally:
            app.kill()
            app.wait()


_WRITE_EXECUTE_PROBE = """
import ctypes, os, sys
import doordown
doors = doordown.NativeDoors()
server = doors.serve(sys.argv[1], lambda data, fds, caller: (b"pong", []))
reply = doors.open(sys.argv[1]).call(b"ping")[0].decode()
print(reply, ctypes.CDLL(os.environ["DOORDOWN_LIBDOOR"]).doormodel_wx_procedures())
server.close(grace=0.1)
os._exit(0)
"""


def test_trampoline_page_is_never_writable_and_executable(door_model, tmp_path):
    """Preloaded, the model sees every mmap and mprotect: no door's procedure was ever in
    memory that was writable and executable at once."""
    result = subprocess.run([sys.executable, "-c", _WRITE_EXECUTE_PROBE, str(tmp_path / "wx.door")],
                            cwd=HERE, capture_output=True, timeout=60,
                            env=dict(os.environ, DOORDOWN_LIBDOOR=door_model, LD_PRELOAD=door_model))
    assert result.stdout.decode().split() == ["pong", "0"], result.stdout.decode() + result.stderr.decode()


def test_refused_executable_memory_fails_clearly(door_model, tmp_path):
    """A system that refuses to make memory executable: the app says so in one line."""
    door = tmp_path / "app.door"
    result = subprocess.run([sys.executable, DOORDOWN, "app", "--doors", "native", "--door", str(door)],
                            cwd=SUPPORT, capture_output=True, timeout=30,
                            env=dict(os.environ, DOORDOWN_LIBDOOR=door_model, LD_PRELOAD=door_model,
                                     DOORMODEL_REFUSE_EXEC="1"))
    err = result.stderr.decode()
    assert result.returncode == 5 and not door.exists(), err
    assert "mprotect of the door trampoline to read+execute" in err and "Permission denied" in err, err
    assert len(err.strip().splitlines()) == 1, err


def test_check_command_passes_under_the_model(door_model):
    result = subprocess.run([sys.executable, DOORDOWN, "check", "--doors", "native"], capture_output=True,
                            timeout=120, env=dict(os.environ, DOORDOWN_LIBDOOR=door_model))
    out = result.stdout.decode()
    assert result.returncode == 0, out + result.stderr.decode()
    assert "tested: the door library %s: a MODEL of the illumos door ABI" % door_model in out
    assert "verdict: PASS: doordown's native doors work on the model" in out and "door round trip" in out
    assert out.count("[ok]") == 12, out  # the failure paths too: full fd table ... no thread free


def test_check_command_says_the_emulation_is_not_doors():
    result = subprocess.run([sys.executable, DOORDOWN, "check", "--doors", "emulated"], capture_output=True,
                            timeout=120)
    out = result.stdout.decode()
    assert result.returncode == 0, out + result.stderr.decode()
    assert "tested: the EMULATION of doors" in out and "(no real doors tested)" in out


def test_native_doors_refuse_without_a_door_library():
    env = {k: v for k, v in os.environ.items() if k != "DOORDOWN_LIBDOOR"}
    result = subprocess.run([sys.executable, DOORDOWN, "serve", "--doors", "native", "--bind", "127.0.0.1:0"],
                            capture_output=True, timeout=30, env=env)
    assert result.returncode != 0
    assert "use --doors emulated" in result.stderr.decode()


# -- per-thread resources: a database connection per door thread -----------------------------
#
# doordown.per_thread on its own, then examples/counter.py served for real: SQLite always,
# PostgreSQL when DOORDOWN_TEST_DATABASE_URL names a server (.ci/run starts one).

PG_URL = os.environ.get("DOORDOWN_TEST_DATABASE_URL")


class _Resource:
    def __init__(self, serial):
        self.serial = serial
        self.closed_on = []  # the threads that closed it: exactly one, eventually

    def close(self):
        self.closed_on.append(threading.get_ident())


def _in_thread(function):
    result = []
    thread = threading.Thread(target=lambda: result.append(function()))
    thread.start()
    thread.join()
    return result[0], thread.ident


def test_per_thread_one_resource_per_thread_reused():
    resources = doordown.per_thread(lambda: _Resource(0))
    mine = resources.get()
    assert resources.get() is mine and resources.get() is mine
    barrier = threading.Barrier(8)

    def use_twice():
        first = resources.get()
        barrier.wait()  # all eight threads alive at once: no thread ends and hands its resource on
        return first if resources.get() is first else None

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        theirs = list(pool.map(lambda _: use_twice(), range(8)))
    assert len({id(resource) for resource in theirs + [mine]}) == 9 and None not in theirs
    assert resources.opened == 9
    resources.close_all()


def test_per_thread_closes_on_thread_end_and_close_all():
    resources = doordown.per_thread(lambda: _Resource(0))
    theirs, ident = _in_thread(resources.get)
    assert theirs.closed_on == [ident]  # the thread ended: closed there, by its locals going away
    mine = resources.get()
    assert (resources.opened, resources.closed) == (2, 1) and not mine.closed_on
    assert resources.close_all() == 1 and mine.closed_on == [threading.get_ident()]
    assert resources.close_all() == 0 and len(mine.closed_on) == 1  # never closed twice
    replacement = resources.get()  # after close_all, a thread that comes back gets a new one
    assert replacement is not mine and (resources.opened, resources.closed) == (3, 2)
    resources.discard()
    assert replacement.closed_on and resources.close_all() == 0


def test_per_thread_check_replaces_broken_and_close_errors_are_logged(capfd):
    class Flaky(_Resource):
        broken = False

        def close(self):
            raise OSError("already gone")

    resources = doordown.per_thread(lambda: Flaky(resources.opened + 1), check=lambda r: not r.broken)
    first = resources.get()
    assert resources.get() is first
    first.broken = True
    second = resources.get()
    assert second is not first and second.serial == 2 and resources.get() is second
    assert "closing a per-thread resource failed" in capfd.readouterr().err
    assert resources.close_all() == 1 and resources.closed == 2


def test_per_thread_resources_closed_when_the_app_stops(started):
    server = serve(started, "per_thread_app:app")
    replies = _hammer(server, "/", 400, 8)
    assert {status for status, _ in replies} == {200}
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(15) == 0
    opened = re.findall(r"resource (\d+) opened", server.log)
    closed = re.findall(r"resource (\d+) closed", server.log)
    assert len(opened) >= 2 and sorted(closed) == sorted(opened)  # each closed, once
    # The main thread's resource outlives every door thread: the shutdown closed it.
    assert re.search(r"closed [1-9]\d* per-thread resource\(s\)", server.log), server.log


def _hammer(server, path, total, concurrency):
    """`total` GETs of `path` over `concurrency` keep-alive connections: [(status, reply)]."""
    def client(count):
        conn = server.connect(timeout=30)
        replies = []
        try:
            for _ in range(count):
                conn.request("GET", path)
                response = conn.getresponse()
                body = response.read()
                replies.append((response.status, json.loads(body) if response.status == 200 else body))
        finally:
            conn.close()
        return replies

    shares = [total // concurrency + (i < total % concurrency) for i in range(concurrency)]
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        return [reply for part in pool.map(client, shares) for reply in part]


def _counter(started, tmp_path, mode="per-thread", database_url=None):
    env = dict(os.environ, COUNTER_DATA_DIR=str(tmp_path / "data"), COUNTER_CONNECTIONS=mode)
    env.pop("DATABASE_URL", None)
    if database_url:
        env["DATABASE_URL"] = database_url
    return serve(started, "examples.counter:app", cwd=HERE, env=env)


def _get_json(conn, path):
    conn.request("GET", path)
    response = conn.getresponse()
    return response.status, json.loads(response.read())


def _assert_one_connection_per_thread(server, replies, total):
    """Every request answered, by no more connections than door threads, each reused many times."""
    assert [status for status, _ in replies] == [200] * total
    uses, thread_of = {}, {}
    for _, reply in replies:
        uses[reply["connection"]] = uses.get(reply["connection"], 0) + 1
        # a connection never moves to another thread
        assert thread_of.setdefault(reply["connection"], reply["thread_id"]) == reply["thread_id"]
    stats = json.loads(server.get("/stats")[2])
    door_threads = server.stats()["threads"]
    assert stats["requests"] == total and stats["connections_opened"] == len(uses)
    # door_threads also counts the threads that served only the front's health checks
    # and this test's own stats call: they never open a connection.
    # Native doors' pool may overshoot a burst (libc creates a thread on depletion before
    # the new ones have parked), as illumos's does, and more so on a loaded machine: 44
    # threads for 32 connections seen with another suite running beside this one.
    ceiling = 33 if DOORS == "emulated" else 48
    assert len(uses) <= stats["threads_seen"] <= door_threads and len(uses) <= ceiling, (uses, stats, door_threads)
    # Most connections are reused many times.  Not all: under a burst the door pool may
    # overshoot (illumos's does too), and a late thread may serve only a few requests.
    # The pool is LIFO, so hot threads take most calls: the median is well under the mean
    # (46 against 151 seen on native doors), yet a connection per call would make it 1.
    assert total / len(uses) >= 100 and sorted(uses.values())[len(uses) // 2] >= 20, uses
    return stats


def test_sqlite_5000_requests_at_32_use_one_connection_per_door_thread(started, tmp_path):
    server = _counter(started, tmp_path)
    replies = _hammer(server, "/", 5000, 32)
    stats = _assert_one_connection_per_thread(server, replies, 5000)
    assert stats["database"] == "sqlite" and stats["connections_open"] == stats["connections_opened"]
    assert sorted(reply["hit"] for _, reply in replies) == list(range(1, 5001))


def test_sqlite_connection_per_request_mode_for_comparison(started, tmp_path):
    server = _counter(started, tmp_path, mode="per-request")
    replies = _hammer(server, "/", 300, 8)
    assert {status for status, _ in replies} == {200}
    assert {reply["connection_uses"] for _, reply in replies} == {1}
    stats = json.loads(server.get("/stats")[2])
    assert (stats["requests"], stats["connections_opened"], stats["connections_open"]) == (300, 300, 0)


@pytest.fixture(scope="module")
def postgres():
    """An autocommit connection to the test PostgreSQL server, or a skip that says why not."""
    if not PG_URL:
        pytest.skip("no PostgreSQL server: set DOORDOWN_TEST_DATABASE_URL to a DSN "
                    "(.ci/run starts a private one and sets it)")
    psycopg = pytest.importorskip("psycopg", reason="the PostgreSQL tests need psycopg 3: "
                                                    "pip install -r support/requirements.txt")
    try:
        conn = psycopg.connect(PG_URL, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        pytest.skip("no PostgreSQL server reachable at DOORDOWN_TEST_DATABASE_URL: %s" % exc)
    yield conn
    conn.close()


@pytest.fixture
def pg_url(postgres):
    """The test server's DSN with a schema of this test's own, dropped afterwards."""
    from psycopg.conninfo import make_conninfo
    schema = "doordown_test_%d_%d" % (os.getpid(), int(time.monotonic() * 1000))
    postgres.execute('CREATE SCHEMA "%s"' % schema)
    yield make_conninfo(PG_URL, options="-c search_path=%s" % schema)
    postgres.execute('DROP SCHEMA "%s" CASCADE' % schema)


def _terminate(postgres, pid):
    """pg_terminate_backend, then wait until that backend is gone."""
    assert postgres.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone()[0]
    deadline = time.monotonic() + 10
    while postgres.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone():
        assert time.monotonic() < deadline, "backend %d did not go away" % pid
        time.sleep(0.02)


def test_postgresql_5000_requests_at_32_use_one_connection_per_door_thread(started, tmp_path,
                                                                           postgres, pg_url):
    server = _counter(started, tmp_path, database_url=pg_url)
    replies = _hammer(server, "/", 5000, 32)
    stats = _assert_one_connection_per_thread(server, replies, 5000)
    assert stats["database"] == "postgresql"
    backends = {reply["backend_pid"] for _, reply in replies}
    assert len(backends) == stats["connections_opened"]
    alive = postgres.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s)",
                             (list(backends),)).fetchone()[0]
    assert alive == len(backends)  # the server agrees: every connection is still open, reused


def test_postgresql_connection_killed_while_idle_is_replaced_before_use(started, tmp_path,
                                                                        postgres, pg_url):
    server = _counter(started, tmp_path, database_url=pg_url)
    conn = server.connect()  # one keep-alive client: its requests land on one hot door thread
    _, first = _get_json(conn, "/")
    _, second = _get_json(conn, "/")
    assert (second["connection"], second["connection_uses"]) == (first["connection"], 2)
    _terminate(postgres, first["backend_pid"])
    status, third = _get_json(conn, "/")  # no failure: the dead connection is seen before use
    assert status == 200 and third["thread_id"] == first["thread_id"]
    assert third["backend_pid"] != first["backend_pid"] and third["connection_uses"] == 1
    assert not third["retried"] and third["hit"] == second["hit"] + 1
    assert _get_json(conn, "/")[1]["connection"] == third["connection"]
    stats = json.loads(server.get("/stats")[2])
    assert (stats["connections_opened"], stats["connections_open"]) == (2, 1)


def test_postgresql_connection_killed_in_flight_fails_that_write_only(started, tmp_path,
                                                                      postgres, pg_url):
    server = _counter(started, tmp_path, database_url=pg_url)
    conn = server.connect()
    _, before = _get_json(conn, "/")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        write = pool.submit(_get_json, conn, "/?hold=5")  # the kill cuts it short
        _terminate(postgres, _busy_backend(postgres, before["backend_pid"]))
        status, reply = write.result(10)
    assert status == 503 and "lost" in reply["error"]  # the write may have been done: not retried
    status, after = _get_json(conn, "/")
    assert status == 200 and after["thread_id"] == before["thread_id"]
    assert after["backend_pid"] != before["backend_pid"]
    server.wait_for(r"counter: GET /: the database connection was lost")


def test_postgresql_connection_killed_in_flight_read_is_retried(started, tmp_path, postgres, pg_url):
    server = _counter(started, tmp_path, database_url=pg_url)
    conn = server.connect()
    _, before = _get_json(conn, "/")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        read = pool.submit(_get_json, conn, "/latest?hold=2")  # and again on retry
        _terminate(postgres, _busy_backend(postgres, before["backend_pid"]))
        status, reply = read.result(10)
    assert status == 200 and reply["retried"] and reply["latest"][0][0] == before["hit"]
    assert reply["thread_id"] == before["thread_id"] and reply["backend_pid"] != before["backend_pid"]


def _busy_backend(postgres, pid):
    """Wait until backend `pid` is inside pg_sleep; return it."""
    deadline = time.monotonic() + 10
    while not postgres.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s AND state = 'active'"
                               " AND query LIKE 'SELECT pg_sleep%%'", (pid,)).fetchone():
        assert time.monotonic() < deadline, "backend %d never started its query" % pid
        time.sleep(0.02)
    return pid


def test_door_model_self_test(door_model):
    """The model's own checks of illumos semantics (E2BIG, EBADF after revoke, EINTR, ...)."""
    result = subprocess.run([sys.executable, os.path.join(SUPPORT, "model_selftest.py")],
                            capture_output=True, timeout=180)
    assert result.returncode == 0, result.stdout.decode()[-3000:] + result.stderr.decode()[-2000:]

# -- every transport: the same WSGI behaviour and failure handling ------------------------------

TRANSPORTS = ["door", "proxy", "fastcgi", "cgi", "inprocess"]
APP_PROCESS_TRANSPORTS = ["door", "proxy", "fastcgi"]


def _children(pid):
    """Pids of the live processes whose parent is `pid`."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open("/proc/%s/stat" % entry) as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                found.append(int(entry))
    return found


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_transport_hello_head_and_stream(started, transport):
    server = serve(started, "apps:validated", "--transport", transport)
    assert "through %s" % doordown.transport_description(transport, doordown.door_backend(DOORS)) \
        in server.log
    status, headers, body = server.get("/x?q=1")
    assert status == 200 and json.loads(body) == {"len": 0, "method": "GET", "path": "/x", "query": "q=1"}
    assert headers["Server"] == "doordown"
    status, headers, body = server.get("/h", "HEAD")
    assert status == 200 and body == b"" and int(headers["Content-Length"]) > 0
    status, headers, body = server.get("/stream")  # no Content-Length from the app: chunked
    assert (status, body, headers.get("Transfer-Encoding")) == (200, b"one two three", "chunked")
    assert server.get("/write")[::2] == (200, b"hello world")
    assert "Traceback" not in server.log and "Warning" not in server.log


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_transport_post_bodies_and_environ(started, transport):
    server = serve(started, "apps:echo", "--transport", transport, "--max-body", "8M")
    status, _, body = server.get("/a%20b?x=1", "POST", b"payload",
                                 {"Content-Type": "text/x-test", "X-Custom": "v1",
                                  "Doordown-Forwarded": "https 6.6.6.6 1 evil 2 /x",
                                  "Proxy": "http://evil.example:3128/"})
    env = json.loads(body)
    assert status == 200 and "HTTP_PROXY" not in env  # httpoxy
    assert (env["REQUEST_METHOD"], env["PATH_INFO"], env["QUERY_STRING"], env["SCRIPT_NAME"]) == \
        ("POST", "/a b", "x=1", "")
    assert (env["CONTENT_TYPE"], env["CONTENT_LENGTH"], env["HTTP_X_CUSTOM"]) == ("text/x-test", "7", "v1")
    assert (env["REMOTE_ADDR"], env["SERVER_PORT"], env["wsgi.url_scheme"]) == ("127.0.0.1", str(server.port), "http")
    assert env["SERVER_PROTOCOL"] == "HTTP/1.1" and env["body_head"] == "payload"
    payload = os.urandom(2 << 20)  # over the inline limit: spooled by the front
    status, _, body = server.get("/", "POST", payload)
    assert status == 200 and json.loads(body)["body_sha256"] == hashlib.sha256(payload).hexdigest()
    chunked = b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    reply = server.raw(b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                       b"Connection: close\r\n\r\n" + chunked)
    env = json.loads(reply.split(b"\r\n\r\n", 1)[1])
    assert env["body_head"] == "hello world" and env["CONTENT_LENGTH"] == "11"


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_transport_app_exception_is_500(started, transport):
    server = serve(started, "apps:crash", "--transport", transport)
    assert server.get("/")[::2] == (500, b"Internal Server Error\n")
    server.wait_for(r"RuntimeError: the app fell over on purpose")
    assert server.get("/")[0] == 500


def _head_fields(reply):
    """The header lines of a raw response, as (lower name, value) in the order sent."""
    lines = reply.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]
    return [(name.strip().lower(), value.strip()) for name, _, value in (l.partition(b":") for l in lines)]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_transport_front_owns_date_server_and_framing(started, transport):
    server = serve(started, "apps:misbehaving", "--transport", transport)
    reply = server.raw(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    fields = _head_fields(reply)
    names = [name for name, _ in fields]
    assert status_of(reply) == 200 and reply.endswith(b"\r\n\r\nok"), reply
    assert names.count(b"date") == 1 and names.count(b"server") == 1, fields
    assert dict(fields)[b"server"] == b"doordown" and dict(fields)[b"date"] != b"Thu, 01 Jan 1970 00:00:00 GMT"
    reply = server.raw(b"GET /dup-length HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status_of(reply) == 500 and [n for n, _ in _head_fields(reply)].count(b"content-length") == 1, reply
    reply = server.raw(b"GET /bad-length-stream HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status_of(reply) == 500, reply[:200]
    # a client's path in the application's error line: escaped, so it forges no line, no colour
    reply = server.raw(b"GET /crash%0a[doordown%20front%201]%20forged%1b[31m HTTP/1.1\r\nHost: x\r\n"
                       b"Connection: close\r\n\r\n")
    assert status_of(reply) == 500
    server.wait_for(r"RuntimeError: misbehaving on purpose")
    assert "\\x0a[doordown front 1] forged\\x1b[31m" in server.log, server.log
    assert "\n[doordown front 1] forged" not in server.log and "\x1b" not in server.log


def test_fastcgi_stderr_reaches_the_front_log_escaped(started):
    # what the app writes to wsgi.errors comes back as FCGI_STDERR and may quote a client's path
    server = serve(started, "apps:warn", "--transport", "fastcgi")
    reply = server.raw(b"GET /w%0a[doordown%20front%201]%20forged%1b[31m HTTP/1.1\r\nHost: x\r\n"
                       b"Connection: close\r\n\r\n")
    assert status_of(reply) == 200
    server.wait_for(r"FastCGI stderr: warned about /w")
    assert "\\x1b[31m" in server.log and "\x1b" not in server.log, server.log
    assert "\n[doordown front 1] forged" not in server.log


def _fake_peer(path, serve_connection):
    """A broken application at `path`, in a thread: serve_connection(sock) runs per connection."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)

    def accept():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=lambda: (serve_connection(conn), conn.close()), daemon=True).start()
    threading.Thread(target=accept, daemon=True).start()
    return listener


def _recv_exact(sock, size):
    data = b""
    while len(data) < size:
        more = sock.recv(size - len(data))
        if not more:
            raise EOFError
        data += more
    return data


# What a broken proxy-pass peer answers for each path (it answers stats probes properly).
_BAD_PROXY_REPLIES = {
    b"/dup-length": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok",
    b"/bad-status": b"HTTP/1.1 2OO OK\r\nContent-Length: 2\r\n\r\nok",
    b"/ctl": b"HTTP/1.1 200 OK\r\nX-A: a\x01b\r\nContent-Length: 2\r\n\r\nok",
    b"/bad-chunk": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0 \r\n\r\n",
    b"/gzip": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
    b"/\x9b31m": b"HTTP/1.1 200 OK\r\nX: y\r\n bad fold\r\n\r\n",
}


def _bad_proxy_peer(sock):
    buf = b""
    while True:
        while b"\r\n\r\n" not in buf:
            more = sock.recv(65536)
            if not more:
                return
            buf += more
        head, buf = buf.split(b"\r\n\r\n", 1)
        length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
        buf = buf[int(length.group(1)) if length else 0:]
        if b"Doordown-Stats" in head:
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
            continue
        sock.sendall(_BAD_PROXY_REPLIES[head.split(b" ")[1]])
        return


def _bad_fastcgi_peer(sock):
    """A responder that ends each request with an END_REQUEST record too short to hold its body."""
    try:
        while True:
            _, kind, request_id, size, padding = doordown._FCGI_HEADER.unpack(_recv_exact(sock, 8))
            _recv_exact(sock, size + padding)
            if kind == doordown._FCGI_GET_VALUES:
                sock.sendall(doordown.fcgi_record(doordown._FCGI_GET_VALUES_RESULT, 0))
            elif kind == doordown._FCGI_STDIN and size == 0:
                sock.sendall(doordown.fcgi_stream(doordown._FCGI_STDOUT, request_id, b"Status: 200 OK\r\n\r\nok")
                             + doordown.fcgi_record(doordown._FCGI_END_REQUEST, request_id, b"\0\0\0"))
    except (EOFError, OSError):
        pass


def test_malformed_peer_replies_are_a_502_for_that_request(started, tmp_path):
    proxy = _fake_peer(str(tmp_path / "proxy.sock"), _bad_proxy_peer)
    fastcgi = _fake_peer(str(tmp_path / "fastcgi.sock"), _bad_fastcgi_peer)
    try:
        front = serve(started, "--transport", "proxy", "--app-door", str(tmp_path / "proxy.sock"))
        for path in _BAD_PROXY_REPLIES:
            reply = front.raw(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path)
            assert status_of(reply) == 502 and not reply.endswith(b"<timeout>"), (path, reply)
        front.wait_for(r"GET /\\x9b31m: ")  # log_failure escapes C1 controls too
        assert "\x9b" not in front.log and "Traceback" not in front.log, front.log
        front = serve(started, "--transport", "fastcgi", "--app-door", str(tmp_path / "fastcgi.sock"))
        for _ in range(2):
            reply = front.raw(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert status_of(reply) == 502 and not reply.endswith(b"<timeout>"), reply
        assert "Traceback" not in front.log, front.log
    finally:
        proxy.close()
        fastcgi.close()


def _failing_door(data, fds, caller):
    kind, _, _ = doordown.unpack_message(data, (doordown.KIND_PING, doordown.KIND_REQUEST))
    if kind == doordown.KIND_PING:
        return doordown.pack_message(doordown.KIND_STATS, 0, [b'{"pid": 1}']), []
    path = doordown.unpack_message(data, (kind,))[2][1]
    if path == b"/dup-length":
        return doordown.pack_message(doordown.KIND_RESPONSE, 0, [b"200 OK", b"ok", b"Content-Length", b"2",
                                                                 b"Content-Length", b"2"]), []
    if path == b"/bad-status":
        return doordown.pack_message(doordown.KIND_RESPONSE, 0, [b"abc", b"ok"]), []
    return doordown.pack_message(doordown.KIND_FAIL, 0, []), []  # a failure without its fields


class _Connection:
    closed = False

    def close(self):
        self.closed = True


def test_a_connection_put_back_while_its_pool_closes_is_closed():
    """close() can run between put()'s look at the pool and its append: the connection
    must still be closed, not left in a closed pool for the garbage collector."""
    pool = doordown.LifoPool(_Connection)

    class ClosingAsItAppends(list):
        def append(self, connection):
            pool.close()  # another thread's close(), just before this append
            super().append(connection)

    pool._idle = ClosingAsItAppends()
    connection = pool.get()
    pool.put(connection)
    assert connection.closed and not pool._idle


_EMULATED_FULL_TABLE_CLIENT = """
import os, resource, sys
import doordown
client = doordown.EmulatedDoors().open(sys.argv[1])
for fd in client.call(b"warm")[1]:  # the connection is made while descriptors are free
    os.close(fd)
resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
try:
    while True:
        os.open(os.devnull, os.O_RDONLY)
except OSError:
    pass
try:
    client.call(b"fd")
except doordown.DoorError as exc:
    print(exc.errno)
"""


def test_emulated_reply_descriptors_the_caller_cannot_take_are_emfile(tmp_path):
    """As on illumos, a caller whose descriptor table is full is told EMFILE (the kernel
    cut the message's descriptors short), not that the message was malformed."""
    read, write = os.pipe()
    door = doordown.EmulatedDoors().serve(str(tmp_path / "fd.door"), lambda data, fds, caller: (b"x", [os.dup(read)]))
    try:
        result = subprocess.run([sys.executable, "-c", _EMULATED_FULL_TABLE_CLIENT, door.path],
                                cwd=HERE, capture_output=True, timeout=60)
        assert result.stdout.decode().split() == [str(errno.EMFILE)], result.stdout + result.stderr
    finally:
        door.close(0)
        _close_all([read, write])


@pytest.mark.skipif(DOORS != "emulated", reason="the broken door is served by the test's own process")
def test_malformed_door_replies_are_a_502_for_that_request(started, tmp_path):
    door = doordown.EmulatedDoors().serve(str(tmp_path / "bad.door"), _failing_door)
    try:
        front = serve(started, "--app-door", str(tmp_path / "bad.door"))
        for path in (b"/", b"/dup-length", b"/bad-status"):
            reply = front.raw(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path)
            assert status_of(reply) == 502 and not reply.endswith(b"<timeout>"), (path, reply)
        assert "Traceback" not in front.log, front.log
    finally:
        door.close(0)


@pytest.mark.parametrize("transport", APP_PROCESS_TRANSPORTS)
def test_transport_app_killed_gives_502_then_recovers(started, transport):
    server = serve(started, "apps:slow", "--transport", transport)
    old = server.app_pid()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(server.get, "/?s=5")
        time.sleep(0.5)
        os.kill(old, signal.SIGKILL)
        assert pending.result(10)[0] == 502
    deadline = time.monotonic() + 10
    statuses = []
    while time.monotonic() < deadline:
        status, _, body = server.get("/?s=0")
        statuses.append(status)
        if status == 200:
            break
        time.sleep(0.05)
    assert statuses[-1] == 200 and set(statuses[:-1]) <= {502, 503}, statuses
    assert json.loads(body)["pid"] != old
    server.wait_for(r"app pid %d exited \(killed by SIGKILL\)" % old)


def test_cgi_child_killed_gives_502_next_request_served(started):
    server = serve(started, "apps:slow", "--transport", "cgi")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(server.get, "/?s=5")
        deadline = time.monotonic() + 10
        while not _children(server.proc.pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)
        for pid in _children(server.proc.pid):
            os.kill(pid, signal.SIGKILL)
        assert pending.result(10)[0] == 502
    status, _, body = server.get("/?s=0")
    assert status == 200 and json.loads(body)["pid"] not in (server.proc.pid, os.getpid())


def test_cgi_header_too_large_for_an_environment_is_a_431(started):
    """Linux refuses an environment string over 128 KiB (E2BIG): a header the front takes
    can still be too large for the CGI program's environment.  That is the client's 431."""
    server = serve(started, "apps:counter", "--transport", "cgi", "--max-header-size", "512K",
                   "--max-line", "262144")
    reply = server.raw(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: %s\r\n\r\n" % (b"a" * (140 << 10)))
    assert status_of(reply) == 431 and not reply.endswith(b"<timeout>"), reply[:200]
    assert server.get("/")[0] == 200


def test_cgi_program_that_closes_stdout_and_keeps_running_gets_504(started, tmp_path):
    # Its answer ends (stdout closed) but the program does not: the wait for it is bounded
    # by --timeout, and it is killed and reaped.
    (tmp_path / "lingers.py").write_text(
        "import os, time\n"
        "def application(environ, start_response):\n"
        "    if environ.get('QUERY_STRING') == 'linger':\n"
        "        os.close(1)\n"
        "        time.sleep(60)\n"
        "    start_response('200 OK', [('Content-Type', 'text/plain')])\n"
        "    return [b'ok']\n")
    server = started("serve", "lingers", "--transport", "cgi", "--timeout", "1", "--bind", "127.0.0.1:0",
                     "--doors", DOORS, "--access-log", "off", cwd=str(tmp_path))
    asked = time.monotonic()
    assert server.get("/?linger")[0] in (502, 504)
    assert time.monotonic() - asked < 8
    deadline = time.monotonic() + 5
    while _children(server.proc.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _children(server.proc.pid)
    assert server.get("/")[:3:2] == (200, b"ok")


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_transport_sigterm_lets_slow_request_finish(started, transport):
    server = serve(started, "apps:slow", "--transport", transport)
    app_pid = server.app_pid() if transport in APP_PROCESS_TRANSPORTS else None
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(server.get, "/?s=1.5")
        time.sleep(0.7)
        server.proc.send_signal(signal.SIGTERM)
        status, _, body = pending.result(10)
    assert status == 200 and json.loads(body)["slept"] == 1.5
    assert server.proc.wait(15) == 0
    if app_pid is not None:
        assert not _pid_alive(app_pid)
        socket_path = server.wait_for(r"on (?:door|socket) (\S+) \(").group(1)
        assert not os.path.exists(os.path.dirname(socket_path))


def _read_events(sock, until=b"0\r\n\r\n"):
    """(arrival time of each SSE event, all the bytes) of a response read until `until` or EOF."""
    data, arrivals = b"", []
    while not data.endswith(until):
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            break
        if not chunk:
            break
        arrivals += [time.monotonic()] * chunk.count(b"data: ")
        data += chunk
    return arrivals, data


def _wait_for_file(path, timeout):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.02)
    return os.path.exists(path)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_transport_streams_events_at_the_apps_pace(started, transport):
    # --timeout bounds the time to the first byte only, and a stream is no stuck request.
    # (CGI's --timeout also covers starting a Python for the request: on a loaded machine,
    # seconds.)
    server = serve(started, "apps:streams", "--transport", transport, "--max-stuck", "1",
                   "--timeout", "0.5" if transport != "cgi" else "5")
    pid = server.app_pid() if transport in APP_PROCESS_TRANSPORTS else None
    assert server.get("/")[0] == 200
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        asked = time.monotonic()
        sock.sendall(b"GET /events?n=8&every=0.2 HTTP/1.1\r\nHost: x\r\n\r\n")
        arrivals, data = _read_events(sock)
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"200 OK" in head and b"Transfer-Encoding: chunked" in head and b"text/event-stream" in head
    assert body.endswith(b"\r\n0\r\n\r\n") and len(arrivals) == 8, data
    # CGI starts a Python process for the request first.
    assert arrivals[0] - asked < (0.3 if transport != "cgi" else 5), arrivals[0] - asked
    print("first event after %.1f ms" % ((arrivals[0] - asked) * 1000))
    gaps = sorted(b - a for a, b in zip(arrivals, arrivals[1:]))
    assert arrivals[-1] - arrivals[0] > 1.0 and gaps[0] > 0.03 and gaps[3] > 0.15, gaps  # at the app's pace
    if pid is not None:
        assert server.app_pid() == pid and "replacing" not in server.log, server.log
    status, headers, body = server.get("/bytesio")  # a file-like without a descriptor: streamed
    assert (status, body) == (200, b"no descriptor " * 1000)
    if transport not in ("inprocess", "cgi"):  # in-process has no --timeout: the front runs the app
        assert server.get("/lazy?s=2")[0] == 504  # nothing produced within --timeout


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_transport_client_disconnect_closes_the_iterable(started, transport, tmp_path):
    server = serve(started, "apps:streams", "--transport", transport)
    mark = str(tmp_path / "closed")
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"GET /events?n=100000&every=0.05&mark=%s HTTP/1.1\r\nHost: x\r\n\r\n" % mark.encode())
        assert b"data: 0" in _read_events(sock, until=b"\n\n\r\n")[1].split(b"\r\n\r\n", 1)[1]
    gone = time.monotonic()
    assert _wait_for_file(mark, 5) and time.monotonic() - gone < 2.0
    if transport == "door":  # and its app thread has ended
        deadline = time.monotonic() + 2
        while server.stats()["streams"] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.stats()["streams"] == 0
    assert server.get("/")[0] == 200


def _tree_rss(pid):
    """Resident memory (bytes) of a process and all its descendants."""
    total, pending = 0, [pid]
    while pending:
        current = pending.pop()
        try:
            with open("/proc/%d/status" % current) as f:
                total += int(re.search(r"VmRSS:\s+(\d+) kB", f.read()).group(1)) << 10
        except (OSError, AttributeError):
            continue
        pending += _children(current)
    return total


def _download(port, path, sample):
    """Bytes of the body of an HTTP/1.0 GET (close-delimited), calling sample() as it goes."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"GET %s HTTP/1.0\r\n\r\n" % path)
        buffer = bytearray(1 << 20)
        head, size, calls = b"", 0, 0
        while True:
            got = sock.recv_into(buffer)
            if not got:
                break
            if not head:
                head = bytes(buffer[:got])
                size -= head.index(b"\r\n\r\n") + 4
            size += got
            calls += 1
            if calls % 64 == 0:
                sample()
    return head, size


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_transport_512mib_stream_and_200mib_file_download_in_flat_memory(started, transport, tmp_path):
    server = serve(started, "apps:streams", "--transport", transport)
    assert server.get("/big?mib=1")[2] == bytes(range(256)) * 4096
    assert server.get("/file?mib=1&dir=%s" % tmp_path)[2] == bytes(1 << 20)  # never read by the app
    base = _tree_rss(server.proc.pid)
    peak = [base]

    def sample():
        peak[0] = max(peak[0], _tree_rss(server.proc.pid))

    head, size = _download(server.port, b"/big?mib=512", sample)
    assert b"200 OK" in head and size == 512 << 20
    head, size = _download(server.port, b"/file?mib=200&dir=%s" % str(tmp_path).encode(), sample)
    assert b"200 OK" in head and size == 200 << 20
    print("serve tree RSS grew %.1f MB" % ((peak[0] - base) / 1e6))
    assert peak[0] - base < 40 << 20, (base, peak)
    assert "AssertionError" not in server.log


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_transport_sigterm_lets_a_stream_run_its_grace_then_cuts_it_off(started, transport, tmp_path):
    # As gunicorn's or nginx's stop past its grace: the body is not all there, so the
    # response ends without the last chunk (which would say it is), then the close.
    server = serve(started, "apps:streams", "--transport", transport, "--graceful-timeout", "1")
    mark = str(tmp_path / "closed")
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"GET /events?n=100000&every=0.1&mark=%s HTTP/1.1\r\nHost: x\r\n\r\n" % mark.encode())
        assert b"data: 0" in _read_events(sock, until=b"\n\n\r\n")[1].split(b"\r\n\r\n", 1)[1]
        server.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        arrivals, data = _read_events(sock)
    assert arrivals and arrivals[-1] - signalled > 0.7  # the stream ran on through the grace
    assert data.endswith(b"\n\n\r\n") and not data.endswith(b"\r\n0\r\n\r\n"), data[-40:]  # then stopped
    assert server.proc.wait(10) == 0
    assert _wait_for_file(mark, 3)


# In-process, the front's own thread is inside the app's iteration: nothing can time it.
@pytest.mark.parametrize("transport", ["door", "proxy", "fastcgi", "cgi"])
def test_transport_stream_idle_timeout_ends_the_stream_as_incomplete(started, transport, tmp_path):
    # As nginx on proxy_read_timeout, and as a body the app broke off: no last chunk, or no
    # padding to the Content-Length; the close says the response is incomplete.
    server = serve(started, "apps:streams", "--transport", transport, "--stream-idle-timeout", "0.5")
    for length, head, body in ((None, b"Transfer-Encoding: chunked", b"5\r\nfirst\r\n"),
                               (10, b"Content-Length: 10", b"first")):
        mark = str(tmp_path / ("idle-%s" % length))
        # CGI: the close waits a second for the program to stop, then kills it (_CGIStream.close),
        # so that program must look up well within the second to run its close().
        silence = b"0.9" if transport == "cgi" else b"1.5"
        query = b"s=%s&mark=%s" % (silence, mark.encode()) + (b"&length=%d" % length if length else b"")
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(b"GET /idle?%s HTTP/1.1\r\nHost: x\r\n\r\n" % query)
            _, data = _read_events(sock, until=body)
            first = time.monotonic()  # the app is silent from here
            _, rest = _read_events(sock)
            assert 0.4 < time.monotonic() - first < (2.6 if transport == "cgi" else 1.4), length
            assert sock.recv(10) == b""  # closed
        data += rest
        assert head in data.split(b"\r\n\r\n", 1)[0], data
        assert data.split(b"\r\n\r\n", 1)[1] == body, data
        assert _wait_for_file(mark, 3)  # the app's iterable closed once it looked up again
    server.wait_for(r"(?s)(no byte from the app .*--stream-idle-timeout.*){2}")


def test_sighup_during_a_stream_lets_it_run_its_grace_then_cuts_it_off(started, tmp_path):
    server = serve(started, "apps:streams", "--stream-idle-timeout", "0.5", "--graceful-timeout", "1")
    old = server.app_pid()
    # SIGHUP: the old app's stream runs through its grace, then is cut off (no last chunk:
    # it is not complete); the new app serves.
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"GET /events?n=100000&every=0.1 HTTP/1.1\r\nHost: x\r\n\r\n")
        assert b"data: 0" in _read_events(sock, until=b"\n\n\r\n")[1].split(b"\r\n\r\n", 1)[1]
        server.proc.send_signal(signal.SIGHUP)
        signalled = time.monotonic()
        server.wait_for(r"app pid \d+ exited|replacing app pid %d" % old)
        arrivals, data = _read_events(sock)
    assert data.endswith(b"\n\n\r\n") and not data.endswith(b"\r\n0\r\n\r\n"), data[-40:]
    assert arrivals[-1] - signalled > 0.7
    assert json.loads(server.get("/")[2])["pid"] != old


def test_transport_timeout_gives_504(started):
    for transport in ("door", "proxy", "fastcgi", "cgi"):
        # 1.5 s: a CGI child starting on a loaded machine must not pass it for s=0
        server = serve(started, "apps:slow", "--transport", transport, "--timeout", "1.5")
        assert server.get("/?s=5")[0] == 504, transport
        assert server.get("/?s=0")[0] == 200, transport


@pytest.mark.parametrize("transport", ["proxy", "fastcgi"])
def test_socket_app_keeps_the_door_rules(started, tmp_path, transport):
    path = str(tmp_path / "app.sock")
    app = started("app", "apps:counter", "--transport", transport, "--socket", path,
                  ready=r"serving apps:counter on socket")
    assert os.stat(path).st_mode & 0o777 == 0o600
    # a second app on the same path is refused: the live one keeps its socket
    second = started("app", "apps:counter", "--transport", transport, "--socket", path, ready=None)
    assert second.proc.wait(10) == doordown.EXIT_DOOR_FAILED
    assert "another server is listening there" in second.log
    front = serve(started, "--transport", transport, "--app-door", path)
    status, _, body = front.get("/")
    assert status == 200 and json.loads(body)["pid"] == app.proc.pid
    app.proc.send_signal(signal.SIGTERM)
    assert app.proc.wait(10) == 0 and not os.path.exists(path)
    assert front.get("/")[0] == 502


@pytest.mark.skipif(os.geteuid() != 0, reason="calling as another user needs root")
@pytest.mark.parametrize("transport", ["proxy", "fastcgi"])
def test_socket_app_refuses_another_euid(started, transport):
    directory = tempfile.mkdtemp(prefix="doordown-test-")
    try:
        os.chmod(directory, 0o755)
        path = os.path.join(directory, "app.sock")
        app = started("app", "apps:counter", "--transport", transport, "--socket", path,
                      ready=r"serving apps:counter on socket")
        os.chmod(path, 0o666)  # let the file mode pass, so that the credential check is what refuses
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child, as nobody
            code = 2
            try:
                os.setgid(65534)
                os.setuid(65534)
                with socket.socket(socket.AF_UNIX) as sock:
                    sock.settimeout(5)
                    sock.connect(path)
                    try:
                        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                        code = 0 if sock.recv(100) == b"" else 1
                    except (ConnectionResetError, BrokenPipeError):
                        code = 0  # closed unanswered, with our request unread
            finally:
                os._exit(code)
        assert os.waitpid(pid, 0)[1] == 0, "the app answered a caller of another euid"
        app.wait_for(r"refused a connection from euid 65534")
    finally:
        shutil.rmtree(directory, ignore_errors=True)


# -- the FastCGI and CGI encodings on their own ------------------------------------------------

def test_fastcgi_records_and_pairs_round_trip():
    pairs = [(b"A", b""), (b"LONG_VALUE", b"v" * 300), (b"N" * 200, b"x")]
    encoded = doordown.fcgi_pairs(pairs)
    assert encoded[:3] == b"\x01\x00A" and doordown.parse_fcgi_pairs(encoded) == dict(pairs)
    with pytest.raises(doordown.TransportError):
        doordown.parse_fcgi_pairs(encoded[:-1])
    record = doordown.fcgi_record(6, 1, b"abc")
    assert record == b"\x01\x06\x00\x01\x00\x03\x05\x00abc\x00\x00\x00\x00\x00"
    stream = doordown.fcgi_stream(6, 1, b"x" * 70000)
    assert len(stream) == 8 + 65528 + 8 + 4472 + 8  # two records, no padding needed, then the end


@pytest.mark.parametrize("output,status,headers,body,close", [
    (b"Status: 404 Not Here\r\nContent-Type: text/plain\r\n\r\nnope", b"404 Not Here",
     [b"Content-Type", b"text/plain"], b"nope", False),
    (b"Content-Type: text/plain\n\nbody\n\nmore", b"200 OK", [b"Content-Type", b"text/plain"],
     b"body\n\nmore", False),
    (b"Location: http://x/\r\n\r\n", b"302 Found", [b"Location", b"http://x/"], b"", False),
    (b"Content-Type: a\r\n\r\nx\n\ny", b"200 OK", [b"Content-Type", b"a"], b"x\n\ny", False),  # LF LF in the body
    (b"Status: 201\r\nConnection: close\r\n\r\n", b"201 Created", [], b"", True),
])
def test_cgi_response_parsing(output, status, headers, body, close):
    response = doordown.parse_cgi_response(output)
    assert (response.status, response.headers, response.body, response.close) == (status, headers, body, close)


@pytest.mark.parametrize("output", [b"Status: 200 OK\r\n", b"Bad Header\r\n\r\n", b"Status: 99\r\n\r\n",
                                    b"X: a\rb\r\n\r\n"])
def test_cgi_response_parsing_refuses_damage(output):
    with pytest.raises(doordown.TransportError):
        doordown.parse_cgi_response(output)


# -- FastCGI against a real peer: nginx's fastcgi_pass ----------------------------------------

NGINX = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx")
                                        if os.path.exists(p)), None)


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.skipif(NGINX is None, reason="nginx is not installed (Debian package nginx; .ci/run installs it)")
def test_fastcgi_responder_behind_nginx(started, tmp_path):
    app_socket = str(tmp_path / "app.sock")
    app = started("app", "apps:echo", "--transport", "fastcgi", "--socket", app_socket,
                  ready=r"serving apps:echo on socket")
    warn = started("app", "apps:warn", "--transport", "fastcgi", "--socket", str(tmp_path / "warn.sock"),
                   ready=r"serving apps:warn on socket")
    port = _free_port()
    params = "\n".join("        fastcgi_param %s %s;" % pair for pair in (
        ("QUERY_STRING", "$query_string"), ("REQUEST_METHOD", "$request_method"),
        ("CONTENT_TYPE", "$content_type"), ("CONTENT_LENGTH", "$content_length"),
        ("SCRIPT_NAME", '""'), ("PATH_INFO", "$uri"), ("REQUEST_URI", "$request_uri"),
        ("SERVER_PROTOCOL", "$server_protocol"), ("REQUEST_SCHEME", "$scheme"),
        ("GATEWAY_INTERFACE", "CGI/1.1"), ("REMOTE_ADDR", "$remote_addr"),
        ("REMOTE_PORT", "$remote_port"), ("SERVER_NAME", "$server_name"), ("SERVER_PORT", "$server_port")))
    for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (tmp_path / name).mkdir()
    config = tmp_path / "nginx.conf"
    config.write_text("""
%(user)s
daemon off;
worker_processes 1;
pid %(tmp)s/nginx.pid;
error_log %(tmp)s/error.log info;
events { worker_connections 64; }
http {
    access_log off;
    client_body_temp_path %(tmp)s/client_body;
    proxy_temp_path %(tmp)s/proxy;
    fastcgi_temp_path %(tmp)s/fastcgi;
    uwsgi_temp_path %(tmp)s/uwsgi;
    scgi_temp_path %(tmp)s/scgi;
    upstream doordown_app { server unix:%(app)s; keepalive 4; }
    server {
        listen 127.0.0.1:%(port)d;
        location / {
            fastcgi_pass doordown_app;
            fastcgi_keep_conn on;
%(params)s
        }
        location /closing/ {
            fastcgi_pass unix:%(app)s;
%(params)s
        }
        location /warn/ {
            fastcgi_pass unix:%(warn)s;
%(params)s
        }
    }
}
""" % {"user": "user root;" if os.geteuid() == 0 else "", "tmp": tmp_path, "app": app_socket,
       "warn": tmp_path / "warn.sock", "port": port, "params": params})
    nginx = subprocess.Popen([NGINX, "-c", str(config), "-p", str(tmp_path), "-e", str(tmp_path / "error.log")],
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if nginx.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError("nginx did not start: %s %s" % (
                        nginx.stdout.read().decode(), (tmp_path / "error.log").read_text()))
                time.sleep(0.05)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        for prefix in ("/", "/closing/"):  # with FCGI_KEEP_CONN (pooled) and without (a connection each)
            for i in range(3):
                payload = os.urandom(100000 + i)
                conn.request("POST", prefix + "p%d?x=%d" % (i, i), body=payload, headers={"X-Custom": "v"})
                response = conn.getresponse()
                env = json.loads(response.read())
                assert response.status == 200
                assert env["body_sha256"] == hashlib.sha256(payload).hexdigest()
                assert (env["PATH_INFO"], env["QUERY_STRING"], env["HTTP_X_CUSTOM"]) == \
                    (prefix + "p%d" % i, "x=%d" % i, "v")
                assert env["pid"] == app.proc.pid
        conn.request("GET", "/warn/now")
        response = conn.getresponse()
        assert (response.status, response.read()) == (200, b"warned")
        conn.close()
        deadline = time.monotonic() + 5
        while "warned about /warn/now" not in (tmp_path / "error.log").read_text():
            assert time.monotonic() < deadline, (tmp_path / "error.log").read_text()
            time.sleep(0.05)
        assert "FastCGI sent in stderr" in (tmp_path / "error.log").read_text()
        assert "refused" not in app.log and "Traceback" not in app.log + warn.log
    finally:
        nginx.terminate()
        try:
            nginx.wait(10)
        except subprocess.TimeoutExpired:
            nginx.kill()
            nginx.wait()


# -- many applications behind one front: serve --config ------------------------------------------

def _site(tmp_path, text, name="site.ini"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def site_serve(started, config, *args, **kwargs):
    return started("serve", "--config", config, "--doors", DOORS, *args, **kwargs)


def doordown_command(*args):
    return subprocess.run([sys.executable, DOORDOWN, *args], capture_output=True, timeout=30, cwd=SUPPORT)


def _app_pids(server, name):
    """Pids the front has said serve app `name`, in order."""
    return [int(pid) for pid in re.findall(r"app %s: pid (\d+) serving" % re.escape(name), server.log)]


def _await_app_pids(server, name, count, timeout=15):
    """_app_pids once the front has said at least `count` pids serve app `name`.  The line
    comes just after the mount is handed the new app, so a request can be answered by it
    before the line is in the log."""
    deadline = time.monotonic() + timeout
    while len(_app_pids(server, name)) < count:
        assert time.monotonic() < deadline, server.log
        time.sleep(0.05)
    return _app_pids(server, name)


SITE = """
[serve]
bind = 127.0.0.1:0
access-log = off
control = {control}

[app:hello]
wsgi = doordown:hello_app   ; the built-in hello app
mount = /hello
spawn = eager

[app:flask]
wsgi = flask_app:app
mount = /flask
idle-timeout = 2

[app:django]
wsgi = django_app
host = django.test          ; this Host only, and it beats a bare mount
mount = /

[app:echo]
wsgi = apps:interpreter
mount = /echo/deep
env = GREETING="hello there"

[app:broken]
wsgi = no_such_module
mount = /broken
"""


def test_site_routes_spawns_lazily_isolates_and_stops_the_idle(started, tmp_path):
    pytest.importorskip("flask", reason="Flask is a test dependency: pip install flask")
    pytest.importorskip("django", reason="Django is a test dependency: pip install django")
    control = str(tmp_path / "control")
    server = site_serve(started, _site(tmp_path, SITE.format(control=control)))
    server.wait_for(r"app hello: pid \d+ serving")
    assert len(_children(server.proc.pid)) == 1  # lazy apps cost nothing until asked for
    assert server.get("/hello")[::2] == (200, b"Well, hello to you too!\n")
    assert server.get("/nobody/claims/this")[0] == 404
    assert server.get("/hellothere")[0] == 404  # a prefix matches whole segments only
    # Concurrent first requests to a stopped app share one spawn.
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        firsts = list(pool.map(lambda _: server.get("/flask/"), range(8)))
    assert [(status, body) for status, _, body in firsts] == [(200, b"Hello from Flask")] * 8
    assert len(_await_app_pids(server, "flask", 1)) == 1
    status, _, body = server.get("/flask/items/7?x=y")  # Flask routes on PATH_INFO
    assert status == 200 and json.loads(body)["args"] == {"x": "y"}
    env = json.loads(server.get("/echo/deep/a%20b/c")[2])
    assert (env["script_name"], env["path_info"], env["greeting"]) == ("/echo/deep", "/a b/c", "hello there")
    status, _, body = server.get("/echo/deep/x", headers={"Host": "Django.Test:8000"})  # Host beats the rest
    assert status == 200 and json.loads(body)["path"] == "/echo/deep/x"
    # Isolation: the app that cannot load gets 503 at its mount only; serve and the others go on.
    begin = time.monotonic()
    status, _, body = server.get("/broken/page")
    assert (status, body) == (503, b"the application failed to load\n") and time.monotonic() - begin < 10
    hello_pid = _app_pids(server, "hello")[0]
    os.kill(env["pid"], signal.SIGKILL)  # a crash: restarted, the others untouched
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and server.get("/echo/deep")[0] != 200:
        time.sleep(0.1)
    assert json.loads(server.get("/echo/deep")[2])["pid"] != env["pid"]
    assert server.get("/hello")[0] == 200 and _app_pids(server, "hello") == [hello_pid]
    assert server.proc.poll() is None
    # Idle stop: flask goes after 2 s without a request; the next request starts it again.
    flask_pid = _app_pids(server, "flask")[-1]
    server.wait_for(r"app flask: stopping app pid %d: idle for 2s" % flask_pid, timeout=15)
    deadline = time.monotonic() + 10
    while _pid_alive(flask_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _pid_alive(flask_pid)
    assert server.get("/flask/")[::2] == (200, b"Hello from Flask") and len(_await_app_pids(server, "flask", 2)) == 2
    # The control door: status, reload, stop, start.
    assert server.get("/broken/")[0] == 503  # and it is tried again, as its own spawn score allows
    result = doordown_command("status", "--control", control, "--doors", DOORS, "--json")
    assert result.returncode == 0, result.stderr
    rows = {row["app"]: row for row in json.loads(result.stdout)}
    assert set(rows) == {"hello", "flask", "django", "echo", "broken"}
    assert rows["hello"]["state"] == "running" and rows["hello"]["pid"] == hello_pid
    assert rows["hello"]["rss"] > 0 and rows["hello"]["uptime"] > 0
    assert rows["broken"]["state"] in ("refusing", "starting") and "exit code 4" in rows["broken"]["last_exit"]
    assert rows["broken"]["spawn_score"] > 0
    table = doordown_command("status", "--control", control, "--doors", DOORS).stdout.decode()
    assert len(table.strip().splitlines()) == 6 and "django.test/" in table
    echo_pid = json.loads(server.get("/echo/deep")[2])["pid"]
    load = Load(server, threads=4, path="/echo/deep")  # a reload under load loses nothing
    time.sleep(0.3)
    result = doordown_command("reload", "echo", "--control", control, "--doors", DOORS)
    assert result.returncode == 0 and b"replaces pid %d" % echo_pid in result.stdout
    deadline = time.monotonic() + 15
    while _app_pids(server, "echo")[-1] == echo_pid and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    assert set(load.stop()) == {200}
    assert json.loads(server.get("/echo/deep")[2])["pid"] != echo_pid
    assert doordown_command("stop", "echo", "--control", control, "--doors", DOORS).returncode == 0
    assert server.get("/echo/deep")[0] == 503
    assert doordown_command("start", "echo", "--control", control, "--doors", DOORS).returncode == 0
    assert server.get("/echo/deep")[0] == 200
    result = doordown_command("stop", "nosuch", "--control", control, "--doors", DOORS)
    assert result.returncode == 1 and b"no application 'nosuch'" in result.stderr
    assert _app_pids(server, "hello") == [hello_pid]
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(30) == 0 and not os.path.exists(control)


def test_site_sighup_adds_removes_and_replaces_changed_apps_only(started, tmp_path):
    base = ("[serve]\nbind = 127.0.0.1:0\naccess-log = off\ncontrol = %s\n\n" % (tmp_path / "control") +
            "[app:keep]\nwsgi = apps:counter\nmount = /keep\nspawn = eager\n\n")
    config = _site(tmp_path, base + "[app:change]\nwsgi = apps:interpreter\nmount = /change\nspawn = eager\n"
                   "env = GREETING=one\n\n[app:drop]\nwsgi = apps:counter\nmount = /drop\nspawn = eager\n")
    server = site_serve(started, config)
    for name in ("keep", "change", "drop"):
        server.wait_for(r"app %s: pid \d+ serving" % name)
    keep_pid, drop_pid = _app_pids(server, "keep")[0], _app_pids(server, "drop")[0]
    load = Load(server, threads=4, path="/change/")
    time.sleep(0.5)
    _site(tmp_path, base + "[app:change]\nwsgi = apps:interpreter\nmount = /change\nspawn = eager\n"
          "env = GREETING=two\n\n[app:new]\nwsgi = apps:counter\nmount = /new\n")
    server.proc.send_signal(signal.SIGHUP)
    server.wait_for(r"app change: replacing app pid \d+: its configuration changed")
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if json.loads(server.get("/change/")[2])["greeting"] == "two":
            break
        time.sleep(0.05)
    time.sleep(0.3)
    outcomes = load.stop()
    assert set(outcomes) == {200}, (outcomes, server.log)  # replaced under load, nothing lost
    assert json.loads(server.get("/change/")[2])["greeting"] == "two"
    assert server.get("/new/")[0] == 200  # added (lazy: started by this request)
    assert server.get("/drop/")[0] == 404  # removed: its mount is gone
    deadline = time.monotonic() + 10
    while _pid_alive(drop_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _pid_alive(drop_pid)
    assert json.loads(server.get("/keep/")[2])["pid"] == keep_pid and _app_pids(server, "keep") == [keep_pid]
    # A broken file on SIGHUP changes nothing.
    _site(tmp_path, base + "[app:new]\nwsgi = apps:counter\nmount = /new\nbogus = 1\n")
    server.proc.send_signal(signal.SIGHUP)
    server.wait_for(r"SIGHUP: .*\[app:new\] bogus: unknown key.*; keeping the configuration loaded before")
    assert server.get("/change/")[0] == 200 and server.get("/keep/")[0] == 200


def test_site_app_is_replaced_when_its_lifetime_is_over(started, tmp_path):
    config = _site(tmp_path, "[serve]\nbind = 127.0.0.1:0\naccess-log = off\n\n"
                   "[app:short]\nwsgi = apps:counter\nmount = /\nspawn = eager\nlifetime = 1\n")
    server = site_serve(started, config)
    first = server.wait_for(r"app short: pid (\d+) serving").group(1)
    load = Load(server, threads=2)
    server.wait_for(r"app short: replacing app pid %s: it has served its lifetime of 1s" % first)
    _await_app_pids(server, "short", 2)
    time.sleep(0.3)
    assert set(load.stop()) == {200} and len(_app_pids(server, "short")) >= 2


def test_site_smart_spawn_forks_apps_from_a_template(started, tmp_path):
    config = _site(tmp_path, "[serve]\nbind = 127.0.0.1:0\naccess-log = off\nsmart-spawn = yes\n\n"
                   "[app:hello]\nwsgi = doordown:hello_app\nmount = /hello\nspawn = eager\n\n"
                   "[app:echo]\nwsgi = apps:interpreter\nmount = /echo\nenv = GREETING=forked\n"
                   "directory = %s\n\n[app:broken]\nwsgi = no_such_module\nmount = /broken\n" % SUPPORT)
    server = site_serve(started, config, cwd=str(tmp_path))
    (template,) = _children(server.proc.pid)  # the template; the apps are its children
    with open("/proc/%d/cmdline" % template, "rb") as f:
        assert b"\0template\0" in f.read()
    hello = int(server.wait_for(r"app hello: pid (\d+) serving").group(1))
    env = json.loads(server.get("/echo/")[2])
    assert (env["greeting"], env["cwd"], env["script_name"]) == ("forked", SUPPORT, "/echo")
    assert set(_children(template)) == {hello, env["pid"]}
    assert server.get("/broken/")[::2] == (503, b"the application failed to load\n")
    os.kill(hello, signal.SIGKILL)  # its exit comes through the template
    server.wait_for(r"app hello: app pid %d exited \(killed by SIGKILL\)" % hello)
    deadline = time.monotonic() + 15
    while server.get("/hello")[0] != 200 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(_await_app_pids(server, "hello", 2)) == 2 and server.get("/hello")[0] == 200
    apps = _children(template)
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(30) == 0
    deadline = time.monotonic() + 10
    while any(_pid_alive(pid) for pid in apps + [template]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_pid_alive(pid) for pid in apps + [template])


@pytest.mark.parametrize("text,message", [
    ("[app:a]\nmount = /a\n", r"\[app:a\] wsgi: missing"),
    ("[app:a]\nwsgi = apps:echo\nmount = a\n", r"\[app:a\] mount: expected a URL path prefix"),
    ("[app:a]\nwsgi = apps:echo\nidle-timeout = soon\n", r"\[app:a\] idle-timeout: could not convert"),
    ("[app:a]\nwsgi = apps:echo\nbogus = 1\n", r"\[app:a\] bogus: unknown key"),
    ("[app:a]\nwsgi = apps:echo\ntimeout = -1\n", r"\[app:a\] timeout: .*positive number"),
    ("[app:a]\nwsgi = apps:echo\nspawn = sometimes\n", r"\[app:a\] spawn: expected lazy or eager"),
    ("[app:a]\nwsgi = apps:echo\nhost = Blog.example.org:8000\n", r"\[app:a\] host: .*without a port"),
    ("[app:a]\nwsgi = apps:echo\nhost = [::1]:8000\n", r"\[app:a\] host: .*without a port"),
    ("[app:a]\nwsgi = apps:echo\ndirectory = /no/such/dir\n", r"\[app:a\] directory: no such directory"),
    ("[app:a]\nwsgi = apps:echo\npython = /no/python\n", r"\[app:a\] python: not an executable"),
    ("[app:a]\nwsgi = apps:echo\nuser = no-such-user-here\n", r"\[app:a\] user no-such-user-here: no such user"),
    ("[app:a]\nwsgi = apps:echo\n[app:b]\nwsgi = apps:echo\n", r"\[app:b\] mount: / is \[app:a\]'s already"),
    ("[serve]\nbind = nonsense:port\n[app:a]\nwsgi = apps:echo\n", r"\[serve\] bind: "),
    ("[serve]\nworkers = 4\n[app:a]\nwsgi = apps:echo\n", r"\[serve\] workers: "),
    ("[serve]\nmax-header-size = 2M\n[app:a]\nwsgi = apps:echo\n", r"\[serve\] max-header-size: .*at most"),
    ("[serve]\nbind = 127.0.0.1:0\n", r"no \[app:NAME\] section"),
    ("[wrong]\n", r"\[wrong\]: unknown section"),
    ("[serve]\nbind = 127.0.0.1:0\n[app:..]\nwsgi = apps:echo\n", r"\[app:\.\.\]: unknown section"),
    ("not ini at all\n", r"line 1: a line before any \[section\]"),
    ("[app:a]\nwsgi = apps:echo\nwsgi = apps:echo\n", r"\[app:a\] wsgi: given twice"),
])
def test_site_config_errors_are_one_line_naming_file_section_and_key(tmp_path, text, message):
    result = doordown_command("serve", "--config", _site(tmp_path, text))
    lines = result.stderr.decode().strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, lines
    assert re.search(r"^doordown: error: \S*site.ini: " + message, lines[0]), lines[0]
    assert doordown_command("serve", "--config", str(tmp_path / "missing.ini")).returncode == 2


def test_site_control_door_that_cannot_be_made_stops_serve_before_any_app(tmp_path):
    control = tmp_path / "no" / "such" / "dir" / "control"
    config = _site(tmp_path, "[serve]\nbind = 127.0.0.1:0\naccess-log = off\ncontrol = %s\n\n"
                             "[app:a]\nwsgi = apps:echo\nspawn = eager\n" % control)
    result = doordown_command("serve", "--config", config, "--doors", DOORS)
    lines = result.stderr.decode().strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, lines  # no "serving ...", no app started
    assert "cannot make the control door %s: No such file or directory" % control in lines[0]


def test_control_status_into_a_pipe_its_reader_closed_is_no_traceback(started, tmp_path):
    # `doordown status --json | head -1`: the reader goes away; the command stops quietly.
    control = str(tmp_path / "control")
    server = site_serve(started, _site(tmp_path, "[serve]\nbind = 127.0.0.1:0\naccess-log = off\n"
                                                 "control = %s\n\n[app:a]\nwsgi = apps:echo\n" % control))
    assert server.port
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run([sys.executable, DOORDOWN, "status", "--json", "--control", control,
                                 "--doors", DOORS], stdout=write_end, stderr=subprocess.PIPE, timeout=30)
    finally:
        os.close(write_end)
    assert result.returncode != 0 and b"Traceback" not in result.stderr, result.stderr.decode()


def test_site_app_runs_its_own_python_virtualenv(started, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    config = _site(tmp_path, "[serve]\nbind = 127.0.0.1:0\naccess-log = off\n\n"
                   "[app:venv]\nwsgi = apps:interpreter\nmount = /venv\npython = %s\ndirectory = %s\n\n"
                   "[app:system]\nwsgi = apps:interpreter\nmount = /system\n" % (venv / "bin" / "python", SUPPORT))
    server = site_serve(started, config)
    inside, outside = json.loads(server.get("/venv/")[2]), json.loads(server.get("/system/")[2])
    assert inside["prefix"] == str(venv) and outside["prefix"] == sys.prefix
    assert inside["cwd"] == SUPPORT


def _skip_unless_nobody_reads(*paths):
    """Skip unless user nobody may read each of `paths`: every directory above it searchable
    by others, and the path itself readable (a checkout in a 0700 directory is not)."""
    for path in paths:
        path = os.path.abspath(path)
        if not os.stat(path).st_mode & 0o004:
            pytest.skip("%s is not readable by user nobody" % path)
        reachable = path
        while reachable != os.path.dirname(reachable):
            reachable = os.path.dirname(reachable)
            if not os.stat(reachable).st_mode & 0o001:
                pytest.skip("%s is not searchable by user nobody" % reachable)


def _python_for_nobody(request):
    """(a Python that user nobody may run, the environment for it: its door library too)."""
    env = dict(os.environ)
    if env.get("DOORDOWN_LIBDOOR"):  # the door model, where user nobody may load it
        library = os.path.join(RUN_TMP, "libdoormodel-%d.so" % os.getpid())
        shutil.copy(env["DOORDOWN_LIBDOOR"], library)
        os.chmod(library, 0o755)
        request.addfinalizer(lambda: os.unlink(library))
        env["DOORDOWN_LIBDOOR"] = library
    probe = "import ctypes, os; os.environ.get('DOORDOWN_LIBDOOR') and ctypes.CDLL(os.environ['DOORDOWN_LIBDOOR'])"
    for python in (sys.executable, "/usr/bin/python3"):  # one that user nobody may run
        try:
            subprocess.run([python, "-c", probe], user=65534, group=65534, check=True,
                           capture_output=True, timeout=30, cwd="/", env=env)
            break
        except (OSError, subprocess.CalledProcessError):
            continue
    else:
        pytest.skip("no Python here that user nobody may run (with the door library)")
    return python, env


@pytest.mark.skipif(os.geteuid() != 0, reason="running apps as other users needs root")
def test_site_apps_run_as_their_own_users_and_cannot_reach_each_other(started, tmp_path, request):
    python, env = _python_for_nobody(request)
    _skip_unless_nobody_reads(DOORDOWN, os.path.join(SUPPORT, "apps.py"))  # the nobody app runs them
    config = _site(tmp_path, "[serve]\nbind = 127.0.0.1:0\naccess-log = off\n\n"
                   "[app:nobody]\nwsgi = apps:interpreter\nmount = /nobody\nuser = nobody\nspawn = eager\n"
                   "directory = %s\npython = %s\n\n"
                   "[app:root]\nwsgi = apps:interpreter\nmount = /root\nspawn = eager\n" % (SUPPORT, python))
    server = site_serve(started, config, env=env)
    assert json.loads(server.get("/nobody/")[2])["uid"] == 65534
    assert json.loads(server.get("/root/")[2])["uid"] == 0
    root_door = server.wait_for(r"serving apps:interpreter on door (\S+/root/\S+) \(").group(1)
    nobody_door = server.wait_for(r"serving apps:interpreter on door (\S+/nobody/\S+) \(").group(1)
    assert os.stat(nobody_door).st_uid == 65534
    backend = doordown.door_backend(DOORS)  # loaded as root, as the front's is
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child, as the nobody app's user
        code = 1
        try:
            os.setgid(65534)
            os.setuid(65534)
            try:
                backend.open(root_door).call(
                    doordown.pack_message(doordown.KIND_PING, 0, []))
            except doordown.DoorError as exc:
                code = 0 if exc.errno == errno.EACCES else 2
        finally:
            os._exit(code)
    assert os.waitpid(pid, 0)[1] == 0  # another app's door is out of its reach


# -- the bench command, end to end (no timing assertions) ---------------------------------------

def test_each_role_loads_only_what_it_uses_and_starts_compiled(started):
    """serve re-executes itself from a copy compiled once, and starts its children from that
    copy; no role loads http.server, http.client, email or xml, no child argparse or subprocess."""
    door = serve(started, "apps:lean")
    status, _, body = door.get()
    app = json.loads(body)
    assert status == 200 and app["pid"] == door.app_pid()
    assert app["heavy"] == [], app
    assert app["compiled"].endswith("/doordown.code") and app["file"] == app["argv0"] == DOORDOWN
    assert app["same_module"]  # the application's `import doordown` is the running copy
    front = json.loads(serve(started, "apps:lean", "--transport", "inprocess").get()[2])
    assert front["heavy"] == ["argparse"], front  # the front's own command line
    assert front["compiled"] and front["file"] == DOORDOWN  # re-executed from a compiled copy
    cgi = json.loads(serve(started, "apps:lean", "--transport", "cgi").get()[2])
    assert cgi["heavy"] == [] and cgi["compiled"].endswith("/doordown.code"), cgi


def _bench(tmp_path, *args):
    report, chart = tmp_path / "bench.json", tmp_path / "bench.svg"
    # Its own process group: on a time-out, the bench and the servers it started go together.
    bench = subprocess.Popen([sys.executable, DOORDOWN, "bench", *args, "--json", str(report), "--svg", str(chart)],
                             cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             start_new_session=True)
    try:
        out, err = bench.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(bench.pid, signal.SIGKILL)
        bench.communicate()
        raise
    assert bench.returncode == 0, err.decode()
    return json.loads(report.read_text()), chart, out.decode(), err.decode()


def test_bench_minimal_run_reports_json_svg_and_markdown(tmp_path):
    import xml.etree.ElementTree as ElementTree
    report, chart, table, progress = _bench(tmp_path, "--transports", "door,inprocess", "--workloads", "hello",
                                            "-c", "2", "-d", "0.5", "--warmup", "0.2", "--load", "builtin")
    assert report["config"]["load"].startswith("built-in") and report["config"]["placement"] == "free"
    assert [(r["transport"], r["concurrency"]) for r in report["results"]] == [("door", 2), ("inprocess", 2)]
    for row in report["results"]:
        assert row["requests"] > 0 and row["errors"] == 0 and row["non_2xx"] == 0, row
        assert row["requests_per_s"] > 0 and 0 < row["p50_ms"] <= row["p99_ms"]
        assert row["cpu_s_per_1k"] is not None and row["app_threads"] >= 1
        assert 0 < row["rss_idle_mb"] <= row["rss_peak_mb"] and row["pss_peak_mb"] > 0
    door, inprocess = report["results"]
    assert door["processes_peak"] == 2 and inprocess["processes_peak"] == 1  # front + app, front alone
    # each process of the stack on its own, beside the stack's sum
    assert 0 < door["front_pss_peak_mb"] <= door["front_rss_peak_mb"] and door["app_rss_peak_mb"] > 0
    assert door["front_rss_peak_mb"] + door["app_rss_peak_mb"] <= door["rss_peak_mb"] + 1
    assert inprocess["front_rss_peak_mb"] > 0 and inprocess["app_rss_peak_mb"] is None
    root = ElementTree.parse(str(chart)).getroot()
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    assert len(root.findall(".//{http://www.w3.org/2000/svg}rect")) >= 4
    assert "| hello | door | 2 |" in table and "| hello | inprocess | 2 |" in table
    assert "door req/s = " in table and "[2/2] hello" in progress


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed (Debian package wrk)")
def test_bench_with_wrk_checks_the_64k_answer(tmp_path):
    report, _, table, _ = _bench(tmp_path, "--transports", "fastcgi", "--workloads", "64k",
                                 "-c", "4", "-d", "1", "--warmup", "0", "--pinned")
    (row,) = report["results"]
    assert report["config"]["load"].startswith("wrk") and report["config"]["placement"] == "pinned"
    assert row["requests"] > 0 and row["errors"] == 0 and row["non_2xx"] == 0
    assert "| 64k | fastcgi | 4 |" in table


def test_bench_streams_reports_first_event_and_rates(tmp_path):
    report, _, out, _ = _bench(tmp_path, "--streams", "--quick", "--transports", "door,inprocess", "--doors", DOORS)
    rows = {row["transport"]: row for row in report["streams"]}
    assert set(rows) == {"door", "inprocess"} and not any("failed" in row for row in rows.values())
    for row in rows.values():
        assert row["first_event_p50_ms"] > 0 and row["stream_mb_per_s"] > 0 and row["file_mb_per_s"] > 0
    assert "| door |" in out and "first event p50 ms" in out


@pytest.mark.skipif(importlib.util.find_spec("gunicorn") is None, reason="gunicorn is not installed "
                    "(pip install -r support/requirements.txt)")
def test_bench_peers_measures_gunicorn_beside_the_door(tmp_path):
    report, _, table, _ = _bench(tmp_path, "--peers", "gunicorn,granian", "-c", "2", "-d", "0.5",
                                 "--warmup", "0.2", "--load", "builtin")
    rows = {row["transport"]: row for row in report["results"]}
    assert list(rows) == ["door", "gunicorn", "granian"]
    gunicorn = rows["gunicorn"]
    assert gunicorn["requests"] > 0 and gunicorn["errors"] == 0 and gunicorn["non_2xx"] == 0, gunicorn
    assert gunicorn["processes_peak"] == 3 and gunicorn["pss_peak_mb"] > 0  # arbiter and two workers
    assert "| hello | gunicorn | 2 |" in table and "door req/s = " in table and "gunicorn" in table
    if "skipped" in rows["granian"]:  # not installed: skipped with how to install it
        assert "pip install granian" in rows["granian"]["skipped"] and "skipped" in table


def test_bench_breakdown_accounts_for_the_door_hop(tmp_path):
    report = tmp_path / "breakdown.json"
    pinned = ["--pinned"] if len(os.sched_getaffinity(0)) >= 2 else []
    result = subprocess.run([sys.executable, DOORDOWN, "bench", "--breakdown", "-c", "2", "-d", "0.5",
                             "--warmup", "0.2", "--load", "builtin", "--doors", DOORS, "--json", str(report),
                             *pinned], capture_output=True, timeout=120, cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    figures = json.loads(report.read_text())
    steps = figures["steps_us"]
    assert len(steps) == 9 and all(value > 0 for value in steps.values()), steps
    assert figures["raw_socket_round_trip_us"] > 0
    assert figures["app_handler_us"] > 0 and figures["app_handler_after_sleep_us"] >= 0
    # pinned, the estimate from the floor's hop: a ratio of times, so in (0, 1), unless cells this
    # short saw no hop at all; free, none
    estimate = figures["door_over_inprocess_with_the_floors_hop"]
    assert (estimate is None or 0 < estimate < 1) if pinned else estimate is None, estimate
    whole = figures["whole"]
    assert set(whole) == {"door", "inprocess", "floor", "floor-hop"}
    assert all(row["requests"] > 0 and row["errors"] == 0 for row in whole.values()), whole
    # user and system CPU per request of the front and the app on their own, floor included
    assert set(whole["door"]["cpu_user_system_us"]) == set(whole["floor-hop"]["cpu_user_system_us"]) \
        == {"front", "app"}
    for row in whole["door"], whole["floor-hop"]:  # CPU time is counted in ticks: a light role may show 0
        splits = row["cpu_user_system_us"].values()
        assert all(len(split) == 2 for split in splits) and sum(map(sum, splits)) > 0, whole
    out = result.stdout.decode()
    assert "| door: round trip, both processes |" in out and "raw Unix-socket round trip" in out
    assert "the door hop costs" in out and "the floor's hop" in out


def test_bench_faults_counts_failures_per_event(tmp_path):
    report = tmp_path / "faults.json"
    result = subprocess.run([sys.executable, DOORDOWN, "bench", "--faults", "-d", "3", "--doors", DOORS,
                             "--json", str(report)], capture_output=True, timeout=240)
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    rows = {row["event"].split()[0]: row for row in json.loads(report.read_text())["faults"]}
    assert all(row["attempted"] > 100 for row in rows.values()), rows
    assert rows["app"]["failed"] <= 32 and rows["app"]["app_processes"] == 2  # only calls in flight
    assert rows["reload"]["failed"] == 0 and rows["reload"]["app_processes"] == 2
    assert rows["--max-requests"]["failed"] == 0 and rows["--max-requests"]["app_processes"] >= 2, rows
    assert rows["stop"]["failed"] == 0 and rows["stop"]["serve_exit"] == 0  # it did stop, cleanly
    assert all(row["serve_exit"] is None for event, row in rows.items() if event != "stop"), rows
    assert "| event | requests attempted | failed |" in result.stdout.decode()


# -- review: defects found and fixed -----------------------------------------------------

def _fd_count(pid):
    return len(os.listdir("/proc/%d/fd" % pid))


def test_spooled_body_of_a_request_the_app_never_sees_is_closed(started, tmp_path):
    """A body over the inline limit is spooled to a descriptor; a request answered by the
    front itself (a --static-map path, here 405) must close it, or a client leaks the
    front's descriptors one request at a time."""
    (tmp_path / "f.txt").write_bytes(b"file")
    server = serve(started, "--static-map", "/static=%s" % tmp_path)
    payload = b"x" * (2 << 20)
    assert server.get("/static/f.txt", "POST", payload)[0] == 405  # warm up
    before = _fd_count(server.proc.pid)
    for _ in range(10):
        assert server.get("/static/f.txt", "POST", payload)[0] == 405
    time.sleep(0.2)
    assert _fd_count(server.proc.pid) - before < 3


def test_keep_alive_timeout_holds_after_a_streamed_response(started):
    """After a streamed response the idle keep-alive connection must still be closed after
    --keep-alive seconds, not after --stream-idle-timeout (the stream's socket timeout)."""
    server = serve(started, "apps:streams", "--keep-alive", "1", "--stream-idle-timeout", "30")
    with socket.create_connection(("127.0.0.1", server.port), timeout=20) as sock:
        sock.sendall(b"GET /events?n=2&every=0.05 HTTP/1.1\r\nHost: x\r\n\r\n")
        _read_events(sock)
        begin = time.monotonic()
        assert sock.recv(100) == b""  # the front closes the idle connection
        assert time.monotonic() - begin < 5


@pytest.mark.parametrize("transport", ["door", "inprocess", "proxy"])
def test_stream_whose_first_chunk_is_over_the_inline_limit_is_sent_whole(started, transport):
    """A first chunk too big for the door call goes down the pipe; the Content-Length
    budget must not be charged for it twice (the body was cut off after the first chunk)."""
    server = serve(started, "apps:big_first_chunk", "--transport", transport)
    for query in ("", "?length=0"):
        status, _, body = server.get("/" + query)
        assert status == 200 and len(body) == 3 << 20, (query, len(body))
        assert body == b"a" * (2 << 20) + b"b" * (1 << 20)


def test_a_response_head_too_large_for_the_door_closes_its_body(started):
    """A head over the door's bound becomes a 500; the streamed or file body the app
    returned with it must still be closed (PEP 3333), not left among the app's streams."""
    server = serve(started, "apps:huge_head")
    for path in ("/stream", "/file"):
        status, _, body = server.get(path)
        assert status == 500 and b"x" * 100 not in body, path
    assert json.loads(server.get("/closed")[2])["closed"] == 2
    assert server.stats()["streams"] == 0
    before = _fd_count(server.app_pid())
    for _ in range(5):
        assert server.get("/file")[0] == 500
    assert _fd_count(server.app_pid()) - before < 3


def test_the_head_too_large_warning_escapes_the_path(started):
    server = serve(started, "apps:huge_head")
    reply = server.raw(b"GET /stream%0aFORGED%1b[31m HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status_of(reply) == 500
    server.wait_for(r"response head of GET .* over \d+ bytes")
    assert "\nFORGED" not in server.log and "\x1b" not in server.log


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_an_iterable_may_read_the_request_body_as_it_goes(started, transport):
    """PEP 3333 lets the iterable read wsgi.input while it yields: the input must stay open
    until the body is done, inline or spooled, on every transport."""
    server = serve(started, "apps:lazy_echo", "--transport", transport)
    for size in (5000, (1 << 20) + 5000):
        payload = os.urandom(size)
        status, _, body = server.get("/", "POST", payload)
        assert (status, len(body)) == (200, size) and body == payload, (transport, size, len(body))


def test_site_smart_spawn_survives_its_template_dying(started, tmp_path):
    """The template killed: its apps stop (their parent is gone) and their exits are never
    reported.  serve must still see them gone: no request hangs on their dead doors, and
    a SIGTERM stops serve (it waited for those exits for ever)."""
    config = _site(tmp_path, "[serve]\nbind = 127.0.0.1:0\naccess-log = off\nsmart-spawn = yes\n"
                   "graceful-timeout = 2\nboot-timeout = 3\n\n"
                   "[app:hello]\nwsgi = doordown:hello_app\nspawn = eager\n")
    server = site_serve(started, config, cwd=str(tmp_path))
    (template,) = _children(server.proc.pid)
    hello = int(server.wait_for(r"app hello: pid (\d+) serving").group(1))
    os.kill(template, signal.SIGKILL)
    server.wait_for(r"app pid %d exited" % hello, timeout=10)
    assert server.get("/")[0] in (502, 503)  # no template to fork a new app from: refused, at once
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(15) == 0


def test_sigterm_answers_a_request_whose_body_is_still_arriving(started):
    """A stop closes idle keep-alive connections after a second; a connection whose request
    is still arriving (its body uploading) is not idle: it must get its answer."""
    server = serve(started, "apps:echo")
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nhello")
        time.sleep(0.3)
        server.proc.send_signal(signal.SIGTERM)
        server.wait_for(r"SIGTERM: finishing")
        time.sleep(2)  # past the second after which idle connections are closed
        sock.sendall(b"world")
        reply = b"".join(iter(lambda: sock.recv(65536), b""))
    assert status_of(reply) == 200 and b'"body_head": "helloworld"' in reply, reply
    assert server.proc.wait(15) == 0


def test_a_second_serve_does_not_take_a_live_control_door(started, tmp_path):
    """A control door left by a killed serve is replaced; one a running serve answers on is
    not: the second serve stops with one line, the first keeps its control door."""
    control = str(tmp_path / "control")
    text = ("[serve]\nbind = 127.0.0.1:0\naccess-log = off\ncontrol = %s\n\n"
            "[app:hello]\nwsgi = doordown:hello_app\n" % control)
    if DOORS == "emulated":  # a stale socket there, as a killed serve leaves it: replaced
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(control)
        stale.close()
    first = site_serve(started, _site(tmp_path, text, "first.ini"))
    second = site_serve(started, _site(tmp_path, text, "second.ini"), ready=None)
    assert second.proc.wait(20) == 1
    assert "cannot make the control door" in second.log
    result = doordown_command("status", "--control", control, "--doors", DOORS, "--json")
    assert result.returncode == 0 and first.proc.poll() is None, result.stderr
    assert json.loads(result.stdout)[0]["app"] == "hello"


@pytest.mark.parametrize("smart", [False, True])
def test_reload_restarts_a_site_app_when_its_source_changes(started, tmp_path, smart):
    """--reload with --config: the app whose source changed is replaced (the site file did
    not change, so re-reading it replaced nothing; a forked app signalled its template,
    which died of it)."""
    source = tmp_path / "changing.py"
    source.write_text("def application(environ, start_response):\n"
                      "    start_response('200 OK', [])\n"
                      "    return [b'one']\n")
    config = _site(tmp_path, "[serve]\nbind = 127.0.0.1:0\naccess-log = off\nsmart-spawn = %s\n\n"
                   "[app:changing]\nwsgi = changing\nspawn = eager\ndirectory = %s\n"
                   % ("yes" if smart else "no", tmp_path))
    server = site_serve(started, config, "--reload", cwd=str(tmp_path))
    server.wait_for(r"app changing: pid (\d+) serving")
    assert server.get("/")[2] == b"one"
    source.write_text(source.read_text().replace("b'one'", "b'two'"))
    later = time.time() + 5
    os.utime(str(source), (later, later))
    server.wait_for(r"changing\.py changed")
    deadline = time.monotonic() + 20
    while server.get("/")[2] != b"two":
        assert time.monotonic() < deadline, server.log
        time.sleep(0.2)
    if smart:
        (template,) = _children(server.proc.pid)  # still there, never signalled


def test_a_site_app_streaming_a_response_is_not_idle(started, tmp_path):
    """idle-timeout counts a request in progress: a response still streaming is one, so the
    app is not stopped under it (its stream was cut after idle-timeout and the grace)."""
    config = _site(tmp_path, "[serve]\nbind = 127.0.0.1:0\naccess-log = off\ngraceful-timeout = 1\n\n"
                   "[app:streams]\nwsgi = apps:streams\nspawn = eager\nidle-timeout = 1\n"
                   "directory = %s\n" % SUPPORT)
    server = site_serve(started, config, cwd=str(tmp_path))
    server.wait_for(r"app streams: pid (\d+) serving")
    with socket.create_connection(("127.0.0.1", server.port), timeout=15) as sock:
        sock.sendall(b"GET /events?n=10&every=0.4 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        arrivals, data = _read_events(sock)
    assert len(arrivals) == 10 and data.endswith(b"0\r\n\r\n"), (len(arrivals), server.log)
    server.wait_for(r"app streams: stopping app pid \d+: idle for 1s")  # and once it ended, it is idle


def test_fastcgi_responder_closes_a_stream_whose_client_left(started, tmp_path):
    """The FastCGI client gone before the reply's first records are sent: the stream the
    application returned must still be closed (its iterable's close(), PEP 3333)."""
    path, mark = str(tmp_path / "app.sock"), str(tmp_path / "closed")
    started("app", "apps:slow_stream", "--transport", "fastcgi", "--socket", path,
            ready=r"serving apps:slow_stream")
    params = doordown.fcgi_pairs([(b"REQUEST_METHOD", b"GET"), (b"PATH_INFO", b"/"),
                                  (b"QUERY_STRING", b"mark=" + mark.encode())])
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(path)
        sock.sendall(doordown.fcgi_record(1, 1, doordown._FCGI_BEGIN.pack(1, 0))
                     + doordown.fcgi_stream(4, 1, params) + doordown.fcgi_stream(5, 1, b""))
    assert _wait_for_file(mark, 10)


def _door_fds(pid):
    """The front's descriptors open on an app's door file (native doors)."""
    found = 0
    for entry in os.listdir("/proc/%d/fd" % pid):
        try:
            found += bool(re.search(r"/app-\d+\.door", os.readlink("/proc/%d/fd/%s" % (pid, entry))))
        except OSError:
            pass
    return found


def test_an_app_that_exits_leaves_no_door_descriptor_in_the_front(started, native):
    """Each exit of the app (here, at every request) replaces its upstream; the old one must
    be closed, or the front keeps a descriptor of every dead app's door."""
    server = started("serve", "apps:exiter", "--bind", "127.0.0.1:0", "--doors", "native",
                     "--access-log", "off", **native)
    for generation in range(2, 6):
        assert server.get("/")[0] == 502
        server.wait_for(r"on door \S+/app-%d\.door" % generation, timeout=30)
    time.sleep(0.5)
    assert _door_fds(server.proc.pid) <= 2, os.listdir("/proc/%d/fd" % server.proc.pid)


def test_a_large_head_with_an_inline_body_still_fits_the_door_call(started):
    """A head near --max-header-size and a body just under the inline bound make a call
    over the door's limit: the body goes by descriptor instead (it was a 502)."""
    server = serve(started, "apps:echo", "--max-header-size", "1M", "--max-line", "1000000")
    body = os.urandom(1 << 20)
    reply = server.raw(b"POST / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Big: " + b"a" * 900000
                       + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body, timeout=20)
    assert status_of(reply) == 200, reply[:200]
    seen = json.loads(reply.split(b"\r\n\r\n", 1)[1])
    assert seen["body_sha256"] == hashlib.sha256(body).hexdigest()


def test_chdir_comes_first_for_static_map_and_the_site_file(started, tmp_path):
    """--chdir DIR: relative paths are read from DIR.  --static-map's directory was looked
    for where serve was started (refused, or another one); a relative --config was read
    there at start and from DIR at every SIGHUP (which then failed)."""
    site = tmp_path / "site"
    (site / "static").mkdir(parents=True)
    (site / "static" / "f.txt").write_bytes(b"static file")
    server = serve(started, "--chdir", str(site), "--static-map", "/s=static", cwd=str(tmp_path))
    assert server.get("/s/f.txt")[::2] == (200, b"static file")
    config = tmp_path / "site.ini"
    config.write_text("[serve]\nbind = 127.0.0.1:0\naccess-log = off\n\n[app:a]\nwsgi = doordown:hello_app\n"
                      "mount = /a\n")
    server = site_serve(started, "site.ini", "--chdir", str(site), cwd=str(tmp_path))
    assert server.get("/a/")[0] == 200
    config.write_text(config.read_text() + "\n[app:b]\nwsgi = doordown:hello_app\nmount = /b\n")
    server.proc.send_signal(signal.SIGHUP)
    server.wait_for(r"app b: added at /b")
    assert server.get("/b/")[0] == 200


def test_if_modified_since_in_all_three_date_forms_without_the_email_package(started, tmp_path):
    """RFC 9110 5.6.7: IMF-fixdate, RFC 850 and asctime dates are all understood, and the
    front (its app in process shows its modules) never loads the email package for them."""
    root = tmp_path / "static"
    root.mkdir()
    (root / "a.txt").write_text("a\n")
    os.utime(root / "a.txt", (784111777, 784111777))  # Sun, 06 Nov 1994 08:49:37 GMT
    server = serve(started, "apps:lean", "--transport", "inprocess", "--static-map", "/s=%s" % root)
    for since in ("Sun, 06 Nov 1994 08:49:37 GMT", "Sunday, 06-Nov-94 08:49:37 GMT",
                  "Sun Nov  6 08:49:37 1994", "Mon, 07 Nov 1994 00:00:00 GMT"):
        status, _, _ = server.get("/s/a.txt", headers={"If-Modified-Since": since})
        assert status == 304, since
    for since in ("Sat, 05 Nov 1994 08:49:37 GMT", "Saturday, 05-Nov-94 08:49:37 GMT",
                  "Sat Nov  5 08:49:37 1994", "not a date", "Sun, 06 Foo 1994 08:49:37 GMT"):
        status, _, _ = server.get("/s/a.txt", headers={"If-Modified-Since": since})
        assert status == 200, since
    front = json.loads(server.get("/")[2])
    assert not [name for name in front["heavy"] if name.split(".")[0] == "email"], front


def _raw_json(server, target, host="127.0.0.1"):
    reply = server.raw(b"GET %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % (target, host.encode()))
    head, _, body = reply.partition(b"\r\n\r\n")
    assert status_of(reply) == 200, reply[:300]
    return json.loads(body)


def test_routing_uses_the_decoded_path_and_the_absolute_forms_authority(started, tmp_path):
    """A mount matches the percent-decoded path (the one SCRIPT_NAME + PATH_INFO split), and
    an absolute-form target (RFC 9112 3.2.2) routes on its path, and on its authority as
    the host, whatever its Host field says."""
    config = _site(tmp_path, "[serve]\nbind = 127.0.0.1:0\naccess-log = off\n\n"
                             "[app:admin]\nwsgi = apps:echo\nmount = /admin\n\n"
                             "[app:root]\nwsgi = apps:echo\nmount = /\n\n"
                             "[app:other]\nwsgi = apps:echo\nhost = other.test\nmount = /\n")
    server = site_serve(started, config)

    def seen(target, host="127.0.0.1"):
        env = _raw_json(server, target, host)
        return env["SCRIPT_NAME"], env["PATH_INFO"], env["pid"]
    script, info, admin = seen(b"/admin/x")
    assert (script, info) == ("/admin", "/x") and _await_app_pids(server, "admin", 1) == [admin]
    assert seen(b"/%61dmin/x")[:2] == ("/admin", "/x")
    assert seen(b"/%61dmin")[:2] == ("/admin", "")
    assert seen(b"/%61dmin%2fx")[:2] == ("/admin", "/x")  # as PATH_INFO decodes it
    assert seen(b"/adminx")[:2] == ("", "/adminx")
    assert seen(b"http://127.0.0.1/admin/y?q=1") == ("/admin", "/y", admin)
    assert seen(b"HTTP://127.0.0.1:8080/%61dmin") == ("/admin", "", admin)
    script, info, other = seen(b"http://Other.Test:80/admin/z")  # its authority, not Host
    assert (script, info) == ("", "/admin/z") and _await_app_pids(server, "other", 1) == [other]
    assert seen(b"/admin/z", host="other.test")[2] == other
    assert seen(b"http://127.0.0.1/admin/z", host="other.test") == ("/admin", "/z", admin)


def test_static_map_matches_the_decoded_path_and_never_escapes(started, tmp_path):
    root = tmp_path / "static"
    root.mkdir()
    (root / "a.txt").write_bytes(b"static a")
    (tmp_path / "secret").write_bytes(b"secret")
    server = serve(started, "apps:echo", "--static-map", "/s=%s" % root)
    for target in (b"/s/a.txt", b"/%73/a.txt", b"/s/%61.txt", b"http://127.0.0.1/s/a.txt",
                   b"http://127.0.0.1/%73/a.txt"):
        reply = server.raw(b"GET %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % target)
        assert status_of(reply) == 200 and reply.endswith(b"\r\n\r\nstatic a"), (target, reply[:300])
    for target in (b"/s/../secret", b"/s/%2e%2e/secret", b"/%73/%2e%2e/secret", b"/%73/%2E%2E/secret",
                   b"/s/%2e%2e%2fsecret", b"/%73%2f..%2fsecret", b"http://127.0.0.1/s/../secret",
                   b"/s/.%2e/secret"):
        reply = server.raw(b"GET %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % target)
        assert b"secret" not in reply.partition(b"\r\n\r\n")[2], (target, reply[:300])


@pytest.mark.skipif(os.geteuid() != 0, reason="running apps as other users needs root")
def test_reload_replaces_a_site_app_that_runs_as_another_user(started, tmp_path, request):
    """--reload: an app with its own `user =` may not signal the front (root); its watcher
    died of the PermissionError with a traceback, and reload silently stopped.  It now
    tells the front through its door's stats, which the front reads at every health check."""
    python, env = _python_for_nobody(request)
    directory = tempfile.mkdtemp(dir=RUN_TMP)  # RUN_TMP is 0711: nobody may pass through it
    request.addfinalizer(lambda: shutil.rmtree(directory, ignore_errors=True))
    os.chmod(directory, 0o755)
    _skip_unless_nobody_reads(directory, DOORDOWN)  # the app as nobody runs both
    source = os.path.join(directory, "changing_nobody.py")
    with open(source, "w") as f:
        f.write("def application(environ, start_response):\n"
                "    start_response('200 OK', [])\n"
                "    return [b'one']\n")
    os.chmod(source, 0o644)
    config = _site(tmp_path, "[serve]\nbind = 127.0.0.1:0\naccess-log = off\n\n"
                   "[app:changing]\nwsgi = changing_nobody\nuser = nobody\nspawn = eager\n"
                   "directory = %s\npython = %s\n" % (directory, python))
    server = site_serve(started, config, "--reload", env=env)
    first = int(server.wait_for(r"app changing: pid (\d+) serving").group(1))
    assert server.get("/")[2] == b"one"
    with open(source, "w") as f:
        f.write("def application(environ, start_response):\n"
                "    start_response('200 OK', [])\n"
                "    return [b'two']\n")
    later = time.time() + 5
    os.utime(source, (later, later))
    server.wait_for(r"changing_nobody\.py changed")
    deadline = time.monotonic() + 20
    while server.get("/")[2] != b"two":
        assert time.monotonic() < deadline, server.log
        time.sleep(0.2)
    assert _await_app_pids(server, "changing", 2)[-1] != first
    server.wait_for(r"cannot signal the front \(pid %d: Operation not permitted\)" % server.proc.pid)
    server.wait_for(r"replacing app pid %d: \S+changing_nobody\.py changed \(--reload\)" % first)
    assert "Traceback" not in server.log, server.log
