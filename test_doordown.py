"""End-to-end tests of doordown: real processes, real sockets, real (emulated or modelled) doors.

Every server listens on a free port (bind to port 0, read the port from the start-up
line), every wait is bounded, and every process started is killed at teardown.
"""

import concurrent.futures
import hashlib
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

import doordown

HERE = os.path.dirname(os.path.abspath(__file__))
DOORDOWN = os.path.join(HERE, "doordown.py")
SUPPORT = os.path.join(HERE, "support")
DOORS = os.environ.get("DOORDOWN_TEST_DOORS", "emulated")


# -- harness ---------------------------------------------------------------------------

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

    def __init__(self, *args, cwd=SUPPORT, env=None, ready=r"serving .* at http://[^ ]+:(\d+)/"):
        self.lines = []
        self.changed = threading.Condition()
        self.proc = subprocess.Popen([sys.executable, DOORDOWN, *args], cwd=cwd,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env)
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
        pids = set(self.app_pids)
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
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
                      "--access-log", "off", "--max-body", "8M", "--max-line", "2000")
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
    assert ("through %s doors" % DOORS) in server.log


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


def test_app_exception_is_500_with_log(started):
    server = serve(started, "apps:crash")
    status, _, body = server.get("/")
    assert (status, body) == (500, b"Internal Server Error\n")
    server.wait_for(r"RuntimeError: the app fell over on purpose")
    assert server.get("/")[0] == 500  # and the app is still there


def test_iterable_close_always_called(started):
    server = serve(started, "apps:closing")
    assert server.get("/")[::2] == (200, b"closed later")
    assert server.get("/fail")[0] == 500
    assert json.loads(server.get("/count")[2])["closed"] == 2


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


@pytest.mark.parametrize("request_bytes,status", [
    (b"GET / HTTP/1.1\r\n\r\n", 400),  # no Host
    (b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc", 400),
    (b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: +3\r\n\r\nabc", 400),
    (b"GET / HTTP/1.1\r\nHost: x\r\nBad Name: v\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost : x\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: x\r\nX: a\rContent-Length: 9\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: x\r\nX: a\r\n folded\r\n\r\n", 400),
    (b"GET  / HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    (b"GET / HTTP/2.0\r\nHost: x\r\n\r\n", 505),
    (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 400),  # chunked not last
    (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: x-magic, chunked\r\n\r\n", 501),
    (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nz\r\n", 400),
    (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    (b"GET /" + b"a" * 2100 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
    (b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-A: b\r\n" * 101 + b"\r\n", 431),
    (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\n\r\n", 413),
])
def test_malformed_requests_refused_and_closed(echo_server, request_bytes, status):
    reply = echo_server.raw(request_bytes + b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status_of(reply) == status, reply[:200]
    assert b"Connection: close" in reply and b"/smuggled" not in reply and reply.count(b"HTTP/1.1") == 1
    assert echo_server.get("/")[0] == 200  # and others are still served


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
    assert server.stats()["threads"] <= 2
    by_thread = {}
    for item in seen:
        by_thread.setdefault(item["thread"], []).append(item["count"])
    counts = max(by_thread.values(), key=len)
    assert counts == list(range(counts[0], counts[0] + len(counts))) and len(counts) > 900


def test_app_killed_gives_502_then_recovers(started):
    server = serve(started, "apps:counter")
    assert server.get("/")[0] == 200
    old = server.app_pid()
    os.kill(old, signal.SIGKILL)
    deadline = time.monotonic() + 10
    statuses = []
    while time.monotonic() < deadline:
        status, _, body = server.get("/")
        statuses.append(status)
        if status == 200:
            break
        time.sleep(0.02)
    assert statuses[-1] == 200 and set(statuses[:-1]) <= {502, 503}, statuses
    assert json.loads(body)["pid"] != old
    server.wait_for(r"app pid %d exited \(killed by SIGKILL\)" % old)


def test_sigterm_lets_slow_request_finish(started):
    server = serve(started, "apps:slow")
    door = server.door_path()
    app_pid = server.app_pid()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(server.get, "/?s=1.5")
        time.sleep(0.5)
        server.proc.send_signal(signal.SIGTERM)
        status, _, body = pending.result(10)
    assert status == 200 and json.loads(body)["slept"] == 1.5
    assert server.proc.wait(15) == 0
    assert not os.path.exists(door) and not os.path.exists(os.path.dirname(door))
    assert not _pid_alive(app_pid)


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

@pytest.mark.parametrize("args", [
    ["serve", "--bind", "nonsense:port"], ["serve", "--timeout", "-1"], ["serve", "--doors", "magic"],
    ["serve", "not a spec"], ["bogus"], [], ["app"], ["serve", "--max-body", "lots"],
])
def test_bad_command_line_exits_2_with_one_line(args):
    result = subprocess.run([sys.executable, DOORDOWN, *args], capture_output=True, timeout=20)
    assert result.returncode == 2
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("doordown"), lines


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


# -- per-thread resources: a database connection per door thread (issue 6) -------------------
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
    assert len(uses) <= stats["threads_seen"] <= door_threads <= 33, (uses, stats, door_threads)
    assert total / len(uses) >= 100 and min(uses.values()) >= 10, uses
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
