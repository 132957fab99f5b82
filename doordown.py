#!/usr/bin/env python3
"""doordown: serve a Python WSGI application through illumos doors.

    python3 doordown.py serve [module:app]     HTTP front; spawns the app role itself
    python3 doordown.py serve --config site.ini    many apps behind one front
    python3 doordown.py status|reload|stop|start [APP] --control PATH    and their control
    python3 doordown.py app [module:app] --door PATH    the app role alone
    python3 doordown.py bench [--faults|--streams]   measure the transports, failures, streams
    python3 doordown.py check                  put this machine's doors through their paces
    python3 doordown.py systemd|smf [serve options]    print a service file for that serve

A web front and a web application talk over *doors*: a synchronous IPC in which a
client thread calls into another process and the kernel picks, or creates, the
server thread that runs the call.  The application stays plain synchronous WSGI
code; the operating system, not a worker pool you tune, provides its threads.

On illumos the doors are real (ctypes into libc).  Everywhere else the same API
is served by a faithful emulation over Unix-domain sockets, chosen automatically
and named at start-up.  One file, the standard library only, Python 3.9 or newer.

The file reads top to bottom in dependency order, each part built on those above it:
utilities (logging, counters, the buffered socket reader, the connection pool, the
private-socket binder) -> the HTTP/1.1 codec (pure: parsing, chunked coding, response
framing) and the request reader over it -> door layer (emulated, then native) -> wire
format -> WSGI gateway (with per-thread resources) -> transports, each as a pair of its
app end and its front end (door, proxy, FastCGI, CGI, in-process), and the app role ->
front role (connections, access log, static files, listeners, dispatch) -> site
configuration -> supervisor -> benchmark -> door check -> service files -> command line.
"""

# What every role needs.  Anything else is imported inside the functions that use it, so
# each process loads only its role's share: the app role never loads http.server,
# http.client, subprocess or argparse (http.client and what it pulls in alone is 6 MB).
import array
import collections
import ctypes
import errno
import io
import json
import os
import queue
import re
import select
import signal
import socket
import socketserver
import stat
import struct
import sys
import threading
import time
import traceback
import weakref
from urllib.parse import quote as urllib_quote, unquote_to_bytes
from wsgiref.util import FileWrapper

__version__ = "0.1.0"
SERVER_SOFTWARE = "doordown/" + __version__

# Exit codes of the app role, read by the supervisor (after gunicorn's arbiter): a boot
# failure must stop `serve` instead of turning into a respawn loop.
EXIT_USAGE = 2
EXIT_APP_LOAD = 4
EXIT_DOOR_FAILED = 5


###############################################################################
# Utilities ###################################################################
###############################################################################
#
# What every part below leans on: logging that no client byte can forge, a counter
# that threads share, and the socket plumbing every transport uses (one buffered
# reader, one LIFO connection pool, one binder of private Unix sockets).

_LOG_LEVELS = ("debug", "info", "warning", "error", "critical")  # gunicorn's --log-level names
_log_threshold = [_LOG_LEVELS.index("info")]


def _log(role, message, level="info"):
    """One line on stderr, prefixed with the role and pid (the app's log is stderr too),
    unless `level` is below --log-level."""
    if _LOG_LEVELS.index(level) < _log_threshold[0]:
        return
    sys.stderr.write("[doordown %s %d] %s\n" % (role, os.getpid(), message))
    sys.stderr.flush()


# Bytes a log value may carry as they are; any other is escaped (\xHH, \", \\), as
# Apache's mod_log_config does, so a client cannot forge a line or a field.
_LOG_SAFE = bytes(range(0x20, 0x7f)).replace(b'"', b"").replace(b"\\", b"")


def _log_value(raw):
    """A value as the log shows it: escaped where needed, "-" when empty or absent."""
    if not raw:
        return b"-"
    if not raw.translate(None, _LOG_SAFE):
        return raw
    return _log_escaped(raw)


def _log_field(raw):
    """A header's value as the log shows it: "-" when absent, empty when sent empty (as
    gunicorn logs a header it got)."""
    if raw is None:
        return b"-"
    return _log_value(raw) if raw else b""


def _log_text(value):
    """_log_value for a line of doordown's own log: bytes, or text of latin-1 (an environ
    value), in; text out."""
    if isinstance(value, str):
        value = value.encode("latin-1", "backslashreplace")
    return _log_value(value).decode("ascii")


def _log_escaped(raw):
    return b"".join(bytes((c,)) if c in _LOG_SAFE else b"\\" + bytes((c,)) if c in b'"\\'
                    else b"\\x%02x" % c for c in raw)


class Counter:
    """An integer that many threads add to without losing an update.

    `n += 1` reads, adds and writes back: two threads can read the same value and one
    increment is lost (on free-threaded CPython at any time, not only at a switch).
    """

    __slots__ = ("value", "_lock")

    def __init__(self):
        self.value = 0
        self._lock = threading.Lock()

    def add(self, amount=1):
        """Add `amount`; return the new value."""
        with self._lock:
            self.value += amount
            return self.value


def _close_fds(fds):
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _shutdown(sock):
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def spawn_unmasked(*args, **kwargs):
    """subprocess.Popen with no signal blocked in the child.

    A child inherits the signal mask of the thread that forks it, and threads that must
    not take signals (front connections, door server threads before they run Python)
    block them: a CGI program or an application's subprocess would then ignore SIGTERM.
    """
    import subprocess
    blocked = signal.pthread_sigmask(signal.SIG_SETMASK, ())
    try:
        return subprocess.Popen(*args, **kwargs)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


class _ClientGone(Exception):
    """The client closed the connection."""


class _ReadTimeout(_ClientGone):
    """The client did not send what it had to in time."""


class TransportError(ConnectionError):
    """A peer went away in the middle of a message or broke its protocol."""


class NotDelivered(ConnectionError):
    """The request never reached an application that would run it: no app at the address
    any more, or one that was stopping and closed the connection with the request unread.
    Nothing ran, so the front may send the same request to the app's replacement."""


def _poll_one(fd, events, timeout):
    """Wait up to `timeout` seconds (None: no limit) for `events` on `fd`; the events seen."""
    poller = select.poll()
    poller.register(fd, events)
    ready = poller.poll(None if timeout is None else max(0, int(timeout * 1000)))
    return ready[0][1] if ready else 0


class BufferedSocket:
    """A connected socket and its receive buffer: how doordown reads every byte stream (a
    client's requests, an application's replies, a FastCGI peer's records)."""

    __slots__ = ("sock", "buf", "chunk", "timeout")

    def __init__(self, sock, chunk=65536):
        self.sock = sock
        self.buf = bytearray()
        self.chunk = chunk  # bytes per recv: more costs an allocation that large each time
        self.timeout = None

    def fill(self, deadline=None):
        """Receive what has arrived into `buf`; False at end-of-file (or a reset).

        With `deadline` (a time.monotonic() value) a wait past it raises _ReadTimeout;
        without, the socket's own bound (_io_timeout) raises TimeoutError.
        """
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _ReadTimeout("read timed out")
            # The kernel's timeouts (_io_timeout), which bound the next send too: a Python
            # timeout would poll() before every recv and send.  Setting them costs two
            # system calls, skipped while the current bound is close enough.  TLS needs
            # Python's own (OpenSSL sees the kernel's as "want read").
            if self.timeout is None or abs(self.timeout - remaining) > 0.25:
                if type(self.sock) is socket.socket:
                    _io_timeout(self.sock, remaining)
                else:
                    self.sock.settimeout(remaining)
                self.timeout = remaining
        try:
            data = self.sock.recv(self.chunk)
        except socket.timeout:
            raise _ReadTimeout("read timed out")
        except BlockingIOError:  # the kernel's SO_RCVTIMEO: see _io_timeout
            if deadline is not None:
                raise _ReadTimeout("read timed out")
            raise TimeoutError("the peer did not answer in time")
        except OSError:
            return False
        if not data:
            return False
        self.buf += data
        return True

    def read_exact(self, size):
        while len(self.buf) < size:
            if not self.fill():
                raise TransportError("the peer closed the connection")
        data = bytes(self.buf[:size])
        del self.buf[:size]
        return data

    def fill_ready(self, size):
        """Whether `buf` holds `size` bytes once what has already arrived is received; never
        waits.  A reply in several pieces is so taken whole when it is all on its way, and
        left to stream when the peer is still producing it."""
        while len(self.buf) < size:
            if not _poll_one(self.sock.fileno(), select.POLLIN, 0) or not self.fill():
                return False
        return True

    def read_until(self, separator, limit):
        """Bytes up to `separator` (which is consumed, not returned)."""
        start = 0
        while True:
            end = self.buf.find(separator, start)
            if end >= 0:
                data = bytes(self.buf[:end])
                del self.buf[:end + len(separator)]
                return data
            if len(self.buf) > limit:
                raise TransportError("no %r within %d bytes" % (separator, limit))
            start = max(0, len(self.buf) - len(separator) + 1)
            if not self.fill():
                raise TransportError("the peer closed the connection")

    def read_at_most(self, size):
        """Up to `size` bytes, fewer if the peer closes first: (data, complete)."""
        while len(self.buf) < size and self.fill():
            pass
        data = bytes(self.buf[:size])
        del self.buf[:size]
        return data, len(data) == size

    def read_to_end(self):
        while self.fill():
            pass
        data = bytes(self.buf)
        del self.buf[:]
        return data

    def send(self, data):
        try:
            self.sock.sendall(data)
        except BlockingIOError:  # see _io_timeout
            raise TimeoutError("the peer did not read in time")

    def await_reply(self):
        """Wait for the first bytes of the peer's answer to what was sent.  Unlike fill(), a
        reset is raised (ConnectionResetError): on a Unix socket it says the peer closed the
        connection with bytes of ours unread (Linux's unix_release_sock)."""
        if not self.buf:
            try:
                self.buf += self.sock.recv(self.chunk)
            except BlockingIOError:  # see _io_timeout
                raise TimeoutError("the peer did not answer in time")

    def send_file(self, fd):
        """The whole file open on `fd` (which the caller keeps), from its start."""
        try:
            with os.fdopen(os.dup(fd), "rb") as body_file:
                self.sock.sendfile(body_file, 0)
        except BlockingIOError:
            raise TimeoutError("the peer did not read in time")

    def close(self):
        self.sock.close()


class LifoPool:
    """Idle connections to one peer, reused last in, first out (the hot one first), and
    opened by `connect` only when none is idle: so their number follows the concurrency
    high-water mark.  Safe from many threads: list append and pop are atomic."""

    def __init__(self, connect):
        self.connect = connect
        self._idle = []
        self._closed = False

    def get(self):
        try:
            return self._idle.pop()
        except IndexError:
            return self.connect()

    def put(self, connection):
        self._idle.append(connection)
        if self._closed:  # looked at after the append: a close() in between drained it or not
            self._close_idle()

    def close(self):
        """Close the idle connections now; busy ones are closed when they come back."""
        self._closed = True
        self._close_idle()

    def _close_idle(self):
        while True:
            try:
                self._idle.pop().close()
            except IndexError:  # another thread took the last one
                return


def bind_unix_socket(sock, path, backlog, perms=0o600):
    """Bind the Unix socket `sock` at `path` and listen, its file born with mode `perms`
    (0600: its owner only; the umask is set around bind, so there is no moment with a
    wider mode).  listen() follows bind() at once: a caller that sees the file and is
    refused retries, but the moment is kept as short as it can be.

    A socket file that a server that is gone left there is replaced; one a live server
    answers on, or a file that is not a socket, is an OSError (EADDRINUSE, EEXIST).
    """
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        mode = None
    if mode is not None:
        if not stat.S_ISSOCK(mode):
            raise OSError(errno.EEXIST, "it exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(2.0)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(path)  # left behind by a server that is gone
        else:
            raise OSError(errno.EADDRINUSE, "another server is listening there")
        finally:
            probe.close()
    old_umask = os.umask(0o777 & ~perms)
    try:
        sock.bind(path)
    finally:
        os.umask(old_umask)
    sock.listen(backlog)


def _io_timeout(sock, seconds):
    """Bound each send and receive on the blocking socket `sock` by `seconds` (None: no bound).

    The kernel's SO_RCVTIMEO/SO_SNDTIMEO rather than settimeout(): a socket with a Python
    timeout polls before every send and receive, one system call more each time (measured
    here: 5 % more door calls per second through the whole stack).  A timeout then surfaces
    as BlockingIOError (EAGAIN) instead of socket.timeout.
    """
    if seconds is not None:
        micros = max(1, round(seconds * 1e6))  # zero would mean no bound at all
        timeval = struct.pack("ll", micros // 1000000, micros % 1000000)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)


def send_file(sock, fd, offset, count):
    """Send `count` bytes of the file on `fd` from `offset` with sendfile, so that no byte
    passes through Python; the bytes sent (fewer if the file ends first).  The socket's
    timeout bounds each wait for room to write."""
    if hasattr(sock, "getpeercert"):  # TLS: every byte must pass through the encryption
        return _send_file_through(sock, fd, offset, count)
    sockno, timeout = sock.fileno(), sock.gettimeout()
    sent = 0
    while sent < count:
        try:
            done = os.sendfile(sockno, fd, offset + sent, min(count - sent, 1 << 30))
        except BlockingIOError:  # a socket with a timeout is non-blocking underneath
            if timeout is None or not _poll_one(sockno, select.POLLOUT, timeout):
                raise socket.timeout("timed out")  # None: the kernel's SO_SNDTIMEO ran out
            continue
        if not done:
            break
        sent += done
    return sent


def _send_file_through(sock, fd, offset, count):
    """send_file for a socket that must see the bytes (TLS): 256 KiB at a time."""
    sent = 0
    while sent < count:
        data = os.pread(fd, min(count - sent, 1 << 18), offset + sent)
        if not data:
            break
        sock.sendall(data)
        sent += len(data)
    return sent


###############################################################################
# HTTP/1.1 codec ##############################################################
###############################################################################
#
# Every rule of HTTP/1.1 message syntax (RFC 9110, RFC 9112) that doordown applies, each
# in one place and with no I/O: the front, both ends of the proxy transport and the CGI
# and FastCGI response parsers all call these.  The cost of each is linear in its input:
# splits, strips, counts and regular expressions that can match a byte only one way.  (A
# field pattern of a lazy value followed by optional whitespace, as this once had, tries
# every split of a run of blanks: a 64 KiB head of them cost more than a second.)

class HTTPError(Exception):
    """A request the front refuses: answered with `status`, then the connection closes."""

    def __init__(self, status, detail):
        Exception.__init__(self, detail)
        self.status = status


class Limits:
    """Bounds on what one client may send or hold (defaults for `serve`)."""

    max_connections = 1000
    max_line = 8190  # request line; longer: 414
    max_headers = 100  # header fields; more: 431
    max_header_size = 65536  # the whole head; larger: 431
    max_body = 100 << 20  # decoded body; larger: 413
    header_timeout = 10.0  # seconds for request line and headers to arrive
    keepalive = 5.0  # seconds an idle keep-alive connection is kept
    body_timeout = 30.0  # seconds for a body to start arriving ...
    min_body_rate = 1024  # ... and bytes per second it must keep up after that
    stream_idle_timeout = 60.0  # seconds a streamed response may go without a byte either way

    def __init__(self, **overrides):
        for name, value in overrides.items():
            if name.startswith("_") or not hasattr(Limits, name):
                raise TypeError("Limits has no %r" % name)  # a misspelt limit must not pass unseen
            if value is not None:
                setattr(self, name, value)


_REASONS = {100: "Continue", 301: "Moved Permanently", 400: "Bad Request", 404: "Not Found",
            405: "Method Not Allowed", 408: "Request Timeout", 413: "Content Too Large",
            414: "URI Too Long", 416: "Range Not Satisfiable", 417: "Expectation Failed",
            431: "Request Header Fields Too Large",
            500: "Internal Server Error", 501: "Not Implemented", 502: "Bad Gateway",
            503: "Service Unavailable", 504: "Gateway Timeout", 505: "HTTP Version Not Supported"}


_TCHAR = rb"!#$%&'*+\-.^_`|~0-9A-Za-z"  # RFC 9110 5.6.2
_TCHARS = bytes(c for c in range(256) if re.fullmatch(rb"[%s]" % _TCHAR, bytes((c,))))
_CTL = rb"\x00-\x08\x0a-\x1f\x7f"  # control characters, HTAB apart: never in a field or reason
_HAS_CTL = re.compile(rb"[%s]" % _CTL)
_HAS_CTL_BUT_CRLF = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_REQUEST_LINE = re.compile(rb"([%s]+) ([^\x00-\x20\x7f]+) HTTP/([0-9])\.([0-9])" % _TCHAR)
_STATUS = re.compile(rb"([1-9][0-9][0-9])(?: ([^%s]*))?" % _CTL)  # code, optional reason
_STATUS_LINE = re.compile(rb"HTTP/1\.[01] " + _STATUS.pattern)
_DIGITS = re.compile(rb"[0-9]{1,18}")
# RFC 9112 7.1: chunk-size [ BWS ";" chunk-ext ]: whitespace only before an extension.
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,16})(?:[ \t]*;[^%s]*)?" % _CTL)
_FRAMING = frozenset((b"content-length", b"transfer-encoding", b"host"))
_PROXY_HEADERS = frozenset((b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host",
                            b"x-forwarded-port", b"forwarded"))
# Fields about one connection (RFC 9110 7.6.1), which a sender frames for itself, and the
# two the front owns: its Date and Server replace an application's (as nginx's proxy_pass
# hides an upstream's by default), so a client never sees two.
_HOP_BY_HOP = frozenset((b"connection", b"keep-alive", b"transfer-encoding", b"te", b"trailer",
                         b"upgrade", b"proxy-connection"))
_NOT_FORWARDED = _HOP_BY_HOP | {b"date", b"server"}


def target_path(target):
    """The path of a request target, percent-decoded: the one rule by which the front routes
    a request and by which its SCRIPT_NAME + PATH_INFO are split (cgi_variables).  Of an
    absolute-form target (RFC 9112 3.2.2, "http://host/x") it is the path after the authority."""
    path = target.partition(b"?")[0]
    if path[:1] != b"/" and b"://" in path:  # absolute-form
        path = b"/" + path.split(b"/", 3)[3] if path.count(b"/") >= 3 else b"/"
    return unquote_to_bytes(path) if b"%" in path else path


def target_authority(target):
    """The host of an absolute-form target, lower-case, without port or userinfo; None for
    any other form (RFC 9112 3.2.2: that authority is the request's host, not Host's)."""
    if target[:1] == b"/" or b"://" not in target:
        return None
    authority = target.split(b"/", 3)[2].partition(b"?")[0].rpartition(b"@")[2]
    return _without_port(authority).lower()


def _without_port(host):
    return host.rpartition(b":")[0] if host.rsplit(b":", 1)[-1].isdigit() else host


class Request:
    """One parsed request, as the front hands it to an upstream, with its framing."""

    __slots__ = ("method", "target", "version", "headers", "body", "body_fd", "keep_alive",
                 "path", "line", "proxy_headers", "length", "chunked", "expect_continue")

    def __init__(self, method, target, version, headers, keep_alive, line):
        self.method, self.target, self.version = method, target, version
        self.headers = headers  # [(name, value)] as received, bytes
        self.keep_alive = keep_alive
        self.body, self.body_fd = b"", None
        self.path = target_path(target)  # decoded: what routing and SCRIPT_NAME + PATH_INFO see
        self.line = line
        self.proxy_headers = None  # {lower name: value} of X-Forwarded-* and Forwarded
        self.length = None  # Content-Length, if the body is framed by one
        self.chunked = False  # Transfer-Encoding: chunked
        self.expect_continue = False  # the client waits for 100 Continue before the body


class Response:
    """What an upstream answers: status line tail, header pairs, and the body: bytes, or
    `body_length` bytes of the file on `body_fd` from `body_offset` (all of it when the
    length is None), sent with sendfile, or bytes followed by a `stream` (a body source,
    see _PipeStream) that the front relays as it arrives."""

    __slots__ = ("status", "headers", "body", "body_fd", "close", "body_offset", "body_length",
                 "stream")

    def __init__(self, status, headers, body=b"", body_fd=None, close=False, body_offset=0,
                 body_length=None, stream=None):
        self.status, self.headers, self.body, self.body_fd, self.close = (
            status, headers, body, body_fd, close)
        self.body_offset, self.body_length, self.stream = body_offset, body_length, stream


def plain_response(code, text=None, close=False):
    body = ((text or _REASONS.get(code, "Error")) + "\n").encode()
    return Response(("%d %s" % (code, _REASONS.get(code, "Error"))).encode(),
                    [b"Content-Type", b"text/plain", b"Content-Length", str(len(body)).encode()],
                    body, close=close)


def head_lines(head, lf_ends_lines=False):
    """The lines of a message head (the bytes before its blank line), without line ends.

    Each line must end in CRLF (a CGI program's output may use LF: RFC 3875 6.3) and no
    control character but HTAB may stand in it; HTTPError (400) otherwise.
    """
    if lf_ends_lines:
        head = head.replace(b"\r\n", b"\n")
        if b"\r" in head:
            raise HTTPError(400, "bare CR in the head")
        lines = head.split(b"\n")
    else:
        lines = head.split(b"\r\n")
        ends = len(lines) - 1  # every CR and every LF must belong to one of these CRLFs
        if head.count(b"\r") != ends or head.count(b"\n") != ends:
            raise HTTPError(400, "bare CR or LF in the head")
    if _HAS_CTL_BUT_CRLF.search(head):
        raise HTTPError(400, "control character in the head")
    return lines


def split_field(line):
    """(name, value) of a field line already cleared by head_lines; HTTPError (400) if malformed.

    The name is a token right against the colon (RFC 9112 5.1 refuses whitespace there; a
    line that starts with it is obs-fold, refused too); the value loses its SP/HTAB ends.
    """
    name, colon, value = line.partition(b":")
    if not colon or not name or name.translate(None, _TCHARS):
        raise HTTPError(400, "malformed header field %r" % line[:40])
    return name, value.strip(b" \t")


def find_head_end(buf, start=0):
    """Where the CRLF CRLF that ends a head starts in `buf` (searching from `start`), or -1.

    A bare LF before it refuses the head at once (HTTPError 400; RFC 9112 2.2 lets a server
    refuse it): a client that ends its lines so never sends CRLF CRLF and would otherwise
    wait out the header timeout.  Callers pass back len(buf) - 3 as `start` after each read,
    so a head that arrives a byte at a time is still scanned once.
    """
    start = max(0, start)
    end = buf.find(b"\r\n\r\n", start)
    stop = end if end >= 0 else len(buf)
    if buf.count(b"\n", start, stop) != buf.count(b"\r\n", max(0, start - 1), stop):
        raise HTTPError(400, "bare LF in the head")
    return end


def parse_request_head(head, limits):
    """The Request in `head`, its framing included; HTTPError for what the front refuses."""
    first = head.find(b"\r\n")
    line = head if first < 0 else head[:first]
    if len(line) > limits.max_line:
        raise HTTPError(414, "request line over %d bytes" % limits.max_line)
    match = _REQUEST_LINE.fullmatch(line)
    if match is None:
        raise HTTPError(400, "malformed request line")
    method, target, major, minor = match.groups()
    if major != b"1" or minor not in b"01":
        raise HTTPError(505, "HTTP/%s.%s is not supported" % (major.decode(), minor.decode()))
    if b"#" in target:  # RFC 9112 3.2: a fragment is the client's own, never sent
        raise HTTPError(400, "fragment in the request target")
    if not (target[:1] == b"/" or target[:7].lower() == b"http://"
            or target[:8].lower() == b"https://" or (target == b"*" and method == b"OPTIONS")):
        raise HTTPError(400, "unsupported request target")
    version = b"HTTP/1.1" if minor == b"1" else b"HTTP/1.0"
    lines = head_lines(head)
    if len(lines) - 1 > limits.max_headers:
        raise HTTPError(431, "more than %d header fields" % limits.max_headers)
    headers = []
    special = {}
    request_proxy = None
    for field in lines[1:]:
        if len(field) > limits.max_line:
            raise HTTPError(431, "header field over %d bytes" % limits.max_line)
        name, value = split_field(field)
        if b"_" in name:
            continue  # X_Foo must never alias X-Foo in the environ: drop it (as nginx does)
        lower = name.lower()
        if lower in _PROXY_HEADERS:
            proxy = request_proxy if request_proxy is not None else {}
            request_proxy = proxy
            proxy[lower] = proxy[lower] + b"," + value if lower in proxy else value
        elif lower in _FRAMING or lower in (b"connection", b"expect"):
            if lower in special and lower != b"connection":
                raise HTTPError(400, "duplicate %s header" % lower.decode())
            special[lower] = special[lower] + b"," + value if lower in special else value
            if lower == b"connection":
                continue
        headers.append((name, value))
    if version == b"HTTP/1.1" and b"host" not in special:
        raise HTTPError(400, "missing Host header")
    tokens = {t.strip(b" \t").lower() for t in special.get(b"connection", b"").split(b",")}
    keep_alive = (b"close" not in tokens) if version == b"HTTP/1.1" else (b"keep-alive" in tokens)
    request = Request(method, target, version, headers, keep_alive, line)
    request.proxy_headers = request_proxy
    _request_framing(request, special, limits)
    return request


def _request_framing(request, special, limits):
    """Set how the request's body is framed (RFC 9112 6.3): length, chunked, expect_continue."""
    expect = special.get(b"expect")
    if expect is not None:
        if expect.lower() != b"100-continue":
            raise HTTPError(417, "unsupported expectation")
        request.expect_continue = request.version == b"HTTP/1.1"
    length = special.get(b"content-length")
    coding = special.get(b"transfer-encoding")
    if coding is not None:
        if length is not None:
            raise HTTPError(400, "both Content-Length and Transfer-Encoding")
        if request.version != b"HTTP/1.1":
            raise HTTPError(400, "Transfer-Encoding in an HTTP/1.0 request")
        codings = [c.strip(b" \t").lower() for c in coding.split(b",")]
        if codings[-1] != b"chunked" or codings.count(b"chunked") != 1:
            if any(c not in (b"chunked", b"gzip", b"deflate", b"compress", b"identity") or not c
                   for c in codings):
                raise HTTPError(501, "unknown transfer coding")
            raise HTTPError(400, "chunked must be the last transfer coding, once")
        if len(codings) != 1:
            raise HTTPError(501, "only the chunked transfer coding is supported")
        request.chunked = True
    elif length is not None:
        if not _DIGITS.fullmatch(length):
            raise HTTPError(400, "invalid Content-Length")
        request.length = int(length)
        if request.length > limits.max_body:
            raise HTTPError(413, "request body of %d bytes over %d" % (request.length, limits.max_body))


def response_length(headers):
    """The Content-Length among a response's fields ([name, value, ...]): None if absent.

    ValueError for two of them, or one that is not a number: a message nobody can frame
    (RFC 9110, section 8.6).  The one place that rule is kept, for every response: the
    application's, an upstream's, and the front's as it frames one.
    """
    length = None
    for i in range(0, len(headers), 2):
        if headers[i].lower() == b"content-length":
            if length is not None or not _DIGITS.fullmatch(headers[i + 1]):
                raise ValueError("duplicate or invalid Content-Length %r" % headers[i + 1][:40])
            length = int(headers[i + 1])
    return length


def parse_response_fields(lines):
    """Header pairs and framing of a response's field lines: (headers, length, chunked, close).

    `headers` is [name, value, ...] without Connection and Transfer-Encoding; `length` the
    Content-Length (None if absent).  HTTPError for anything a sender must not send: a
    malformed field, a coding other than chunked, two or an invalid Content-Length.
    """
    headers = []
    chunked = close = False
    for line in lines:
        name, value = split_field(line)
        lower = name.lower()
        if lower == b"transfer-encoding":
            if value.lower() != b"chunked":
                raise HTTPError(400, "unsupported transfer coding %r" % value[:40])
            chunked = True
        elif lower == b"connection":
            close = close or b"close" in value.lower()
        else:
            headers += (name, value)
    try:
        length = response_length(headers)
    except ValueError as exc:
        raise HTTPError(400, str(exc))
    if chunked and length is not None:
        raise HTTPError(400, "both Content-Length and Transfer-Encoding")
    return headers, length, chunked, close


def parse_status(text):
    """`code reason` from a status line's tail or a CGI Status value; the reason is filled in
    when missing.  HTTPError (400) if malformed."""
    match = _STATUS.fullmatch(text)
    if match is None:
        raise HTTPError(400, "malformed status %r" % text[:40])
    code, reason = match.groups()
    return b"%s %s" % (code, reason or _reason_phrase(code))


def _reason_phrase(code):
    """The standard reason phrase of a status code given as bytes (b"" if there is none)."""
    import http  # the package alone: HTTPStatus, without http.client
    try:
        return http.HTTPStatus(int(code)).phrase.encode()
    except ValueError:
        return b""


def has_no_body(method, code):
    """RFC 9110 6.4.1: a response to HEAD, and a 1xx, 204 or 304, never has a body."""
    return method == b"HEAD" or code < 200 or code == 204 or code == 304


class ChunkedDecoder:
    """A chunked body (RFC 9112 7.1), decoded from a receive buffer as its bytes arrive.

    decode(buf) takes from the bytearray `buf` whatever it can decode and returns the body
    bytes found; `done` is set once the last chunk and the trailers are in.  Trailer fields
    are checked and dropped.  HTTPError: 400 for a malformed body, 413 past `limit` bytes
    (refused on the chunk size, before its data is read).
    """

    __slots__ = ("limit", "max_line", "max_trailers", "size", "left", "state", "trailers", "scanned")

    _SIZE, _DATA, _DATA_END, _TRAILER, _DONE = range(5)

    def __init__(self, limit, max_line=8190, max_trailers=100):
        self.limit, self.max_line, self.max_trailers = limit, max_line, max_trailers
        self.size = self.left = self.trailers = 0
        self.scanned = 0  # how far the current line has been searched for its end
        self.state = self._SIZE

    @property
    def done(self):
        return self.state == self._DONE

    def decode(self, buf):
        data = []
        while True:
            state = self.state
            if state == self._DATA:
                if not buf:
                    break
                piece = bytes(buf[:self.left])
                del buf[:len(piece)]
                data.append(piece)
                self.left -= len(piece)
                if self.left:
                    break
                self.state = self._DATA_END
            elif state == self._DATA_END:
                if len(buf) < 2:
                    break
                if buf[:2] != b"\r\n":
                    raise HTTPError(400, "chunk data longer than its size")
                del buf[:2]
                self.state = self._SIZE
            elif state == self._DONE:
                break
            else:
                end = buf.find(b"\r\n", self.scanned, self.max_line + 2)
                if end < 0:
                    if len(buf) > self.max_line:
                        raise HTTPError(400, "chunk line too long")
                    # A line arriving in pieces is searched once: linear, however it is cut
                    # (its last byte may be the CR of a CRLF still to come).
                    self.scanned = max(len(buf) - 1, 0)
                    break
                self.scanned = 0
                line = bytes(buf[:end])
                del buf[:end + 2]
                if state == self._SIZE:
                    self._size_line(line)
                else:
                    self._trailer_line(line)
        return b"".join(data) if len(data) != 1 else data[0]

    def _size_line(self, line):
        match = _CHUNK_SIZE.fullmatch(line)
        if match is None:
            raise HTTPError(400, "malformed chunk size line")
        size = int(match.group(1), 16)
        if size == 0:
            self.state = self._TRAILER
            return
        if self.size + size > self.limit:
            raise HTTPError(413, "request body over %d bytes" % self.limit)
        self.size += size
        self.left = size
        self.state = self._DATA

    def _trailer_line(self, line):
        if not line:
            self.state = self._DONE
            return
        self.trailers += 1
        try:
            if self.trailers > self.max_trailers or _HAS_CTL.search(line):
                raise HTTPError(400, "too many trailer fields, or a control character in one")
            name, _ = split_field(line)
        except HTTPError:
            raise HTTPError(400, "malformed trailer field")  # never echo it: it may be the next request
        if name.lower() in _FRAMING:
            raise HTTPError(400, "framing header in trailers")


LAST_CHUNK = b"0\r\n\r\n"


def chunk_header(size):
    return b"%x\r\n" % size


def encode_chunk(data):
    """`data` as one chunk of a chunked body; nothing for no data (a 0 chunk ends the body)."""
    return b"%x\r\n%s\r\n" % (len(data), data) if data else b""


def frame_response(status, headers, body_size, method, version, keep_alive, own=b""):
    """How a response goes out: (head, body bytes to send, chunked, close).

    `status` and `headers` ([name, value, ...]) are what an application or upstream gave;
    `method`, `version` and `keep_alive` those of the request (method None: a refused one);
    `own` the sender's own header lines (the front's Date and Server).  The sender frames
    the message itself: the application's hop-by-hop fields (and Date and Server) are
    dropped; no body for HEAD, 1xx, 204 and 304; else its Content-Length, or chunked for
    HTTP/1.1, or the close for HTTP/1.0.  A Content-Length that disagrees with the body
    sends what both allow, then closes.  ValueError for what cannot be sent at all: a bad
    status, a control character in a field, two or an invalid Content-Length.
    """
    if _STATUS.fullmatch(status) is None:
        raise ValueError("malformed status %r" % status[:40])
    code = int(status[:3])
    parts = [b"HTTP/1.1 ", status, b"\r\n", own]
    length = response_length(headers)
    close = not keep_alive
    for i in range(0, len(headers), 2):
        name = headers[i]
        lower = name.lower()
        if lower in _NOT_FORWARDED:
            if lower == b"connection" and b"close" in headers[i + 1].lower():
                close = True
            continue
        parts += (name, b": ", headers[i + 1], b"\r\n")
    names = headers[::2]
    if _HAS_CTL.search(b"".join(headers)) or b"".join(names).translate(None, _TCHARS) or not all(names):
        raise ValueError("malformed header field in the response")
    chunked = False
    if has_no_body(method, code):
        body_size = 0
    elif length is not None:
        if length != body_size:
            close = True
            body_size = min(length, body_size)
    elif version == b"HTTP/1.1":
        chunked = True
        parts.append(b"Transfer-Encoding: chunked\r\n")
    else:
        close = True  # HTTP/1.0 without a length: the close ends the body
    if close:
        parts.append(b"Connection: close\r\n\r\n")
    elif version == b"HTTP/1.0":
        parts.append(b"Connection: keep-alive\r\n\r\n")
    else:
        parts.append(b"\r\n")
    return b"".join(parts), body_size, chunked, close


def framed_bytes(head, body, size, chunked):
    """A whole response, from frame_response's head, size and chunked and the body in memory."""
    if chunked:
        return b"".join((head, encode_chunk(body), LAST_CHUNK))
    return head + (body if size == len(body) else body[:size])


_date_cache = [0, b""]


def http_date():
    """The Date header value, formatted at most once a second."""
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache[1] = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now)).encode()
        _date_cache[0] = now
    return _date_cache[1]


def cgi_response(status, headers, body, close):
    """A response in CGI form (RFC 3875 section 6): Status and header lines, a blank line, the body."""
    parts = [b"Status: ", status, b"\r\n"]
    for i in range(0, len(headers), 2):
        parts += (headers[i], b": ", headers[i + 1], b"\r\n")
    if close:
        parts.append(b"Connection: close\r\n")  # the app broke its framing: the front closes
    parts += (b"\r\n", body)
    return b"".join(parts)


def cgi_head_end(output, start=0):
    """(where, length) of the blank line that ends a CGI response head, the first from
    `start`: CRLF CRLF, or LF LF (RFC 3875 6.3 lets a program end its lines with LF);
    (-1, 0) while there is none.  The LF LF search stops at the CRLF CRLF: a body is not
    scanned (64 KiB of it cost 60 µs a search)."""
    end = output.find(b"\r\n\r\n", start)
    bare = output.find(b"\n\n", start, end if end >= 0 else len(output))
    if bare >= 0:
        return bare, 2
    return (end, 4) if end >= 0 else (-1, 0)


def parse_cgi_response(output):
    """The Response in a CGI program's output: header lines (CRLF or LF), a blank line, the body."""
    end, skip = cgi_head_end(output)
    if end < 0:
        raise TransportError("the CGI response has no end of headers")
    status = None
    try:
        fields, _, chunked, close = parse_response_fields(head_lines(output[:end], lf_ends_lines=True))
        if chunked:
            raise HTTPError(400, "a chunked CGI response")
        headers = []
        for i in range(0, len(fields), 2):
            lower = fields[i].lower()
            if lower == b"status":
                status = parse_status(fields[i + 1])
                continue
            if lower == b"location" and status is None:
                status = b"302 Found"  # RFC 3875 6.2.3: a client redirect
            headers += fields[i:i + 2]
    except HTTPError as exc:
        raise TransportError("malformed CGI response: %s" % exc)
    return Response(status or b"200 OK", headers, output[end + skip:], None, close)


# -- reading requests off a connection: the codec over a BufferedSocket ------------------

class _BodySink:
    """Collects a request body in memory, moving it to a temporary file past the inline limit."""

    def __init__(self, limit):
        self.limit = limit
        self.size = 0
        self.buf = bytearray()
        self.spool = None

    def write(self, data):
        self.size += len(data)
        if self.size > self.limit:
            raise HTTPError(413, "request body over %d bytes" % self.limit)
        if self.spool is not None:
            self.spool.write(data)
            return
        self.buf += data
        if len(self.buf) > INLINE_BODY_MAX:
            import tempfile
            self.spool = tempfile.TemporaryFile()
            self.spool.write(self.buf)
            self.buf = None

    def finish(self, request):
        if self.spool is None:
            request.body = bytes(self.buf)
        else:
            self.spool.flush()
            request.body_fd = os.dup(self.spool.fileno())
            os.lseek(request.body_fd, 0, os.SEEK_SET)
            self.spool.close()


class _BodyClock:
    """The deadline for the rest of a request body, pushed back as bytes arrive.

    A body must start within body_timeout, then keep up a minimum rate: each byte
    received earns 1/min_rate more seconds (as Apache's mod_reqtimeout does).
    """

    __slots__ = ("deadline", "rate")

    def __init__(self, timeout, rate):
        self.deadline = time.monotonic() + timeout
        self.rate = rate

    def earn(self, received):
        self.deadline += received / self.rate


class RequestReader:
    """Reads requests, bodies included, off a connection: the codec over a BufferedSocket.

    What it reads is bounded by `self.limits` and their deadlines; a request it refuses is
    an HTTPError.  Its users (the front, the proxy transport's app end) set `reader`,
    `limits` and `request` (the socket, which answers 100 Continue).
    """

    line = None  # the request line, once read (the access log's, even if refused)
    started = 0.0  # when the current request began to arrive

    def read_request(self):
        """The next request with its body, or None when the client is done (or idle too long)."""
        limits, reader = self.limits, self.reader
        buf = reader.buf
        deadline = time.monotonic() + limits.keepalive
        skipped_empty_line = False
        self.line = None
        while True:
            if buf[:2] == b"\r\n" and not skipped_empty_line:  # RFC 9112 2.2: ignore one
                del buf[:2]
                skipped_empty_line = True
            if buf:
                break
            try:
                if not reader.fill(deadline):
                    return None
            except _ClientGone:
                return None
        self.started = time.monotonic()
        self.arriving()
        deadline = self.started + limits.header_timeout
        scanned = 0
        while True:
            end = find_head_end(buf, scanned - 3)
            if end >= 0:
                break
            if len(buf) > limits.max_header_size or (len(buf) > limits.max_line and b"\r\n" not in buf):
                raise self.head_too_large(buf)
            scanned = len(buf)
            try:
                if not reader.fill(deadline):
                    raise _ClientGone("closed inside the request head")
            except _ReadTimeout:
                raise HTTPError(408, "request head not received within %ss" % limits.header_timeout)
        if end > limits.max_header_size:
            raise self.head_too_large(buf)
        head = bytes(buf[:end])
        del buf[:end + 4]
        line = head.partition(b"\r\n")[0]
        self.line = line if len(line) <= limits.max_line else None
        request = parse_request_head(head, limits)
        self.read_body(request)
        return request

    def arriving(self):
        """A request has begun to arrive: the connection is no longer idle."""

    def head_too_large(self, buf):
        first = buf.find(b"\r\n")
        if first < 0 or first > self.limits.max_line:
            return HTTPError(414, "request line over %d bytes" % self.limits.max_line)
        return HTTPError(431, "request head over %d bytes" % self.limits.max_header_size)

    def read_body(self, request):
        limits, reader = self.limits, self.reader
        if request.length is None and not request.chunked:
            return
        if request.expect_continue and not reader.buf and request.length != 0:
            self.request.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        sink = _BodySink(limits.max_body)
        clock = _BodyClock(limits.body_timeout, limits.min_body_rate)
        try:
            if request.chunked:
                self.read_chunked(sink, clock)
            else:
                self.read_length(sink, request.length, clock)
        except _ReadTimeout:
            raise HTTPError(408, "request body arrived slower than %d bytes/s" % limits.min_body_rate)
        sink.finish(request)

    def read_length(self, sink, size, clock):
        """Move a body of `size` bytes into `sink`."""
        reader, buf = self.reader, self.reader.buf
        while size:
            if not buf and not reader.fill(clock.deadline):
                raise HTTPError(400, "connection closed %d bytes before the end of the body" % size)
            piece = bytes(buf[:size])
            del buf[:len(piece)]
            sink.write(piece)
            clock.earn(len(piece))
            size -= len(piece)

    def read_chunked(self, sink, clock):
        """Decode a chunked body into `sink`.  Every byte earns time as it is received,
        framing included: a chunk-size line, extension or trailer field still incomplete
        has earned its bytes already (earning only what the decoder took would leave a long
        line trickling in at any rate unpaid until its end).  Framing cannot buy time
        without bytes: each chunk before the last carries payload, so its line (at most
        max_line) comes with a byte of max_body, and the trailers are limited too."""
        reader, buf = self.reader, self.reader.buf
        decoder = ChunkedDecoder(sink.limit, self.limits.max_line, self.limits.max_headers)
        clock.earn(len(buf))  # what came with the head: of this body, unless it ends in there
        while True:
            data = decoder.decode(buf)
            if data:
                sink.write(data)
            if decoder.done:
                return
            before = len(buf)
            if not reader.fill(clock.deadline):
                raise HTTPError(400, "connection closed inside a chunked body")
            clock.earn(len(buf) - before)


###############################################################################
# Door layer #################################################################
###############################################################################
#
# One API over two backends:
#
#   server = backend.serve(path, handler)   handler(data, fds, caller) -> (reply, fds)
#   client = backend.open(path)             client.call(data, fds) -> (reply, fds)
#
# Descriptor ownership follows doors with DOOR_RELEASE: descriptors a handler returns
# are closed once sent; descriptors a caller passes stay the caller's; descriptors
# received (by a handler or in a reply) belong to the receiver, who must close them.

Caller = collections.namedtuple("Caller", "euid pid")

# Largest call the door layer accepts.  illumos copies the arguments onto the server
# thread's stack and refuses larger ones with E2BIG (about 1.93 MiB with default
# threads); the emulation enforces the same bound so that code above behaves alike.
DOOR_CALL_MAX = 1900 * 1024


class DoorError(OSError):
    """A door call that could not be completed."""


class DoorGone(DoorError):
    """No server behind the door any more: it died, possibly during this very call."""


class DoorRevoked(DoorGone, NotDelivered):
    """The call never reached a server (no door, or a revoked one: EBADF on illumos).

    Unlike a server that died during the call, nothing ran, so the caller may safely
    make the same call on another door.
    """


class DoorTimeout(DoorError):
    """The server did not answer within the caller's time limit."""


# -- emulated doors: Unix-domain sockets ---------------------------------------
#
# Semantics kept from illumos (door_sys.c and door_calls.c in illumos-gate):
# * a call is synchronous: the calling thread blocks until the reply;
# * a client holds a LIFO stack of idle connections and opens a new one only when
#   every one is busy, and the server gives each connection a thread from its own LIFO
#   pool of idle threads, creating one only when none is free.  So server threads
#   follow the concurrency high-water mark, never shrink, and sequential calls are
#   served by the same hot thread, whose thread-locals therefore persist;
# * the door file is the socket, created 0600 (in a directory the caller keeps 0700);
# * descriptors travel both ways (SCM_RIGHTS); the caller's euid and pid come from
#   the socket's peer credentials;
# * a dead server is seen at once as end-of-file: DoorGone, never a hang;
# * revoking answers each connection's next call with a REVOKED frame instead of running
#   it, so the caller knows the call was not invoked (DoorRevoked) and may go elsewhere.
#
# Each message: header (payload length, descriptor count), payload; descriptors ride on
# the first sendmsg.
#
# A connection is two stream sockets, one a way: calls go on the connected socket and
# replies come back on a socket pair whose far end the server hands over as it accepts
# (the connection's first message; a server out of descriptors hands over none, and
# replies on the connected socket).  On one socket, a thread blocked reading it is also
# woken, for nothing, each time its peer reads what it sent (Linux wakes every waiter on a
# Unix socket when space to write frees up, net/unix/af_unix.c unix_write_space, and a
# stream reader's wait does not filter by event): so every call woke its server thread
# twice, and often its caller too.  Split, nobody waits where the space frees up.
# Measured with hello under wrk at c16, runs interleaved: context switches per request in
# the app 2.2 → 1.4 and in the front 2.8 → 2.2 pinned, in the app 3.4 → 2.6 free; the
# app's CPU per request 79 → 71 µs free (medians of six).  Datagram sockets, whose readers
# ignore that wake-up, would bound each message by the send buffer.  The cost: each
# connection holds two descriptors in each process, and one more message as it opens.

_FRAME = struct.Struct("=IH2x")
_MAX_FDS = 16
_ANC_SPACE = socket.CMSG_SPACE(_MAX_FDS * array.array("i").itemsize)
# Plain ints: the socket module's are IntFlag members, and `flags & socket.MSG_CTRUNC`
# would build a new enum member per message.
_RECV_FLAGS = int(getattr(socket, "MSG_CMSG_CLOEXEC", 0))
_MSG_CTRUNC = int(socket.MSG_CTRUNC)
# Each connection keeps a buffer of this size for the first read of every message: small
# messages (most calls and replies) take one read and no allocation; a larger one is read
# on into a buffer of its own size.  Kept small, as every open connection holds one
# (64 KiB each made the stack 4 MB larger at 64 connections).
_FIRST_READ = 8192
_REVOKED_MARK = 0xFFFF
_REVOKED_FRAME = _FRAME.pack(0, _REVOKED_MARK)


def send_gathered(sock, head, body, anc=()):
    """Send `head` then `body` in one gathering write, without joining (copying) them."""
    sent = sock.sendmsg([head, body], anc)
    if sent < len(head):  # a stream socket may take less than all (a signal, a timeout)
        sock.sendall(memoryview(head)[sent:])
        sent = len(head)
    if sent < len(head) + len(body):
        sock.sendall(memoryview(body)[sent - len(head):])


def _send_message(sock, data, fds=()):
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else ()
    send_gathered(sock, _FRAME.pack(len(data), len(fds)), data, anc)


def receive_buffer():
    """The buffer a connection reuses for the first read of each message it receives."""
    return memoryview(bytearray(_FIRST_READ))


def _recv_message(sock, limit, buffer):
    """Read one message: (payload, fds, revoked_after).  EOFError on a clean close first.

    `buffer` is the connection's receive_buffer(): a message that fits in it costs one
    read and one copy, and no allocation.
    `revoked_after` is True when the server's REVOKED frame came in right behind the
    message (the only bytes that may ever follow a reply unasked).
    """
    got, anc, flags, _ = sock.recvmsg_into([buffer], _ANC_SPACE, _RECV_FLAGS)
    data = buffer[:got]
    fds = []
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.extend(array.array("i", payload[: len(payload) - len(payload) % 4]))
    if flags & _MSG_CTRUNC:
        _close_fds(fds)
        # The control buffer has room for as many descriptors as a message may carry, so a
        # message within the limit was cut short because this process could not take them
        # (Linux's scm_detach_fds stops at a full descriptor table and sets MSG_CTRUNC): the
        # EMFILE a door call gets for a reply its caller cannot take.
        announced = _FRAME.unpack_from(buffer)[1] if got >= _FRAME.size else 0
        if announced <= _MAX_FDS:
            raise DoorError(errno.EMFILE, "the caller's descriptor table is full: the "
                            "descriptors the message carried were lost")
        raise DoorError(errno.EMSGSIZE, "too many descriptors in one door message")
    if not got:
        _close_fds(fds)
        raise EOFError
    try:
        while got < _FRAME.size:
            more = sock.recv_into(buffer[got:_FRAME.size])
            if not more:
                raise EOFError
            got += more
        data = buffer[:got]
        size, nfds = _FRAME.unpack_from(data)
        if nfds == _REVOKED_MARK:
            raise DoorRevoked(errno.EBADF, "door revoked")
        if size > limit or nfds != len(fds):
            raise DoorError(errno.EPROTO, "malformed door message (size %d, %d fds)" % (size, nfds))
        have = got - _FRAME.size
        if have == size:
            return data[_FRAME.size:].tobytes(), fds, False
        if have > size:
            if data[_FRAME.size + size:] != _REVOKED_FRAME:
                raise DoorError(errno.EPROTO, "door message longer than its header says")
            return data[_FRAME.size:_FRAME.size + size].tobytes(), fds, True
        buf = bytearray(size)
        buf[:have] = data[_FRAME.size:]
        view = memoryview(buf)
        while have < size:
            got = sock.recv_into(view[have:])
            if not got:
                raise EOFError
            have += got
        return bytes(buf), fds, False
    except BaseException:
        _close_fds(fds)
        raise


def _peer_credentials(sock):
    """(euid, pid) of the process at the other end of a Unix socket."""
    if hasattr(socket, "SO_PEERCRED"):  # Linux
        pid, uid, _gid = struct.unpack("3i", sock.getsockopt(
            socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
        return Caller(uid, pid)
    # BSD and macOS: getpeereid(3) gives the uid; the pid is not known
    uid, gid = ctypes.c_uint32(), ctypes.c_uint32()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.getpeereid(sock.fileno(), ctypes.byref(uid), ctypes.byref(gid)) != 0:
        raise OSError(ctypes.get_errno(), "getpeereid failed")
    return Caller(uid.value, 0)


class _EmulatedDoorServer:
    """A door at `path` whose invocations run `handler` on a pool of server threads."""

    def __init__(self, path, handler):
        self.path = path
        self._handler = handler
        self._lock = threading.Lock()
        self._idle_threads = []  # LIFO of per-thread hand-off queues
        self._waiting = collections.deque()  # (conn, replies, caller) accepted, no thread yet
        self._connections = {}  # socket -> True while a call is being served
        self._revoked = False
        self.threads = 0
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            bind_unix_socket(self._listener, path, 256)
        except OSError:
            self._listener.close()
            raise
        self._acceptor = threading.Thread(target=self._accept_loop, name="door-accept", daemon=True)
        self._acceptor.start()

    def _accept_loop(self):
        failing = False
        while True:
            self._listener.settimeout(0.1 if self._waiting else None)
            try:
                conn, _ = self._listener.accept()
            except socket.timeout:  # connections wait for a thread: try to make one again
                self._hand_off_waiting()
                continue
            except OSError as exc:
                if self._revoked:
                    return  # the listener is closed
                # EMFILE, ENFILE, ENOBUFS: the caller waits in the backlog, as a door
                # call waits for a server thread; take it once descriptors are free again.
                if not failing:
                    _log("door", "accept failed (%s): retrying" % (exc.strerror or exc), "warning")
                failing = True
                time.sleep(0.05)
                continue
            failing = False
            try:
                caller = _peer_credentials(conn)
            except OSError:
                conn.close()
                continue
            replies = _open_reply_channel(conn)
            if replies is None:
                continue
            with self._lock:
                if self._revoked:
                    _answer_revoked(conn, replies)
                    return
                self._connections[conn] = False
                self._waiting.append((conn, replies, caller))
            self._hand_off_waiting()

    def _hand_off_waiting(self):
        """Give waiting connections to idle threads, or to new ones while threads can be made."""
        while True:
            with self._lock:
                if not self._waiting or self._revoked:
                    return
                handoff = self._idle_threads.pop() if self._idle_threads else None
                if handoff is None:
                    handoff = queue.SimpleQueue()
                    try:
                        threading.Thread(target=self._server_thread, args=(handoff,),
                                         name="door-server-%d" % (self.threads + 1), daemon=True).start()
                    except RuntimeError as exc:  # can't start new thread: the next idle one serves it
                        _log("door", "no new server thread (%s): the call waits" % exc, "warning")
                        return
                    self.threads += 1
                item = self._waiting.popleft()
            handoff.put(item)

    def _server_thread(self, handoff):
        item = handoff.get()
        while item is not None:
            conn, replies, caller = item
            self._serve_connection(conn, replies, caller)
            with self._lock:
                self._connections.pop(conn, None)
                if self._revoked:
                    return
                if self._waiting:  # a connection no new thread could be made for
                    item = self._waiting.popleft()
                    continue
                self._idle_threads.append(handoff)
            item = handoff.get()

    def _serve_connection(self, conn, replies, caller):
        # No lock per call: one item store marks the connection busy or idle (atomic), and
        # close() sets _revoked before it looks at them.  A call read just as close() looks
        # either sees _revoked and is answered REVOKED, or runs and is waited for.
        buffer = receive_buffer()
        with conn, replies:
            while not self._revoked:
                try:
                    data, fds, _ = _recv_message(conn, DOOR_CALL_MAX, buffer)
                except (EOFError, OSError):
                    break
                if self._revoked:
                    _close_fds(fds)
                    break
                self._connections[conn] = True
                try:
                    reply, reply_fds = self._handler(data, fds, caller)
                except BaseException:  # on illumos the thread would exit; the caller gets EINTR
                    _log("door", "door handler raised:\n" + traceback.format_exc(), "error")
                    return
                finally:
                    self._connections[conn] = False
                try:
                    _send_message(replies, reply, reply_fds)
                except OSError:
                    return
                finally:
                    _close_fds(reply_fds)
            if self._revoked:  # the client's next call (sent or not yet) was not invoked
                try:
                    replies.sendall(_REVOKED_FRAME)
                except OSError:
                    pass

    def close(self, grace=10.0):
        """Revoke: refuse new calls, let in-flight ones finish (up to `grace`), remove the file."""
        with self._lock:
            self._revoked = True
            idle = [conn for conn, busy in self._connections.items() if not busy]
            waiting = [(conn, replies) for conn, replies, _ in self._waiting]
            self._waiting.clear()
        try:
            os.unlink(self.path)  # no new caller finds the door
        except OSError:
            pass
        # Callers already connected but not yet accepted (or given no thread) made a call
        # that was never invoked: they are told so, as a revoked door's callers are.
        self._listener.setblocking(False)
        while True:
            try:
                conn = self._listener.accept()[0]
            except OSError:
                break
            waiting.append((conn, conn))
        for conn, replies in waiting:
            _answer_revoked(conn, replies)
            with self._lock:
                self._connections.pop(conn, None)
        _shutdown(self._listener)  # wakes the accept loop
        self._listener.close()
        for conn in idle:
            try:  # wakes the connection's thread, which answers REVOKED and closes
                conn.shutdown(socket.SHUT_RD)
            except OSError:
                pass
        # Wait for every connection to be done, not just the calls in flight: a thread
        # that has read a call but not yet started it must still answer REVOKED.
        deadline = time.monotonic() + grace
        while self._connections and time.monotonic() < deadline:
            time.sleep(0.01)
        with self._lock:
            for handoff in self._idle_threads:
                handoff.put(None)
            self._idle_threads = []


def _open_reply_channel(conn):
    """Hand the client on `conn` the socket it will read replies from; return our end.

    `conn` itself when no socket pair can be made (descriptors exhausted: one socket both
    ways then); None when the client is gone (`conn` is closed).
    """
    try:
        replies, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    except OSError:
        replies, theirs = conn, None
    try:
        _send_message(conn, b"", [theirs.fileno()] if theirs else ())
    except OSError:
        replies.close()
        conn.close()
        return None
    finally:
        if theirs is not None:
            theirs.close()
    return replies


def _answer_revoked(conn, replies):
    """Tell the caller on `conn`, not yet served, that its call was not invoked; close it."""
    try:
        replies.sendall(_REVOKED_FRAME)
    except OSError:
        pass
    replies.close()
    conn.close()


class _DoorConnection:
    """A client's connection to an emulated door: a socket each way, a buffer for replies."""

    __slots__ = ("calls", "replies", "buffer")

    def __init__(self, calls, replies, buffer):
        self.calls = calls
        self.replies = replies
        self.buffer = buffer

    def close(self):
        self.calls.close()
        self.replies.close()


class _EmulatedDoorClient:
    """A door opened by path; call() is safe from many threads at once."""

    def __init__(self, path, timeout=None):
        self.path = path
        self.timeout = timeout
        self._pool = LifoPool(self._connect)

    def _connect(self):
        calls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            calls.connect(self.path)
        except (FileNotFoundError, ConnectionRefusedError) as exc:  # no server there now
            calls.close()
            raise DoorRevoked(exc.errno, "no door server at %s (%s)" % (self.path, exc.strerror))
        except OSError as exc:  # EACCES, EMFILE...: a server may well be there
            calls.close()
            raise DoorError(exc.errno, "cannot reach the door %s: %s" % (self.path, exc.strerror))
        _io_timeout(calls, self.timeout)
        buffer = receive_buffer()
        try:  # the server's first message: the socket replies come on (see above)
            _, fds, revoked = _recv_message(calls, 0, buffer)
            if revoked:
                _close_fds(fds)
                raise EOFError
        except BlockingIOError:
            calls.close()
            raise DoorTimeout(errno.ETIMEDOUT, "door at %s not answering after %ss"
                              % (self.path, self.timeout))
        except DoorError:  # revoked, or this process has no descriptor free for the socket
            calls.close()
            raise
        except (EOFError, OSError):
            calls.close()
            raise DoorRevoked(errno.EBADF, "door at %s revoked" % self.path)
        if len(fds) > 1:
            _close_fds(fds)
            calls.close()
            raise DoorError(errno.EPROTO, "door at %s opened with %d descriptors"
                            % (self.path, len(fds)))
        if fds:
            replies = socket.socket(fileno=fds[0])
            _io_timeout(replies, self.timeout)
        else:
            replies = calls
        return _DoorConnection(calls, replies, buffer)

    def call(self, data, fds=()):
        # Two system calls, a send and the receive that waits, where door_call(3C) is one;
        # CPython lets go of the GIL around each, and with other threads waiting for it
        # each release hands it over.  That second release is what the emulation adds to a
        # native door's cost in a busy front (measured in the README).  Sending with the
        # GIL held (ctypes.PyDLL) was measured too: worse on one CPU, where the app's
        # woken thread takes the CPU from the thread holding the GIL.
        if len(data) > DOOR_CALL_MAX:
            raise DoorError(errno.E2BIG, "door call of %d bytes exceeds %d" % (len(data), DOOR_CALL_MAX))
        connection = self._pool.get()
        try:
            _send_message(connection.calls, data, fds)
        except OSError:  # the server closed this connection: the call was not delivered
            connection.close()
            raise DoorRevoked(errno.EBADF, "door at %s revoked" % self.path)
        try:
            reply, reply_fds, revoked_after = _recv_message(
                connection.replies, 1 << 30, connection.buffer)
        except BlockingIOError:  # the kernel's timeout: see _io_timeout
            connection.close()
            raise DoorTimeout(errno.ETIMEDOUT, "door call timed out after %ss" % self.timeout)
        except (EOFError, OSError) as exc:
            connection.close()
            if isinstance(exc, DoorError):
                raise
            raise DoorGone(errno.EINTR, "door server at %s went away during the call" % self.path)
        if revoked_after:
            connection.close()
        else:
            self._pool.put(connection)
        return reply, reply_fds

    def server_pid(self):
        connection = self._connect()
        try:
            return _peer_credentials(connection.calls).pid
        finally:
            connection.close()

    def close(self):
        """Close idle connections now, busy ones when their call returns."""
        self._pool.close()


class EmulatedDoors:
    name = "emulated"
    description = "emulated doors (Unix-domain sockets)"
    exit_hard = False
    request_inline_max = None  # no server stack to spare: the wire format's own limit

    def serve(self, path, handler):
        return _EmulatedDoorServer(path, handler)

    def open(self, path, timeout=None):
        return _EmulatedDoorClient(path, timeout)


# -- native doors: illumos libc through ctypes ---------------------------------
#
# The facts this rests on are in the illumos sources (door.h, door_calls.c,
# door_sys.c) and are summarised in doordown's notes:
# * door_desc_t and door_info_t are #pragma pack(4) on amd64: 24 and 48 bytes;
# * every invocation starts the server procedure at the same spot near the top of the
#   server thread's stack and abandons every frame that was live when the thread called
#   door_return, which never returns on success.  A ctypes callback that called
#   door_return itself would leave CPython's thread state pointing into overwritten
#   frames (unknown opcodes, segfaults, or RecursionError after a few hundred calls).
#   So the server procedure is a tiny native trampoline: it calls the Python handler,
#   which RETURNS normally after leaving its reply in a per-thread buffer, and only
#   then calls door_return from native code;
# * libc makes the server threads.  ctypes would create and destroy a Python thread
#   state per callback on such a thread; one extra PyGILState_Ensure on its first
#   invocation keeps a single thread state for the thread's whole life, so its
#   threading.local values persist like those of any Python thread.
#
# On Linux the same code runs against a model of the illumos door ABI (a C library the
# tests compile: support/doormodel.c), named by DOORDOWN_LIBDOOR.  That is how CI runs
# the illumos code path without an illumos machine.

_c_uint, _c_size_t, _c_void_p = ctypes.c_uint, ctypes.c_size_t, ctypes.c_void_p

DOOR_UNREF_DATA = 1  # argp of an unreferenced notification: (void *)1, not a buffer
DOOR_REVOKED = 0x08
DOOR_NO_CANCEL = 0x80  # an interrupted client must never pthread_cancel a Python thread
DOOR_DESCRIPTOR = 0x10000
DOOR_RELEASE = 0x40000
DOOR_PARAM_DESC_MAX, DOOR_PARAM_DATA_MAX = 1, 2


class door_arg_t(ctypes.Structure):  # not packed: 48 bytes
    _fields_ = [("data_ptr", _c_void_p), ("data_size", _c_size_t), ("desc_ptr", _c_void_p),
                ("desc_num", _c_uint), ("rbuf", _c_void_p), ("rsize", _c_size_t)]


class _door_desc_data(ctypes.Structure):
    _pack_, _layout_ = 4, "ms"  # Python 3.14 wants _layout_ beside _pack_
    _fields_ = [("d_descriptor", ctypes.c_int), ("d_id", ctypes.c_ulonglong)]


class _door_desc_union(ctypes.Union):
    _pack_, _layout_ = 4, "ms"
    _fields_ = [("d_desc", _door_desc_data), ("d_resv", ctypes.c_int * 5)]


class door_desc_t(ctypes.Structure):  # #pragma pack(4): 24 bytes
    _pack_, _layout_ = 4, "ms"
    _fields_ = [("d_attributes", _c_uint), ("d_data", _door_desc_union)]


class door_info_t(ctypes.Structure):  # #pragma pack(4): 48 bytes
    _pack_, _layout_ = 4, "ms"
    _fields_ = [("di_target", ctypes.c_int), ("di_proc", ctypes.c_ulonglong),
                ("di_data", ctypes.c_ulonglong), ("di_attributes", _c_uint),
                ("di_uniquifier", ctypes.c_ulonglong), ("di_resv", ctypes.c_int * 4)]


class stack_t(ctypes.Structure):  # thr_stksegment's answer: ss_sp is the top of the stack
    _fields_ = [("ss_sp", _c_void_p), ("ss_size", _c_size_t), ("ss_flags", ctypes.c_int)]


class _Reply(ctypes.Structure):
    """Where the Python handler leaves its reply for the trampoline's door_return."""
    _fields_ = [("data", _c_void_p), ("size", _c_size_t), ("desc", _c_void_p), ("ndesc", _c_uint)]


# handler(cookie, argp, arg_size, dp, n_desc, &reply): the five arguments of a door
# server procedure, plus the out-struct in the trampoline's frame.
_HANDLER = ctypes.CFUNCTYPE(None, _c_void_p, _c_void_p, _c_size_t, _c_void_p, _c_uint,
                            ctypes.POINTER(_Reply))
# refused(&reply): door_return refused the reply (errno says why); the callback closes the
# reply's descriptors and leaves a short answer without any in their place.
_REFUSED = ctypes.CFUNCTYPE(None, ctypes.POINTER(_Reply), use_errno=True)


def _trampoline_code(handler, refused, door_return, active):
    """x86-64 machine code of the door server procedure (System V AMD64 calling convention).

    Entered as proc(cookie=rdi, argp=rsi, arg_size=rdx, dp=rcx, n_desc=r8), rsp = 8 mod 16.
    `active` is the address of a 64-bit count of invocations under way, kept here in
    native code so that it covers an invocation from its first instruction: a revoked
    server can then wait for every call the kernel has already handed to it.

    door_return can fail back to the server with the client still waiting: EMFILE (the
    client's descriptor table cannot take the reply's descriptors), E2BIG, EFAULT, EINVAL
    (door_results in usr/src/uts/common/fs/doorfs/door_sys.c).  The descriptors are then
    still the server's, so `refused` closes them and replaces the reply with one that
    says what happened; only if that fails too does the client get an empty reply.
    """
    address = lambda value: struct.pack("<Q", value)
    load_reply = [
        b"\x48\x8b\x3c\x24",              # mov rdi, [rsp]       reply.data
        b"\x48\x8b\x74\x24\x08",          # mov rsi, [rsp+8]     reply.size
        b"\x48\x8b\x54\x24\x10",          # mov rdx, [rsp+16]    reply.desc
        b"\x8b\x4c\x24\x18",              # mov ecx, [rsp+24]    reply.ndesc
        b"\x48\xb8" + address(door_return),  # mov rax, door_return
        b"\xff\xd0",                      # call rax             door_return(reply): no return on success
    ]
    return b"".join([
        b"\x48\xb8" + address(active),    # mov rax, active
        b"\xf0\x48\xff\x00",              # lock inc qword [rax] one more invocation under way
        b"\x48\x83\xec\x28",              # sub rsp, 0x28        32-byte reply at [rsp]; rsp = 0 mod 16
        b"\x31\xc0",                      # xor eax, eax
        b"\x48\x89\x04\x24",              # mov [rsp], rax       reply.data  = NULL
        b"\x48\x89\x44\x24\x08",          # mov [rsp+8], rax     reply.size  = 0
        b"\x48\x89\x44\x24\x10",          # mov [rsp+16], rax    reply.desc  = NULL
        b"\x48\x89\x44\x24\x18",          # mov [rsp+24], rax    reply.ndesc = 0
        b"\x49\x89\xe1",                  # mov r9, rsp          6th argument: &reply
        b"\x48\xb8" + address(handler),   # mov rax, handler     (rdi..r8 still hold the 5 args)
        b"\xff\xd0",                      # call rax             the Python handler; it RETURNS
        b"\x48\xb8" + address(active),    # mov rax, active
        b"\xf0\x48\xff\x08",              # lock dec qword [rax] its answer is ready
        *load_reply,
        b"\x48\x89\xe7",                  # mov rdi, rsp         it failed and the client still
        b"\x48\xb8" + address(refused),   # mov rax, refused     waits: close the reply's
        b"\xff\xd0",                      # call rax             descriptors, say why instead
        *load_reply,
        b"\x31\xff",                      # xor edi, edi         that failed too: answer it with
        b"\x31\xf6",                      # xor esi, esi         an empty reply
        b"\x31\xd2",                      # xor edx, edx
        b"\x31\xc9",                      # xor ecx, ecx
        b"\x48\xb8" + address(door_return),  # mov rax, door_return
        b"\xff\xd0",                      # call rax             door_return(NULL, 0, NULL, 0)
        b"\x48\x83\xc4\x28",              # add rsp, 0x28        that failed too: return, which ends
        b"\xc3",                          # ret                  the thread; the client gets EINTR
    ])


def _executable(code):
    """Address of `code` copied into a fresh page that is then made read+execute only.

    Never writable and executable at once (W^X): mapped read+write, written, then
    mprotect'ed to read+execute.  A system that refuses executable anonymous memory
    (a security policy) makes native doors fail here, clearly, rather than at the first call.
    """
    import mmap
    page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    page.write(code)
    address = ctypes.addressof(ctypes.c_char.from_buffer(page))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [_c_void_p, _c_size_t, ctypes.c_int]
    if libc.mprotect(address, mmap.PAGESIZE, mmap.PROT_READ | mmap.PROT_EXEC) != 0:
        raise _failed("mprotect of the door trampoline to read+execute (is executable "
                      "memory refused here?)")
    _executable.pages.append(page)  # mapped for the life of the process
    return address


_executable.pages = []


def _load_door_library():
    """libc's door calls, or those of the library DOORDOWN_LIBDOOR names (the test model)."""
    machine = os.uname().machine  # not platform.machine(): on 3.9 `platform` loads subprocess
    if machine.lower() not in ("x86_64", "amd64", "i86pc") or sys.maxsize < 2 ** 32:
        raise DoorError(errno.ENOTSUP, "native doors need a 64-bit x86 CPU for their trampoline "
                        "(this is %s); use --doors emulated" % machine)
    path = os.environ.get("DOORDOWN_LIBDOOR") or ("libc.so.1" if is_illumos() else None)
    if path is None:
        raise DoorError(errno.ENOTSUP, "native doors need illumos (or DOORDOWN_LIBDOOR naming a "
                        "door library, as the tests do); use --doors emulated")
    try:
        lib = ctypes.CDLL(path, use_errno=True)
    except OSError as exc:
        raise DoorError(errno.ENOENT, "cannot load the door library %s: %s" % (path, exc))
    c_int, c_char_p = ctypes.c_int, ctypes.c_char_p
    for name, restype, argtypes in (
            ("door_create", c_int, [_c_void_p, _c_void_p, _c_uint]),
            ("door_call", c_int, [c_int, ctypes.POINTER(door_arg_t)]),
            ("door_return", c_int, [_c_void_p, _c_size_t, _c_void_p, _c_uint]),
            ("door_info", c_int, [c_int, ctypes.POINTER(door_info_t)]),
            ("door_revoke", c_int, [c_int]),
            ("door_ucred", c_int, [ctypes.POINTER(_c_void_p)]),
            ("ucred_geteuid", _c_uint, [_c_void_p]),
            ("ucred_getpid", c_int, [_c_void_p]),
            ("ucred_free", None, [_c_void_p]),
            ("door_getparam", c_int, [c_int, c_int, ctypes.POINTER(_c_size_t)]),
            ("door_setparam", c_int, [c_int, c_int, _c_size_t]),
            ("fattach", c_int, [c_int, c_char_p]),
            ("fdetach", c_int, [c_char_p])):
        function = getattr(lib, name)
        function.restype, function.argtypes = restype, argtypes
    libc = ctypes.CDLL(None, use_errno=True)
    lib.munmap = libc.munmap
    lib.munmap.argtypes = [_c_void_p, _c_size_t]
    return lib


def _failed(what):
    number = ctypes.get_errno()
    return DoorError(number, "%s: %s" % (what, os.strerror(number)))


# Signals a door server thread keeps blocked until it first runs Python: all but the
# faults a thread raises itself.
_ASYNC_SIGNALS = signal.valid_signals() - {
    getattr(signal, name) for name in ("SIGSEGV", "SIGBUS", "SIGFPE", "SIGILL", "SIGTRAP", "SIGSYS")
    if hasattr(signal, name)}


def _tell_python_the_stack():
    """CPython 3.14+ on illumos: the real bounds of this door thread's stack for its checks.

    From 3.14 CPython raises RecursionError by comparing the stack pointer with limits it
    derives from pthread_getattr_np, which illumos lacks; it then assumes a stack larger
    than the 2,088,960 bytes libc gives a door thread, and deep C recursion would run off
    the end (there is no guard page).  Where CPython offers a way to be told, tell it.
    """
    protect = getattr(ctypes.pythonapi, "PyUnstable_ThreadState_SetStackProtection", None)
    if protect is None or not is_illumos():
        return
    segment = stack_t()
    if ctypes.CDLL("libc.so.1").thr_stksegment(ctypes.byref(segment)) != 0:
        return
    ctypes.pythonapi.PyThreadState_Get.restype = _c_void_p
    protect.argtypes = [_c_void_p, _c_void_p, _c_size_t]
    if protect(ctypes.pythonapi.PyThreadState_Get(), segment.ss_sp - segment.ss_size,
               segment.ss_size) != 0:
        ctypes.pythonapi.PyErr_Clear()


class _NativeDoorServer:
    """A door created with door_create and attached to `path` with fattach."""

    def __init__(self, lib, path, handler):
        self.path = path
        self._lib, self._handler = lib, handler
        self._local = threading.local()
        self._lock = threading.Lock()
        self.threads = 0  # server threads that have run an invocation
        self._active = ctypes.c_int64(0)  # invocations under way, counted by the trampoline
        self._ensure = ctypes.pythonapi.PyGILState_Ensure
        self._ensure.restype = ctypes.c_int
        self._callback = _HANDLER(self._invoke)  # referenced for as long as the door lives
        self._refused_callback = _REFUSED(self._refused)
        procedure = _executable(_trampoline_code(ctypes.cast(self._callback, _c_void_p).value,
                                                 ctypes.cast(self._refused_callback, _c_void_p).value,
                                                 ctypes.cast(lib.door_return, _c_void_p).value,
                                                 ctypes.addressof(self._active)))
        self._claim(path)
        # libc's own creator of server threads is kept (no door_server_create): detached
        # threads, cancellation disabled, each parked in door_return from native code.  A
        # creator of ours would need native start code too: Python never calls door_return.
        # Those threads inherit the signal mask of the thread that makes them (_thrp_create
        # in thr.c): signals are blocked around door_create so that none lands on a thread
        # before it ever ran Python, and each thread takes this thread's mask back before
        # the application's code first runs on it (_invoke).  The faults a thread causes
        # itself stay unblocked: blocked, they would kill the process without a word.
        self._normal_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _ASYNC_SIGNALS)
        try:
            self._fd = lib.door_create(procedure, None, DOOR_NO_CANCEL)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, self._normal_mask)
        if self._fd < 0:
            raise _failed("door_create")
        # Let the kernel refuse what the wire format never sends (ENOBUFS, ENFILE), before
        # copying it onto a server thread's stack.
        lib.door_setparam(self._fd, DOOR_PARAM_DATA_MAX, DOOR_CALL_MAX)
        lib.door_setparam(self._fd, DOOR_PARAM_DESC_MAX, 1)
        # The file the door covers: fattach needs it, and the door takes its mode (0600,
        # whatever the umask), owner and group.
        placeholder = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        try:
            os.fchmod(placeholder, 0o600)
        finally:
            os.close(placeholder)
        if lib.fattach(self._fd, path.encode()) != 0:
            error = _failed("fattach %s" % path)
            lib.door_revoke(self._fd)
            raise error

    def _claim(self, path):
        """Free `path` for fattach: remove a stale door of ours there, refuse anything else.

        A door stays attached to its path after its server died (namefs keeps the mount
        until fdetach; callers get EBADF).  What is under it is the empty file a server
        of ours made; anything else at the path (a live door, a file with data, another
        user's file) is not ours to delete.
        """
        try:
            before = os.lstat(path)
        except FileNotFoundError:
            return
        if before.st_uid != os.geteuid():
            raise DoorError(errno.EEXIST, "%s exists and belongs to uid %d: not replacing it"
                            % (path, before.st_uid))
        pid = self._live_door_at(path)
        if pid is not None:
            raise DoorError(errno.EADDRINUSE, "%s: the door of a running server (pid %d) is "
                            "attached there" % (path, pid))
        self._lib.fdetach(path.encode())  # a stale attachment (EINVAL: there is none)
        node = os.lstat(path)
        if not (stat.S_ISDOOR(node.st_mode) or (stat.S_ISREG(node.st_mode) and node.st_size == 0
                                                and node.st_uid == os.geteuid())):
            raise DoorError(errno.EEXIST, "%s exists and is not a stale door: not replacing it"
                            % path)
        os.unlink(path)

    def _live_door_at(self, path):
        """The pid of the server whose door answers at `path`, or None."""
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            return None
        try:
            info = door_info_t()
            if (self._lib.door_info(fd, ctypes.byref(info)) != 0 or info.di_target < 0
                    or info.di_attributes & DOOR_REVOKED):  # door_info_common: -1 once it died
                return None
            return info.di_target
        finally:
            os.close(fd)

    def _invoke(self, cookie, argp, arg_size, descriptors, count, reply):
        """The ctypes callback the trampoline calls.  It must always return normally."""
        local = self._local
        if not getattr(local, "primed", False):
            self._ensure()  # this thread keeps its Python thread state from now on
            local.primed = True
            # The application's code (and every process it starts) gets the signal mask
            # of an ordinary thread, not the all-blocked one this thread was born with.
            signal.pthread_sigmask(signal.SIG_SETMASK, self._normal_mask)
            _tell_python_the_stack()
            with self._lock:
                self.threads += 1
        local.reply_fds = ()
        answer_fds = ()
        try:
            if argp == DOOR_UNREF_DATA:
                return  # an unreferenced notification: nothing to answer
            fds = [d.d_data.d_desc.d_descriptor for d in (door_desc_t * count).from_address(descriptors)
                   if d.d_attributes & DOOR_DESCRIPTOR] if count else []
            # door_ucred first: it fails (EINVAL) once the caller gave up and detached
            # (door_call in door_sys.c clears the server's d_caller); the call is then
            # dropped before the application sees it, its descriptors closed.
            try:
                caller = self._caller()
            except DoorError as exc:
                _close_fds(fds)
                _log("door", "a call whose caller had left was dropped unrun (%s)" % exc, "warning")
                return
            data = ctypes.string_at(argp, arg_size) if arg_size else b""
            answer, answer_fds = self._handler(data, fds, caller)
            self._leave_reply(reply.contents, answer, answer_fds)
        except BaseException:  # the caller sees an empty answer
            _log("door", "door handler raised:\n" + traceback.format_exc(), "error")
            try:  # a reply _leave_reply could not finish (MemoryError): its descriptors
                if answer_fds and not local.reply_fds:  # are still ours, and nobody else's
                    _close_fds(answer_fds)
                local.reply_fds = ()
                reply.contents.data, reply.contents.size = None, 0
                reply.contents.desc, reply.contents.ndesc = None, 0
            except BaseException:
                pass

    def _refused(self, reply):
        """door_return refused the reply: close its descriptors, leave an explanation."""
        number = ctypes.get_errno()
        try:
            local = self._local
            _close_fds(local.reply_fds)
            local.reply_fds = ()
            why = getattr(self._handler, "refused_reply", None)
            answer = why(number) if why is not None else b""
            reply = reply.contents
            reply.desc, reply.ndesc = None, 0
            self._leave_reply(reply, answer, ())
            _log("door", "door_return refused a reply: %s" % os.strerror(number), "error")
        except BaseException:
            _log("door", "door reply refusal:\n" + traceback.format_exc(), "error")

    @property
    def in_flight(self):
        return self._active.value

    def _caller(self):
        credentials = _c_void_p()
        if self._lib.door_ucred(ctypes.byref(credentials)) != 0:
            raise _failed("door_ucred")
        try:
            return Caller(self._lib.ucred_geteuid(credentials), self._lib.ucred_getpid(credentials))
        finally:
            self._lib.ucred_free(credentials)

    def _leave_reply(self, reply, answer, fds):
        """Copy the answer into this thread's buffer, which outlives the handler."""
        local = self._local
        buffer = getattr(local, "buffer", None)
        if buffer is None or len(buffer) < len(answer):
            buffer = local.buffer = ctypes.create_string_buffer(max(len(answer), 65536))
        ctypes.memmove(buffer, answer, len(answer))
        reply.data, reply.size = ctypes.addressof(buffer), len(answer)
        if fds:
            table = local.descriptors = (door_desc_t * len(fds))()
            for entry, fd in zip(table, fds):
                entry.d_attributes = DOOR_DESCRIPTOR | DOOR_RELEASE  # closed once passed
                entry.d_data.d_desc.d_descriptor = fd
            reply.desc, reply.ndesc = ctypes.addressof(table), len(fds)
            local.reply_fds = tuple(fds)  # still ours if door_return refuses them

    def close(self, grace=10.0):
        """Revoke (later calls fail with EBADF), let calls in flight finish, detach, unlink."""
        self._lib.door_revoke(self._fd)
        deadline = time.monotonic() + grace
        quiet_since = None
        # Done when no invocation has been under way for a moment: long enough for the
        # last door_return to hand its reply over (after the trampoline's count dropped).
        while time.monotonic() < deadline:
            if self.in_flight:
                quiet_since = None
            elif quiet_since is None:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since >= 0.1:
                break
            time.sleep(0.01)
        self._lib.fdetach(self.path.encode())
        try:
            os.unlink(self.path)
        except OSError:
            pass


class _DoorHandle:
    """One open descriptor of a door, closed only once no call uses it any more."""

    __slots__ = ("fd", "users", "retired")

    def __init__(self, fd):
        self.fd, self.users, self.retired = fd, 0, False


class _NativeDoorClient:
    """A door opened by path; door_call from many threads at once.

    When the door at the path is replaced (EBADF: its server died or revoked it), the
    path is opened again; the old descriptor is closed only after the last call still
    using it has returned, so its number is never reused under another thread's call.
    """

    # Every reply this size or smaller lands in the caller's buffer; a larger one costs a
    # fresh mapping and its munmap.  Room for a 64 KiB body and its head, and for the
    # largest head that comes with a descriptor (REPLY_HEAD_MAX), so that no reply with a
    # descriptor overflows: an overflow mapping is sized roundup(data + 24 * ndesc,
    # PAGESIZE) while door_call writes the descriptors at rbuf + roundup(data, 24), which
    # can fall up to 23 bytes past it (door_overflow and door_call, door_sys.c).
    reply_buffer_size = 68 * 1024

    def __init__(self, doors, path, timeout=None):
        self._doors, self._lib, self.path, self.timeout = doors, doors.lib, path, timeout
        self._handle = None
        self._handle_lock = threading.Lock()
        self._local = threading.local()

    def _open(self):
        try:
            return _DoorHandle(os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)))
        except FileNotFoundError as exc:
            raise DoorRevoked(exc.errno, "no door at %s" % self.path)
        except OSError as exc:  # EMFILE, EACCES...: a door may well be there
            raise DoorError(exc.errno, "cannot open the door %s: %s" % (self.path, exc.strerror))

    def _acquire(self, stale=None):
        """The current handle, one more user on it; a fresh one if `stale` is current."""
        with self._handle_lock:
            if self._handle is None or self._handle is stale:
                fresh = self._open()
                if self._handle is not None:
                    self._handle.retired = True
                self._handle = fresh
            self._handle.users += 1
            return self._handle

    def _release(self, handle):
        with self._handle_lock:
            handle.users -= 1
            if handle.retired and handle.users == 0:
                os.close(handle.fd)

    def call(self, data, fds=()):
        local = self._local
        if getattr(local, "rbuf", None) is None:
            local.rbuf = ctypes.create_string_buffer(self.reply_buffer_size)
        arg = door_arg_t()
        arg.data_ptr = ctypes.cast(ctypes.c_char_p(data), _c_void_p)  # no copy of the request
        arg.data_size = len(data)
        if fds:
            table = (door_desc_t * len(fds))()
            for entry, fd in zip(table, fds):
                entry.d_attributes = DOOR_DESCRIPTOR  # the caller keeps its descriptor
                entry.d_data.d_desc.d_descriptor = fd
            arg.desc_ptr, arg.desc_num = ctypes.addressof(table), len(fds)
        rbuf = ctypes.addressof(local.rbuf)
        arg.rbuf, arg.rsize = rbuf, self.reply_buffer_size
        handle, reopened = self._acquire(), False
        watch = self._doors.watchdog.watch(self.timeout) if self.timeout else None
        try:
            while self._lib.door_call(handle.fd, ctypes.byref(arg)) != 0:
                number = ctypes.get_errno()
                if number == errno.EAGAIN and watch is not None and watch.expired:
                    # Interrupted while waiting for a free server thread (door_get_server
                    # in door_sys.c), past the deadline: nothing ran, safe to retry elsewhere.
                    raise DoorTimeout(errno.ETIMEDOUT, "no server thread of %s was free within "
                                      "%ss (the call did not run)" % (self.path, self.timeout))
                if number == errno.EAGAIN:
                    continue  # some other signal while waiting for a thread: nothing ran
                if number == errno.EINTR and watch is not None and watch.expired:
                    raise DoorTimeout(errno.ETIMEDOUT, "door call timed out after %ss" % self.timeout)
                if number == errno.EINTR:
                    raise DoorGone(number, "door server at %s went away during the call" % self.path)
                if number == errno.EBADF and not reopened:
                    stale, reopened = handle, True  # a new server may be attached
                    handle = self._acquire(stale)
                    self._release(stale)
                    continue
                if number == errno.EBADF:
                    raise DoorRevoked(number, "door at %s revoked" % self.path)
                raise DoorError(number, "door_call: %s" % os.strerror(number))
        finally:
            if watch is not None:
                watch.done()
            self._release(handle)
        try:
            reply = ctypes.string_at(arg.data_ptr, arg.data_size) if arg.data_size else b""
            reply_fds = [d.d_data.d_desc.d_descriptor
                         for d in (door_desc_t * arg.desc_num).from_address(arg.desc_ptr)
                         if d.d_attributes & DOOR_DESCRIPTOR] if arg.desc_num else []
        finally:
            if arg.rbuf != rbuf:  # the reply came in a fresh mapping: ours to unmap
                self._lib.munmap(arg.rbuf, arg.rsize)
        return reply, reply_fds

    def server_pid(self):
        info = door_info_t()
        handle = self._acquire()
        try:
            if self._lib.door_info(handle.fd, ctypes.byref(info)) != 0:
                raise _failed("door_info %s" % self.path)
        finally:
            self._release(handle)
        return info.di_target

    def close(self):
        with self._handle_lock:
            handle, self._handle = self._handle, None
            if handle is not None:
                handle.retired = True
                if handle.users == 0:
                    os.close(handle.fd)


class _CallWatchdog:
    """Interrupts door calls that overrun their time limit.

    door_call has no timeout of its own.  A thread past its deadline is sent `signum`
    (with a no-op handler) until it leaves door_call (EINTR, or EAGAIN if no server
    thread had taken the call yet); the flag tells that apart from a server that died.
    A signal is only sent to a call still being watched, under the lock that done()
    takes, and done() then makes one system call: a signal already sent is delivered
    on its return, never into the thread's next, innocent, door call.
    """

    class _Watch:
        __slots__ = ("thread", "deadline", "expired", "owner")

        def done(self):
            with self.owner._lock:
                self.owner._watches.pop(self.thread, None)
            if self.expired:
                signal.pthread_sigmask(signal.SIG_BLOCK, ())  # a pending signal lands here

    def __init__(self, signum):
        self.signum = signum
        self._watches = {}
        self._started = False
        self._lock = threading.Lock()

    def watch(self, timeout):
        watch = self._Watch()
        watch.thread, watch.deadline, watch.expired, watch.owner = (
            threading.get_ident(), time.monotonic() + timeout, False, self)
        with self._lock:
            self._watches[watch.thread] = watch
            if not self._started:
                self._started = True
                threading.Thread(target=self._run, name="door-watchdog", daemon=True).start()
        return watch

    def _run(self):
        while True:
            time.sleep(0.05)
            now = time.monotonic()
            with self._lock:
                if not self._watches:  # idle: no thread left behind (a later fork() is safe)
                    self._started = False
                    return
                for watch in self._watches.values():
                    if now >= watch.deadline:
                        watch.expired = True
                        try:
                            signal.pthread_kill(watch.thread, self.signum)
                        except (ProcessLookupError, OSError):
                            pass


def _watchdog_signal():
    """A signal for the watchdog that nobody else handles: the application keeps its own.

    A real-time signal whose disposition is still the default, else SIGUSR2 if that one
    is; its handler does nothing (installed by Python, so it interrupts system calls).
    """
    candidates = list(range(signal.SIGRTMIN, signal.SIGRTMAX + 1)) if hasattr(signal, "SIGRTMIN") else []
    for signum in candidates + [signal.SIGUSR2]:
        try:
            if signal.getsignal(signum) == signal.SIG_DFL:
                signal.signal(signum, lambda *_: None)
                return signum
        except (OSError, ValueError, RuntimeError):
            continue
    raise DoorError(errno.EBUSY, "no free signal for the door-call watchdog")


class NativeDoors:
    """illumos doors through ctypes into libc."""

    name = "native"
    description = "native illumos doors"
    exit_hard = True  # parked server threads own Python thread states: no finalization

    # Request bodies larger than this travel as a descriptor: the request data is copied
    # onto the server thread's stack, which the application then has to run in.  libc's
    # server threads have 2,088,960-byte stacks (find_stack in thr.c) with no guard page,
    # and every invocation starts 512 bytes below the top (door_return in door_calls.c).
    request_inline_max = 64 * 1024

    def __init__(self):
        self.lib = _load_door_library()
        self._watchdog = None
        if threading.current_thread() is threading.main_thread():
            self.watchdog  # signal handlers can only be installed on the main thread
        if os.environ.get("DOORDOWN_LIBDOOR"):
            self.description = "native illumos doors (door library %s)" % os.environ["DOORDOWN_LIBDOOR"]

    def serve(self, path, handler):
        return _NativeDoorServer(self.lib, path, handler)

    def open(self, path, timeout=None):
        if timeout:
            self.watchdog
        return _NativeDoorClient(self, path, timeout)

    @property
    def watchdog(self):
        if self._watchdog is None:
            if threading.current_thread() is not threading.main_thread():
                raise DoorError(errno.EINVAL, "timed door clients are opened on the main thread")
            self._watchdog = _CallWatchdog(_watchdog_signal())
        return self._watchdog


def is_illumos():
    return sys.platform.startswith("sunos")


def door_backend(choice="auto"):
    """The door backend for `choice`: auto (native on illumos), native or emulated."""
    if choice == "auto":
        choice = "native" if is_illumos() else "emulated"
    if choice == "native":
        return NativeDoors()
    if choice == "emulated":
        return EmulatedDoors()
    raise ValueError("unknown door backend %r" % choice)


###############################################################################
# Wire format ################################################################
###############################################################################
#
# One door call carries one HTTP request; its reply carries one response.  A message
# is: kind (1 byte), flags (1), field count (2), each field's length (4 bytes each,
# network order), then the fields back to back.  The lengths must add up to the
# message exactly: anything else is a WireError, never a crash.  No pickle, no eval.
#
#   request  Q: method target version scheme remote_addr remote_port server_name
#               server_port script_name body, then header name, value pairs
#   response R: status body, then header name, value pairs
#   ping     P: no fields; its reply S carries one JSON field (pid, threads, requests)
#   failure  E: status reason (the app role refused the call)
#
# Bodies up to INLINE_BODY_MAX travel in the message.  Larger ones travel as a passed
# descriptor of an unlinked temporary file (flag BODY_IN_FD, body field empty): the
# door call stays far below illumos' per-call limit and the body is never copied
# through the door.  A response may also pass a descriptor:
#
#   BODY_IN_FD   a regular file (a spooled body, or the app's wsgi.file_wrapper file); the
#                body field is empty (all of it) or holds offset and length (!QQ): the
#                front sends that span with sendfile, no byte of it through Python.
#   BODY_STREAM  the read end of a pipe; the body field holds what the app had produced
#                when the call returned, the rest follows on the pipe as frames (length
#                !I, then the bytes) written by an app thread as the iterable yields.
#                An empty frame ends the body; end-of-file without it means the app failed.

KIND_REQUEST, KIND_RESPONSE, KIND_PING, KIND_STATS, KIND_FAIL = b"Q", b"R", b"P", b"S", b"E"
FLAG_BODY_IN_FD = 1
FLAG_CLOSE = 2  # response: close the connection after it (e.g. framing the app broke)
FLAG_BODY_STREAM = 4
_FILE_SPAN = struct.Struct("!QQ")
_STREAM_FRAME = struct.Struct("!I")  # a stream's frame: its length; 0 ends the body
_STREAM_CUT = 0xFFFFFFFF  # instead of a length: the app, stopping, broke the body off
INLINE_BODY_MAX = 1 << 20
REPLY_HEAD_MAX = 64 * 1024  # a response head larger than this is the app's error: 500
_REQUEST_FIXED = 10
_MESSAGE_HEAD = struct.Struct("!cBH")
_MAX_FIELDS = 2 * 1024 + _REQUEST_FIXED
_FIELD_TABLES = {}  # field count -> the Struct of its length table (at most _MAX_FIELDS of them)


class WireError(ValueError):
    """A truncated or malformed door message."""


def _field_table(count):
    """The Struct of a message's table of `count` field lengths (made once per count)."""
    table = _FIELD_TABLES.get(count)
    if table is None:
        table = _FIELD_TABLES[count] = struct.Struct("!%dI" % count)
    return table


def pack_message(kind, flags, fields):
    count = len(fields)
    return b"".join((_MESSAGE_HEAD.pack(kind, flags, count), _field_table(count).pack(*map(len, fields)),
                     *fields))


def unpack_message(data, expected_kinds):
    """(kind, flags, fields) of a message whose kind is one of `expected_kinds`."""
    if len(data) < _MESSAGE_HEAD.size:
        raise WireError("truncated message (%d bytes)" % len(data))
    kind, flags, count = _MESSAGE_HEAD.unpack_from(data)
    if kind not in expected_kinds:
        raise WireError("unexpected message kind %r" % kind)
    if count > _MAX_FIELDS:
        raise WireError("too many fields (%d)" % count)
    pos = _MESSAGE_HEAD.size + 4 * count
    if len(data) < pos:
        raise WireError("truncated field table")
    fields = []
    for length in _field_table(count).unpack_from(data, _MESSAGE_HEAD.size):
        fields.append(data[pos:pos + length])
        pos += length
    if pos != len(data):
        raise WireError("field lengths say %d bytes, message has %d" % (pos, len(data)))
    return kind, flags, fields


def spool_body(body):
    """Descriptor of an unlinked temporary file holding `body` (bytes or chunks), at offset 0."""
    import tempfile
    with tempfile.TemporaryFile() as spool:
        for chunk in ([body] if isinstance(body, (bytes, bytearray)) else body):
            spool.write(chunk)
        spool.flush()
        fd = os.dup(spool.fileno())
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


###############################################################################
# WSGI gateway ################################################################
###############################################################################
#
# One request through the WSGI application (PEP 3333), whatever the transport: the
# environ every transport builds with cgi_variables(), the response collected and
# checked; for the door transport also the door handler itself, which decodes the
# request and encodes the response on the server thread the OS (or the emulation)
# provides.

def hello_app(environ, start_response):
    """The built-in application."""
    body = b"Well, hello to you too!\n"
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


class AppLoadError(Exception):
    pass


def load_app(spec):
    """Import a WSGI callable the way gunicorn does: 'module:callable', default 'application'."""
    if spec is None:
        return hello_app
    module_name, _, attr = spec.partition(":")
    attr = attr or "application"
    call = None
    if attr.endswith(")"):
        try:
            attr, call = factory_call(attr)
        except ValueError as exc:
            raise AppLoadError("bad application %r: %s" % (spec, exc))
    if not module_name or not re.fullmatch(r"[\w.]+", module_name) \
            or not re.fullmatch(r"[\w.]+", attr):
        raise AppLoadError("bad application %r: expected module:callable" % spec)
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        __import__(module_name)
    except ImportError as exc:
        if exc.name and module_name.startswith(exc.name) \
                and (exc.name == module_name or module_name[len(exc.name)] == "."):
            raise AppLoadError("no module named %r (from %r)" % (exc.name, spec))
        raise
    obj = sys.modules[module_name]
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise AppLoadError("module %r has no attribute %r" % (module_name, attr))
    if call is not None:  # an application factory: called once, here
        obj = obj(*call[0], **call[1])
    if not callable(obj):
        raise AppLoadError("%s is not callable" % spec)
    return obj


def factory_call(text):
    """'create_app("arg", debug=True)' -> ("create_app", (["arg"], {"debug": True})): a
    factory named the way gunicorn and Flask name it, literal arguments only (no eval)."""
    import ast
    try:
        node = ast.parse(text, mode="eval").body
    except SyntaxError:
        raise ValueError("%r is not a call like create_app() or create_app('arg')" % text)
    if not isinstance(node, ast.Call):
        raise ValueError("%r is not a call like create_app() or create_app('arg')" % text)
    name, func = [], node.func
    while isinstance(func, ast.Attribute):
        name.insert(0, func.attr)
        func = func.value
    if not isinstance(func, ast.Name):
        raise ValueError("the factory in %r must be a name" % text)
    name.insert(0, func.id)
    try:
        args = [ast.literal_eval(arg) for arg in node.args]
        kwargs = {keyword.arg: ast.literal_eval(keyword.value) for keyword in node.keywords}
    except ValueError:
        raise ValueError("the arguments in %r must be literals (strings, numbers, ...)" % text)
    if None in kwargs:
        raise ValueError("no **arguments in %r" % text)
    return ".".join(name), (args, kwargs)


class _Buffered:
    """What start_response and write() collect for one request."""

    __slots__ = ("status", "headers", "chunks", "size")

    def __init__(self):
        self.status = None
        self.headers = None
        self.chunks = []
        self.size = 0


def cgi_variables(fields, headers, body_length):
    """The RFC 3875 meta-variables of a request, as PEP 3333 strings (latin-1 of the bytes).

    `fields` are the request fields of the wire format (method ... script_name), `headers`
    the header name, value pairs.  Every transport builds its environ from this, so an
    application sees the same environ whichever way its requests arrive.
    """
    (method, target, version, _scheme, remote_addr, remote_port, server_name, server_port,
     script_name) = fields[:9]
    query = target.partition(b"?")[2]
    path = target_path(target).decode("latin-1")  # as the front routed it
    script = script_name.decode("latin-1")
    if script and path.startswith(script):
        path = path[len(script):]
    env = {
        "REQUEST_METHOD": method.decode("latin-1"),
        "SCRIPT_NAME": script,
        "PATH_INFO": path,
        "QUERY_STRING": query.decode("latin-1"),
        "SERVER_NAME": server_name.decode("latin-1"),
        "SERVER_PORT": server_port.decode("latin-1"),
        "SERVER_PROTOCOL": version.decode("latin-1"),
        "SERVER_SOFTWARE": SERVER_SOFTWARE,
        "REMOTE_ADDR": remote_addr.decode("latin-1"),
        "REMOTE_PORT": remote_port.decode("latin-1"),
    }
    if body_length or method not in (b"GET", b"HEAD"):
        env["CONTENT_LENGTH"] = str(body_length)
    for i in range(0, len(headers), 2):
        name = headers[i].decode("latin-1").upper().replace("-", "_")
        value = headers[i + 1].decode("latin-1")
        if name == "CONTENT_TYPE":
            env["CONTENT_TYPE"] = value
            continue
        if name == "CONTENT_LENGTH":
            continue  # the front decoded the body; its true length is set above
        if name == "PROXY":
            # httpoxy (CVE-2016-1000110 for Python): as HTTP_PROXY in a CGI child's
            # environment it would set the proxy of every HTTP client library there.
            # Dropped for every transport, as Apache httpd's ap_add_common_vars drops it.
            continue
        key = "HTTP_" + name
        env[key] = env[key] + "," + value if key in env else value
    return env


class WSGIGateway:
    """Runs requests through a WSGI application (PEP 3333).

    respond() is the WSGI part, the same for every transport; the door handler (__call__)
    packs its result into one door reply, other transports frame it their own way.  A
    short response is collected whole (one door call, one reply); a file is passed on its
    descriptor (_FileBody); any other body is returned at its first chunk with the rest
    still to come (_StreamBody), which the transport relays on another thread or socket.
    Configuration is class attributes, overridable per instance.
    """

    error_body = b"Internal Server Error\n"
    wsgi_keys = {"wsgi.version": (1, 0), "wsgi.input_terminated": True, "wsgi.multithread": True,
                 "wsgi.multiprocess": False, "wsgi.run_once": False,
                 "wsgi.file_wrapper": FileWrapper}

    def __init__(self, app, allowed_uids=None, stuck_after=30.0):
        self.app = app
        self.allowed_uids = frozenset((os.geteuid(), *(allowed_uids or ())))  # own euid, and any allowed
        self.stuck_after = stuck_after  # a request running longer is reported as stuck
        self.served = Counter()
        self.door_threads = lambda: 0
        self._running = {}  # thread ident -> when its current request started
        self.streams = set()  # _StreamBody still being relayed: not running, not stuck
        self.changed = None  # --reload: a changed source the front is to hear of by stats

    # -- the door handler -------------------------------------------------------
    def __call__(self, data, fds, caller):
        if caller.euid not in self.allowed_uids:
            _close_fds(fds)
            _log("app", "refused a door call from euid %d pid %d" % (caller.euid, caller.pid), "warning")
            return pack_message(KIND_FAIL, 0, [b"403", b"caller not allowed"]), []
        try:
            kind, flags, fields = unpack_message(data, (KIND_REQUEST, KIND_PING))
            if kind == KIND_PING:
                _close_fds(fds)
                return self.stats_message(), []
            return self.handle_request(flags, fields, fds)
        except WireError as exc:
            _close_fds(fds)
            _log("app", "bad door message: %s" % exc, "warning")
            return pack_message(KIND_FAIL, 0, [b"400", str(exc).encode()]), []

    def stats(self):
        now = time.monotonic()
        stuck = sum(1 for started in list(self._running.values()) if now - started > self.stuck_after)
        stats = {"pid": os.getpid(), "threads": self.door_threads(), "requests": self.served.value,
                 "running": len(self._running), "stuck": stuck, "streams": len(self.streams),
                 "python_threads": threading.active_count()}
        if self.changed is not None:
            stats["changed"] = self.changed
        return stats

    def stats_message(self):
        return pack_message(KIND_STATS, 0, [json.dumps(self.stats()).encode()])

    @staticmethod
    def refused_reply(number):
        """The door reply sent when door_return refused ours (its descriptors are closed)."""
        why = "EMFILE: the caller cannot take more descriptors" if number == errno.EMFILE \
            else os.strerror(number)
        return pack_message(KIND_FAIL, 0, [b"502", b"the reply could not be delivered (%s)"
                                           % why.encode()])

    def handle_request(self, flags, fields, fds):
        if len(fields) < _REQUEST_FIXED or len(fields) % 2:
            _close_fds(fds)
            raise WireError("request with %d fields" % len(fields))
        if flags & FLAG_BODY_IN_FD:
            if len(fds) != 1:
                _close_fds(fds)
                raise WireError("request body descriptor missing")
            body_input = os.fdopen(fds[0], "rb")
            body_length = os.fstat(fds[0]).st_size
        else:
            _close_fds(fds)
            body_input = io.BytesIO(fields[9])
            body_length = len(fields[9])
        environ = self.environ(fields, body_input, body_length)
        try:
            return self.run(environ, body_input)
        except BaseException:
            body_input.close()
            raise

    def environ(self, fields, body_input, body_length):
        env = cgi_variables(fields, fields[_REQUEST_FIXED:], body_length)
        env.update(self.wsgi_keys)
        env["wsgi.url_scheme"] = fields[3].decode("latin-1")
        env["wsgi.input"] = body_input
        env["wsgi.errors"] = sys.stderr
        return env

    def run(self, environ, body_input=None):
        """Call the application; return the door reply (response message, descriptors)."""
        status, headers, body, close = self.respond(environ)
        if body_input is not None:
            _release_input(body_input, body)
        if sum(map(len, headers)) + 8 * len(headers) > REPLY_HEAD_MAX:
            _log("app", "response head of %s %s over %d bytes: 500 instead"
                 % (_log_text(environ["REQUEST_METHOD"]), _log_text(environ["PATH_INFO"]), REPLY_HEAD_MAX),
                 "warning")
            if type(body) is _FileBody:
                os.close(body.fd)
            elif type(body) is _StreamBody:
                body.close()  # the iterable's close(), and no longer one of the streams
            status, headers, body, close = self.error_reply()
        flags = FLAG_CLOSE if close else 0
        if type(body) is not bytes:
            return self.passed_body(status, headers, body, flags)
        if len(body) > INLINE_BODY_MAX:
            return pack_message(KIND_RESPONSE, flags | FLAG_BODY_IN_FD,
                                [status, b"", *headers]), [spool_body(body)]
        return pack_message(KIND_RESPONSE, flags, [status, body, *headers]), []

    def passed_body(self, status, headers, body, flags):
        """The door reply of a body that travels on a descriptor: a file span, or a stream
        whose app thread is started here, so that this door thread returns at once."""
        if type(body) is _FileBody:
            return pack_message(KIND_RESPONSE, flags | FLAG_BODY_IN_FD,
                                [status, _FILE_SPAN.pack(body.offset, body.length), *headers]), [body.fd]
        first = body.first
        if len(first) > INLINE_BODY_MAX:  # too big for the call: the pipe carries it too
            body.out.chunks.append(first)
            if body.left is not None:
                body.left += len(first)  # pieces() cuts it to the Content-Length again
            body.first = first = b""
        read_end, write_end = os.pipe()
        if _PIPE_SIZE is not None:  # Linux's 64 KiB is one chunk: with four, both sides keep
            # running (3x the rate, measured), and the kernel memory one stream holds stays bounded.
            try:
                import fcntl
                fcntl.fcntl(write_end, _PIPE_SIZE, 256 << 10)
            except OSError:
                pass  # over /proc/sys/fs/pipe-max-size: the default will do
        try:
            threading.Thread(target=_stream_to_pipe, args=(body, write_end), name="stream",
                             daemon=True).start()
        except BaseException:
            os.close(read_end)
            os.close(write_end)
            body.close()
            raise
        return pack_message(KIND_RESPONSE, flags | FLAG_BODY_STREAM, [status, first, *headers]), [read_end]

    def respond(self, environ):
        """Call the application: (status, header fields, body, close), whatever the transport.

        `close` asks the front to close the client connection after this response (the
        application broke its own framing).  Exceptions become a 500; close() is always called.
        """
        thread = threading.get_ident()
        self._running[thread] = time.monotonic()  # for stats(): requests stuck past --timeout
        try:
            return self._call_app(environ)
        finally:
            del self._running[thread]

    def _call_app(self, environ):
        self.served.add()
        out = _Buffered()

        def write(data):
            if out.status is None:
                raise AssertionError("write() before start_response()")
            if not isinstance(data, bytes):
                raise TypeError("write() takes bytes, not %s" % type(data).__name__)
            out.chunks.append(data)
            out.size += len(data)

        def start_response(status, headers, exc_info=None):
            if exc_info:
                try:
                    if out.size:  # produced (and, streaming, perhaps sent): PEP 3333 says re-raise
                        raise exc_info[1].with_traceback(exc_info[2])
                finally:
                    exc_info = None
            elif out.status is not None:
                raise AssertionError("start_response() called twice without exc_info")
            out.status, out.headers = self.checked_status(status, headers)
            return write

        result = None
        try:
            result = self.app(environ, start_response)
            if type(result) is not list:
                started = self.start_body(environ, out, result, write)
                if started is not None:
                    if type(started[2]) is _StreamBody:
                        result = None  # its close() is the stream's now
                    return started
            else:
                for chunk in result:
                    if chunk:
                        if out.status is None:
                            raise AssertionError("body yielded before start_response()")
                        write(chunk)
            if out.status is None:
                raise AssertionError("application returned without calling start_response()")
        except Exception:
            _log("app", "error in %s %s:\n%s" % (_log_text(environ.get("REQUEST_METHOD", "")),
                                                  _log_text(environ.get("PATH_INFO", "")),
                                                  traceback.format_exc().rstrip()), "error")
            return self.error_reply()
        finally:
            if hasattr(result, "close"):
                try:
                    result.close()
                except Exception:
                    _log("app", "error in close():\n" + traceback.format_exc().rstrip(), "error")
        return self.framed(environ, out)

    def start_body(self, environ, out, result, write):
        """An iterable other than a list: run it to its first chunk.  None when `out`
        holds what framed() needs: the whole body (a materialized iterator, HEAD, a body
        that reached its Content-Length), or a Content-Length nobody can frame (a 500);
        else the response with a _FileBody or _StreamBody."""
        if type(result) is FileWrapper and out.status is not None and not out.chunks:
            length = _declared_length(out.headers)
            body = _FileBody.of(result.filelike, length) if length != -1 else None
            if body is not None:
                if environ["REQUEST_METHOD"] == "HEAD":
                    os.close(body.fd)
                    return None
                return out.status, out.headers, body, body.short
        iterator = iter(result)
        whole = type(iterator) in _MATERIALIZED
        head = environ["REQUEST_METHOD"] == "HEAD"
        for chunk in iterator:
            if chunk:
                if out.status is None:
                    raise AssertionError("body yielded before start_response()")
                write(chunk)
                if head:
                    return None  # the body is not sent: no need to produce the rest
                if not whole:
                    length = _declared_length(out.headers)
                    if length == -1:
                        return None  # framed() answers 500: no need to produce the rest
                    if length is None or out.size < length:
                        return out.status, out.headers, _StreamBody(self, environ, out, iterator, result), False
        return None

    @staticmethod
    def checked_status(status, headers):
        """Status and headers as bytes, refusing what would corrupt the response."""
        if type(status) is not str:
            raise TypeError("status must be a str, not %s" % type(status).__name__)
        encoded = status.encode("latin-1")
        if encoded[3:4] != b" " or _STATUS.fullmatch(encoded) is None:
            raise ValueError("invalid status %r" % (status,))
        if type(headers) is not list:
            raise TypeError("headers must be a list, not %s" % type(headers).__name__)
        fields = []
        for item in headers:
            if type(item) is not tuple or len(item) != 2:
                raise TypeError("header %r is not a (name, value) tuple" % (item,))
            name, value = item
            if type(name) is not str or type(value) is not str:
                raise TypeError("header %r is not a pair of str" % (item,))
            name, value = name.encode("latin-1"), value.encode("latin-1")
            if name.translate(None, _TCHARS) or not name:
                raise ValueError("invalid header name %r" % (name,))
            if _HAS_CTL.search(value):
                raise ValueError("invalid value for header %s: %r" % (name.decode("latin-1"), value))
            fields += (name, value)
        return encoded, fields

    def framed(self, environ, out):
        """The collected response, its body cut to what HEAD and Content-Length allow.

        Two Content-Length fields, or one that is not a number, are the application's
        error: a 500, whatever the transport (the front would refuse them with a 502).
        """
        close = False
        body = b"".join(out.chunks)
        try:
            length = response_length(out.headers)
        except ValueError as exc:
            _log("app", "%s from the application: answering 500" % exc, "warning")
            return self.error_reply()
        if environ["REQUEST_METHOD"] == "HEAD":
            body = b""
        elif length is not None:
            if length < len(body):
                _log("app", "Content-Length %d but %d bytes of body: closing after it" % (length, len(body)),
                     "warning")
                close = True
                body = body[:length]
            elif length > len(body):
                close = True  # the client sees a short body, then the close
        return out.status, out.headers, body, close

    def error_reply(self):
        return (b"500 Internal Server Error",
                [b"Content-Type", b"text/plain", b"Content-Length", str(len(self.error_body)).encode()],
                self.error_body, False)


_PIPE_SIZE = 1031 if sys.platform.startswith("linux") else None  # fcntl.F_SETPIPE_SZ (3.10+)
_MATERIALIZED = (type(iter([])), type(iter(())))  # e.g. Django's HttpResponse: all there already


def _declared_length(headers):
    """response_length(headers), or -1 for a Content-Length nobody can frame."""
    try:
        return response_length(headers)
    except ValueError:
        return -1


class _FileBody:
    """A body that is a span of a regular file: `length` bytes of `fd` from `offset`."""

    __slots__ = ("fd", "offset", "length", "short")

    def __init__(self, fd, offset, length, short=False):
        self.fd, self.offset, self.length, self.short = fd, offset, length, short

    @classmethod
    def of(cls, filelike, declared):
        """The rest of a wsgi.file_wrapper file from its current position (on a descriptor of
        our own), cut to the declared length; None if it is no regular file."""
        try:
            fd = filelike.fileno()
            info = os.fstat(fd)
            offset = filelike.tell() if hasattr(filelike, "tell") else os.lseek(fd, 0, os.SEEK_CUR)
        except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
            return None
        if not stat.S_ISREG(info.st_mode):
            return None
        length = max(0, info.st_size - offset)
        short = declared is not None and declared > length  # the close tells the client
        if declared is not None and declared < length:
            length = declared
        return cls(os.dup(fd), offset, length, short)


class _StreamFailed(Exception):
    """The application failed in the middle of a body (already logged)."""


class _StreamBody:
    """A body the application is still producing: what it had produced when the response
    started (`first`), then pieces() iterates on, on whichever thread relays it.

    The relaying transport calls pieces() and, whatever happened, close() once.  Whatever
    the transport, the body is cut to the application's Content-Length.  end() lets the
    app role end a stream it is stopping with while the application is still producing.
    """

    def __init__(self, gateway, environ, out, iterator, result):
        self.gateway, self.environ, self.out = gateway, environ, out
        self.iterator, self.result = iterator, result
        self.first = b"".join(out.chunks)
        del out.chunks[:]
        length = _declared_length(out.headers)
        self.left = None if length is None else length - len(self.first)
        self.lock = threading.Lock()  # held while a piece is written, and by end()
        self.cut_off = None  # the transport's way to break the body off, for end()
        self.ended = False
        self.input = None  # wsgi.input, which the iterable may read as it goes: closed by close()
        gateway.streams.add(self)

    def pieces(self):
        """The rest of the body as the application produces it; _StreamFailed if it fails."""
        out = self.out
        try:
            for piece in out.chunks:
                yield self.cut(piece)
            del out.chunks[:]
            for chunk in self.iterator:
                if out.chunks:  # write() called from inside the iterable
                    chunks, out.chunks = out.chunks, []
                    for piece in chunks:
                        yield self.cut(piece)
                if chunk:
                    if type(chunk) is not bytes:
                        raise TypeError("the iterable yielded %s, not bytes" % type(chunk).__name__)
                    yield self.cut(chunk)
                if self.left == 0:
                    return
            for piece in out.chunks:
                yield self.cut(piece)
        except GeneratorExit:
            raise
        except Exception:
            _log("app", "error in %s %s, in the middle of the body:\n%s"
                 % (_log_text(self.environ.get("REQUEST_METHOD", "")),
                    _log_text(self.environ.get("PATH_INFO", "")), traceback.format_exc().rstrip()), "error")
            raise _StreamFailed()

    def send(self, write, finish, cut_off):
        """Write the rest with write(piece), then end the body with finish(); False if end(),
        from another thread, broke it off with cut_off() instead.  _StreamFailed, OSError."""
        self.cut_off = cut_off
        for piece in self.pieces():
            if piece:
                with self.lock:
                    if self.ended:
                        return False
                    write(piece)
        with self.lock:
            if self.ended:
                return False
            self.ended = True
            finish()
        return True

    def cut(self, piece):
        if self.left is not None:
            piece = piece[:self.left]
            self.left -= len(piece)
        return piece

    def end(self):
        """Stopping: break the body off now (unless a write is stuck), whatever the app does.
        The front then ends the response as incomplete: the body is not all there, and a
        last chunk would tell the client it is."""
        if self.lock.acquire(timeout=1.0):
            try:
                if not self.ended and self.cut_off is not None:  # None: not being sent yet
                    self.ended = True
                    try:
                        self.cut_off()
                    except OSError:
                        pass
            finally:
                self.lock.release()

    def close(self):
        self.gateway.streams.discard(self)
        result, self.result = self.result, None
        if hasattr(result, "close"):
            try:
                result.close()
            except Exception:
                _log("app", "error in close():\n" + traceback.format_exc().rstrip(), "error")
        body_input, self.input = self.input, None
        if body_input is not None:
            body_input.close()


def _release_input(body_input, body):
    """After respond(): close wsgi.input now, unless the body is a stream the iterable is
    still producing (PEP 3333 lets it read the input as it goes): that closes it at its end."""
    if type(body) is _StreamBody:
        body.input = body_input
    else:
        body_input.close()


def _stream_to_pipe(body, fd):
    """The app thread of a door stream: the rest of `body`, framed, into the pipe `fd`.

    The pipe's small buffer is the backpressure: a client that reads slowly makes this
    write wait, and so the application's iteration.  A front that has gone (its client
    left) makes it fail (EPIPE): the iterable is closed at once.
    """
    def write_frame(piece):
        data = _STREAM_FRAME.pack(len(piece)) + piece if len(piece) < 65536 else None
        if data is None:
            _write_all(fd, _STREAM_FRAME.pack(len(piece)))
            data = piece
        _write_all(fd, data)

    try:
        body.send(write_frame, lambda: _write_all(fd, _STREAM_FRAME.pack(0)),
                  lambda: _write_all(fd, _STREAM_FRAME.pack(_STREAM_CUT)))
    except (_StreamFailed, OSError):
        pass  # the front sees end-of-file without the end frame, or has gone away
    finally:
        body.close()
        os.close(fd)


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


# -- per-thread resources ----------------------------------------------------------------
#
# A door server thread outlives its invocation: the pool is LIFO and never shrinks, and
# the thread's threading.local state lives on with it into the next call it serves.  So
# a resource that is costly to open and must not be used by two threads at once (a
# database connection above all) can belong to a thread instead of to a pool: opened on
# the thread's first use, reused by every later invocation that thread serves, with no
# lock and no hand-off on the hot path.  At most one is open per door thread, so the
# number of connections follows the concurrency high-water mark, as the threads do.
#
# per_thread relies on threading.local alone, so emulated and native door threads are
# treated alike.  A thread's resource is closed when the thread ends (its locals are
# dropped, a weak reference notices) and, for threads that never end, by run_app once
# the door is closed.

class per_thread:
    """One resource per thread: made by `factory()` on a thread's first get(), then reused.

        connections = doordown.per_thread(open_connection, check=is_alive)

        def application(environ, start_response):
            conn = connections.get()  # this door thread's own connection
            ...

    check(resource), if given, runs on every get() and must be cheap (no round trip): a
    false answer closes the resource and makes a new one, so a connection the server
    dropped while the thread was idle is replaced before it is used.  discard() closes
    the current thread's resource at once, for a caller that saw it fail.

    close(resource) (default: resource.close()) runs when the owning thread ends, or in
    close_all(), which the app role calls after its door is closed; it may therefore
    run on another thread than the one that used the resource (open sqlite3 connections
    with check_same_thread=False).  A close that raises is logged, never raised.
    `opened` and `closed` count the resources made and closed so far.
    """

    def __init__(self, factory, check=None, close=None):
        self._factory = factory
        self._check = check
        self._close = close or _close_resource
        self._local = threading.local()
        self._lock = threading.Lock()
        self._live = {}  # weak reference to a thread's _Held -> its resource
        self.opened = 0
        self.closed = 0
        with _every_per_thread_lock:
            _every_per_thread.add(self)

    def get(self):
        """The calling thread's resource, made now if it has none or its check failed."""
        held = getattr(self._local, "held", None)
        if held is not None:
            if held.ref in self._live and (self._check is None or self._check(held.resource)):
                return held.resource
            self.discard()
        held = _Held(self._factory())
        # The thread's locals hold the only strong reference to `held`: when the thread
        # ends they are dropped, and the weak reference's callback closes the resource.
        held.ref = weakref.ref(held, self._release)
        with self._lock:
            self._live[held.ref] = held.resource
            self.opened += 1
        self._local.held = held
        return held.resource

    def discard(self):
        """Close the calling thread's resource; its next get() makes a new one."""
        held = self._local.__dict__.pop("held", None)
        if held is not None:
            self._release(held.ref)

    def close_all(self):
        """Close every thread's resource; return how many.  A later get() makes a new one."""
        with self._lock:
            resources = list(self._live.values())
            self._live.clear()
            self.closed += len(resources)
        for resource in resources:
            self._close_logged(resource)
        return len(resources)

    def _release(self, ref):
        with self._lock:  # whoever takes it from _live closes it: never twice
            if ref not in self._live:
                return
            resource = self._live.pop(ref)
            self.closed += 1
        self._close_logged(resource)

    def _close_logged(self, resource):
        try:
            self._close(resource)
        except Exception:
            _log("app", "closing a per-thread resource failed:\n" + traceback.format_exc().rstrip(),
                 "warning")


class _Held:
    """What a thread's local keeps: its resource, and the weak reference that outlives it."""

    __slots__ = ("resource", "ref", "__weakref__")

    def __init__(self, resource):
        self.resource = resource


def _close_resource(resource):
    resource.close()


_every_per_thread = weakref.WeakSet()
_every_per_thread_lock = threading.Lock()


def _close_every_per_thread():
    """run_app's last step: close what every per_thread still holds, once no call can run."""
    with _every_per_thread_lock:
        helpers = list(_every_per_thread)
    count = sum(helper.close_all() for helper in helpers)
    if count:
        _log("app", "closed %d per-thread resource(s)" % count)


# The app role runs this file as __main__.  An application's `import doordown` must get
# this very module, not a second copy whose per_thread objects run_app would never close.
if __name__ == "__main__":
    sys.modules.setdefault("doordown", sys.modules[__name__])


###############################################################################
# Transports ##################################################################
###############################################################################
#
# The ways of putting an application behind the front, each a pair: the app end, which
# gives the application its requests, and the front end (an upstream: forward(request,
# env) -> Response), under one sub-banner each.  Between the same front and the same
# WSGIGateway (`serve --transport NAME`):
#
#   door       one door call per request (the app end is the door backend serving
#              WSGIGateway, above).
#   proxy      the app role serves HTTP/1.1 on a Unix socket with its own threaded server;
#              the front forwards over pooled keep-alive connections (nginx's proxy_pass
#              with upstream keepalive).
#   fastcgi    the app role is a FastCGI 1.0 responder on a Unix socket; the front is its
#              client over pooled connections (FCGI_KEEP_CONN).  nginx's fastcgi_pass can
#              be its client just as well.
#   cgi        the front runs `doordown.py cgi module:app` for every request (RFC 3875).
#   inprocess  the front calls the application itself, with no IPC at all: the reference
#              the benchmark measures the others against, not a way to deploy.
#
# Whatever the transport, the application gets the environ of cgi_variables(), and a
# failure reaches FrontServer.dispatch as an OSError (502) or a timeout (504).

def _body_input(body, body_fd):
    """(wsgi.input, its length) for a body in memory or on a descriptor the caller keeps."""
    if body_fd is None:
        return io.BytesIO(body), len(body)
    return os.fdopen(os.dup(body_fd), "rb"), os.fstat(body_fd).st_size


# -- door: one door call per request, one reply ------------------------------------------

def request_fields(request, env):
    """The wire format's request fields for `request`: method ... body, then header pairs."""
    fields = [request.method, request.target, request.version, env.scheme,
              env.remote_addr, env.remote_port, env.server_name, env.server_port,
              env.script_name, request.body]
    for name, value in request.headers:
        fields += (name, value)
    return fields


class DoorUpstream:
    """Forwards requests to an application over its door."""

    transport = "door"

    def __init__(self, backend, path, timeout=None):
        self.path = path
        self.client = backend.open(path, timeout)
        self.inline_max = getattr(backend, "request_inline_max", None) or INLINE_BODY_MAX

    def forward(self, request, env):
        fields = request_fields(request, env)
        body_fd, spooled = request.body_fd, None
        if body_fd is None and request.body and (
                len(request.body) > self.inline_max
                or sum(map(len, fields)) + 4 * len(fields) + _MESSAGE_HEAD.size > DOOR_CALL_MAX):
            body_fd = spooled = spool_body(request.body)  # off the server thread's stack
            fields[9] = b""
        flags = FLAG_BODY_IN_FD if body_fd is not None else 0
        fds = [body_fd] if body_fd is not None else []
        try:
            reply, reply_fds = self.client.call(pack_message(KIND_REQUEST, flags, fields), fds)
        finally:
            if spooled is not None:
                os.close(spooled)
        try:
            kind, flags, fields = unpack_message(reply, (KIND_RESPONSE, KIND_FAIL))
            if kind == KIND_FAIL:  # status and reason, or whatever a broken peer put there
                raise WireError("the app refused the call: %s" % _log_text(b" ".join(fields)[:200]))
            if len(fields) < 2 or len(fields) % 2:
                raise WireError("response with %d fields" % len(fields))
            if flags & (FLAG_BODY_IN_FD | FLAG_BODY_STREAM):
                return self.passed_body(flags, fields, reply_fds)
        finally:
            _close_fds(reply_fds)
        return Response(fields[0], fields[2:], fields[1], None, bool(flags & FLAG_CLOSE))

    @staticmethod
    def passed_body(flags, fields, reply_fds):
        """The Response of a reply whose body is on a descriptor: a file span or a stream."""
        if len(reply_fds) != 1:
            raise WireError("response body descriptor missing")
        fd = reply_fds.pop()
        if flags & FLAG_BODY_STREAM:
            return Response(fields[0], fields[2:], fields[1], close=bool(flags & FLAG_CLOSE),
                            stream=_PipeStream(fd))
        offset, length = _FILE_SPAN.unpack(fields[1]) if len(fields[1]) == _FILE_SPAN.size else (0, None)
        return Response(fields[0], fields[2:], b"", fd, bool(flags & FLAG_CLOSE), offset, length)

    def stats(self):
        reply, fds = self.client.call(pack_message(KIND_PING, 0, []))
        _close_fds(fds)
        _, _, fields = unpack_message(reply, (KIND_STATS,))
        return json.loads(fields[0])

    def close(self):
        self.client.close()


class _PipeStream:
    """The rest of a door response's body: frames on the pipe the app passed in its reply.

    Every body source the front relays has this shape: fileno() to wait on (None: read()
    never waits long), ready() when read() can go on without waiting, read() for the next
    bytes (possibly none yet), `done` once the body ended cleanly, close() always, once
    (before `done`, it tells the app to stop).  A source raises TransportError when the
    body broke off.
    """

    def __init__(self, fd):
        self.fd = fd
        self.left = 0  # bytes still to come of the current frame
        self.header = b""
        self.done = False

    def fileno(self):
        return self.fd

    def ready(self):
        return False

    def read(self):
        try:
            if not self.left:
                data = os.read(self.fd, _STREAM_FRAME.size - len(self.header))
                if not data:
                    raise TransportError("the application stopped in the middle of the body")
                self.header += data
                if len(self.header) < _STREAM_FRAME.size:
                    return b""
                self.left, = _STREAM_FRAME.unpack(self.header)
                self.header = b""
                if self.left == _STREAM_CUT:
                    raise TransportError("the application stopped in the middle of the body")
                if not self.left:
                    self.done = True
                    return b""
            # A frame's bytes follow its length at once (one write, or two back to back).
            data = os.read(self.fd, min(self.left, 262144))
            self.left -= len(data)
        except OSError as exc:
            raise TransportError("reading the body from the app: %s" % exc)
        if not data:
            raise TransportError("the application stopped in the middle of the body")
        return data

    def close(self):
        os.close(self.fd)


# -- over a Unix socket: the app end's threaded server, the front end's pool -------------

class _UnixAppServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """An app role's server on a Unix socket: one thread per connection from the front.

    It keeps the door's rules: the socket file is born 0600, connections from any euid but
    the app's own (and --allow-uid) are refused, close() lets requests in flight finish.
    The front keeps its connections open, so `threads` follows its concurrency high-water
    mark, like door server threads.
    """

    daemon_threads = True
    block_on_close = False
    request_queue_size = 1024
    description = ""

    def __init__(self, path, gateway, handler):
        self.path = path
        self.gateway = gateway
        self.threads = 0
        self.closing = False
        self._lock = threading.Lock()
        self._connections = {}  # socket -> True while a request is being answered
        socketserver.UnixStreamServer.__init__(self, path, handler)
        threading.Thread(target=self.serve_forever, name="app-accept", daemon=True).start()

    def server_bind(self):
        bind_unix_socket(self.socket, self.server_address, self.request_queue_size)

    def verify_request(self, request, client_address):
        try:
            caller = _peer_credentials(request)
        except OSError:
            return False
        if caller.euid not in self.gateway.allowed_uids:
            _log("app", "refused a connection from euid %d pid %d" % (caller.euid, caller.pid), "warning")
            return False
        return True

    def process_request_thread(self, request, client_address):
        with self._lock:
            self._connections[request] = False
            self.threads += 1
        try:
            socketserver.ThreadingMixIn.process_request_thread(self, request, client_address)
        finally:
            with self._lock:
                self._connections.pop(request, None)
                self.threads -= 1

    def shutdown_request(self, request):
        # Close only, without socketserver's shutdown(SHUT_WR) first: a request the front
        # sent just as this connection ended is still unread, and the half-close would wake
        # the front's read with an end-of-file (which may follow a request that ran) before
        # the close resets it (Linux's unix_release_sock), which says the request did not.
        self.close_request(request)

    def handle_error(self, request, client_address):
        _log("app", "error on a connection from the front:\n" + traceback.format_exc().rstrip(), "error")

    def busy(self, sock, busy):
        # No lock per request: storing to a connection's existing entry is atomic and never
        # resizes the dict; its thread adds and removes the entry under the lock.
        self._connections[sock] = busy

    def close(self, grace=10.0):
        """Refuse new connections, close idle ones, let requests in flight finish (up to `grace`)."""
        self.closing = True
        self.shutdown()
        self.server_close()
        try:
            os.unlink(self.path)
        except OSError:
            pass
        with self._lock:
            idle = [sock for sock, busy in self._connections.items() if not busy]
        for sock in idle:
            # For reading only: the front's next write there fails, so it knows that request
            # did not run here; one already sent is still read, run and answered.
            try:
                sock.shutdown(socket.SHUT_RD)
            except OSError:
                pass
        # Wait for every connection's thread, not only the requests marked in flight: a
        # thread that has read a request but not yet marked it must still answer it.  The
        # others end at once (their read sees the shutdown, or their loop sees `closing`).
        deadline = time.monotonic() + grace
        while self._connections and time.monotonic() < deadline:
            time.sleep(0.01)


def unix_pool(path, timeout=None):
    """A LifoPool of BufferedSockets connected to the Unix socket at `path`, each send and
    receive bounded by `timeout`."""
    def connect():
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError) as exc:  # the app has stopped listening
            sock.close()
            raise NotDelivered(exc.errno, "no application at %s (%s)" % (path, exc.strerror))
        except OSError:
            sock.close()
            raise
        _io_timeout(sock, timeout)
        return BufferedSocket(sock, 262144)
    return LifoPool(connect)


def deliver(connection, send):
    """Call `send()`, which writes a whole request on `connection` to an app, and wait for
    the first bytes of the answer.  An app reads a request whole before it runs it, so a
    write it refused (it had shut the connection, or closed it) or a reset before any
    answer (it closed the connection with the request unread) means the request did not
    run there: NotDelivered.  An end-of-file instead may follow a request that ran and
    crashed its app: that stays the caller's TransportError."""
    try:
        send()
        connection.await_reply()
    except (BrokenPipeError, ConnectionResetError) as exc:
        raise NotDelivered(exc.errno, "the application closed the connection unread (%s)" % exc.strerror)


def _put_back(pool, connection):
    if connection.buf:
        connection.close()  # bytes nobody asked for: the connection is out of step
    else:
        pool.put(connection)


# -- proxy pass: HTTP/1.1 over a Unix socket -----------------------------------
#
# The front sends the request as it received it (line, headers, the decoded body with a
# Content-Length) plus one header of its own, Doordown-Forwarded: scheme, client address
# and port, server name and port, mount prefix.  It drops any header a client sent whose
# name starts with Doordown-, so a client can never forge it; the app trusts it because
# only its own user can connect.  The app answers without Date or Server: the front adds
# its own, as nginx does with what an upstream sends.

# A reply (proxy, FastCGI, CGI) that has arrived, or is arriving, whole is sent in one
# piece; past this many bytes its body is streamed, so that an app that writes faster
# than the front reads is never held in memory whole.
_GATHER_MAX = 1 << 20
_PROXY_DROPPED = frozenset((b"content-length", b"transfer-encoding", b"expect"))


class _ProxyAppHandler(RequestReader, socketserver.BaseRequestHandler):
    """The app end of proxy pass: requests parsed by the front's own strict parser."""

    def setup(self):
        self.reader = BufferedSocket(self.request)
        self.limits = self.server.limits

    def handle(self):
        server = self.server
        while not server.closing:
            try:
                request = self.read_request()
            except HTTPError as exc:
                self.send(None, plain_response(exc.status, str(exc)))
                return
            except (_ClientGone, OSError):
                return
            if request is None:
                return
            server.busy(self.request, True)
            try:
                keep_open = self.answer(request)
            finally:
                server.busy(self.request, False)
                if request.body_fd is not None:
                    os.close(request.body_fd)
            if not keep_open:
                return

    def answer(self, request):
        """Run one request through the gateway and send the reply; False to close after it."""
        gateway = self.server.gateway
        forwarded = None
        headers = []
        for name, value in request.headers:
            lower = name.lower()
            if lower == b"doordown-forwarded":
                forwarded = value
            elif lower == b"doordown-stats":
                body = json.dumps(gateway.stats()).encode()
                return self.send(request, Response(b"200 OK", [b"Content-Type", b"application/json",
                                                               b"Content-Length", b"%d" % len(body)], body))
            else:
                headers += (name, value)
        env_fields = forwarded.split(b" ", 5) if forwarded is not None else []
        if len(env_fields) == 5:
            env_fields.append(b"")  # no mount prefix
        if len(env_fields) != 6:
            return self.send(request, plain_response(400, "no Doordown-Forwarded header", close=True))
        body_input, length = _body_input(request.body, request.body_fd)
        fields = [request.method, request.target, request.version, *env_fields, b"", *headers]
        try:
            status, headers, body, close = gateway.respond(gateway.environ(fields, body_input, length))
        except BaseException:
            body_input.close()
            raise
        _release_input(body_input, body)
        if type(body) is not bytes:
            return self.send_passed(request, status, headers, body, close)
        return self.send(request, Response(status, headers, body, None, close))

    def send(self, request, response):
        """Send `response` (framed as the front frames its own); False if the connection closes."""
        method, version = (request.method, request.version) if request is not None else (None, b"HTTP/1.1")
        keep_alive = request is not None and request.keep_alive and not response.close
        body = response.body
        head, size, chunked, close = frame_response(response.status, response.headers, len(body),
                                                    method, version, keep_alive)
        self.request.sendall(framed_bytes(head, body, size, chunked))
        return not close


    def send_passed(self, request, status, headers, body, close):
        """A file (its length made the Content-Length) or a stream: sent as it comes."""
        sock = self.request
        keep_alive = request.keep_alive and not close
        if type(body) is _FileBody:
            try:
                if _declared_length(headers) is None:
                    headers = headers + [b"Content-Length", b"%d" % body.length]
                head, size, _, close = frame_response(status, headers, body.length, request.method,
                                                      request.version, keep_alive and not body.short)
                sock.sendall(head)
                return send_file(sock, body.fd, body.offset, size) == size and not close
            finally:
                os.close(body.fd)
        try:
            head, _, chunked, close = frame_response(status, headers, max(_declared_length(headers) or 0, 0),
                                                     request.method, request.version, keep_alive)
            sock.sendall(head + encode_chunk(body.first) if chunked else head + body.first)
            whole = body.send(lambda piece: sock.sendall(encode_chunk(piece) if chunked else piece),
                              lambda: sock.sendall(LAST_CHUNK) if chunked else None,
                              lambda: sock.shutdown(socket.SHUT_RDWR))
            return whole and not close and (body.left is None or body.left == 0)
        except (_StreamFailed, OSError, ValueError):
            return False  # the close, without the last chunk, tells the front the body broke
        finally:
            body.close()


class ProxyAppServer(_UnixAppServer):
    """The app role of `--transport proxy`: HTTP/1.1 on a Unix socket, a thread per connection."""

    description = "proxy pass: HTTP/1.1"
    # The front has checked the request against the user's limits already; these only bound
    # a broken peer.  Idle connections stay open: the front's pool decides when to close.
    limits = Limits(keepalive=86400.0, header_timeout=60.0, body_timeout=60.0, max_line=1 << 16,
                    max_headers=10000, max_header_size=1 << 24, max_body=1 << 62)

    def __init__(self, path, gateway):
        _UnixAppServer.__init__(self, path, gateway, _ProxyAppHandler)


class _ProxyStream:
    """The body of a proxied response, read as it arrives (see _PipeStream): `framing` is
    the ChunkedDecoder of a chunked body, a Content-Length, or None (the app's close ends
    it).  Once the body is through, the connection goes back to `pool` (None: the app
    closes it)."""

    def __init__(self, connection, pool, framing):
        self.connection, self.pool = connection, pool
        self.decoder = framing if type(framing) is ChunkedDecoder else None
        self.left = None if self.decoder is not None else framing  # bytes still to come
        self.done = False

    def fileno(self):
        return self.connection.sock.fileno()

    def ready(self):
        return bool(self.connection.buf)

    def read(self):
        connection = self.connection
        data = self.parse() if connection.buf else b""
        if data or self.done:
            return data
        if not connection.fill():
            if self.decoder is None and self.left is None:
                self.done = True  # the close ends a body without framing
                return b""
            raise TransportError("the application closed the connection in the middle of the body")
        return self.parse()

    def parse(self):
        """What the buffer holds of the body, framing removed."""
        buf = self.connection.buf
        if self.decoder is not None:
            try:
                data = self.decoder.decode(buf)
            except HTTPError as exc:
                raise TransportError("malformed chunked body from the app: %s" % exc)
            self.done = self.decoder.done
            return data
        data = bytes(buf if self.left is None else buf[:self.left])
        del buf[:len(data)]
        if self.left is not None:
            self.left -= len(data)
            self.done = not self.left
        return data

    def close(self):
        if self.done and self.pool is not None and (self.decoder is not None or self.left is not None):
            _put_back(self.pool, self.connection)
        else:
            self.connection.close()  # the app sees its writes fail: it stops


def _read_whole(stream):
    """All of a body source's bytes (for the front's own small exchanges with an app)."""
    pieces = []
    try:
        while not stream.done:
            pieces.append(stream.read())
    finally:
        stream.close()
    return b"".join(pieces)


class ProxyUpstream:
    """Forwards requests over pooled keep-alive HTTP/1.1 connections to a ProxyAppServer."""

    transport = "proxy"

    def __init__(self, path, timeout=None):
        self.path = path
        self.pool = unix_pool(path, timeout)

    def forward(self, request, env):
        head = [request.method, b" ", request.target, b" ", request.version, b"\r\n"]
        for name, value in request.headers:
            lower = name.lower()
            if lower not in _PROXY_DROPPED and not lower.startswith(b"doordown-"):
                head += (name, b": ", value, b"\r\n")
        fd = request.body_fd
        size = len(request.body) if fd is None else os.fstat(fd).st_size
        head.append(b"Doordown-Forwarded: %s %s %s %s %s %s\r\nContent-Length: %d\r\n" % (
            env.scheme, env.remote_addr, env.remote_port, env.server_name, env.server_port,
            env.script_name, size))
        if request.version == b"HTTP/1.0":
            head.append(b"Connection: keep-alive\r\n")
        head.append(b"\r\n")
        return self._exchange(head, request.body, fd, request.method == b"HEAD")

    def _exchange(self, head, body, body_fd, head_only):
        def send():
            if body_fd is None:
                head.append(body)
                connection.send(b"".join(head))
            else:
                connection.send(b"".join(head))
                connection.send_file(body_fd)

        connection = self.pool.get()
        try:
            deliver(connection, send)
            response, reusable = self._read_response(connection, head_only)
        except BaseException:
            connection.close()
            raise
        if response.stream is not None:
            return response  # the stream hands the connection back when the body is through
        if reusable:
            _put_back(self.pool, connection)
        else:
            connection.close()
        return response

    def _read_response(self, connection, head_only):
        """(Response, whether the connection can be reused) from the app's reply."""
        try:
            lines = head_lines(connection.read_until(b"\r\n\r\n", 1 << 20))
            match = _STATUS_LINE.fullmatch(lines[0])
            if match is None:
                raise HTTPError(400, "malformed status line %r" % lines[0][:40])
            status = parse_status(lines[0][9:])
            headers, length, chunked, close = parse_response_fields(lines[1:])
            if head_only or has_no_body(None, int(status[:3])):
                body = b""
            elif length is not None and length <= _GATHER_MAX and connection.fill_ready(length):
                body = connection.read_exact(length)
            else:
                body = b""
                if chunked:  # what is there is decoded now: all of it, or a malformed one, is a 502
                    chunked = ChunkedDecoder(1 << 62, 65536, 10000)
                    body = chunked.decode(connection.buf)
                if not chunked or not chunked.done:  # the rest follows as the app produces it
                    stream = _ProxyStream(connection, self.pool if not close else None,
                                          chunked or length)
                    return Response(status, headers, body, None, close, stream=stream), False
        except HTTPError as exc:
            raise TransportError("malformed reply from the app: %s" % exc)
        return Response(status, headers, body, None, close), not close

    def stats(self):
        head = [b"OPTIONS * HTTP/1.1\r\nHost: app\r\nDoordown-Stats: 1\r\n\r\n"]
        response = self._exchange(head, b"", None, False)
        return json.loads(response.body if response.stream is None else _read_whole(response.stream))

    def close(self):
        self.pool.close()


# -- FastCGI 1.0 -----------------------------------------------------------------
#
# Records: version 1, type, request id, content length, padding length, then content and
# padding (to a multiple of 8, as the specification recommends).  One request at a time
# per connection (FCGI_MPXS_CONNS is 0; a second BEGIN_REQUEST gets CANT_MPX_CONN); the
# connection stays open after END_REQUEST only if the client set FCGI_KEEP_CONN.  What
# the application writes to wsgi.errors travels back as FCGI_STDERR, which nginx puts in
# its error log and doordown's front in its own.

_FCGI_HEADER = struct.Struct("!BBHHBx")
_FCGI_BEGIN = struct.Struct("!HB5x")
_FCGI_END = struct.Struct("!IB3x")
_FCGI_LONG_LENGTH = struct.Struct("!I")
(_FCGI_BEGIN_REQUEST, _FCGI_ABORT_REQUEST, _FCGI_END_REQUEST, _FCGI_PARAMS, _FCGI_STDIN,
 _FCGI_STDOUT, _FCGI_STDERR, _FCGI_DATA, _FCGI_GET_VALUES, _FCGI_GET_VALUES_RESULT,
 _FCGI_UNKNOWN_TYPE) = range(1, 12)
_FCGI_RESPONDER = 1
_FCGI_KEEP_CONN = 1
_FCGI_REQUEST_COMPLETE, _FCGI_CANT_MPX_CONN, _FCGI_OVERLOADED, _FCGI_UNKNOWN_ROLE = range(4)
_FCGI_PIECE = 65528  # the largest multiple of 8 a record can carry: no padding in a long stream


def fcgi_record(kind, request_id, content=b""):
    """One record (content of at most 65535 bytes), padded to a multiple of 8."""
    padding = -len(content) % 8
    return b"".join((_FCGI_HEADER.pack(1, kind, request_id, len(content), padding), content,
                     b"\0" * padding))


def fcgi_stream(kind, request_id, data, end=True):
    """`data` as a stream of records, ended by the empty record (unless more is to come)."""
    records = [fcgi_record(kind, request_id, data[i:i + _FCGI_PIECE])
               for i in range(0, len(data), _FCGI_PIECE)]
    if end:
        records.append(fcgi_record(kind, request_id))
    return b"".join(records)


def _fcgi_length(size):
    return bytes((size,)) if size < 128 else _FCGI_LONG_LENGTH.pack(size | 0x80000000)


def fcgi_pairs(pairs):
    """Name-value pairs (bytes) in FastCGI's encoding: lengths of 1 byte, or 4 with the high bit."""
    parts = []
    for name, value in pairs:
        parts += (_fcgi_length(len(name)), _fcgi_length(len(value)), name, value)
    return b"".join(parts)


def parse_fcgi_pairs(data):
    """The name-value pairs in `data`, as a dict of bytes; TransportError if they do not add up."""
    pairs = {}
    pos, end = 0, len(data)
    while pos < end:
        sizes = []
        for _ in range(2):
            if pos >= end:
                raise TransportError("truncated FastCGI name-value pair")
            size = data[pos]
            if size & 0x80:
                if pos + 4 > end:
                    raise TransportError("truncated FastCGI name-value pair")
                size = _FCGI_LONG_LENGTH.unpack_from(data, pos)[0] & 0x7FFFFFFF
                pos += 4
            else:
                pos += 1
            sizes.append(size)
        name_end = pos + sizes[0]
        if name_end + sizes[1] > end:
            raise TransportError("truncated FastCGI name-value pair")
        pairs[bytes(data[pos:name_end])] = bytes(data[name_end:name_end + sizes[1]])
        pos = name_end + sizes[1]
    return pairs


def _read_fcgi_record(connection):
    """(type, request id, content) of the next record on a BufferedSocket."""
    version, kind, request_id, size, padding = _FCGI_HEADER.unpack(
        connection.read_exact(_FCGI_HEADER.size))
    if version != 1:
        raise TransportError("FastCGI record of version %d" % version)
    content = connection.read_exact(size + padding)
    return kind, request_id, content[:size] if padding else content


def _fcgi_record_buffered(connection):
    """Whether a whole record is in the connection's buffer (reading it will not wait)."""
    buf = connection.buf
    if len(buf) < _FCGI_HEADER.size:
        return False
    _, _, _, size, padding = _FCGI_HEADER.unpack_from(buf)
    return len(buf) >= _FCGI_HEADER.size + size + padding


def _fcgi_record_ready(connection):
    """Whether a whole record is in the buffer once what has already arrived is received
    (never waits)."""
    if not connection.fill_ready(_FCGI_HEADER.size):
        return False
    _, _, _, size, padding = _FCGI_HEADER.unpack_from(connection.buf)
    return connection.fill_ready(_FCGI_HEADER.size + size + padding)


def _fcgi_reply_record(kind, request_id, content):
    """True for the END_REQUEST of request 1; logs its STDERR; refusals raise."""
    if request_id != 1:
        return False  # management records we did not ask for
    if kind == _FCGI_STDERR and content:
        for line in content.rstrip().split(b"\n"):  # the app's text may quote a client's bytes
            _log("front", "FastCGI stderr: " + _log_text(line.rstrip(b"\r")), "error")
    elif kind == _FCGI_END_REQUEST:
        if len(content) < _FCGI_END.size:
            raise TransportError("FastCGI END_REQUEST of %d bytes" % len(content))
        app_status, protocol_status = _FCGI_END.unpack_from(content)
        if protocol_status != _FCGI_REQUEST_COMPLETE:
            raise TransportError("the FastCGI app refused the request (protocol status %d)"
                                 % protocol_status)
        return True
    return False


class _FastCGIStream:
    """The rest of a FastCGI response: STDOUT records as they arrive (see _PipeStream)."""

    def __init__(self, connection, pool):
        self.connection, self.pool = connection, pool
        self.done = False

    def fileno(self):
        return self.connection.sock.fileno()

    def ready(self):
        return _fcgi_record_buffered(self.connection)

    def read(self):
        if not _fcgi_record_buffered(self.connection) and not self.connection.fill():
            raise TransportError("the application closed the connection in the middle of the body")
        return self.parse()

    def parse(self):
        out = []
        connection = self.connection
        while not self.done and _fcgi_record_buffered(connection):
            kind, request_id, content = _read_fcgi_record(connection)
            if _fcgi_reply_record(kind, request_id, content):
                self.done = True
            elif kind == _FCGI_STDOUT and request_id == 1:
                out.append(content)
        return b"".join(out)

    def close(self):
        if self.done:
            _put_back(self.pool, self.connection)
        else:
            self.connection.close()


class _FastCGIErrors:
    """wsgi.errors of one FastCGI request: what the app writes goes back as FCGI_STDERR."""

    def __init__(self):
        self.chunks = []

    def write(self, text):
        self.chunks.append(text.encode("utf-8", "replace"))

    def writelines(self, lines):
        for line in lines:
            self.write(line)

    def flush(self):
        pass


class _FastCGIRequest:
    """What a responder gathers for one request before running it."""

    __slots__ = ("request_id", "keep_conn", "params", "params_done", "stdin", "stdin_done",
                 "body", "body_fd")

    def __init__(self, request_id, keep_conn):
        self.request_id, self.keep_conn = request_id, keep_conn
        self.params = bytearray()
        self.stdin = _BodySink(1 << 62)  # the client (front or nginx) bounds the body
        self.params_done = self.stdin_done = False
        self.body, self.body_fd = b"", None


class _FastCGIHandler(socketserver.BaseRequestHandler):
    """One connection to the responder: requests one after another until the client is done."""

    def handle(self):
        connection = BufferedSocket(self.request, 262144)
        server = self.server
        while not server.closing:
            try:
                request = self.read_request(connection)
            except (TransportError, OSError):
                return
            if request is None:
                continue  # aborted before it ran
            server.busy(self.request, True)
            passed = None
            try:
                records, passed = self.run(request)
                self.request.sendall(records)
                body, passed = passed, None  # send_passed() closes it, whatever happens
                if body is not None and not self.send_passed(request.request_id, body):
                    return
            except OSError:
                return
            finally:
                server.busy(self.request, False)
                if request.body_fd is not None:
                    os.close(request.body_fd)
                if type(passed) is _FileBody:  # the client left before the reply began
                    os.close(passed.fd)
                elif passed is not None:
                    passed.close()
            if not request.keep_conn:
                return

    def read_request(self, connection):
        """The next complete request (params and stdin), or None if the client aborted it."""
        request = None
        while request is None or not (request.params_done and request.stdin_done):
            kind, request_id, content = _read_fcgi_record(connection)
            if request_id == 0:
                self.management_reply(kind, content)
            elif kind == _FCGI_BEGIN_REQUEST:
                if len(content) < _FCGI_BEGIN.size:
                    raise TransportError("FastCGI BEGIN_REQUEST of %d bytes" % len(content))
                role, flags = _FCGI_BEGIN.unpack_from(content)
                if request is not None:
                    self.end_request(request_id, _FCGI_CANT_MPX_CONN)
                elif role != _FCGI_RESPONDER:
                    self.end_request(request_id, _FCGI_UNKNOWN_ROLE)
                else:
                    request = _FastCGIRequest(request_id, bool(flags & _FCGI_KEEP_CONN))
            elif request is None or request_id != request.request_id:
                continue  # a record of a request that is not (or no longer) active: ignored
            elif kind == _FCGI_PARAMS:
                if content:
                    request.params += content
                else:
                    request.params_done = True
            elif kind == _FCGI_STDIN:
                if content:
                    request.stdin.write(content)
                else:
                    request.stdin_done = True
            elif kind == _FCGI_ABORT_REQUEST:
                self.end_request(request_id, _FCGI_REQUEST_COMPLETE)
                if not request.keep_conn:
                    raise TransportError("request aborted")
                return None
        request.stdin.finish(request)
        return request

    def management_reply(self, kind, content):
        if kind != _FCGI_GET_VALUES:
            self.request.sendall(fcgi_record(_FCGI_UNKNOWN_TYPE, 0, bytes((kind,)) + b"\0" * 7))
            return
        known = {b"FCGI_MAX_CONNS": b"%d" % self.server.request_queue_size,
                 b"FCGI_MAX_REQS": b"%d" % self.server.request_queue_size,
                 b"FCGI_MPXS_CONNS": b"0",
                 b"DOORDOWN_STATS": json.dumps(self.server.gateway.stats()).encode()}
        asked = parse_fcgi_pairs(content)
        self.request.sendall(fcgi_record(_FCGI_GET_VALUES_RESULT, 0, fcgi_pairs(
            (name, known[name]) for name in asked if name in known)))

    def end_request(self, request_id, protocol_status, app_status=0):
        self.request.sendall(fcgi_record(_FCGI_END_REQUEST, request_id,
                                         _FCGI_END.pack(app_status, protocol_status)))

    def run(self, request):
        """The reply records for one request: STDERR if any, STDOUT, END_REQUEST."""
        gateway = self.server.gateway
        environ = {name.decode("latin-1"): value.decode("latin-1")
                   for name, value in parse_fcgi_pairs(request.params).items()}
        body_input, length = _body_input(request.body, request.body_fd)
        if length and not environ.get("CONTENT_LENGTH"):
            environ["CONTENT_LENGTH"] = str(length)
        errors = _FastCGIErrors()
        environ.update(gateway.wsgi_keys)
        environ["wsgi.url_scheme"] = "https" if environ.get("HTTPS") in ("on", "1") \
            else environ.get("REQUEST_SCHEME", "http")
        environ["wsgi.input"] = body_input
        environ["wsgi.errors"] = errors
        environ.setdefault("PATH_INFO", "")
        environ.setdefault("SCRIPT_NAME", "")
        environ.setdefault("QUERY_STRING", "")
        try:
            status, headers, body, close = gateway.respond(environ)
        except BaseException:
            body_input.close()
            raise
        _release_input(body_input, body)
        passed = None
        if type(body) is not bytes:  # a file or a stream: send_passed() sends the rest
            passed, body = body, body.first if type(body) is _StreamBody else b""
        output = cgi_response(status, headers, body, close)
        request_id = request.request_id
        records = [fcgi_stream(_FCGI_STDERR, request_id, b"".join(errors.chunks))] if errors.chunks else []
        if passed is not None:
            return b"".join(records) + fcgi_stream(_FCGI_STDOUT, request_id, output, end=False), passed
        records += (fcgi_stream(_FCGI_STDOUT, request_id, output),
                    fcgi_record(_FCGI_END_REQUEST, request_id, _FCGI_END.pack(0, _FCGI_REQUEST_COMPLETE)))
        return b"".join(records), None

    def send_passed(self, request_id, body):
        """The rest of a file or stream body as STDOUT records, then END_REQUEST; False when
        it broke off (the connection is then closed: the front sees no END_REQUEST)."""
        sock = self.request
        end = fcgi_record(_FCGI_STDOUT, request_id) + fcgi_record(
            _FCGI_END_REQUEST, request_id, _FCGI_END.pack(0, _FCGI_REQUEST_COMPLETE))
        if type(body) is _FileBody:
            try:
                offset, left = body.offset, body.length
                while left:
                    piece = os.pread(body.fd, min(left, _FCGI_PIECE), offset)
                    if not piece:
                        return False
                    sock.sendall(fcgi_record(_FCGI_STDOUT, request_id, piece))
                    offset, left = offset + len(piece), left - len(piece)
                sock.sendall(end)
                return not body.short
            finally:
                os.close(body.fd)
        try:
            return body.send(lambda piece: sock.sendall(fcgi_stream(_FCGI_STDOUT, request_id, piece, end=False)),
                             lambda: sock.sendall(end), lambda: sock.shutdown(socket.SHUT_RDWR))
        except (_StreamFailed, OSError):
            return False
        finally:
            body.close()


class FastCGIAppServer(_UnixAppServer):
    """The app role of `--transport fastcgi`: a FastCGI 1.0 responder on a Unix socket."""

    description = "FastCGI responder"

    def __init__(self, path, gateway):
        _UnixAppServer.__init__(self, path, gateway, _FastCGIHandler)


class FastCGIUpstream:
    """The front as a FastCGI client: one request per pooled connection at a time, KEEP_CONN."""

    transport = "fastcgi"

    def __init__(self, path, timeout=None):
        self.path = path
        self.pool = unix_pool(path, timeout)

    def forward(self, request, env):
        fields = request_fields(request, env)
        fd = request.body_fd
        size = len(request.body) if fd is None else os.fstat(fd).st_size
        params = [(name.encode("latin-1"), value.encode("latin-1"))
                  for name, value in cgi_variables(fields, fields[_REQUEST_FIXED:], size).items()]
        params += ((b"GATEWAY_INTERFACE", b"CGI/1.1"), (b"REQUEST_SCHEME", env.scheme),
                   (b"REQUEST_URI", request.target))
        if env.scheme == b"https":
            params.append((b"HTTPS", b"on"))
        message = [fcgi_record(_FCGI_BEGIN_REQUEST, 1, _FCGI_BEGIN.pack(_FCGI_RESPONDER, _FCGI_KEEP_CONN)),
                   fcgi_stream(_FCGI_PARAMS, 1, fcgi_pairs(params))]

        def send():
            if fd is None:
                message.append(fcgi_stream(_FCGI_STDIN, 1, request.body))
                connection.send(b"".join(message))
            else:
                connection.send(b"".join(message))
                with os.fdopen(os.dup(fd), "rb") as body_file:
                    for piece in iter(lambda: body_file.read(_FCGI_PIECE), b""):
                        connection.send(fcgi_record(_FCGI_STDIN, 1, piece))
                connection.send(fcgi_record(_FCGI_STDIN, 1))

        connection = self.pool.get()
        try:
            deliver(connection, send)
            output, complete = self._read_reply(connection)
            response = parse_cgi_response(output)
        except BaseException:
            connection.close()
            raise
        if complete:
            _put_back(self.pool, connection)
        else:  # the rest follows as the app produces it
            response.stream = _FastCGIStream(connection, self.pool)
        return response

    def _read_reply(self, connection):
        """(STDOUT so far, whether END_REQUEST came): all of it if it is there, else at least
        the response head, as soon as nothing more has arrived."""
        stdout = bytearray()
        searched, headed = 0, False
        while True:
            kind, request_id, content = _read_fcgi_record(connection)
            if _fcgi_reply_record(kind, request_id, content):
                return bytes(stdout), True
            if kind == _FCGI_STDOUT and request_id == 1:
                stdout += content
                if not headed:
                    headed = cgi_head_end(stdout, searched)[0] >= 0
                    searched = max(0, len(stdout) - 3)
                if headed and (len(stdout) > _GATHER_MAX or not _fcgi_record_ready(connection)):
                    return bytes(stdout), False

    def stats(self):
        connection = self.pool.get()
        try:
            connection.send(fcgi_record(_FCGI_GET_VALUES, 0, fcgi_pairs([(b"DOORDOWN_STATS", b"")])))
            kind, _, content = _read_fcgi_record(connection)
            if kind != _FCGI_GET_VALUES_RESULT:
                raise TransportError("FastCGI record of type %d instead of GET_VALUES_RESULT" % kind)
            stats = parse_fcgi_pairs(content).get(b"DOORDOWN_STATS")
        except BaseException:
            connection.close()
            raise
        _put_back(self.pool, connection)
        if stats is None:  # a responder other than doordown's: it answers, but says nothing more
            return {"pid": None, "threads": None, "requests": None}
        return json.loads(stats)

    def close(self):
        self.pool.close()


# -- CGI: a process per request ----------------------------------------------------------

def run_cgi(args):
    """The `cgi` command: answer the one request in the environment, as an RFC 3875 program."""
    environ = {name.decode("latin-1"): value.decode("latin-1")
               for name, value in os.environb.items()}
    if "REQUEST_METHOD" not in environ:
        _log("cgi", "no REQUEST_METHOD in the environment: run by a web server, not by hand", "error")
        return EXIT_USAGE
    try:
        app = load_app(args.app)
    except BaseException:
        _log("cgi", "cannot load the application %s:\n%s" % (args.app, traceback.format_exc().rstrip()),
             "error")
        return EXIT_APP_LOAD
    gateway = WSGIGateway(app)
    environ.update(gateway.wsgi_keys)
    environ.update({"wsgi.multithread": False, "wsgi.multiprocess": True, "wsgi.run_once": True,
                    "wsgi.input": sys.stdin.buffer, "wsgi.errors": sys.stderr,
                    "wsgi.url_scheme": "https" if environ.get("HTTPS") in ("on", "1") else "http"})
    for name in ("SCRIPT_NAME", "PATH_INFO", "QUERY_STRING"):
        environ.setdefault(name, "")
    status, headers, body, close = gateway.respond(environ)
    out = sys.stdout.buffer
    if type(body) is bytes:
        out.write(cgi_response(status, headers, body, close))
        out.flush()
        return 0
    # A file or a stream: each piece goes out (and on to the client) as it comes.
    out.write(cgi_response(status, headers, body.first if type(body) is _StreamBody else b"", close))
    out.flush()
    if type(body) is _FileBody:
        with os.fdopen(body.fd, "rb") as source:
            source.seek(body.offset)
            left = body.length
            while left:
                piece = source.read(min(left, 262144))
                if not piece:
                    return 1
                out.write(piece)
                left -= len(piece)
        out.flush()
        return 1 if body.short else 0
    try:
        for piece in body.pieces():
            out.write(piece)
            out.flush()
    except (_StreamFailed, OSError):
        return 1  # a non-zero exit tells the front the body broke off
    finally:
        body.close()
    return 0


class CGIUpstream:
    """Runs `doordown.py cgi module:app` for every request: environment and stdin in, stdout out.

    The child inherits the front's environment (virtualenv, settings module), less any
    HTTP_* variable, plus the request's RFC 3875 variables; its stderr is the front's.
    A child that fails before answering, or is killed, gets the client a 502.
    """

    transport = "cgi"

    def __init__(self, spec, timeout=None):
        self.command = child_command("cgi", {"app": spec})
        self.timeout = timeout
        self.served = Counter()
        self.environ = {name: value for name, value in os.environb.items()
                        if not name.startswith(b"HTTP_")}

    def forward(self, request, env):
        fields = request_fields(request, env)
        fd = request.body_fd
        size = len(request.body) if fd is None else os.fstat(fd).st_size
        variables = dict(self.environ)
        for name, value in cgi_variables(fields, fields[_REQUEST_FIXED:], size).items():
            variables[name.encode("latin-1")] = value.encode("latin-1")
        variables.update({b"GATEWAY_INTERFACE": b"CGI/1.1", b"REQUEST_SCHEME": env.scheme,
                          b"REQUEST_URI": request.target})
        if env.scheme == b"https":
            variables[b"HTTPS"] = b"on"
        import subprocess
        # A body larger than a pipe surely holds goes in a file: the child may write before
        # it reads.  Its own session: a Ctrl-C at the terminal must not kill requests in flight.
        if fd is None and len(request.body) > 4096:
            fd = spool_body(request.body)
        elif fd is not None:
            fd = os.dup(fd)
        try:
            child = spawn_unmasked(self.command, stdin=subprocess.PIPE if fd is None else fd,
                                   stdout=subprocess.PIPE, env=variables, start_new_session=True)
        except OSError as exc:
            if exc.errno != errno.E2BIG:
                raise
            # The kernel's bound on one environment string (128 KiB on Linux) or on them all:
            # a header within --max-header-size can still be too large to pass to a program.
            return plain_response(431, "a request header is too large for a CGI environment", close=True)
        finally:
            if fd is not None:
                os.close(fd)
        try:
            if child.stdin is not None:
                try:
                    child.stdin.write(request.body)
                    child.stdin.close()
                except BrokenPipeError:
                    pass  # it answered without reading the body
            output, ended, deadline = self._read_head(child)
            # Its stdout is closed, but it may still run: that wait is bounded too.
            if ended:
                try:
                    child.wait(None if deadline is None else max(0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    raise TimeoutError("the CGI program closed its output but did not exit within %ss"
                                       % self.timeout) from None
            if ended and child.returncode != 0:
                raise TransportError("the CGI program stopped without answering (%s)"
                                     % _describe_exit(child.returncode))
            response = parse_cgi_response(output)
        except BaseException:
            child.kill()
            child.wait()
            child.stdout.close()
            raise
        self.served.add()
        if ended:
            child.stdout.close()
        else:  # the rest follows as the program writes it
            response.stream = _CGIStream(child)
        return response

    def _read_head(self, child):
        """(output so far, whether the program ended it, the deadline) once it holds the
        response head."""
        fd = child.stdout.fileno()
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        output = bytearray()
        searched = 0
        head_in = False
        while True:
            if not _poll_one(fd, select.POLLIN, None if deadline is None else deadline - time.monotonic()):
                raise TimeoutError("the CGI program did not answer within %ss" % self.timeout)
            data = os.read(fd, 262144)
            if not data:
                return bytes(output), True, deadline
            output += data
            head_in = head_in or cgi_head_end(output, searched)[0] >= 0
            if head_in:
                # Gather what is already written, so that a short answer goes out in one
                # piece, but at most _GATHER_MAX bytes of it: a program that writes faster
                # than this loop reads would otherwise be buffered whole.
                if len(output) > _GATHER_MAX or not _poll_one(fd, select.POLLIN, 0):
                    return bytes(output), False, deadline
            searched = max(0, len(output) - 3)

    def stats(self):
        return {"pid": None, "threads": 0, "requests": self.served.value}

    def close(self):
        pass


class _CGIStream:
    """The rest of a CGI program's output, as it writes it (see _PipeStream).  The body ends
    cleanly when the program exits 0."""

    def __init__(self, child):
        self.child = child
        self.done = False

    def fileno(self):
        return self.child.stdout.fileno()

    def ready(self):
        return False

    def read(self):
        import subprocess
        data = os.read(self.child.stdout.fileno(), 262144)
        if data:
            return data
        try:
            code = self.child.wait(5)
        except subprocess.TimeoutExpired:
            code = None
        if code != 0:
            raise TransportError("the CGI program failed in the middle of the body (%s)"
                                 % ("still running" if code is None else _describe_exit(code)))
        self.done = True
        return b""

    def close(self):
        import subprocess
        self.child.stdout.close()  # a program still writing sees EPIPE: it stops
        if not self.done:
            try:
                self.child.wait(1)
            except subprocess.TimeoutExpired:
                self.child.kill()
                self.child.wait()


# -- in-process: the reference -------------------------------------------------------

class _IterStream:
    """In-process: the front's own thread iterates the application's body (see _PipeStream)."""

    def __init__(self, body):
        self.body = body
        self.pieces = body.pieces()
        self.done = False

    def fileno(self):
        return None

    def ready(self):
        return True

    def read(self):
        try:
            return next(self.pieces)
        except StopIteration:
            self.done = True
            return b""
        except _StreamFailed:
            raise TransportError("the application failed in the middle of the body")

    def close(self):
        self.pieces.close()
        self.body.close()


class InProcessUpstream:
    """The front calls the application itself, on the connection's thread: no IPC at all.

    For reference only (the benchmark's yardstick): the application shares the front's
    process, its memory and its fate.
    """

    transport = "inprocess"

    def __init__(self, spec):
        self.gateway = WSGIGateway(load_app(spec))

    def forward(self, request, env):
        fields = request_fields(request, env)
        body_input, length = _body_input(request.body, request.body_fd)
        try:
            status, headers, body, close = self.gateway.respond(
                self.gateway.environ(fields, body_input, length))
        except BaseException:
            body_input.close()
            raise
        _release_input(body_input, body)
        if type(body) is _FileBody:
            return Response(status, headers, b"", body.fd, close, body.offset, body.length)
        if type(body) is _StreamBody:
            return Response(status, headers, body.first, None, close, stream=_IterStream(body))
        return Response(status, headers, body, None, close)

    def stats(self):
        return dict(self.gateway.stats(), threads=threading.active_count())

    def close(self):
        pass


# -- the table `serve` and `app` choose from -------------------------------------------

TRANSPORTS = ("door", "proxy", "fastcgi", "cgi", "inprocess")
APP_SERVERS = {"proxy": ProxyAppServer, "fastcgi": FastCGIAppServer}  # the door's is the backend's


def transport_description(transport, backend):
    """How `serve` names the way it reaches its application, at start-up."""
    if transport == "door":
        return backend.description
    return {"proxy": "proxy pass (HTTP/1.1 over a Unix socket, pooled keep-alive)",
            "fastcgi": "FastCGI (over a Unix socket, pooled connections)",
            "cgi": "CGI (a process per request)",
            "inprocess": "no IPC (the app in the front's process: a reference, not a deployment)"}[transport]


def make_upstream(transport, target, backend, timeout=None):
    """The front's upstream for `transport`: `target` is the door or socket path, or for
    cgi and inprocess the application spec."""
    if transport == "door":
        return DoorUpstream(backend, target, timeout)
    if transport == "proxy":
        return ProxyUpstream(target, timeout)
    if transport == "fastcgi":
        return FastCGIUpstream(target, timeout)
    if transport == "cgi":
        return CGIUpstream(target, timeout)
    if transport == "inprocess":
        return InProcessUpstream(target)
    raise ValueError("unknown transport %r" % transport)


# -- the app role: `doordown.py app`, the app end of door, proxy and fastcgi -------------

def run_app(args):
    """The `app` command: serve one WSGI application on a door until SIGTERM/SIGINT."""
    try:
        app = load_app(args.app)
    except AppLoadError as exc:
        _log("app", "cannot load the application: %s" % exc, "error")
        return EXIT_APP_LOAD
    except BaseException:
        _log("app", "cannot load the application %s:\n%s" % (args.app, traceback.format_exc().rstrip()),
             "error")
        return EXIT_APP_LOAD
    gateway = WSGIGateway(app, args.allow_uid, args.timeout)
    backend = None
    try:
        if args.transport == "door":
            backend = door_backend(args.doors)
            server = backend.serve(args.door, gateway)
            where = "door %s (%s)" % (args.door, backend.description)
        else:
            server = APP_SERVERS[args.transport](args.door, gateway)
            where = "socket %s (%s)" % (args.door, server.description)
    except (OSError, ValueError) as exc:
        _log("app", "cannot listen at %s: %s" % (args.door, exc), "error")
        return EXIT_DOOR_FAILED
    gateway.door_threads = lambda: server.threads
    release_free_memory()  # what loading doordown and the application left behind
    _log("app", "serving %s on %s" % (args.app or "the built-in hello app", where))
    if args.reload and args.parent_pid:
        front_pid = getattr(args, "front_pid", None) or args.parent_pid  # forked: the template's parent
        threading.Thread(target=watch_sources, args=(front_pid, gateway), name="reload", daemon=True).start()
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    # The front's pid comes on the command line: had the front died before this line ran,
    # os.getppid() would already name init, and the app would outlive it unnoticed.
    while not stop.wait(0.5):
        if args.parent_pid and os.getppid() != args.parent_pid:
            _log("app", "the front went away: stopping")
            break
    deadline = time.monotonic() + args.graceful_timeout
    server.close(args.graceful_timeout)
    # Streams are not door calls: they get the rest of the grace, then are broken off.
    while gateway.streams and time.monotonic() < deadline:
        time.sleep(0.05)
    for body in list(gateway.streams):
        body.end()
    _close_every_per_thread()
    _log("app", "stopped after %d requests" % gateway.served.value)
    if backend is not None and backend.exit_hard:
        os._exit(0)
    return 0


def watch_sources(front_pid, gateway, interval=1.0):
    """--reload: poll the files of every loaded module; when one changes, ask the front
    for a new app process (SIGHUP: the zero-loss replacement, new code loaded).  An app
    that may not signal the front (a site app with its own `user =`) says so in its door's
    stats instead, which the front reads at its next health check (within a second)."""
    seen = {}
    told = False
    while True:
        for module in list(sys.modules.values()):
            path = getattr(module, "__file__", None)
            try:
                mtime = os.stat(path).st_mtime_ns
            except (OSError, TypeError):
                continue
            if seen.setdefault(path, mtime) != mtime:
                _log("app", "%s changed: asking the front for a new app process (--reload)" % path)
                seen[path] = mtime
                try:
                    os.kill(front_pid, signal.SIGHUP)
                except OSError as exc:
                    if not told:
                        _log("app", "cannot signal the front (pid %d: %s): it replaces this app at "
                                    "its next health check instead" % (front_pid, exc.strerror))
                        told = True
                    gateway.changed = path
        time.sleep(interval)


###############################################################################
# Front role #################################################################
###############################################################################
#
# http.server's ThreadingHTTPServer gives the socket plumbing (a thread per
# connection); the HTTP/1.1 parsing is the codec's (above), strict (RFC 9110/9112),
# because the stdlib parser is lenient in ways that have allowed request smuggling.  A
# bad request gets its 4xx, then the connection is closed: nothing after an error is parsed.

_SUPERVISOR_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD, signal.SIGUSR1,
                       signal.SIGTTIN, signal.SIGTTOU)

# An HTTP/2 client with prior knowledge (RFC 9113 3.3) opens with this line.  It is told
# in its own protocol: the server preface, an empty SETTINGS frame (3.4), then GOAWAY
# (6.8) with HTTP_1_1_REQUIRED (0xd); then the connection closes.
_H2_PREFACE_LINE = b"PRI * HTTP/2.0"
_H2_GOAWAY = (b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
              b"\x00\x00\x08\x07\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x0d")


class FrontHandler(RequestReader, socketserver.BaseRequestHandler):
    """One client connection: read requests, forward each, answer each, until close."""

    def __init__(self, request, client_address, server, listener=None):
        self.listener = listener  # the FrontServer listener that accepted this connection
        socketserver.BaseRequestHandler.__init__(self, request, client_address, server)

    def setup(self):
        self.reader = BufferedSocket(self.request)
        self.limits = self.server.limits
        self.line = None  # the request line, once read (the access log's, even if refused)
        self.started = time.monotonic()  # when the current request began to arrive
        self.sent = 0  # body bytes of the last response

    def handle(self):
        server = self.server
        while True:  # even while stopping: a request already sent still gets its answer
            try:
                request = self.read_request()  # busy from its first byte: see arriving()
                if request is None:
                    return
                try:
                    response = server.dispatch(request, self.client_address, self.listener)
                    self.send_response(request, response)
                finally:
                    server.busy(self.request, False)
                if not request.keep_alive or response.close:
                    return
            except HTTPError as exc:
                self.refuse(exc)
                return
            except (_ClientGone, OSError):
                return

    def arriving(self):
        # Busy from its first byte: a stop closes idle connections, never one whose
        # request (a body still uploading, say) is on its way.
        self.server.busy(self.request, True)

    def refuse(self, error):
        """Answer a request the front will not take, then the connection closes."""
        if self.line is None:  # refused inside the head: its line, if that much arrived
            end = self.reader.buf.find(b"\r\n")
            if 0 < end <= self.limits.max_line:
                self.line = bytes(self.reader.buf[:end])
        response = plain_response(error.status, "%s: %s" % (_REASONS.get(error.status, "Error"), error),
                                  close=True)
        try:
            self.request.settimeout(1.0)  # a client that does not read cannot hold us
            if self.line == _H2_PREFACE_LINE:
                self.request.sendall(_H2_GOAWAY)
                self.sent = len(_H2_GOAWAY)
            else:
                self.send_response(None, response)
        except OSError:
            pass
        self.server.log_access(self, None, response)

    # -- writing --------------------------------------------------------------------
    def send_response(self, request, response):
        """Frame and send a response in one write (plus sendfile for a body on a descriptor)."""
        if response.stream is not None:
            return self.relay(request, response)
        fd = response.body_fd
        body = response.body
        if fd is None:
            size = len(body)
        else:
            size = response.body_length
            if size is None:
                size = os.fstat(fd).st_size - response.body_offset
        keep_alive = (request is not None and request.keep_alive and not response.close
                      and not self.server.stopping)
        own = b"Date: %s\r\nServer: doordown\r\n" % http_date()
        method, version = (request.method, request.version) if request is not None else (None, b"HTTP/1.1")
        try:
            head, size, chunked, close = frame_response(response.status, response.headers, size,
                                                        method, version, keep_alive, own)
        except ValueError as exc:
            if fd is not None:
                os.close(fd)
            self.server.log_failure(request, "unusable response from the application: %s" % exc)
            response = plain_response(502, "the application sent an unusable response", close=True)
            fd, body = None, response.body
            head, size, chunked, close = frame_response(response.status, response.headers, len(body),
                                                        method, version, False, own)
        if request is not None:
            request.keep_alive = not close
        response.close = close
        self.sent = size
        try:
            if fd is None and size > 16384 and not chunked:  # sent from where it is, not copied
                send_gathered(self.request, head, memoryview(body)[:size])
            elif fd is None:
                self.request.sendall(framed_bytes(head, body, size, chunked))
            else:
                self.request.sendall(head + chunk_header(size) if chunked and size else head)
                self.sent = send_file(self.request, fd, response.body_offset, size) if size else 0
                if self.sent < size:  # the file shrank under us: the close tells the client
                    response.close = True
                    if request is not None:
                        request.keep_alive = False
                elif chunked:
                    self.request.sendall(b"\r\n" + LAST_CHUNK if size else LAST_CHUNK)
        finally:
            if fd is not None:
                os.close(fd)
        if request is not None:
            self.server.log_access(self, request, response)


    def relay(self, request, response):
        """Send a streamed response as its body arrives, chunk by chunk (or up to its
        Content-Length, or until the close on HTTP/1.0).

        While the app is silent, the client's socket is watched too: a client that goes away
        ends the stream at once (the source's close() tells the app).  A body that broke off,
        no byte from the app for --stream-idle-timeout (as nginx on proxy_read_timeout), or a
        stop that has run out of grace ends it with the close alone: no last chunk, no padding
        to a Content-Length, so the client knows the response is incomplete.
        """
        stream, sock, server = response.stream, self.request, self.server
        idle = self.limits.stream_idle_timeout
        keep_alive = (request is not None and request.keep_alive and not response.close
                      and not server.stopping)
        own = b"Date: %s\r\nServer: doordown\r\n" % http_date()
        method, version = (request.method, request.version) if request is not None else (None, b"HTTP/1.1")
        declared = _declared_length(response.headers)
        try:
            head, length, chunked, close = frame_response(
                response.status, response.headers, max(declared or 0, 0), method, version, keep_alive, own)
        except ValueError as exc:
            stream.close()
            self.server.log_failure(request, "unusable response from the application: %s" % exc)
            return self.send_response(request, plain_response(502, "the application sent an unusable "
                                                                   "response", close=True))
        if chunked or declared is None:
            length = None  # no bound but the end of the stream
        body = response.body if length is None else response.body[:length]
        clean = False  # the body was sent whole, or ended as a complete message
        self.sent = 0
        try:
            if has_no_body(method, int(response.status[:3])):
                sock.sendall(head)
                clean = True
                return
            sock.settimeout(idle)  # a client that stops reading is bounded as the app is
            self.reader.timeout = idle
            sock.sendall(head + encode_chunk(body) if chunked else head + body)
            self.sent = len(body)
            source = stream.fileno()
            poller = select.poll()
            if source is not None:
                poller.register(source, select.POLLIN)
            client = sock.fileno()
            poller.register(client, select.POLLIN)
            quiet_since = time.monotonic()
            while not stream.done and not server.ending_streams:
                if source is not None and not stream.ready():
                    events = dict(poller.poll(250))
                    if client in events:
                        # A TLS socket cannot be peeked at: its client's leaving is seen at
                        # the next write instead.
                        if not hasattr(sock, "getpeercert") and not sock.recv(1, socket.MSG_PEEK):
                            raise _ClientGone("the client went away during the stream")
                        poller.unregister(client)  # a pipelined request: it waits its turn
                    if source not in events:
                        if time.monotonic() - quiet_since >= idle:
                            self.server.log_failure(request, "no byte from the app for %ss "
                                                    "(--stream-idle-timeout): stream ended "
                                                    "incomplete" % idle)
                            return  # not clean: the close alone ends it (see finally)
                        continue
                piece = stream.read()
                if not piece:
                    continue
                quiet_since = time.monotonic()
                if length is not None:
                    piece = piece[:length - self.sent]
                    if not piece:
                        break  # more than the app's Content-Length: not sent, and we close
                sock.sendall(encode_chunk(piece) if chunked else piece)
                self.sent += len(piece)
            # Not done: a stop that ran out of grace (ending_streams) cuts it off, incomplete.
            if chunked and stream.done:
                sock.sendall(LAST_CHUNK)
            clean = stream.done and (length is None or self.sent == length)
        except TransportError as exc:
            self.server.log_failure(request, "stream broken off: %s" % exc)
        except (_ClientGone, OSError):
            pass  # the client left, or stopped reading for --stream-idle-timeout
        finally:
            stream.close()
            if not clean:
                close = True
            elif type(sock) is socket.socket:
                # Back to the kernel's bounds, which the next read sets (a Python timeout
                # left here would hold an idle connection for the stream's bound instead
                # of --keep-alive, and a next head for that long past --header-timeout).
                sock.settimeout(None)
                self.reader.timeout = None
            else:
                self.reader.timeout = None  # TLS: the next read sets its own bound
            response.close = close
            if request is not None:
                request.keep_alive = not close
                server.log_access(self, request, response)


# -- the access log ----------------------------------------------------------------------

class AccessLog:
    """The access log, in gunicorn's --access-logformat (Apache's combined format by default).

    One line per request is on every request's path, so it is built cheaply: the format
    is compiled once into one function (see compile_log_format); the time string is made
    once a second; a value is escaped only when it holds a byte that needs it.
    Lines are buffered and written by a background thread at least every
    `flush_interval` seconds (or once `flush_lines` are pending), and at exit.
    """

    FORMAT = '%(h)s %(l)s %(u)s %(t)s "%(r)s" %(s)s %(b)s "%(f)s" "%(a)s"'
    flush_interval = 1.0
    flush_lines = 512

    def __init__(self, path=None, log_format=None):
        self.path = path  # None: stderr
        self.fd = 2 if path is None else self._open(path)
        self.format_line, self.wanted = compile_log_format(log_format or self.FORMAT)
        self.lock = threading.Lock()  # one writer of the file at a time
        self.pending = collections.deque()  # append and popleft are atomic: no lock per line
        self.failed = None  # why the last write failed, said once
        import atexit
        atexit.register(self.flush)  # a clean stop loses no line
        threading.Thread(target=self._flush_loop, name="access-log", daemon=True).start()

    @staticmethod
    def _open(path):
        return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)

    def write(self, handler, request, response):
        """Log one exchange: `request` None for one the front refused (handler.line says
        what was read of it)."""
        headers = {}  # the request headers the format names, in one pass
        wanted = self.wanted
        if wanted and request is not None:
            for name, value in request.headers:
                name = name.lower()
                if name in wanted:
                    headers[name] = value
        pending = self.pending
        pending.append(self.format_line(handler, request, response, headers))
        if len(pending) >= self.flush_lines:
            self.flush()

    def _flush_loop(self):
        while True:
            time.sleep(self.flush_interval)
            self.flush()

    def flush(self):
        with self.lock:
            self._flush_locked()

    def _flush_locked(self):
        pending = self.pending
        if not pending:
            return
        data = b"".join([pending.popleft() for _ in range(len(pending))])
        try:
            while data:
                data = data[os.write(self.fd, data):]
        except OSError as exc:
            if self.failed != exc.strerror:
                self.failed = exc.strerror
                _log("front", "cannot write the access log: %s" % exc.strerror, "error")

    def reopen(self):
        """SIGUSR1 (logrotate): write what is pending, then continue in a new file at the path."""
        if self.path is None:
            self.flush()
            return
        try:
            fd = self._open(self.path)
        except OSError as exc:
            _log("front", "cannot reopen the access log %s: %s; writing on to the old file"
                 % (self.path, exc.strerror), "warning")
            return
        with self.lock:
            self._flush_locked()
            self.fd, old = fd, self.fd
        os.close(old)
        _log("front", "SIGUSR1: reopened the access log %s" % self.path)


_log_time_cache = [0, b""]


def _log_time():
    """t: [01/Dec/2026:21:17:19 +0000], local time as Apache and gunicorn write it, made
    once a second."""
    now = int(time.time())
    if _log_time_cache[0] != now:
        _log_time_cache[1] = time.strftime("[%d/%b/%Y:%H:%M:%S %z]", time.localtime(now)).encode()
        _log_time_cache[0] = now
    return _log_time_cache[1]


def _log_request_part(pick, empty=b"-"):
    """m U q H: `pick`(method, target, version) of the request, or of the line of one
    that was refused; `empty` when that is empty ("-" without a request line)."""
    def get(handler, request, response, headers):
        if request is not None:
            value = pick(request.method, request.target, request.version)
        else:
            parts = (handler.line or b"").split(b" ")
            if len(parts) != 3:
                return b"-"
            value = pick(*parts)
        return _log_value(value) if value else empty
    return get


_LOG_METHOD = _log_request_part(lambda method, target, version: method)
_LOG_PATH = _log_request_part(lambda method, target, version: target.partition(b"?")[0])
# gunicorn logs QUERY_STRING as it is: empty when the target has none, never "-".
_LOG_QUERY = _log_request_part(lambda method, target, version: target.partition(b"?")[2], b"")
_LOG_PROTOCOL = _log_request_part(lambda method, target, version: version)


class _Inline(str):
    """An atom as an expression of h (the handler), q (the request, None if refused),
    r (the response) and i (the request headers the format names, lower-case); `{0}` is
    its `constant`.  Only these, written here, are ever compiled."""

    def __new__(cls, expression, constant=None, header=None):
        self = str.__new__(cls, expression)
        self.constant, self.header = constant, header
        return self


def _log_header(name, where):
    name = name.lower().encode("latin-1")
    if where == "i":
        return _Inline("field(i.get({0}))", name, header=name)

    def from_response(handler, request, response, headers):
        headers = response.headers
        for i in range(0, len(headers), 2):
            if headers[i].lower() == name:
                return _log_field(headers[i + 1])
        return b"-"
    return from_response


def _log_user(handler, request, response, headers):
    """u: the user name of HTTP Basic authentication (RFC 7617), as gunicorn logs it."""
    credentials = headers.get(b"authorization", b"")
    if credentials[:6].lower() != b"basic ":
        return b"-"
    import binascii
    try:
        return _log_value(binascii.a2b_base64(credentials[6:]).partition(b":")[0])
    except binascii.Error:
        return b"-"


_log_user.header = b"authorization"


def _log_elapsed(scale, text=None):
    def get(handler, request, response, headers):
        seconds = time.monotonic() - handler.started
        return (text % seconds if text else str(int(seconds * scale))).encode()
    return get


_LOG_PEER = _Inline('(h.client_address[0].encode() or b"-")')


def _log_variable(name):
    """{NAME}e: a CGI/WSGI variable of the request as the front forwards it."""
    key = name.lower()
    if key.startswith("http_"):
        return _log_header(key[5:].replace("_", "-"), "i")
    if key in ("content_type", "content_length"):
        return _log_header(key.replace("_", "-"), "i")
    known = {
        "remote_addr": _LOG_PEER,
        "remote_port": _Inline('(str(h.client_address[1]).encode() or b"-")'),
        "server_name": _Inline("h.listener.server_name"),
        "server_port": _Inline("h.listener.server_port"),
        "wsgi.url_scheme": _Inline("h.listener.scheme"),
        "request_method": _LOG_METHOD,
        "path_info": _LOG_PATH,
        "query_string": _LOG_QUERY,
        "server_protocol": _LOG_PROTOCOL,
    }
    if key not in known:
        raise ValueError("%%({%s}e)s: no such variable (known: %s, http_*, content_type, "
                         "content_length)" % (name, ", ".join(sorted(known))))
    return known[key]


def _log_atoms():
    """gunicorn's access log atoms (gunicorn/glogging.py, Logger.atoms)."""
    return {
        "h": _LOG_PEER,
        "l": b"-",
        "u": _log_user,
        "t": _Inline("(TIME[1] if TIME[0] == int(time()) else stamp())"),
        "r": _Inline("value(q.line if q is not None else h.line)"),
        "m": _LOG_METHOD,
        "U": _LOG_PATH,
        "q": _LOG_QUERY,
        "H": _LOG_PROTOCOL,
        "s": _Inline("r.status[:3]"),
        "B": _Inline('b"%d" % h.sent'),
        "b": _Inline('(b"%d" % h.sent if h.sent else b"-")'),
        "f": _log_header("referer", "i"),
        "a": _log_header("user-agent", "i"),
        "T": _log_elapsed(1),
        "M": _log_elapsed(1000),
        "D": _log_elapsed(1000000),
        "L": _log_elapsed(1, "%.6f"),
        "p": ("<%d>" % os.getpid()).encode(),
    }


def compile_log_format(log_format):
    """A --access-logformat as (line function, lower-case names of the request headers it
    reads); ValueError names a bad atom.

    The function is made the way collections.namedtuple makes its methods: one expression,
    `template % (atom, atom, ...)`, compiled once, so a line costs one call and not one
    per atom.  The format's own text is never compiled: it is the bytes template, an
    argument; the code is made only of the _Inline expressions above and calls of the
    other atoms' functions."""
    atoms = _log_atoms()
    template, expressions = [], []
    namespace = {"TIME": _log_time_cache, "time": time.time, "stamp": _log_time, "value": _log_value,
                 "field": _log_field}
    wanted = set()
    position = 0
    for match in re.finditer(r"%\(([^)]*)\)s|%%|%", log_format):
        template.append(log_format[position:match.start()].encode().replace(b"%", b"%%"))
        position = match.end()
        if match.group(0) == "%%":
            template.append(b"%%")
            continue
        name = match.group(1)
        if name is None:
            raise ValueError("a lone %% at column %d (write %%%% for a percent sign)" % match.start())
        braced = re.fullmatch(r"\{([^}]+)\}([ioe])", name)
        if braced:
            header, where = braced.groups()
            atom = _log_variable(header) if where == "e" else _log_header(header, where)
        elif name in atoms:
            atom = atoms[name]
        else:
            raise ValueError("unknown atom %%(%s)s (atoms: %s, {header}i, {header}o, {variable}e)"
                             % (name, " ".join(atoms)))
        if isinstance(atom, bytes):  # a constant: into the template
            template.append(atom.replace(b"%", b"%%"))
            continue
        template.append(b"%s")
        slot = "A%d" % len(expressions)
        if isinstance(atom, _Inline):
            namespace[slot] = atom.constant
            expressions.append(atom.format(slot))
        else:
            namespace[slot] = atom
            expressions.append("%s(h, q, r, i)" % slot)
        if getattr(atom, "header", None):
            wanted.add(atom.header)
    template.append(log_format[position:].encode().replace(b"%", b"%%") + b"\n")
    namespace["TEMPLATE"] = b"".join(template)
    exec("def format_line(h, q, r, i):\n    return TEMPLATE %% (%s)\n"
         % "".join(expression + ", " for expression in expressions), namespace)
    return namespace["format_line"], frozenset(wanted)


# -- static files, served by the front itself ------------------------------------------------
#
# `--static-map /URL=DIR` (uWSGI's option): requests under /URL are answered from DIR by the
# front, with sendfile, and never reach the application.  /URL is matched on the decoded
# path, as mounts are (target_path).  What a path may name is decided before anything is
# opened: an encoded slash or backslash (%2f, %5c) or NUL in the raw target, a NUL, a
# backslash, or a "." or ".." segment (also when percent-encoded) is a 404;
# the file found must, once every symlink is resolved, still lie under DIR.  Directories
# are never listed; with `--static-index NAME` (uWSGI's too) a directory's NAME is served,
# after a redirect that adds the trailing slash.  Conditional requests and ranges follow
# RFC 9110 sections 13 and 14.

_STATIC_REFUSED = re.compile(rb"%(?:2[fF]|5[cC]|00)|[\\\x00]")
_BYTE_RANGE = re.compile(rb"([0-9]{0,18})-([0-9]{0,18})")
_TEXT_TYPES = ("text/", "application/javascript", "application/json", "image/svg+xml")


class StaticFiles:
    """One `--static-map`: files under `root` answered at `prefix` (GET and HEAD)."""

    def __init__(self, prefix, root, index=()):
        self.prefix = prefix.rstrip("/").encode("latin-1")
        self.root = os.path.realpath(root).encode()
        self.index = [name.encode() for name in index]

    def matches(self, path):
        return path == self.prefix or path.startswith(self.prefix + b"/")

    def answer(self, request):
        if request.method not in (b"GET", b"HEAD"):
            response = plain_response(405)
            response.headers += (b"Allow", b"GET, HEAD")
            return response
        if _STATIC_REFUSED.search(request.target.partition(b"?")[0]):
            return plain_response(404)  # so no slash in `rest` was not one in the target
        rest = request.path[len(self.prefix):]  # decoded; "" or "/...": matches() saw to it
        segments = rest.split(b"/")
        if any(segment in (b".", b"..") for segment in segments):
            return plain_response(404)
        path = os.path.join(self.root, *[segment for segment in segments if segment])
        opened = self.open(path)
        if opened is not None and stat.S_ISDIR(opened[1].st_mode):
            os.close(opened[0])
            opened = None
            for name in self.index:
                opened = self.open(os.path.join(path, name))
                if opened is not None and stat.S_ISREG(opened[1].st_mode):
                    path = os.path.join(path, name)
                    break
                if opened is not None:
                    os.close(opened[0])
                    opened = None
            if opened is not None and not rest.endswith(b"/"):  # relative links in it need the slash
                os.close(opened[0])
                response = plain_response(301)
                raw, _, query = request.target.partition(b"?")
                response.headers += (b"Location", raw + b"/" + (b"?" + query if query else b""))
                return response
        if opened is None or not stat.S_ISREG(opened[1].st_mode):
            if opened is not None:
                os.close(opened[0])
            return plain_response(404)
        fd, info = opened
        try:
            return self.respond(request, path, fd, info)
        except BaseException:
            os.close(fd)
            raise

    def open(self, path):
        """(fd, stat) of `path` if it resolves to something under the root, else None."""
        real = os.path.realpath(path)
        if real != self.root and not real.startswith(self.root + b"/"):
            return None  # a symlink out of the root
        try:
            fd = os.open(real, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            return None
        return fd, os.fstat(fd)

    def respond(self, request, path, fd, info):
        size = info.st_size
        etag = b'"%x-%x"' % (info.st_mtime_ns, size)
        modified = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(info.st_mtime)).encode()
        headers = [b"Last-Modified", modified, b"ETag", etag, b"Accept-Ranges", b"bytes"]
        fields = {}
        for name, value in request.headers:
            lower = name.lower()
            if lower in (b"if-none-match", b"if-modified-since", b"range", b"if-range"):
                fields[lower] = fields[lower] + b"," + value if lower in fields else value
        if self.not_modified(fields, etag, int(info.st_mtime)):
            os.close(fd)
            return Response(b"304 Not Modified", headers)
        content_type = _static_type(path)
        headers[:0] = (b"Content-Type", content_type)
        offset, length = 0, size
        status = b"200 OK"
        wanted = fields.get(b"range")
        if wanted is not None and request.method == b"GET" and self.range_applies(fields, etag, modified):
            ranges = _byte_ranges(wanted, size)
            if ranges == []:
                os.close(fd)
                response = plain_response(416)
                response.headers += (b"Content-Range", b"bytes */%d" % size)
                return response
            if ranges is not None and len(ranges) == 1:
                (offset, last), = ranges
                length = last - offset + 1
                status = b"206 Partial Content"
                headers += (b"Content-Range", b"bytes %d-%d/%d" % (offset, last, size))
        headers += (b"Content-Length", b"%d" % length)
        return Response(status, headers, b"", fd, body_offset=offset, body_length=length)

    @staticmethod
    def not_modified(fields, etag, mtime):
        """RFC 9110 13.1.2 and 13.1.3: If-None-Match first; If-Modified-Since only without it."""
        match = fields.get(b"if-none-match")
        if match is not None:
            tags = [tag.strip(b" \t") for tag in match.split(b",")]
            return b"*" in tags or any(tag[2:] == etag if tag.startswith(b"W/") else tag == etag
                                       for tag in tags)  # weak comparison
        since = fields.get(b"if-modified-since")
        if since is not None:
            when = _parse_http_date(since)
            return when is not None and mtime <= when
        return False

    @staticmethod
    def range_applies(fields, etag, modified):
        """RFC 9110 13.1.5: an If-Range that does not match (strongly) means the whole file."""
        condition = fields.get(b"if-range")
        if condition is None:
            return True
        condition = condition.strip(b" \t")
        return condition == etag if condition.startswith(b'"') else condition == modified


def _byte_ranges(value, size):
    """The satisfiable (first, last) ranges of a Range value (RFC 9110 14.1.2), or None
    when it is not a valid bytes range set (then it is ignored, as 14.2 allows)."""
    unit, _, ranges = value.partition(b"=")
    if unit.strip(b" \t").lower() != b"bytes" or not ranges:
        return None
    found = []
    specs = ranges.split(b",")
    if len(specs) > 100:
        return None  # a client that asks for that many pieces gets the whole file
    for spec in specs:
        match = _BYTE_RANGE.fullmatch(spec.strip(b" \t"))
        if match is None or match.group(1) == match.group(2) == b"":
            return None
        first, last = match.groups()
        if first == b"":  # the last N bytes
            if int(last) and size:
                found.append((max(0, size - int(last)), size - 1))
            continue
        first = int(first)
        if last and int(last) < first:
            return None
        if first < size:
            found.append((first, min(int(last), size - 1) if last else size - 1))
    return found


def _static_type(path):
    import mimetypes  # only a front with --static-map reads the types table
    content_type, encoding = mimetypes.guess_type(path.decode("utf-8", "surrogateescape"), strict=False)
    if content_type is None or encoding is not None:  # x.tar.gz is gzip data, not a tar
        return b"application/octet-stream"
    if content_type.startswith(_TEXT_TYPES):
        content_type += "; charset=utf-8"
    return content_type.encode("latin-1")


_HTTP_MONTHS = {name: number for number, name in enumerate(
    (b"jan", b"feb", b"mar", b"apr", b"may", b"jun", b"jul", b"aug", b"sep", b"oct", b"nov", b"dec"), 1)}
_HTTP_DATES = (  # RFC 9110 5.6.7: IMF-fixdate, the obsolete RFC 850 form, asctime's
    re.compile(rb"[A-Za-z]{3}, ([0-9]{2}) ([A-Za-z]{3}) ([0-9]{4}) ([0-9]{2}):([0-9]{2}):([0-9]{2}) GMT"),
    re.compile(rb"[A-Za-z]{6,9}, ([0-9]{2})-([A-Za-z]{3})-([0-9]{2}) ([0-9]{2}):([0-9]{2}):([0-9]{2}) GMT"),
    re.compile(rb"[A-Za-z]{3} ([A-Za-z]{3}) ([ 0-9][0-9]) ([0-9]{2}):([0-9]{2}):([0-9]{2}) ([0-9]{4})"))


def _parse_http_date(value):
    """Seconds since the epoch of an HTTP date (RFC 9110 5.6.7, all three forms), or None.

    Parsed here, not by email.utils: the front never loads the email package (its memory),
    nor asks the locale for month names."""
    value = value.strip(b" \t")
    for form, pattern in enumerate(_HTTP_DATES):
        match = pattern.fullmatch(value)
        if match is not None:
            break
    else:
        return None
    if form == 2:
        month, day, hour, minute, second, year = match.groups()
    else:
        day, month, year, hour, minute, second = match.groups()
    month = _HTTP_MONTHS.get(month.lower())
    day, year, hour, minute, second = int(day), int(year), int(hour), int(minute), int(second)
    if month is None or not 1 <= day <= 31 or hour > 23 or minute > 59 or second > 60:
        return None
    if form == 1:  # a two-digit year more than 50 years ahead is of the last century (5.6.7)
        now = time.gmtime().tm_year
        year += now - now % 100
        if year > now + 50:
            year -= 100
    # Days since 1970-01-01 of a proleptic Gregorian date (without the calendar module).
    y = year - (month <= 2)
    era = y // 400
    of_era = y - era * 400
    of_year = (153 * (month + (-3 if month > 2 else 9)) + 2) // 5 + day - 1
    days = era * 146097 + of_era * 365 + of_era // 4 - of_era // 100 + of_year - 719468
    return days * 86400 + hour * 3600 + minute * 60 + min(second, 59)


# -- listening sockets -------------------------------------------------------------
#
# `serve` binds every --bind before anything else (before the app is even spawned), so
# a port in use costs one line and no import.  The forms are gunicorn's: HOST:PORT,
# [IPv6]:PORT, unix:PATH and fd://N; under systemd socket activation (LISTEN_FDS, see
# sd_listen_fds(3)) the sockets systemd passes replace --bind, as gunicorn does, so the
# front can be restarted while systemd keeps the socket and its backlog.

SD_LISTEN_FDS_START = 3


class BindError(Exception):
    """A listening socket that could not be made: one line for the operator."""


class Listener:
    """One listening socket of the front, and what requests through it are told."""

    def __init__(self, sock, name, path=None):
        self.sock, self.name, self.path = sock, name, path  # path: a Unix socket's, ours to remove
        self.inode = os.stat(path).st_ino if path is not None else None
        self.unix = sock.family == socket.AF_UNIX
        if self.unix:  # no port: PEP 3333 still wants SERVER_NAME and SERVER_PORT
            self.server_name, self.server_port = b"localhost", b"80"
        else:
            host, port = sock.getsockname()[:2]
            self.server_name, self.server_port = host.encode(), str(port).encode()
        self.scheme = b"http"

    def url(self):
        if self.unix:
            return "%s (unix:%s)" % (self.scheme.decode(), self.name)
        return "%s://%s/" % (self.scheme.decode(), self.name)

    def close(self):
        """Close the socket; remove its file unless it is another server's by now (one
        started while this one finished its requests)."""
        self.sock.close()
        path, self.path = self.path, None
        try:
            if path is not None and os.lstat(path).st_ino == self.inode:
                os.unlink(path)
        except OSError:
            pass


def open_listeners(binds, backlog=2048, unix_perms=0o600, environ=os.environ):
    """Listeners for `binds` ([("tcp", host, port) | ("unix", path) | ("fd", n)]), or the
    sockets systemd passed.  Raises BindError; what was opened before is closed again."""
    listeners = []
    try:
        if environ.get("LISTEN_PID") == str(os.getpid()) and environ.get("LISTEN_FDS", "").isdigit():
            count = int(environ["LISTEN_FDS"])
            for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):  # not for the app
                environ.pop(name, None)
            binds = [("fd", fd) for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count)]
        for bind in binds:
            listeners.append(_open_listener(bind, backlog, unix_perms))
    except BaseException:
        for listener in listeners:
            listener.close()
        raise
    return listeners


def _open_listener(bind, backlog, unix_perms):
    kind = bind[0]
    if kind == "fd":
        fd = bind[1]
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            raise BindError("fd://%d: %s" % (fd, exc.strerror or exc))
        if sock.type != socket.SOCK_STREAM:
            sock.detach()
            raise BindError("fd://%d is not a stream socket" % fd)
        sock.set_inheritable(False)
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            sock.listen(backlog)
        if sock.family == socket.AF_UNIX:
            return Listener(sock, sock.getsockname() or "fd://%d" % fd)
        return Listener(sock, _host_port(*sock.getsockname()[:2]))
    if kind == "unix":
        return _open_unix_listener(bind[1], backlog, unix_perms)
    host, port = bind[1], bind[2]
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, socket.AF_UNSPEC, socket.SOCK_STREAM,
                                                      0, socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise BindError("cannot listen on %s: %s" % (_host_port(host, port), exc.strerror))
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:  # [::] takes IPv6 only, so 0.0.0.0 can be bound beside it
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise BindError("cannot listen on %s: %s" % (_host_port(host, port), exc.strerror or exc))
    return Listener(sock, _host_port(*sock.getsockname()[:2]))


def _host_port(host, port):
    return "[%s]:%d" % (host, port) if ":" in host else "%s:%d" % (host, port)


def _open_unix_listener(path, backlog, perms):
    """A Unix socket at `path`, born with mode `perms`; a stale socket file is replaced,
    one a live server answers on is not."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        bind_unix_socket(sock, path, backlog, perms)
    except OSError as exc:
        sock.close()
        raise BindError("cannot listen on unix:%s: %s" % (path, exc.strerror or exc))
    return Listener(sock, path, path)


class TLSContext:
    """The front's TLS: stdlib ssl (imported only when TLS is asked for), TLS 1.2 or newer,
    HTTP/1.1 by ALPN; with `ca_certs`, a client certificate signed by one of them is
    required.  reload() reads the files again (on SIGHUP): new connections get the new
    certificate, open ones keep theirs."""

    def __init__(self, certfile, keyfile=None, ca_certs=None):
        self.certfile, self.keyfile, self.ca_certs = certfile, keyfile, ca_certs
        self.context = self._load()

    def _load(self):
        import ssl
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.set_alpn_protocols(["http/1.1"])
        try:
            context.load_cert_chain(self.certfile, self.keyfile)
            if self.ca_certs:
                context.load_verify_locations(self.ca_certs)
                context.verify_mode = ssl.CERT_REQUIRED
        except (OSError, ssl.SSLError) as exc:
            raise BindError("TLS: cannot load %s: %s" % (
                " and ".join(f for f in (self.certfile, self.keyfile, self.ca_certs) if f),
                exc.strerror or exc.reason or exc))
        return context

    def reload(self):
        """Load the files again; on failure keep the current ones and say why."""
        try:
            self.context = self._load()
        except BindError as exc:
            _log("front", "%s; keeping the certificate loaded before" % exc, "warning")
            return False
        return True

    def handshake(self, sock, timeout):
        """The TLS socket for an accepted `sock` once its handshake is done within
        `timeout` seconds, however the client paces it; None (and closed) otherwise."""
        import ssl
        deadline = time.monotonic() + timeout
        try:
            tls = self.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        except OSError:
            sock.close()
            return None
        try:
            tls.setblocking(False)
            poller = select.poll()
            poller.register(tls, select.POLLIN)
            while True:
                try:
                    tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    poller.modify(tls, select.POLLIN)
                except ssl.SSLWantWriteError:
                    poller.modify(tls, select.POLLOUT)
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not poller.poll(remaining * 1000):
                    raise socket.timeout("TLS handshake not done within %ss" % timeout)
            tls.setblocking(True)
            return tls
        except (OSError, ValueError):
            tls.close()
            return None


# -- the server: mounts, dispatch, the upstream's failures as 5xx ------------------------

class _RequestEnv:
    """Per-request facts the front adds for the app: peer, server address, mount."""

    __slots__ = ("scheme", "remote_addr", "remote_port", "server_name", "server_port", "script_name")


class Mount:
    """An application mounted at a path prefix, reached through one upstream at a time.

    The supervisor swaps the upstream whole when it replaces the app, so requests under
    way finish on the one they started with.  A request that could not be delivered
    (the old app revoked its door, or died) waits for the replacement instead of failing.
    """

    def __init__(self, prefix, upstream=None, supervised=True, host=None):
        self.prefix = prefix.rstrip("/").encode("latin-1")
        self.host = host  # lower-case bytes: only requests for this Host; None: any Host
        self.upstream = upstream
        self.supervised = supervised  # False: an app started separately; nobody replaces it
        self.refused = None  # why requests get 503 while restarts are paused, or None
        self.request_limit = 0  # ask for a replacement after this many requests (0: never)
        self.on_limit = None
        self._served = Counter()
        self.on_demand = None  # called when a request finds no upstream: start the app
        self._changed = threading.Condition()
        self._activity = threading.Lock()
        self.active = 0  # requests being forwarded now
        self.last_used = time.monotonic()  # when the last one ended

    def enter(self):
        with self._activity:
            self.active += 1

    def leave(self):
        with self._activity:
            self.active -= 1
            self.last_used = time.monotonic()

    def replace(self, upstream, request_limit=0, refused=None):
        with self._changed:
            self.upstream, self.refused = upstream, refused
            self.request_limit, self._served = request_limit, Counter()
            self._changed.notify_all()

    def next_upstream(self, stale, timeout):
        """The upstream after `stale`, waiting up to `timeout` for it; None if none comes."""
        with self._changed:
            if self.on_demand is not None and self.upstream in (None, stale):
                self.on_demand(self)  # a stopped (lazy or idle) app is started by its request
            self._changed.wait_for(lambda: self.refused or self.upstream not in (None, stale), timeout)
            return None if self.refused or self.upstream is stale else self.upstream

    def count_request(self):
        if self.request_limit and self._served.add() == self.request_limit:
            self.on_limit(self)


class FrontServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    """The HTTP front: ThreadingHTTPServer's threads, our listeners, parser and dispatch.

    http.server's ThreadingHTTPServer is these two socketserver classes, with
    daemon_threads set and a server_bind the front does not use (it binds its listeners
    itself).  They are taken from socketserver directly: importing http.server would load
    http.client and the email package, about 7 MB of the front's memory, for nothing.
    """

    daemon_threads = True
    block_on_close = False

    def __init__(self, listeners, mounts, limits=None, access_log=None,
                 forwarded_allow=("127.0.0.1", "::1"), upstream_wait=30.0, static=(), tls=None):
        socketserver.BaseServer.__init__(self, listeners[0].sock.getsockname(), FrontHandler)
        self.listeners = listeners
        self.set_mounts(mounts)
        self.static = sorted(static, key=lambda s: len(s.prefix), reverse=True)
        self.limits = limits or Limits()
        self.access_log = access_log
        self.forwarded_allow = frozenset(forwarded_allow)
        self.upstream_wait = upstream_wait
        self.tls = tls  # a TLSContext for every listener, or None
        if tls is not None:
            for listener in listeners:
                listener.scheme = b"https"
                if listener.unix:
                    listener.server_port = b"443"
        self.stopping = False
        self._accepting = threading.Event()
        self.ending_streams = False  # set when a stop has run out of grace: streams end now
        self._slots = threading.BoundedSemaphore(self.limits.max_connections)
        self._lock = threading.Lock()
        self._connections = {}  # socket -> True while a request is being answered

    def serve_forever(self, poll_interval=0.25):
        """Accept on every listener until stop_accepting()."""
        import selectors
        self._accepting.set()
        try:
            with selectors.DefaultSelector() as selector:
                for listener in self.listeners:
                    selector.register(listener.sock, selectors.EVENT_READ, listener)
                while not self.stopping:
                    for key, _ in selector.select(poll_interval):
                        self.accept(key.data)
        finally:
            self._accepting.clear()

    def accept(self, listener):
        try:
            request, client_address = listener.sock.accept()
        except OSError as exc:  # gone between select and accept, or out of descriptors
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                time.sleep(0.05)  # the backlog keeps the connection; do not spin meanwhile
            return
        self.process_request(request, client_address, listener)

    def process_request(self, request, client_address, listener):
        # At the connection cap, stop accepting: newcomers wait in the listen backlog.
        while not self._slots.acquire(timeout=0.5):
            if self.stopping:
                self.shutdown_request(request)
                return
        if listener.unix:  # no peer address; a Unix-socket peer is a local proxy
            client_address = ("", "")
        with self._lock:
            self._connections[request] = False
        try:
            threading.Thread(target=self.process_request_thread, args=(request, client_address, listener),
                             name="front-connection", daemon=True).start()
        except RuntimeError as exc:  # can't start new thread: this connection closes, its slot is free
            with self._lock:
                self._connections.pop(request, None)
            self._slots.release()
            _log("front", "no thread for a connection: %s" % exc, "warning")
            self.shutdown_request(request)

    def process_request_thread(self, request, client_address, listener):
        try:
            # Signals are the supervisor's: one landing on this thread would interrupt its
            # door call (EINTR) and fail the request.
            signal.pthread_sigmask(signal.SIG_BLOCK, _SUPERVISOR_SIGNALS)
            if not listener.unix:
                request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.tls is not None:
                # On this thread, bounded by the header timeout: a client that never
                # finishes its handshake holds one thread for that long, and nothing else.
                raw, request = request, self.tls.handshake(request, self.limits.header_timeout)
                with self._lock:
                    self._connections.pop(raw, None)
                    if request is not None:
                        self._connections[request] = False
            if request is not None:
                FrontHandler(request, client_address, self, listener)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            if request is not None:
                with self._lock:
                    self._connections.pop(request, None)
                self.shutdown_request(request)
            self._slots.release()

    def handle_error(self, request, client_address):
        _log("front", "error on connection from %s:\n%s" % (client_address[0], traceback.format_exc().rstrip()),
             "error")

    def busy(self, sock, busy):
        # No lock: one item store is atomic, and only the connection's own thread stores
        # it (its entry is added before that thread starts and removed after it is done).
        self._connections[sock] = busy

    @property
    def in_flight(self):
        with self._lock:
            return sum(self._connections.values())

    def set_mounts(self, mounts):
        """Route to `mounts`: a mount for the request's Host before one for any Host, then
        the longest path prefix (one assignment: requests see the old list or the new)."""
        self.mounts = sorted(mounts, key=lambda m: (m.host is None, -len(m.prefix)))
        self.host_routing = any(mount.host is not None for mount in mounts)

    def route(self, request):
        """The mount that claims the request, or None."""
        path, host = request.path, None
        if self.host_routing:
            host = target_authority(request.target)
            if host is None:
                for name, value in request.headers:
                    if name.lower() == b"host":
                        host = _without_port(value).lower()
                        break
        for mount in self.mounts:
            prefix = mount.prefix
            if (mount.host is None or mount.host == host) and (
                    not prefix or path == prefix or path.startswith(prefix + b"/")):
                return mount
        return None

    def dispatch(self, request, client_address, listener):
        """Forward one request to the app mounted at its path; map IPC failures to 5xx."""
        path = request.path
        mount = None
        try:
            for files in self.static:
                if files.matches(path):
                    return files.answer(request)
            mount = self.route(request)
            if mount is None:
                return plain_response(404)
            mount.enter()
            try:
                response = self.forward(request, client_address, listener, mount)
            except BaseException:
                mount.leave()
                raise
            if response.stream is None:
                mount.leave()
            else:  # still in progress while it streams: the app is not idle under it
                response.stream = _MountedStream(response.stream, mount)
            return response
        finally:
            if request.body_fd is not None:  # a spooled body, also of a request no app saw
                os.close(request.body_fd)
                request.body_fd = None

    def forward(self, request, client_address, listener, mount):
        env = _RequestEnv()
        env.scheme = listener.scheme
        env.remote_addr = client_address[0].encode()
        env.remote_port = str(client_address[1]).encode()
        env.server_name, env.server_port = listener.server_name, listener.server_port
        env.script_name = mount.prefix
        if request.proxy_headers:
            self.apply_proxy_headers(request, env, client_address[0], listener)
        upstream = mount.upstream
        try:
            for _attempt in range(3):
                if upstream is None:
                    upstream = mount.next_upstream(None, self.upstream_wait)
                    if upstream is None:
                        return self.unavailable(request, mount)
                try:
                    response = upstream.forward(request, env)
                    mount.count_request()
                    return response
                except NotDelivered:
                    # The app is being replaced or has died, and nothing ran: the request
                    # goes to the replacement as soon as there is one.
                    if not mount.supervised:
                        raise
                    upstream = mount.next_upstream(upstream, self.upstream_wait)
                    if upstream is None:
                        return self.unavailable(request, mount)
            return self.unavailable(request, mount)
        except (DoorTimeout, TimeoutError, socket.timeout) as exc:  # socket.timeout: Python 3.9
            self.log_failure(request, exc)
            return plain_response(504, "the application did not answer in time", close=True)
        except (DoorError, WireError, OSError) as exc:
            self.log_failure(request, exc)
            return plain_response(502, "the application could not be reached", close=True)
        except Exception:  # a peer's reply that no parser above foresaw: still this request's 502
            self.log_failure(request, "unusable reply:\n" + traceback.format_exc().rstrip())
            return plain_response(502, "the application sent an unusable reply", close=True)

    def unavailable(self, request, mount):
        reason = mount.refused or "no application is answering"
        self.log_failure(request, reason)
        return plain_response(503, reason, close=True)

    @staticmethod
    def log_failure(request, why):
        where = "%s %s" % (_log_text(request.method), _log_text(request.path)) if request else "-"
        _log("front", "%s: %s" % (where, why), "error")

    def apply_proxy_headers(self, request, env, peer, listener):
        """Honour X-Forwarded-For/-Proto from an allowed proxy; from anyone else, drop them.

        A peer on a Unix socket is trusted, as gunicorn does: only a local proxy can reach
        it, and the socket's mode (--unix-socket-perms) says which."""
        if listener.unix or peer in self.forwarded_allow or "*" in self.forwarded_allow:
            forwarded_for = request.proxy_headers.get(b"x-forwarded-for")
            if forwarded_for:  # the nearest hop is the one the allowed proxy saw
                address = forwarded_for.split(b",")[-1].strip(b" \t")
                if _is_ip(address):
                    env.remote_addr = address
            proto = request.proxy_headers.get(b"x-forwarded-proto", b"").strip(b" \t").lower()
            if proto in (b"http", b"https"):
                env.scheme = proto
        else:
            request.headers = [(n, v) for n, v in request.headers if n.lower() not in _PROXY_HEADERS]

    def log_access(self, handler, request, response):
        if self.access_log is not None:
            self.access_log.write(handler, request, response)

    def stop_accepting(self):
        """Stop taking connections.  Open ones get `Connection: close` on their next reply."""
        self.stopping = True
        self._accepting.wait(1.0)  # cleared when serve_forever has left its loop
        while self._accepting.is_set():
            time.sleep(0.01)
        # Connections the kernel completed but we had not yet accepted would be reset by
        # the close: take them in and answer them too.
        for listener in self.listeners:
            listener.sock.setblocking(False)
            while True:
                try:
                    request, client_address = listener.sock.accept()
                except OSError:
                    break
                request.setblocking(True)
                self.process_request(request, client_address, listener)
            listener.close()

    def close_idle(self):
        """Close keep-alive connections that are not in the middle of a request."""
        with self._lock:
            idle = [sock for sock, busy in self._connections.items() if not busy]
        for sock in idle:
            _shutdown(sock)

    @property
    def open_connections(self):
        return len(self._connections)


class _MountedStream:
    """A body source (see _PipeStream) that keeps its mount active until it is closed."""

    __slots__ = ("stream", "mount")

    def __init__(self, stream, mount):
        self.stream, self.mount = stream, mount

    @property
    def done(self):
        return self.stream.done

    def fileno(self):
        return self.stream.fileno()

    def ready(self):
        return self.stream.ready()

    def read(self):
        return self.stream.read()

    def close(self):
        mount, self.mount = self.mount, None
        try:
            self.stream.close()
        finally:
            if mount is not None:
                mount.leave()


def _is_ip(text):
    import ipaddress
    try:
        ipaddress.ip_address(text.decode("ascii"))
        return True
    except ValueError:
        return False


###############################################################################
# Site configuration: many applications behind one front ######################
###############################################################################
#
# `serve --config site.ini` (after mod_fcgid's classes, uWSGI's vassals, NGINX Unit's
# applications): [serve] takes serve's long options by name, without the dashes; one
# [app:NAME] section per application.  The single-app command line is a site of one app.
# Each app keeps serve's per-app options (timeout, max-requests, ...) and may override
# them in its own section; what is wrong is named as FILE: [SECTION] KEY: why, exit 2.

class ConfigError(Exception):
    """A site configuration that cannot be used: one line, naming file, section and key."""


# Keys of an [app:NAME] section besides the serve options an app may set for itself.
_APP_KEYS = ("wsgi", "mount", "host", "directory", "python", "env", "user", "group", "spawn",
             "idle-timeout", "lifetime")
_APP_SERVE_OPTIONS = ("timeout", "graceful-timeout", "boot-timeout", "max-requests",
                      "max-requests-jitter", "max-stuck", "allow-uid")


class AppConfig:
    """One application of the site: how to start it, where it is mounted, when to stop it."""

    def __init__(self, name, spec, args, settings=None, prefix="", host=None, directory=None,
                 python=None, env=None, user=None, credentials=None, spawn="eager",
                 idle_timeout=0.0, lifetime=0.0):
        self.name, self.spec, self.args = name, spec, args
        self.settings = settings or {}  # the section as written: what a reload compares
        self.prefix, self.host = prefix, host
        self.directory, self.python, self.env = directory, python, env or {}
        self.user, self.credentials = user, credentials  # (uid, gid, name) to run as, or None
        self.spawn, self.idle_timeout, self.lifetime = spawn, idle_timeout, lifetime


def _serve_parser():
    """serve's own argument parser, raising ConfigError instead of exiting."""
    import argparse
    root = build_parser()
    serve = next(action for action in root._actions
                 if isinstance(action, argparse._SubParsersAction)).choices["serve"]

    def error(message):
        raise ConfigError(message)
    serve.error = error
    return serve


def _option_argv(parser, where, key, value):
    """The command-line words for `key = value` of a section, checked by serve's parser."""
    action = parser._option_string_actions.get("--" + key)
    if action is None or key in ("config", "help", "version"):
        raise ConfigError("%s %s: unknown key" % (where, key))
    if action.nargs == 0:  # a flag: yes/no
        flag = value.strip().lower()
        if flag not in ("1", "yes", "true", "on", "0", "no", "false", "off"):
            raise ConfigError("%s %s: expected yes or no, got %r" % (where, key, value))
        argv = ["--" + key] if flag in ("1", "yes", "true", "on") else []
    else:  # one value a line: a repeatable option (bind, env, ...) may have several
        argv = []
        for line in value.splitlines() or [""]:
            if line.strip() or not argv:
                argv += ["--" + key, line.strip()]
    try:
        parser.parse_args(argv)
    except ConfigError as exc:
        raise ConfigError("%s %s: %s" % (where, key, exc))
    return argv


def read_site(path, command_line):
    """(serve's args, [AppConfig]) for `serve --config path`; raises ConfigError.

    The command line's options come after [serve]'s, so they win; an app's own
    options win over both, for that app.
    """
    import argparse
    import configparser
    import shlex
    config = configparser.ConfigParser(inline_comment_prefixes=(";", "#"), interpolation=None)
    try:
        with open(path, encoding="utf-8") as f:
            config.read_file(f)
    except OSError as exc:
        raise ConfigError("%s: %s" % (path, exc.strerror or exc))
    except configparser.MissingSectionHeaderError as exc:
        raise ConfigError("%s: line %d: a line before any [section]" % (path, exc.lineno))
    except configparser.DuplicateOptionError as exc:
        raise ConfigError("%s: [%s] %s: given twice (line %d)" % (path, exc.section, exc.option, exc.lineno))
    except configparser.DuplicateSectionError as exc:
        raise ConfigError("%s: [%s]: given twice (line %d)" % (path, exc.section, exc.lineno))
    except (configparser.Error, UnicodeDecodeError) as exc:
        raise ConfigError("%s: %s" % (path, " ".join(str(exc).replace(repr(path), "").split())))
    parser = _serve_parser()
    serve_argv = []
    for section in config.sections():
        # An app's name names its doors' directory: "." or ".." would put them outside.
        if section != "serve" and (not re.fullmatch(r"app:[A-Za-z0-9_.-]+", section)
                                   or section in ("app:.", "app:..")):
            raise ConfigError("%s: [%s]: unknown section (expected [serve] or [app:NAME])" % (path, section))
    if config.has_section("serve"):
        for key, value in config.items("serve"):
            serve_argv += _option_argv(parser, "%s: [serve]" % path, key, value)
    try:
        args = parser.parse_args(serve_argv + command_line)
    except ConfigError as exc:
        raise ConfigError("%s: [serve]: %s" % (path, exc))
    if args.app:
        raise ConfigError("%s: an application on the command line as well as in the file: "
                          "give it an [app:NAME] section" % path)
    if args.app_door or args.transport in ("cgi", "inprocess"):
        raise ConfigError("%s: [serve] transport: a site's apps are processes of their own: "
                          "door, proxy or fastcgi" % path)
    args.serve_argv, args.command_line = serve_argv, command_line
    apps, routes = [], {}
    for section in config.sections():
        if section == "serve":
            continue
        name, where = section[4:], "%s: [%s]" % (path, section)
        settings = dict(config.items(section))
        app_argv = []
        for key, value in settings.items():
            if key in _APP_SERVE_OPTIONS:
                app_argv += _option_argv(parser, where, key, value)
            elif key not in _APP_KEYS:
                raise ConfigError("%s %s: unknown key (an app takes %s)"
                                  % (where, key, ", ".join(_APP_KEYS + _APP_SERVE_OPTIONS)))
        app_args = parser.parse_args(serve_argv + command_line + app_argv)

        def value_of(key, check, default=None, message="", settings=settings, where=where):
            if key not in settings:
                return default
            try:
                return check(settings[key].strip())
            except (ValueError, KeyError, argparse.ArgumentTypeError, OSError) as exc:
                raise ConfigError("%s %s: %s" % (where, key, message or exc))
        if "wsgi" not in settings:
            raise ConfigError("%s wsgi: missing (the application, as module:callable)" % where)
        spec = value_of("wsgi", _app_spec)

        def mount(text):
            if not text.startswith("/"):
                raise ValueError("expected a URL path prefix starting with /, got %r" % text)
            return text.rstrip("/")

        def host_name(text):
            # As nginx's server_name: a name only.  A request's Host is matched without its
            # port, so a host with one would never match: refused, not silently never routed.
            if ":" in text.rpartition("]")[2]:
                raise ValueError("a host name without a port (a request's port is ignored), got %r" % text)
            return text.lower().encode("ascii") or None

        def seconds(text):
            value = float(text)
            if not value >= 0:
                raise ValueError("expected seconds (0: never), got %r" % text)
            return value

        def directory(text):
            if not os.path.isdir(text):
                raise ValueError("no such directory: %s" % text)
            return os.path.abspath(text)

        def python(text):
            if not (os.path.isfile(text) and os.access(text, os.X_OK)):
                raise ValueError("not an executable: %s" % text)
            return text

        def environment(text):
            pairs = {}
            for word in shlex.split(text):
                name, equals, value = word.partition("=")
                if not equals or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                    raise ValueError("expected NAME=VALUE, got %r" % word)
                pairs[name] = value
            return pairs

        def spawn(text):
            if text not in ("lazy", "eager"):
                raise ValueError("expected lazy or eager, got %r" % text)
            return text
        credentials = None
        if "user" in settings or "group" in settings:
            try:
                credentials = _credentials(settings.get("user", "").strip() or None,
                                           settings.get("group", "").strip() or None)
            except BindError as exc:
                raise ConfigError("%s %s" % (where, str(exc).lstrip("-")))
            if os.geteuid() != 0 and credentials[:2] != (os.geteuid(), os.getegid()):
                raise ConfigError("%s user: serve must run as root to run an app as another user" % where)
        app = AppConfig(name, spec, app_args, settings, prefix=value_of("mount", mount, ""),
                        host=value_of("host", host_name),
                        directory=value_of("directory", directory), python=value_of("python", python),
                        env=value_of("env", environment, {}), credentials=credentials,
                        spawn=value_of("spawn", spawn, "lazy"),
                        idle_timeout=value_of("idle-timeout", seconds, 300.0),
                        lifetime=value_of("lifetime", seconds, 0.0))
        route = (app.host, app.prefix)
        if route in routes:
            raise ConfigError("%s mount: %s%s is [app:%s]'s already" % (
                where, (app.host or b"").decode(), app.prefix or "/", routes[route]))
        routes[route] = name
        apps.append(app)
    if not apps:
        raise ConfigError("%s: no [app:NAME] section" % path)
    if (args.user or args.group) and any(app.credentials is not None for app in apps):
        raise ConfigError("%s: [serve] user: the front must stay root to start apps as their own "
                          "users (give the apps user and group, not [serve])" % path)
    args.site = os.path.abspath(path)  # SIGHUP reads it again, after --chdir
    return args, apps



###############################################################################
# Supervisor #################################################################
###############################################################################
#
# After gunicorn's arbiter: signal handlers only enqueue; one loop reaps, replaces
# and stops the app processes; an app that cannot even load stops `serve` with its
# own exit code instead of becoming a respawn loop.

# -- starting processes: compiled once, settings as JSON ---------------------------------
#
# Every process of `serve` (the front, the app role, each CGI program) is this same file.
# A file run as a script is compiled from source at every start and the result never
# kept (with PYTHONDONTWRITEBYTECODE, or an install directory the server may not write,
# not even an imported module's __pycache__ is): for doordown.py about 55 ms of CPU per
# start.  Worse, CPython keeps a script's whole syntax tree until the script ends: for
# doordown.py some 9 MB that nothing can free.  So `serve` and `app`, started as a script,
# compile the file once and re-execute themselves (same pid, same arguments) from that
# copy, handed over in an unlinked temporary file: a stub given to `python3 -c` loads the
# code object with marshal (about 1 ms, 0.6 MB) and runs it as __main__, with the
# __file__, sys.argv[0] and sys.path[0] of a script run.  serve writes the same copy into
# its private directory (0700, like the doors in it) and starts its children from it.
# Children get their settings as one JSON argument rather than a command line, so they
# need no argparse; `doordown.py app ...` typed by hand still takes options.  (SIGHUP
# reloads the application, not doordown: the front and the apps it starts run the copy
# compiled at start-up.)

_SOURCE = os.path.abspath(__file__)  # before any --chdir
_COMPILED_STUB = (  # one line, so that ps shows it whole: python3 -c STUB doordown.py CODE ROLE ...
    "import marshal,os,sys;__file__,_compiled_from=sys.argv[1:3];del sys.argv[1:3];"
    "sys.argv[0]=__file__;sys.path[0]=os.path.dirname(__file__) if sys.path[0]=='' else sys.path[0];"
    "exec(marshal.loads(open(_compiled_from,'rb').read()))")
_compiled_for_children = None  # the code file serve wrote, once it has
_compiled_image = None  # the re-executed serve's compiled copy, until it is written out


def relaunch_compiled(argv):
    """Re-execute this process from a copy of this file compiled now (see above).

    Returns only if that cannot be done: the process then goes on as it is.
    """
    import marshal
    import tempfile
    try:
        with open(_SOURCE, "rb") as f:
            code = compile(f.read(), _SOURCE, "exec", dont_inherit=True)
        image = tempfile.TemporaryFile()  # unlinked: nothing to clean up, whatever happens
        image.write(marshal.dumps(code))
        image.flush()
        image.seek(0)  # illumos' /dev/fd/N shares the offset of the descriptor
        os.set_inheritable(image.fileno(), True)
        os.execv(sys.executable, [sys.executable, "-c", _COMPILED_STUB, _SOURCE,
                                  "/dev/fd/%d" % image.fileno()] + argv)
    except (OSError, SyntaxError, ValueError) as exc:
        _log("start", "running from source: cannot re-execute from a compiled copy: %s" % exc)


def _take_relaunch_image(keep):
    """In a re-executed process: close the inherited copy, keeping its bytes if `keep`."""
    global _compiled_image
    name = globals().get("_compiled_from") or ""
    if name.startswith("/dev/fd/"):
        fd = int(name[len("/dev/fd/"):])
        if keep:
            _compiled_image = os.pread(fd, os.fstat(fd).st_size, 0)
        os.close(fd)


def compile_for_children(directory):
    """Write the compiled copy into `directory` for child_command(); on failure children
    compile the file themselves."""
    global _compiled_for_children, _compiled_image
    path = os.path.join(directory, "doordown.code")
    try:
        image = _compiled_image
        if image is None:  # serve was not re-executed (or was run in-process)
            import marshal
            with open(_SOURCE, "rb") as f:
                image = marshal.dumps(compile(f.read(), _SOURCE, "exec", dont_inherit=True))
        with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
            f.write(image)
    except (OSError, SyntaxError, ValueError) as exc:
        _log("front", "children will compile doordown.py themselves: %s" % exc)
        return
    finally:
        _compiled_image = None
    _compiled_for_children = path


def child_command(role, settings, python=None, compiled=True):
    """The command line that starts this file as `role` ("app" or "cgi") with `settings`.

    From the compiled copy unless it is not there, or the child runs another interpreter
    (a code object is only good for the Python that made it), or as another user (who may
    not read serve's private copy): then from the source.
    """
    python = python or sys.executable
    if _compiled_for_children is None or python != sys.executable or not compiled:
        head = [python, _SOURCE]
    else:
        head = [python, "-c", _COMPILED_STUB, _SOURCE, _compiled_for_children]
    return head + ["--child", role, json.dumps(settings)]


def _run_child(role, settings):
    """main() of a child of serve: `settings` are the options of `role`, by their dest names."""
    import types
    if settings.get("log_level"):
        _log_threshold[0] = _LOG_LEVELS.index(settings["log_level"])
    return {"app": run_app, "cgi": run_cgi}[role](types.SimpleNamespace(**settings))


def release_free_memory():
    """Give back to the OS what the C heap holds free after start-up (glibc's malloc_trim).

    Imports, compiling and an application's own start-up leave megabytes freed but kept
    by glibc's malloc for reuse; malloc_trim(0) returns every free page of it.  Elsewhere
    nothing is done: illumos' libc malloc (like the BSDs' and musl's) has no malloc_trim,
    and keeps freed memory for the process's own reuse ("not returned to the system",
    malloc(3C)), so there a process stays at its start-up high-water mark.
    Python's own small-object arenas are returned by CPython itself, on every system.
    """
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return
        ctypes.CDLL(None).malloc_trim(0)
    except (ValueError, OSError, AttributeError):
        pass


class AppProcess:
    """One app-role child, spawned as `python doordown.py app ...` (the app's own python,
    in its directory, with its environment and user), and its door."""

    def __init__(self, config, door_path, backend, template=None):
        self.config, self.door_path, self.backend = config, door_path, backend
        self.spec, self.args = config.spec, config.args
        self.template = template  # a _Template to fork it from, or None: a process of its own
        self.proc = None
        self.started = 0.0

    def start(self):
        import subprocess
        args, config = self.args, self.config
        allowed = list(args.allow_uid or ())
        if config.credentials is not None:
            allowed.append(os.geteuid())  # an app of another user still answers its front
        settings = {
            "app": self.spec, "door": self.door_path, "doors": self.backend.name,
            "transport": args.transport, "graceful_timeout": args.graceful_timeout,
            "timeout": args.timeout, "parent_pid": os.getpid(), "allow_uid": allowed,
            "reload": args.reload, "log_level": args.log_level}
        if self.template is not None:
            self.proc = _ForkedApp(self.template, self.template.spawn(settings, config.directory, config.env))
            self.started = time.monotonic()
            return self
        command = child_command("app", settings, python=config.python, compiled=config.credentials is None)
        extra = {}
        if config.credentials is not None:
            uid, gid, name = config.credentials
            extra = dict(user=uid, group=gid, extra_groups=[])
            if name is not None:
                extra["extra_groups"] = os.getgrouplist(name, gid)
        # Its own session: a Ctrl-C at the terminal reaches the front, which then stops
        # the app in order, after the requests in flight.
        self.proc = subprocess.Popen(command, start_new_session=True, cwd=config.directory,
                                     env=dict(os.environ, **config.env) if config.env else None, **extra)
        self.started = time.monotonic()
        return self

    @property
    def pid(self):
        return self.proc.pid

    def exited(self):
        return self.proc.poll() is not None

    def terminate(self):
        """Ask for a graceful stop: the app revokes its door and finishes its calls."""
        if not self.exited():
            self.proc.send_signal(signal.SIGTERM)
            self.proc.send_signal(signal.SIGCONT)  # a stopped (stuck) app must wake to act on it

    def kill(self):
        """SIGKILL, without waiting: the loop reaps it like any other exit."""
        if not self.exited():
            self.proc.kill()


# -- smart spawning: apps forked from a template (after Phusion Passenger) ----------------
#
# `--smart-spawn`: a site's apps that run on the front's own interpreter, as its own user,
# are forked from a template process that has imported doordown and frozen its objects
# (gc.freeze) but holds no thread and no door, so that they share those pages instead of
# each loading them anew (measured: 5 MB of PSS an app instead of 31).  The template is a
# fresh process of its own (the front has threads; fork and threads do not mix): it forks
# on request, reaps its children and reports their exits back.

def run_template(args):
    """The `template` role: fork app roles on the front's request, report their exits."""
    import gc
    channel = socket.socket(fileno=args.fd)
    gc.collect()
    gc.freeze()  # no reference count write makes a shared page the child's own
    buffered, children = b"", set()
    while True:
        if os.getppid() != args.parent_pid:
            for pid in children:  # the front is gone: so are its apps
                os.kill(pid, signal.SIGTERM)
            return 0
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if not pid:
                break
            children.discard(pid)
            channel.sendall(json.dumps({"exit": pid, "code": os.waitstatus_to_exitcode(status)}).encode() + b"\n")
        if not select.select([channel], [], [], 0.1)[0]:
            continue
        data = channel.recv(65536)
        if not data:
            return 0
        buffered += data
        while b"\n" in buffered:
            line, buffered = buffered.split(b"\n", 1)
            order = json.loads(line)
            try:
                pid = os.fork()
            except OSError as exc:
                channel.sendall(json.dumps({"failed": exc.strerror or str(exc)}).encode() + b"\n")
                continue
            if pid == 0:  # the app role: never returns into the template's loop
                code = 1
                try:
                    channel.close()
                    os.setsid()
                    if order["cwd"]:
                        os.chdir(order["cwd"])
                    os.environ.update(order["env"])
                    settings = order["settings"]
                    settings["front_pid"] = settings["parent_pid"]  # --reload asks the front
                    settings["parent_pid"] = os.getppid()  # its parent: the template
                    code = _run_child("app", settings) or 0
                except SystemExit as exc:
                    code = exc.code if isinstance(exc.code, int) else 1
                except BaseException:
                    traceback.print_exc()
                finally:
                    os._exit(code)
            children.add(pid)
            channel.sendall(json.dumps({"spawned": pid}).encode() + b"\n")


class _Template:
    """The front's side of the template role: spawn(), and the exits it reports."""

    def __init__(self):
        import subprocess
        ours, theirs = socket.socketpair()
        self.channel = ours
        self.exits = {}  # pid -> exit code, as Popen.returncode
        self.gone = False  # the template died: no exit of its children will be reported
        self.replies = queue.SimpleQueue()
        self.proc = subprocess.Popen([sys.executable, _SOURCE, "template",
                                      "--fd", str(theirs.fileno()), "--parent-pid", str(os.getpid())],
                                     pass_fds=[theirs.fileno()], start_new_session=True)
        theirs.close()
        threading.Thread(target=self._read, name="template-reader", daemon=True).start()

    def _read(self):
        signal.pthread_sigmask(signal.SIG_BLOCK, _SUPERVISOR_SIGNALS)
        for line in self.channel.makefile("rb"):
            report = json.loads(line)
            if "exit" in report:
                self.exits[report["exit"]] = report["code"]
            else:
                self.replies.put(report)
        self.gone = True
        self.replies.put({"failed": "the template process is gone"})

    def spawn(self, settings, cwd, env):
        """The pid of a new app role with `settings`; OSError if the template cannot make one."""
        if self.gone:
            raise OSError(errno.ESRCH, "the template process is gone")
        self.channel.sendall(json.dumps({"settings": settings, "cwd": cwd, "env": env}).encode() + b"\n")
        try:
            reply = self.replies.get(timeout=5)
        except queue.Empty:
            raise OSError(errno.ETIMEDOUT, "the template process does not answer")
        if "failed" in reply:
            raise OSError(errno.EAGAIN, reply["failed"])
        return reply["spawned"]

    def close(self):
        self.proc.terminate()
        self.proc.wait()
        self.channel.close()


class _ForkedApp:
    """What AppProcess keeps of a child (Popen's poll, wait, returncode, send_signal,
    kill), for an app role the template forked."""

    def __init__(self, template, pid):
        self.template, self.pid = template, pid

    @property
    def returncode(self):
        code = self.template.exits.get(self.pid)
        if code is None and self.template.gone:
            # Nobody will report its exit (its parent, the template, died): it is gone
            # once its pid is (reaped by init; it stops when it sees its parent gone).
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                code = self.template.exits.setdefault(self.pid, 1)
            except OSError:
                pass
        return code

    def poll(self):
        return self.returncode

    def wait(self, timeout=None):
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.returncode is None:
            if deadline is not None and time.monotonic() > deadline:
                import subprocess
                raise subprocess.TimeoutExpired("app pid %d" % self.pid, timeout)
            time.sleep(0.01)
        return self.returncode

    def send_signal(self, signum):
        if self.returncode is None:
            try:
                os.kill(self.pid, signum)
            except ProcessLookupError:
                pass

    def kill(self):
        self.send_signal(signal.SIGKILL)


def stop_together(processes, grace):
    """Ask every process to stop, then wait for all of them at once: one grace, not one each."""
    for process in processes:
        process.terminate()
    deadline = time.monotonic() + grace + 2
    while time.monotonic() < deadline and not all(process.exited() for process in processes):
        time.sleep(0.02)
    for process in processes:
        if not process.exited():
            _log("front", "app pid %d did not stop in time: killing it" % process.pid, "warning")
            process.kill()
    for process in processes:
        process.proc.wait()


def wait_for_door(upstream, timeout, process=None, cancelled=lambda: False):
    """Poll the door until it answers; False if `process` exits, `timeout` passes or `cancelled()`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not cancelled():
        if process is not None and process.exited():
            return False
        try:
            upstream.stats()
            return True
        except (DoorError, WireError, OSError, ValueError):
            time.sleep(0.02)
    return False


def _in_background(target, *args):
    """Run `target(*args)` on a daemon thread that blocks the supervisor's signals, so that
    none of them interrupts its door calls (EINTR would read as "the app is gone").
    False when no thread could be started: the caller tries again on its next turn."""
    def run():
        signal.pthread_sigmask(signal.SIG_BLOCK, _SUPERVISOR_SIGNALS)
        target(*args)
    try:
        threading.Thread(target=run, name="supervisor-" + target.__name__.strip("_"), daemon=True).start()
    except RuntimeError as exc:  # can't start new thread
        _log("front", "cannot start a thread (%s): trying again shortly" % exc, "warning")
        return False
    return True


class SpawnScore:
    """mod_fcgid's brake on crash loops: +1 per spawn, +2 per unplanned exit, -1 a second.

    No spawn is made while it would take the score over `limit`; the front answers 503
    meanwhile, so a crash loop costs a few processes a minute, not a spinning CPU.
    """

    limit = 10

    def __init__(self):
        self._score = 0.0
        self._at = time.monotonic()

    @property
    def value(self):
        now = time.monotonic()
        self._score = max(0.0, self._score - (now - self._at))
        self._at = now
        return self._score

    def add(self, points):
        self._score = self.value + points

    def allows_spawn(self):
        return self.value + 1 <= self.limit


_CALL_TIMEOUTS = (DoorTimeout, TimeoutError, socket.timeout)  # socket.timeout: Python 3.9


class _Boot:
    """A generation starting on a fresh door; a watcher thread sets `outcome` and says so."""

    def __init__(self, process, upstream, probe, deadline):
        self.process, self.upstream, self.probe, self.deadline = process, upstream, probe, deadline
        self.watched = False  # a watcher thread is running
        self.cancelled = False
        self.outcome = None  # "ready", "exited" or "timeout", once known

    def close(self):
        self.upstream.close()
        self.probe.close()


class _AppSlot:
    """One supervised application: its mount, serving process, boot, the ones retiring.

    Its state moves only on the supervisor's loop; the threads that wait on doors (boots,
    health checks) report there through the event queue.
    """

    def __init__(self, config, label=""):
        self.config, self.name, self.label = config, config.name, label  # label: "app NAME: "
        self.mount = Mount(config.prefix, host=config.host)
        self.process = None
        self.health = None  # a second door client with a short timeout, for health checks
        self.boot = None  # the _Boot under way, at most one
        self.retiring = []  # [(process, when to kill it)]
        self.generation = 0
        self.score = SpawnScore()
        self.checking = False  # a health check is under way
        self.next_check = 0.0
        self.failed_checks = 0  # health checks in a row that failed other than by a timeout
        self.wanted = config.spawn == "eager"  # to be running: eager, or asked for by a request
        self.held = False  # stopped by the control door: no request starts it
        self.removed = False  # gone from the configuration: draining, then dropped
        self.serving_since = 0.0
        self.stats = {}  # the last health check's figures
        self.last_exit = None  # how its last process ended, for `status`

    def state(self):
        if self.process is not None:
            return "running"
        if self.boot is not None:
            return "starting"
        if self.removed:
            return "removed"
        if self.held:
            return "stopped"
        return "refusing" if self.mount.refused else "idle"


class Supervisor:
    """`serve`: start the apps, run the front, then one loop that reaps, replaces and stops.

    Signal handlers, the control door and front threads only put events on a queue; this
    loop alone starts and stops processes, and it never waits on one.  Whatever waits on
    a door (a booting app, a health check) runs on a thread of its own and reports back
    through the queue, so a SIGTERM is acted on within a turn of the loop, whatever the
    apps are doing.  `apps` (from `serve --config`) makes a site of many apps; without it
    the command line's one app is the site, and a boot failure stops `serve`.
    """

    health_interval = 1.0  # seconds between checks for stuck requests
    health_timeout = 5.0  # an app that cannot answer its door within this is stuck
    turn = 0.1  # the loop's longest sleep: retirees' deadlines and respawns are this late at most

    def __init__(self, args, apps=None):
        self.args = args
        self.apps = apps
        self.single = apps is None
        self.backend = door_backend(args.doors)
        # signal numbers, ("replace", slot, why), ("booted", slot, boot), ("demand", slot),
        # ("health", slot, process, outcome, detail), ("control", command, app, answer)
        self.events = queue.SimpleQueue()
        self.door_dir = None
        self.front = None
        self.control = None  # the control door's server
        self.template = None  # with --smart-spawn, the _Template apps are forked from
        self.mount = None  # the one unsupervised mount (--app-door, cgi, inprocess)
        self.what = None  # what the front serves, for its start-up line
        self.slots = []
        self.exit_code = None  # set when serve must end: the first boot failed, or the app no longer loads
        self.forced = False  # the stop ran out of patience: apps are killed, not asked

    # -- boots ------------------------------------------------------------------
    def app_dir(self, slot):
        """Where an app's doors live: the private directory itself for the one app of the
        command line; else a directory of its own in it, 0700 and owned by the app's user,
        so that no app can reach another's door."""
        if self.single:
            return self.door_dir
        path = os.path.join(self.door_dir, slot.name)
        if not os.path.isdir(path):
            os.mkdir(path, 0o700)
            if slot.config.credentials is not None:
                os.chmod(self.door_dir, 0o711)  # the app may pass through to its own
                os.chown(path, *slot.config.credentials[:2])
        return path

    def start_boot(self, slot):
        """Start a new generation on a fresh door; it takes the traffic once it answers."""
        args = slot.config.args
        slot.generation += 1
        slot.score.add(1)
        try:
            path = os.path.join(self.app_dir(slot), "app-%d.%s" % (
                slot.generation, "door" if args.transport == "door" else "sock"))
            config = slot.config
            template = self.template if config.python is None and config.credentials is None else None
            process = AppProcess(config, path, self.backend, template).start()
        except OSError as exc:  # no process to be had (EAGAIN, EMFILE): the score paces retries
            _log("front", "%scannot start the app: %s" % (slot.label, exc), "error")
            if self.single and self.front is None:  # the first boot: a boot failure stops serve
                # An interpreter this user may not run (or that is not there) never will be:
                # the app cannot load.  A shortage of processes or descriptors may pass.
                transient = exc.errno in (errno.EAGAIN, errno.ENOMEM, errno.EMFILE, errno.ENFILE)
                self.exit_code = 1 if transient else EXIT_APP_LOAD
                return
            slot.score.add(2)
            slot.last_exit = "could not start: %s" % (exc.strerror or exc)
            if not self.single and slot.process is None:  # 503 at once, not at --boot-timeout
                slot.wanted = False
                slot.mount.replace(None, refused="the application could not be started")
            return
        slot.boot = _Boot(process, make_upstream(args.transport, path, self.backend, args.timeout),
                          make_upstream(args.transport, path, self.backend, self.health_timeout),
                          time.monotonic() + args.boot_timeout)
        slot.boot.watched = _in_background(self._watch_boot, slot, slot.boot)

    def _watch_boot(self, slot, boot):
        """A watcher thread: poll the new door until it answers, the app exits or time is up."""
        if wait_for_door(boot.probe, boot.deadline - time.monotonic(), boot.process,
                         lambda: boot.cancelled):
            boot.outcome = "ready"
        else:
            boot.outcome = "exited" if boot.process.exited() else "timeout"
        self.events.put(("booted", slot, boot))

    def cancel_boot(self, slot):
        boot, slot.boot = slot.boot, None
        if boot is not None:
            boot.cancelled = True
            boot.process.terminate()  # it has no requests to finish: it stops at once
            slot.retiring.append((boot.process, time.monotonic() + 5))
            boot.close()

    def boot_ended(self, slot, boot):
        if boot is not slot.boot or boot.cancelled:
            return
        slot.boot = None
        process, args = boot.process, slot.config.args
        if boot.outcome == "ready":
            old, old_upstream = slot.process, slot.mount.upstream
            if slot.health is not None:
                slot.health.close()
            slot.process, slot.health = process, boot.probe
            slot.failed_checks, slot.next_check = 0, time.monotonic() + self.health_interval
            slot.serving_since = slot.mount.last_used = time.monotonic()  # idle from now on
            import random
            limit = args.max_requests + random.randint(0, args.max_requests_jitter) if args.max_requests else 0
            slot.mount.replace(boot.upstream, limit)
            if old_upstream is not None:
                old_upstream.close()
            if old is not None:
                # SIGTERM: the old app revokes its door (calls not yet invoked come back to
                # the front, which sends them to the new one) and finishes the calls it runs.
                old.terminate()
                slot.retiring.append((old, time.monotonic() + args.graceful_timeout + 2))
            if self.front is None:
                self.start_front()
            elif not self.single:
                _log("front", "%spid %d serving at %s%s" % (slot.label, process.pid,
                     (slot.config.host or b"").decode(), slot.config.prefix or "/"))
            return
        boot.close()
        code = process.proc.returncode
        if boot.outcome == "timeout":
            _log("front", "%sapp pid %d did not answer on its door within %ss"
                 % (slot.label, process.pid, args.boot_timeout), "warning")
            process.kill()
            slot.retiring.append((process, float("inf")))  # killed already: only to be reaped
            slot.last_exit = "did not answer within --boot-timeout %ss" % args.boot_timeout
        else:
            slot.last_exit = "could not start (%s)" % _describe_exit(code)
            if code == EXIT_APP_LOAD:
                _log("front", "%sthe application failed to load (see above)" % slot.label, "error")
        slot.score.add(2)
        if slot.process is not None:
            _log("front", "%sthe replacement did not start; app pid %d keeps serving"
                 % (slot.label, slot.process.pid), "warning")
        elif not self.single:  # isolation: 503 for this app's mount only; a request retries
            why = "the application failed to load" if code == EXIT_APP_LOAD else "the application did not start"
            _log("front", "%s%s: answering 503 at its mount" % (slot.label, why), "error")
            slot.wanted = False
            slot.mount.replace(None, refused=why)
        elif self.front is None:  # the first boot: a boot failure stops serve, with its own code
            self.exit_code = code if code in (EXIT_APP_LOAD, EXIT_DOOR_FAILED) else 1
            if boot.outcome == "exited" and self.exit_code == 1:  # the others have said why
                _log("front", "the app exited before its door was ready (%s)" % _describe_exit(code), "error")
        elif code == EXIT_APP_LOAD:  # it loaded before and no longer does: no respawn loop
            self.exit_code = EXIT_APP_LOAD

    # -- health -----------------------------------------------------------------
    def _check_health(self, slot, process, health):
        """A checker thread: one stats call, retried once if it fails other than by timing out."""
        for attempt in (1, 2):
            try:
                outcome, detail = "stats", health.stats()
                break
            except _CALL_TIMEOUTS:
                outcome, detail = "timeout", None
                break
            except (NotDelivered, WireError) as exc:
                outcome, detail = "revoked", exc  # exiting: the loop reaps it
                break
            except Exception as exc:  # DoorGone, a reset socket, a reply that makes no sense
                outcome, detail = "failed", exc
                time.sleep(0.05 * attempt)
        self.events.put(("health", slot, process, outcome, detail))

    def health_checked(self, slot, process, outcome, detail):
        slot.checking = False
        slot.next_check = time.monotonic() + self.health_interval
        if process is not slot.process or process.exited():
            return
        args = slot.config.args
        slot.failed_checks = slot.failed_checks + 1 if outcome == "failed" else 0
        if outcome == "stats":
            slot.stats = detail
        if outcome == "timeout":
            self.replace(slot, "it does not answer its door within %ss" % self.health_timeout)
        elif outcome == "stats" and (detail.get("stuck") or 0) >= args.max_stuck:
            self.replace(slot, "%d requests ran past --timeout %ss" % (detail["stuck"], args.timeout))
        elif outcome == "stats" and detail.get("changed"):  # an app that may not signal us
            self.replace(slot, "%s changed (--reload)" % _log_text(str(detail["changed"])))
        elif slot.failed_checks >= 3:
            self.replace(slot, "its door keeps failing: %s" % detail)

    # -- the state machine ------------------------------------------------------
    def replace(self, slot, why):
        """Zero-loss replacement: the new generation takes new requests, then the old one retires."""
        if slot.process is None or slot.boot is not None:
            return  # a boot is under way already: it is the replacement
        _log("front", "%sreplacing app pid %d: %s" % (slot.label, slot.process.pid, why))
        self.start_boot(slot)

    def retire(self, slot, why, refused=None):
        """Stop serving the app without a replacement: requests wait (or get 503 if
        `refused`) while it finishes those it runs."""
        process, slot.process = slot.process, None
        upstream = slot.mount.upstream
        slot.mount.replace(None, refused=refused)
        if upstream is not None:
            upstream.close()  # its connections close as their calls return
        if slot.health is not None:
            slot.health.close()
            slot.health = None
        _log("front", "%sstopping app pid %d: %s" % (slot.label, process.pid, why))
        process.terminate()
        slot.retiring.append((process, time.monotonic() + slot.config.args.graceful_timeout + 2))
        slot.last_exit = why

    def demanded(self, slot):
        """A request found the app stopped: start it, if its spawn score allows."""
        if slot.removed or slot.held or slot.process is not None or slot.boot is not None:
            return
        slot.wanted = True
        if slot.mount.refused and slot.score.allows_spawn():
            slot.mount.replace(None)  # requests from now on wait for this boot

    def advance(self, slot):
        """One non-blocking step: reap, kill retirees past their grace, respawn, stop the
        idle, check health."""
        now = time.monotonic()
        for entry in list(slot.retiring):
            process, kill_at = entry
            if process.exited():
                slot.retiring.remove(entry)
            elif now > kill_at:
                _log("front", "%sretired app pid %d is still running: killing it" % (slot.label, process.pid), "warning")
                process.kill()
                slot.retiring[slot.retiring.index(entry)] = (process, float("inf"))
        process = slot.process
        if process is not None and process.exited():
            slot.process = None
            upstream = slot.mount.upstream
            slot.mount.replace(None)  # requests wait for the replacement
            if upstream is not None:
                upstream.close()  # its connections (its door descriptor) close as their calls return
            if slot.health is not None:
                slot.health.close()
                slot.health = None
            slot.score.add(2)
            slot.last_exit = _describe_exit(process.proc.returncode)
            _log("front", "%sapp pid %d exited (%s); starting a new one"
                 % (slot.label, process.pid, slot.last_exit), "warning")
        boot = slot.boot
        if boot is not None:
            if not boot.watched:
                boot.watched = _in_background(self._watch_boot, slot, boot)
            return
        config = slot.config
        if slot.process is None:
            if not slot.wanted or slot.removed or slot.held:
                return
            if not slot.score.allows_spawn():
                if not slot.mount.refused:
                    why = "the application keeps exiting; restarts paused (spawn score %.0f)" % slot.score.value
                    _log("front", slot.label + why + ": answering 503 meanwhile", "warning")
                    slot.mount.replace(None, refused=why)
                return
            self.start_boot(slot)
        elif config.idle_timeout and not slot.mount.active and now - slot.mount.last_used >= config.idle_timeout:
            slot.wanted = False  # its next request starts it again
            self.retire(slot, "idle for %gs" % config.idle_timeout)
        elif config.lifetime and now - slot.serving_since >= config.lifetime:
            self.replace(slot, "it has served its lifetime of %gs" % config.lifetime)
        elif not slot.checking and now >= slot.next_check:
            slot.checking = _in_background(self._check_health, slot, slot.process, slot.health)

    def add_slot(self, config):
        slot = _AppSlot(config, "" if self.single else "app %s: " % config.name)
        slot.mount.on_limit = lambda _mount: self.events.put(("replace", slot, "it served its --max-requests"))
        if not self.single:
            slot.mount.on_demand = lambda _mount: self.events.put(("demand", slot))
        self.slots.append(slot)
        return slot

    def remove_slot(self, slot, why):
        """Take an app out: its mount stops routing, its requests finish, it stops."""
        slot.removed, slot.wanted = True, False
        self.cancel_boot(slot)
        if slot.process is not None:
            self.retire(slot, why, refused="the application was removed")
        else:
            slot.mount.replace(None, refused="the application was removed")

    # -- the site: reload and control ---------------------------------------------
    def reload_site(self):
        """SIGHUP with --config: read the file again; add, remove and replace what changed."""
        try:
            args, apps = read_site(self.args.site, self.args.command_line)
        except ConfigError as exc:
            _log("front", "SIGHUP: %s; keeping the configuration loaded before" % exc, "error")
            return
        if args.serve_argv != self.args.serve_argv:
            _log("front", "SIGHUP: changes to [serve] take effect when serve is restarted", "warning")
        current = {slot.name: slot for slot in self.slots if not slot.removed}
        configs = {config.name: config for config in apps}
        added = []
        for name, slot in current.items():
            if name not in configs:
                self.remove_slot(slot, "removed from %s" % self.args.site)
        for name, config in configs.items():
            slot = current.get(name)
            if slot is not None and config.settings == slot.config.settings:
                continue  # unchanged: it keeps its process
            if slot is not None and (config.prefix, config.host) != (slot.config.prefix, slot.config.host):
                self.remove_slot(slot, "moved to another mount")  # a new slot takes the new one
                slot = None
            if slot is None:
                added.append(self.add_slot(config))
            else:
                slot.config = config
                slot.wanted = slot.wanted or config.spawn == "eager"
                if slot.process is not None:
                    self.replace(slot, "its configuration changed")
        self.front.set_mounts([slot.mount for slot in self.slots if not slot.removed])
        for slot in added:  # said once its mount routes, so that a request after the line finds it
            _log("front", "%sadded at %s%s" % (slot.label, (slot.config.host or b"").decode(),
                                                slot.config.prefix or "/"))

    def start_control(self):
        """The control door (0600): `status`, `reload|stop|start APP` from the front's user."""
        path = self.args.control
        try:
            # A door left by a serve that was killed is replaced (by the backend, which
            # probes it first); one a running serve answers on is not.
            self.control = self.backend.serve(path, self.control_call)
            os.chmod(path, 0o600)
        except OSError as exc:
            _log("front", "cannot make the control door %s: %s" % (path, exc.strerror or exc), "error")
            self.exit_code = 1

    def control_call(self, data, fds, caller):
        """A control door call (on a door thread): JSON in, JSON out."""
        _close_fds(fds)
        if caller.euid not in (os.geteuid(), 0):
            return json.dumps({"error": "euid %d may not control this serve" % caller.euid}).encode(), []
        try:
            call = json.loads(data)
            command, name = call["command"], call.get("app")
        except (ValueError, KeyError, TypeError):
            return json.dumps({"error": "not a control call"}).encode(), []
        if command == "status":
            return json.dumps({"apps": self.status()}).encode(), []
        if command not in ("reload", "stop", "start"):
            return json.dumps({"error": "unknown command %r" % command}).encode(), []
        answer = queue.SimpleQueue()
        self.events.put(("control", command, name, answer))
        try:
            return json.dumps(answer.get(timeout=10)).encode(), []
        except queue.Empty:
            return json.dumps({"error": "the supervisor did not answer"}).encode(), []

    def controlled(self, command, name, answer):
        """The loop's side of `reload|stop|start APP`."""
        slot = next((slot for slot in self.slots if slot.name == name and not slot.removed), None)
        if slot is None:
            names = ", ".join(slot.name for slot in self.slots if not slot.removed)
            answer.put({"error": "no application %r (there are: %s)" % (name, names)})
            return
        if command == "reload":
            if slot.process is None:
                answer.put({"message": "%s is not running: its next request starts it" % name})
                return
            self.replace(slot, "reload from the control door")
            answer.put({"message": "%s: a new process replaces pid %d" % (name, slot.process.pid)})
        elif command == "stop":
            slot.held, slot.wanted = True, False
            self.cancel_boot(slot)
            why = "the application is stopped (doordown start %s starts it)" % name
            if slot.process is not None:
                self.retire(slot, "stopped from the control door", refused=why)
            else:
                slot.mount.replace(None, refused=why)
            answer.put({"message": "%s stopped; its mount answers 503" % name})
        else:
            slot.held, slot.wanted = False, True
            if slot.process is None:
                slot.mount.replace(None)  # no longer refused: requests wait for the start
            answer.put({"message": "%s starting" % name if slot.process is None else "%s is running" % name})

    def status(self):
        """One entry an app: what `doordown.py status` prints (read off the loop's thread)."""
        now, rows = time.monotonic(), []
        for slot in list(self.slots):
            process = slot.process
            facts = process_facts(process.pid, memory=False) if process is not None else None
            stats = slot.stats if process is not None else {}
            rows.append({
                "app": slot.name, "state": slot.state(),
                "mount": (slot.config.host or b"").decode() + (slot.config.prefix or "/"),
                "pid": process.pid if process is not None else None,
                "uptime": round(now - slot.serving_since, 1) if process is not None else None,
                "requests": stats.get("requests"), "threads": stats.get("threads"),
                "rss": facts.rss if facts is not None else None,
                "spawn_score": round(slot.score.value, 1), "last_exit": slot.last_exit})
        return rows

    # -- the loop ---------------------------------------------------------------
    def run(self):
        for signum in _SUPERVISOR_SIGNALS:
            signal.signal(signum, lambda signum, _frame: self.events.put(signum))
        self.door_dir = self.args.private_dir
        compile_for_children(self.door_dir)
        try:
            return self._run()
        finally:
            if self.control is not None:
                self.control.close(1.0)
            processes = []
            for slot in self.slots:
                if slot.boot is not None:
                    slot.boot.cancelled = True
                    processes.append(slot.boot.process)
                    slot.boot.close()
                processes += [process for process, _ in slot.retiring]
                if slot.process is not None:
                    processes.append(slot.process)
            if self.forced:
                for process in processes:
                    process.kill()
            stop_together(processes, self.args.graceful_timeout)
            if self.template is not None:
                self.template.close()
            for slot in self.slots:
                for upstream in (slot.mount.upstream, slot.health):
                    if upstream is not None:
                        upstream.close()

    def start_front(self):
        """Take connections on the listeners bound at start-up: for one app, once it answers;
        for a site, at once (its apps start when they are asked for, or eagerly meanwhile)."""
        args = self.args
        limits = Limits(max_connections=args.max_connections, max_body=args.max_body,
                        keepalive=args.keepalive, header_timeout=args.header_timeout,
                        body_timeout=args.body_timeout, min_body_rate=args.min_body_rate,
                        stream_idle_timeout=args.stream_idle_timeout,
                        max_line=args.max_line, max_headers=args.max_headers,
                        max_header_size=args.max_header_size)
        static = [StaticFiles(prefix, root, args.static_index or ()) for prefix, root in args.static_map or ()]
        self.front = FrontServer(args.listeners, [slot.mount for slot in self.slots] or [self.mount],
                                 limits, args.access_logger, args.forwarded_allow_ips,
                                 upstream_wait=args.timeout if self.single else args.boot_timeout, static=static,
                                 tls=args.tls)
        release_free_memory()  # what compiling and start-up left behind
        threading.Thread(target=self.front.serve_forever, name="front-accept", daemon=True).start()
        what = self.what
        if self.single and self.slots:
            slot = self.slots[0]
            what = "%s (app pid %d, door %s)" % (what, slot.process.pid, slot.process.door_path)
        _log("front", "serving %s at %s through %s"
             % (what, " and ".join(listener.url() for listener in args.listeners),
                transport_description(args.transport, self.backend)))
        sd_notify(args.notify_socket, "READY=1")

    def _run(self):
        args = self.args
        if args.app_door:
            self.mount = Mount("", make_upstream(args.transport, args.app_door, self.backend, args.timeout),
                               supervised=False)
            if not wait_for_door(self.mount.upstream, args.boot_timeout):
                _log("front", "no application answers on door %s" % args.app_door, "error")
                return 1
            self.what = "the application on door %s" % args.app_door
        elif args.transport in ("cgi", "inprocess"):  # no app process to supervise
            try:
                self.mount = Mount("", make_upstream(args.transport, args.app, self.backend, args.timeout),
                                   supervised=False)
            except AppLoadError as exc:
                _log("front", "cannot load the application: %s" % exc, "error")
                return EXIT_APP_LOAD
            self.what = args.app or "the built-in hello app"
        elif self.single:
            self.what = args.app or "the built-in hello app"
            self.start_boot(self.add_slot(AppConfig("app", args.app, args)))
        else:
            if args.control:  # before any app or the front starts: a failure stops serve here
                self.start_control()
                if self.exit_code is not None:
                    return self.exit_code
            if args.smart_spawn:
                self.template = _Template()
            for config in self.apps:
                slot = self.add_slot(config)
                if slot.wanted:
                    self.start_boot(slot)
            self.what = "%d applications of %s (%s)" % (len(self.apps), args.site,
                                                       ", ".join(config.name for config in self.apps))
        if not self.single or not self.slots:
            self.start_front()
        while self.exit_code is None:
            try:
                event = self.events.get(timeout=self.turn)
            except queue.Empty:
                event = None
            front = self.front  # None until the first app answers
            if event in (signal.SIGTERM, signal.SIGINT):
                return self.stop(event)
            if event == signal.SIGHUP:
                if self.single:
                    for slot in self.slots:
                        self.replace(slot, "SIGHUP")
                else:
                    self.reload_site()
                    if args.reload:  # an app's source changed (which, SIGHUP does not say)
                        for slot in self.slots:
                            if not slot.removed and slot.process is not None:
                                self.replace(slot, "SIGHUP (--reload)")
                if front is not None and front.tls is not None and front.tls.reload():
                    _log("front", "SIGHUP: TLS certificate reloaded for new connections")
            elif event == signal.SIGUSR1:
                if args.access_logger is not None:
                    args.access_logger.reopen()
            elif event in (signal.SIGTTIN, signal.SIGTTOU):
                _log("front", "%s ignored: the OS sizes the door thread pool, there are no workers "
                              "to add or remove" % signal.Signals(event).name)
            elif isinstance(event, tuple) and event[0] == "replace":
                self.replace(event[1], event[2])
            elif isinstance(event, tuple) and event[0] == "booted":
                self.boot_ended(event[1], event[2])
            elif isinstance(event, tuple) and event[0] == "health":
                self.health_checked(*event[1:])
            elif isinstance(event, tuple) and event[0] == "demand":
                self.demanded(event[1])
            elif isinstance(event, tuple) and event[0] == "control":
                self.controlled(*event[1:])
            if self.exit_code is None:
                for slot in self.slots:
                    self.advance(slot)
                self.slots = [slot for slot in self.slots if not (
                    slot.removed and slot.process is None and slot.boot is None and not slot.retiring)]
        if self.front is not None:
            self.front.stop_accepting()
        return self.exit_code

    def stop(self, signum):
        """Graceful stop: no new connections; requests already sent get their answers."""
        sd_notify(self.args.notify_socket, "STOPPING=1")
        for slot in self.slots:  # a boot has no requests to finish: it stops at once
            if slot.boot is not None:
                slot.boot.cancelled = True
                slot.boot.process.terminate()
        grace, front = self.args.graceful_timeout, self.front
        if front is None:
            _log("front", "%s: stopping before the front started" % signal.Signals(signum).name)
            return 0
        _log("front", "%s: finishing %d request(s) in flight (up to %ss; again to force)"
             % (signal.Signals(signum).name, front.in_flight, grace))
        front.stop_accepting()
        now = time.monotonic()
        deadline = now + grace
        # Idle keep-alive connections get a moment to send the request that may already be
        # on its way; it is answered with `Connection: close`.  Then they are closed.
        linger_until = now + min(1.0, self.args.keepalive)
        while front.open_connections:
            if time.monotonic() >= deadline and not front.ending_streams:
                # Streams have had their time: they end within a moment, as incomplete (no
                # last chunk, then the close); whatever is still running then is forced.
                front.ending_streams = True
                deadline += 1.0
            elif time.monotonic() >= deadline:
                self.forced = True
                _log("front", "grace period over: forced stop with %d request(s) in flight" % front.in_flight, "warning")
                break
            if time.monotonic() >= linger_until:
                front.close_idle()
            try:
                if self.events.get(timeout=0.05) in (signal.SIGTERM, signal.SIGINT):
                    self.forced = True
                    _log("front", "forced stop with %d request(s) in flight" % front.in_flight, "warning")
                    break
            except queue.Empty:
                pass
        return 0


def run_control(args):
    """`status`, `reload APP`, `stop APP`, `start APP`: one call on a serve's control door."""
    call = {"command": args.command}
    if getattr(args, "app", None):
        call["app"] = args.app
    try:
        client = door_backend(args.doors).open(args.control, timeout=15)
        try:
            reply, fds = client.call(json.dumps(call).encode())
        finally:
            client.close()
        _close_fds(fds)
        answer = json.loads(reply)
    except (DoorError, OSError, ValueError) as exc:
        sys.stderr.write("doordown: error: no serve answers on %s: %s\n"
                         % (args.control, getattr(exc, "strerror", None) or exc))
        return 1
    if "error" in answer:
        sys.stderr.write("doordown: error: %s\n" % answer["error"])
        return 1
    if args.command != "status":
        print(answer["message"])
    elif args.json:
        print(json.dumps(answer["apps"], indent=1))
    else:
        def shown(value, form="%s"):
            return "-" if value is None else form % value
        print("%-16s %-9s %-24s %7s %9s %9s %7s %9s %5s  %s" % (
            "APP", "STATE", "MOUNT", "PID", "UPTIME", "REQUESTS", "THREADS", "RSS", "SCORE", "LAST EXIT"))
        for row in answer["apps"]:
            print("%-16s %-9s %-24s %7s %9s %9s %7s %9s %5s  %s" % (
                row["app"], row["state"], row["mount"], shown(row["pid"]), shown(row["uptime"], "%.0fs"),
                shown(row["requests"]), shown(row["threads"]),
                shown(row["rss"] and row["rss"] / 1048576, "%.1fM"), row["spawn_score"],
                shown(row["last_exit"])))
    return 0


def _describe_exit(code):
    if code < 0:
        try:
            return "killed by %s" % signal.Signals(-code).name
        except ValueError:
            return "killed by signal %d" % -code
    return "exit code %d" % code


def app_stats(door_path, doors="auto"):
    """The app role's figures over its door: pid, door threads, requests served."""
    upstream = DoorUpstream(door_backend(doors), door_path)
    try:
        return upstream.stats()
    finally:
        upstream.close()


###############################################################################
# Benchmark ##################################################################
###############################################################################
#
# `doordown.py bench`: every transport, and the in-process reference, against the same
# workloads under the same load, measured the same way.  For each workload and transport
# it starts `serve`, checks the answer (status and exact body) before timing anything,
# measures the idle stack, then for each concurrency: warms up, runs the load, and reads
# requests/s, p50/p99 latency, errors and non-2xx from the load generator; CPU seconds
# of the whole stack (front, app, children) from the kernel's accounting; RSS and PSS of
# the whole stack idle and at peak; the app's thread count at the end.
#
# Load: wrk when it is on PATH (a Python client under-reports a Python server), else a
# built-in generator: forked processes, raw sockets, keep-alive.  --pinned puts the server
# stack on CPU 0 and the load on CPU 1; free (the default) lets the OS place them.  The two
# rank servers differently (threaded Python servers gain most from pinning, multi-process ones from running free): never compare across them.

def block_2ms_app(environ, start_response):
    """The I/O-bound workload: blocks 2 ms, as a query to a database would."""
    time.sleep(0.002)
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "12")])
    return [b"Slept 2 ms.\n"]


_PAYLOAD_64K = bytes(range(256)) * 256


def payload_64k_app(environ, start_response):
    """The bulk workload: a 64 KiB response."""
    start_response("200 OK", [("Content-Type", "application/octet-stream"),
                              ("Content-Length", str(len(_PAYLOAD_64K)))])
    return [_PAYLOAD_64K]


def stream_bench_app(environ, start_response):
    """The streaming workloads of `bench --streams`: /event, one server-sent event at once
    (then the stream ends); /big?mib=N, N MiB generated in 64 KiB chunks; /file?path=P, the
    file P through wsgi.file_wrapper."""
    path, query = environ["PATH_INFO"], environ.get("QUERY_STRING", "")
    if path == "/file":
        f = open(unquote_to_bytes(query.partition("path=")[2].encode()).decode(), "rb")
        start_response("200 OK", [("Content-Type", "application/octet-stream"),
                                  ("Content-Length", str(os.fstat(f.fileno()).st_size))])
        return environ["wsgi.file_wrapper"](f, 1 << 16)
    mib = int(query.partition("mib=")[2] or 0)
    start_response("200 OK", [("Content-Type", "text/event-stream" if path == "/event"
                               else "application/octet-stream")])

    def body():
        if path == "/event":
            yield b"data: hello\n\n"
        for _ in range(mib * 16):
            yield _PAYLOAD_64K
    return body()


def _time_to_first_event(port, count):
    """Seconds from sending a request to the first event of its stream, for `count` requests."""
    times = []
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(count):
            started = time.monotonic()
            sock.sendall(b"GET /event HTTP/1.1\r\nHost: bench\r\n\r\n")
            data = b""
            while b"data: hello" not in data:
                more = sock.recv(65536)
                if not more:
                    raise RuntimeError("the stream closed before its first event")
                data += more
            times.append(time.monotonic() - started)
            while not data.endswith(LAST_CHUNK):
                more = sock.recv(65536)
                if not more:
                    raise RuntimeError("the stream broke off")
                data += more
    return sorted(times)


def _download_rate(port, target, size, root):
    """(MB/s, peak RSS growth of the stack in MB) of an HTTP/1.0 download of `size` bytes."""
    base = sum(facts.rss for facts in map(process_facts, process_tree(root)) if facts)
    peak = base
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        started = time.monotonic()
        sock.sendall(b"GET %s HTTP/1.0\r\n\r\n" % target)
        buffer = bytearray(1 << 20)
        received, calls = 0, 0
        while True:
            got = sock.recv_into(buffer)
            if not got:
                break
            received += got
            calls += 1
            if calls % 256 == 0:
                peak = max(peak, sum(facts.rss for facts in map(process_facts, process_tree(root)) if facts))
        elapsed = time.monotonic() - started
    if received < size:
        raise RuntimeError("%s: %d bytes of %d" % (target.decode(), received, size))
    return size / elapsed / 1e6, (peak - base) / 1e6


def run_streams(args):
    """`bench --streams`: per transport, the time to a stream's first event (c=1, one
    keep-alive connection; CGI a tenth as many, each a new process), and the rate (MB/s)
    and peak memory growth of the whole stack for a generated stream and for a
    wsgi.file_wrapper file (by descriptor and sendfile on the door and in-process)."""
    import tempfile
    count = 200 if not args.quick else 50
    mib = 256 if not args.quick else 64
    rows = []
    with tempfile.TemporaryDirectory(prefix="doordown-bench-") as directory:
        path = os.path.join(directory, "payload")
        with open(path, "wb") as f:
            for _ in range(mib * 16):
                f.write(_PAYLOAD_64K)
        file_target = b"/file?path=" + urllib_quote(path).encode()
        for transport in args.transports:
            server = BenchServer(transport, "doordown:stream_bench_app", args.doors, None).start()
            try:
                _download_rate(server.port, file_target, mib << 20, server.proc.pid)  # warm the cache
                times = _time_to_first_event(server.port, count if transport != "cgi" else count // 10)
                stream_rate, stream_rss = _download_rate(server.port, b"/big?mib=%d" % mib, mib << 20,
                                                         server.proc.pid)
                file_rate, file_rss = _download_rate(server.port, file_target, mib << 20, server.proc.pid)
                row = {"transport": transport, "first_event_p50_ms": times[len(times) // 2] * 1000,
                       "first_event_p99_ms": times[int(len(times) * 0.99)] * 1000,
                       "stream_mb_per_s": stream_rate, "stream_rss_growth_mb": stream_rss,
                       "file_mb_per_s": file_rate, "file_rss_growth_mb": file_rss}
            except (RuntimeError, OSError) as exc:
                row = {"transport": transport, "failed": str(exc)}
            finally:
                server.stop()
            rows.append(row)
            _log("bench", "streams over %s: %s" % (transport, row))
    lines = ["| transport | first event p50 ms | p99 ms | generated %d MiB: MB/s | RSS growth MB "
             "| file %d MiB: MB/s | RSS growth MB |" % (mib, mib), "|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        if "failed" in row:
            lines.append("| %s | failed: %s |||||" % (row["transport"], row["failed"]))
            continue
        lines.append("| %s | %.2f | %.2f | %.0f | %.1f | %.0f | %.1f |" % (
            row["transport"], row["first_event_p50_ms"], row["first_event_p99_ms"], row["stream_mb_per_s"],
            row["stream_rss_growth_mb"], row["file_mb_per_s"], row["file_rss_growth_mb"]))
    sys.stdout.write("\n".join(lines) + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": " ".join(["python3 doordown.py bench"] + args.argv), "streams": rows},
                      f, indent=1)
            f.write("\n")
    return 0 if all("failed" not in row for row in rows) else 1


# name -> (application spec, the exact body every answer must have)
BENCH_WORKLOADS = collections.OrderedDict((
    ("hello", (None, b"Well, hello to you too!\n")),
    ("block-2ms", ("doordown:block_2ms_app", b"Slept 2 ms.\n")),
    ("64k", ("doordown:payload_64k_app", _PAYLOAD_64K)),
))


# -- what the stack uses: CPU, memory, threads, from the kernel ----------------------

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
# illumos psinfo_t (sys/procfs.h), LP64, up to pr_ctime: pr_flag, pr_nlwp, pr_pid, pr_ppid,
# pr_pgid, pr_sid, pr_uid, pr_euid, pr_gid, pr_egid (int); pr_addr, pr_size, pr_rssize,
# pr_pad1, pr_ttydev (8 bytes each); pr_pctcpu, pr_pctmem (ushort), 4 bytes of padding;
# pr_start, pr_time, pr_ctime (timestruc_t: seconds, nanoseconds).  136 bytes.
_PSINFO = struct.Struct("=10i5Q2H4x6q")

ProcessFacts = collections.namedtuple("ProcessFacts", "ppid cpu rss pss threads")
_HAVE_SMAPS_ROLLUP = os.path.exists("/proc/self/smaps_rollup")


def _linux_facts(pid, memory=True):
    """ProcessFacts from /proc/PID/stat (and smaps_rollup for RSS and PSS), or None if gone."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()  # the command name may hold spaces
        # fields[0] is field 3 of proc(5): ppid 4, utime 14, stime 15, cutime 16, cstime 17,
        # num_threads 20, rss 24 (pages); cutime/cstime hold the children it has reaped.
        if fields[0] == b"Z":
            return None
        cpu = sum(int(x) for x in fields[11:15]) / _CLOCK_TICKS
        rss = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
        pss = None
        if memory and _HAVE_SMAPS_ROLLUP:  # Linux 4.14 and later; before, RSS from stat, no PSS
            with open("/proc/%d/smaps_rollup" % pid, "rb") as f:
                for line in f:
                    if line.startswith(b"Rss:"):
                        rss = int(line.split()[1]) * 1024
                    elif line.startswith(b"Pss:"):
                        pss = int(line.split()[1]) * 1024
        return ProcessFacts(int(fields[1]), cpu, rss, pss, int(fields[17]))
    except (OSError, IndexError, ValueError):
        return None


def _illumos_facts(pid):
    """ProcessFacts from /proc/PID/psinfo (illumos has no PSS: pss is None), or None if gone.

    Written from illumos' sys/procfs.h for a 64-bit Python; it cannot run off illumos, so
    it has not run here.
    """
    try:
        with open("/proc/%d/psinfo" % pid, "rb") as f:
            data = f.read(_PSINFO.size)
        fields = _PSINFO.unpack(data)
    except (OSError, struct.error):
        return None
    nlwp, ppid, rss_kb = fields[1], fields[3], fields[12]
    time_s, time_ns, ctime_s, ctime_ns = fields[-4:]
    if nlwp == 0:
        return None  # a zombie
    return ProcessFacts(ppid, time_s + ctime_s + (time_ns + ctime_ns) / 1e9, rss_kb * 1024, None, nlwp)


def process_facts(pid, memory=True):
    """ProcessFacts of one process, or None if it is gone; memory=False skips PSS (cheaper)."""
    if is_illumos():
        return _illumos_facts(pid) if struct.calcsize("P") == 8 else None
    return _linux_facts(pid, memory)


def process_tree(*roots):
    """The `roots` and every live descendant of them, from the parent links in /proc."""
    children = collections.defaultdict(list)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            facts = process_facts(int(entry), memory=False)
            if facts is not None:
                children[facts.ppid].append(int(entry))
    tree, todo = [], list(roots)
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


def user_and_system_cpu(pid):
    """(user, system) CPU seconds of the process `pid` itself, or None (gone, or not Linux)."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return int(fields[11]) / _CLOCK_TICKS, int(fields[12]) / _CLOCK_TICKS  # utime, stime
    except (OSError, IndexError, ValueError):
        return None


StackUsage = collections.namedtuple("StackUsage", "cpu rss pss processes")


def stack_usage(*roots):
    """CPU seconds, RSS and PSS (None where not known) summed over process trees."""
    cpu = rss = pss = processes = 0
    for pid in process_tree(*roots):
        facts = process_facts(pid)
        if facts is None:
            continue
        processes += 1
        cpu += facts.cpu
        rss += facts.rss
        pss = None if pss is None or facts.pss is None else pss + facts.pss
    return StackUsage(cpu, rss, pss, processes)


def _pin(cpus):
    """A preexec_fn binding the child (and all it starts) to `cpus`; None if not pinning.

    Linux: sched_setaffinity before exec, so no thread ever runs elsewhere.  illumos has no
    sched_setaffinity; the child is bound after it starts instead (see _pin_started).
    """
    if not cpus or not hasattr(os, "sched_setaffinity"):
        return None
    return lambda: os.sched_setaffinity(0, cpus)


def _pin_started(pid, cpus):
    """illumos: bind a started process to one CPU with pbind(1M); its LWPs and children follow."""
    if cpus and is_illumos():
        import shutil
        import subprocess
        pbind = shutil.which("pbind") or "/usr/sbin/pbind"  # /usr/sbin is often off a user's PATH
        subprocess.run([pbind, "-b", str(min(cpus)), str(pid)], stdout=subprocess.DEVNULL, check=False)


# -- load generators ---------------------------------------------------------------

LoadResult = collections.namedtuple("LoadResult", "requests seconds latencies errors non_2xx")

_WRK_REPORT = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("DOORDOWN-WRK %d %d %d %d %d %d\\n", summary.requests, summary.duration,
    math.floor(latency:percentile(50)), math.floor(latency:percentile(99)),
    e.connect + e.read + e.write + e.timeout, e.status))
end
"""


class WrkLoad:
    """wrk (keep-alive, C, epoll): the load generator to trust for ceilings."""

    name = "wrk"

    def __init__(self, path, pinned, cpus):
        import subprocess
        import tempfile
        self.path, self.cpus = path, cpus
        self.threads = 1 if pinned else (os.cpu_count() or 2)
        self.script = tempfile.NamedTemporaryFile("w", prefix="doordown-wrk-", suffix=".lua", delete=False)
        self.script.write(_WRK_REPORT)
        self.script.close()
        version = subprocess.run([path, "--version"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.version = version.stdout.decode("utf-8", "replace").split("\n", 1)[0].split(" Copyright")[0]

    def describe(self):
        return "%s, -t%d" % (self.version, self.threads)

    def start(self, port, connections, seconds):
        import subprocess
        # wrk takes whole seconds; --timeout so that slow transports count as slow, not failed
        command = [self.path, "-t%d" % min(self.threads, connections), "-c%d" % connections,
                   "-d%ds" % max(1, round(seconds)), "--timeout", "30s", "-s", self.script.name,
                   "http://127.0.0.1:%d/" % port]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, preexec_fn=_pin(self.cpus))
        _pin_started(process.pid, self.cpus)
        return process

    def running(self, process):
        return process.poll() is None

    def result(self, process):
        output = process.communicate()[0].decode("utf-8", "replace")
        match = re.search(r"DOORDOWN-WRK (\d+) (\d+) (\d+) (\d+) (\d+) (\d+)", output)
        if match is None:
            raise RuntimeError("wrk failed: %s" % output.strip()[-300:])
        requests, micros, p50, p99, errors, bad_status = map(int, match.groups())
        # wrk counts statuses of 400 and over as errors.status: reported as non-2xx
        return LoadResult(requests, micros / 1e6, (p50, p99), errors, bad_status)

    def close(self):
        os.unlink(self.script.name)


class _LoadConnection:
    """One keep-alive connection of a built-in load process, one request in flight."""

    __slots__ = ("sock", "buf", "sent", "end", "closing", "answered")

    def __init__(self, sock, sent):
        self.sock, self.sent = sock, sent
        self.buf = bytearray()
        self.end = -1  # where the response in buf ends, once its head is parsed
        self.closing = False
        self.answered = False  # a connection never answered may never have been accepted


def _load_worker(port, connections, seconds, out_path):
    """One built-in load process: `connections` keep-alive connections, one request in flight
    on each, for `seconds`; writes its counts and latencies (µs) to `out_path`."""
    import selectors
    request = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % port
    content_length = re.compile(rb"\r\ncontent-length: *([0-9]+)")
    selector = selectors.DefaultSelector()
    latencies = array.array("I")
    counts = {"requests": 0, "errors": 0, "non_2xx": 0, "unaccepted": 0}
    clock = time.perf_counter

    def connect():
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(request)
        except OSError:
            counts["unaccepted"] += 1  # refused, or reset by a listener that has closed
            return
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ, _LoadConnection(sock, clock()))

    def reconnect(conn, failed):
        counts["errors" if conn.answered else "unaccepted"] += failed
        selector.unregister(conn.sock)
        conn.sock.close()
        connect()

    for _ in range(connections):
        connect()
    began = time.monotonic()
    deadline = began + seconds
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not selector.get_map():
            break
        for key, _ in selector.select(left):
            conn = key.data
            try:
                data = conn.sock.recv(262144)
            except OSError:
                data = b""
            if not data:
                reconnect(conn, 1)
                continue
            conn.buf += data
            if conn.end < 0:
                head_end = conn.buf.find(b"\r\n\r\n")
                if head_end < 0:
                    continue
                head = bytes(conn.buf[:head_end]).lower()
                length = content_length.search(head)
                if length is None:  # every workload answers with a length: anything else is wrong
                    reconnect(conn, 1)
                    continue
                conn.end = head_end + 4 + int(length.group(1))
                conn.closing = b"\r\nconnection: close" in head
                if not head.startswith(b"http/1.1 2"):
                    counts["non_2xx"] += 1
            if len(conn.buf) < conn.end:
                continue
            now = clock()
            latencies.append(min(int((now - conn.sent) * 1e6), 0xFFFFFFFF))
            counts["requests"] += 1
            conn.answered = True
            if conn.closing:
                reconnect(conn, 0)
                continue
            del conn.buf[:conn.end]
            conn.sent, conn.end = now, -1
            try:
                conn.sock.send(request)
            except OSError:
                reconnect(conn, 1)
    counts["seconds"] = time.monotonic() - began
    with open(out_path, "wb") as out:
        out.write(json.dumps(counts).encode() + b"\n")
        out.write(latencies.tobytes())


class BuiltinLoad:
    """The stdlib load generator: forked processes, raw sockets, keep-alive.  Fine for slow
    servers and for latency at low concurrency; it competes with the server for the CPUs and
    tops out far below wrk, so do not read ceilings from it."""

    name = "builtin"

    def __init__(self, pinned, cpus):
        self.cpus = cpus
        self.processes = 1 if pinned else (os.cpu_count() or 2)

    def describe(self):
        return "built-in (stdlib, %d process%s, keep-alive)" % (self.processes, "" if self.processes == 1 else "es")

    def start(self, port, connections, seconds):
        import tempfile
        workers = []
        count = min(self.processes, connections)
        for i in range(count):
            share = connections // count + (1 if i < connections % count else 0)
            fd, out_path = tempfile.mkstemp(prefix="doordown-load-")
            os.close(fd)
            pid = os.fork()
            if pid == 0:  # the worker: never returns into the caller's code
                code = 0
                try:
                    if self.cpus and hasattr(os, "sched_setaffinity"):
                        os.sched_setaffinity(0, self.cpus)
                    _load_worker(port, share, seconds, out_path)
                except BaseException:
                    traceback.print_exc()
                    code = 1
                finally:
                    os._exit(code)
            _pin_started(pid, self.cpus)
            workers.append([pid, out_path, None])
        return workers

    def running(self, workers):
        for worker in workers:
            if worker[2] is None:
                pid, status = os.waitpid(worker[0], os.WNOHANG)
                if pid:
                    worker[2] = status
        return any(worker[2] is None for worker in workers)

    def result(self, workers):
        requests = errors = non_2xx = 0
        rate = 0.0
        latencies = array.array("I")
        for pid, out_path, status in workers:
            if status is None:
                os.waitpid(pid, 0)
            with open(out_path, "rb") as f:
                counts = json.loads(f.readline())
                latencies.frombytes(f.read())
            os.unlink(out_path)
            requests += counts["requests"]
            errors += counts["errors"] + counts["unaccepted"]
            non_2xx += counts["non_2xx"]
            rate += counts["requests"] / counts["seconds"]
        ordered = sorted(latencies)
        percentiles = tuple(ordered[int(q * (len(ordered) - 1))] if ordered else 0 for q in (0.5, 0.99))
        return LoadResult(requests, requests / rate if rate else 0.0, percentiles, errors, non_2xx)

    def close(self):
        pass


# -- one server stack under test ----------------------------------------------------

class BenchServer:
    """`doordown.py serve` for one transport and workload, on a free port; its log in a file."""

    def __init__(self, transport, spec, doors, cpus, options=()):
        import tempfile
        self.transport, self.spec, self.doors, self.cpus = transport, spec, doors, cpus
        self.options = list(options)
        self.log = tempfile.TemporaryFile()
        self.proc = None
        self.port = None
        self.app_pid = None

    def start(self, timeout=60):
        import subprocess
        command = [sys.executable, os.path.abspath(__file__), "serve", "--transport", self.transport,
                   "--bind", "127.0.0.1:0", "--access-log", "off", "--doors", self.doors] + self.options
        if self.spec:
            command.append(self.spec)
        self.proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=self.log,
                                     stderr=self.log, preexec_fn=_pin(self.cpus))
        _pin_started(self.proc.pid, self.cpus)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready = re.search(r"serving .*? at http://[^ ]+:(\d+)/", self.output())
            if ready:
                self.port = int(ready.group(1))
                app = re.search(r"\(app pid (\d+),", self.output())
                self.app_pid = int(app.group(1)) if app else self.proc.pid
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        raise RuntimeError("serve --transport %s did not start:\n%s" % (self.transport, self.output()[-2000:]))

    def output(self):
        self.log.seek(0)
        return self.log.read().decode("utf-8", "replace")

    def usage(self):
        return stack_usage(self.proc.pid)

    def roles(self):
        """{role: pid} of the stack's processes reported on their own: the front, the app."""
        return {"front": self.proc.pid, "app": self.app_pid} if self.app_pid != self.proc.pid \
            else {"front": self.proc.pid}

    def exited(self):
        return self.proc.poll() is not None

    def check(self, expected):
        """None if GET / answers 200 with exactly `expected`, else what is wrong."""
        import http.client
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request("GET", "/")
            response = conn.getresponse()
            body = response.read()
        except (OSError, http.client.HTTPException) as exc:
            return "no answer: %s" % exc
        finally:
            conn.close()
        if response.status != 200 or body != expected:
            return "answered %d with %d bytes %r" % (response.status, len(body), body[:60])
        return None

    def stop(self):
        import subprocess
        if self.proc is None:
            return
        tree = process_tree(self.proc.pid)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pid in tree[1:]:  # an app or CGI child the front did not take down with it
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        self.log.close()


# -- the stacks people run instead: bench --peers ------------------------------------
#
# Each serves the same hello application (a module of its own, so that no peer carries
# doordown's code), as it is usually deployed, on a free port, all of its processes pinned
# like doordown's with --pinned.  nginx runs one worker, with keep-alive to its upstream;
# the application servers two processes or eight threads, as the comparison has always
# been run.  A peer that is not installed is skipped with a line saying how to install it.

_PEER_APP = '''def app(environ, start_response):
    body = b"Well, hello to you too!\\n"
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
'''

_PEER_NGINX = """%(user)s
daemon off;
worker_processes 1;
pid %(dir)s/nginx.pid;
error_log %(dir)s/nginx-error.log warn;
events { worker_connections 1024; }
http {
    access_log off;
    client_body_temp_path %(dir)s/client_body;
    proxy_temp_path %(dir)s/proxy;
    fastcgi_temp_path %(dir)s/fastcgi;
    uwsgi_temp_path %(dir)s/uwsgi;
    scgi_temp_path %(dir)s/scgi;
    upstream app { server unix:%(dir)s/app.sock; keepalive 32; }
    server {
        listen 127.0.0.1:%(port)d;
        location / {
%(pass)s
        }
    }
}
"""
_PEER_PASS = {
    "proxy": "proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection \"\";",
    "fastcgi": "fastcgi_pass app; fastcgi_keep_conn on; include %(conf)s/fastcgi_params; "
               "fastcgi_param SCRIPT_NAME \"\"; fastcgi_param PATH_INFO $uri;",
    "uwsgi": "uwsgi_pass app; include %(conf)s/uwsgi_params;",
}
_FLUP_THREADED = "from flup.server.fcgi import WSGIServer; import hello; WSGIServer(hello.app, bindAddress=%r).run()"
_FLUP_PREFORK = ("from flup.server.fcgi_fork import WSGIServer; import hello; "
                 "WSGIServer(hello.app, bindAddress=%r, minSpare=4, maxSpare=4, maxChildren=4).run()")


# The floor (bench --breakdown): the least a stack of doordown's shape can cost in Python
# here.  A threaded front that reads just enough of each request to find its end, and
# answers it through a minimal WSGI call, in its own process or through one Unix-socket
# round trip per request to a threaded app process (one connection per front thread, one
# thread per connection: the same threads as the door transport's).  No limit, no
# timeout, no log: what doordown costs beyond it is doordown's, what the hop costs here
# is the hop's.
_FLOOR_STACK = '''import os, socket, sys, threading
import hello

def respond(head):
    lines = head.split(b"\\r\\n")
    method, target, _ = lines[0].split(b" ")
    environ = {"REQUEST_METHOD": method.decode("latin-1"), "PATH_INFO": target.decode("latin-1")}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        environ["HTTP_" + name.decode("latin-1").upper().replace("-", "_")] = value.strip().decode("latin-1")
    start = []
    body = b"".join(hello.app(environ, lambda status, headers: start.extend((status, headers))))
    fields = "".join("%s: %s\\r\\n" % header for header in start[1])
    return ("HTTP/1.1 %s\\r\\n%s\\r\\n" % (start[0], fields)).encode("latin-1") + body

def app_connection(conn, _hop):
    with conn:
        while True:
            head = conn.recv(65536)
            if not head:
                return
            conn.sendall(respond(head))

def front_connection(conn, hop_path):
    hop = None
    if hop_path:
        hop = socket.socket(socket.AF_UNIX)
        hop.connect(hop_path)
    data = b""
    with conn:
        while True:
            more = conn.recv(65536)
            if not more:
                return
            data += more
            while b"\\r\\n\\r\\n" in data:
                head, data = data.split(b"\\r\\n\\r\\n", 1)
                if hop is None:
                    conn.sendall(respond(head))
                else:
                    hop.sendall(head)
                    conn.sendall(hop.recv(65536))  # a reply this small arrives in one read

def serve(listener, connection, hop_path):
    def run(conn):
        try:
            connection(conn, hop_path)
        except OSError:
            pass  # the client reset its connection
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=run, args=(conn,), daemon=True).start()

host, port = sys.argv[1].rsplit(":", 1)
hop_path = sys.argv[2] if len(sys.argv) > 2 else None
if hop_path and os.fork() == 0:
    app = socket.socket(socket.AF_UNIX)
    app.bind(hop_path)
    app.listen(1024)
    serve(app, app_connection, None)
front = socket.socket()
front.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
front.bind((host, int(port)))
front.listen(1024)
serve(front, front_connection, hop_path)
'''


def _find_nginx():
    import shutil
    return shutil.which("nginx") or next((path for path in ("/usr/sbin/nginx", "/usr/local/sbin/nginx",
                                                              "/opt/local/sbin/nginx") if os.path.exists(path)), None)


def _peer_commands(name, directory, port):
    """[(argv, is it nginx)] that start the peer `name`, or a string: what to install for it."""
    import importlib.util
    import shutil
    python = sys.executable
    sock = os.path.join(directory, "app.sock")
    here = "127.0.0.1:%d" % port
    wants = {"waitress": ("waitress", "pip install waitress"), "gunicorn": ("gunicorn", "pip install gunicorn"),
             "flup": ("flup", "pip install flup")}
    uwsgi, granian = shutil.which("uwsgi"), shutil.which("granian")
    uwsgi_app = ["--module", "hello:app", "--master", "--processes", "2", "--threads", "8",
                 "--disable-logging", "--chdir", directory]
    table = {
        "waitress": [[python, "-m", "waitress", "--listen=" + here, "--threads=8", "hello:app"]],
        "gunicorn": [[python, "-m", "gunicorn", "-k", "gthread", "-w", "2", "--threads", "8", "-b", here,
                      "--chdir", directory, "hello:app"]],
        "nginx-gunicorn": [[python, "-m", "gunicorn", "-k", "gthread", "-w", "2", "--threads", "8",
                            "-b", "unix:" + sock, "--chdir", directory, "hello:app"], "proxy"],
        "nginx-flup": [[python, "-c", _FLUP_THREADED % sock], "fastcgi"],
        "nginx-flup-prefork": [[python, "-c", _FLUP_PREFORK % sock], "fastcgi"],
        "nginx-uwsgi": [[uwsgi, "--socket", sock] + uwsgi_app, "uwsgi"],
        "uwsgi-http": [[uwsgi, "--http11-socket", here] + uwsgi_app],
        "floor": [[python, "floor.py", here]],
        "floor-hop": [[python, "floor.py", here, sock]],
        "granian": [[granian, "--interface", "wsgi", "--workers", "2", "--host", "127.0.0.1",
                     "--port", str(port), "--working-dir", directory, "hello:app"]],
    }
    for module, (package, hint) in wants.items():
        if module in name and importlib.util.find_spec(package) is None:
            return "not installed: %s" % hint
    if "uwsgi" in name and uwsgi is None:
        return "not installed: pip install uwsgi (it compiles; or Debian's uwsgi-plugin-python3)"
    if name == "granian" and granian is None:
        return "not installed: pip install granian"
    if name.startswith("nginx") and _find_nginx() is None:
        return "not installed: nginx (apt-get install nginx; pkgin install nginx on an illumos zone)"
    return table[name]


PEERS = ("waitress", "gunicorn", "nginx-gunicorn", "nginx-flup", "nginx-flup-prefork", "nginx-uwsgi",
         "uwsgi-http", "granian")
PEER_TITLES = {"waitress": "waitress, 8 threads", "gunicorn": "gunicorn gthread -w2 --threads 8",
               "nginx-gunicorn": "nginx → gunicorn gthread (proxy pass, keep-alive)",
               "nginx-flup": "nginx → flup threaded FastCGI",
               "nginx-flup-prefork": "nginx → flup prefork FastCGI (4)",
               "nginx-uwsgi": "nginx → uWSGI (uwsgi protocol, 2×8)",
               "uwsgi-http": "uWSGI http11-socket (2×8)", "granian": "granian -w2 (Rust)",
               "floor": "floor: a minimal threaded front, in-process",
               "floor-hop": "floor: the same front, one Unix-socket hop to a threaded app process"}


class PeerStack(BenchServer):
    """A peer stack (see PEERS) on a free port, in a directory of its own."""

    def __init__(self, name, cpus):
        BenchServer.__init__(self, name, None, "auto", cpus)
        self.processes = []
        self.directory = None

    def start(self, timeout=30):
        import subprocess
        import tempfile
        self.directory = tempfile.mkdtemp(prefix="doordown-peer-")
        with open(os.path.join(self.directory, "hello.py"), "w") as f:
            f.write(_PEER_APP)
        with open(os.path.join(self.directory, "floor.py"), "w") as f:
            f.write(_FLOOR_STACK)
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()
        commands = _peer_commands(self.transport, self.directory, self.port)
        env = dict(os.environ, PYTHONPATH=self.directory)
        server = commands[0]
        self.processes.append(subprocess.Popen(server, cwd=self.directory, env=env, stdin=subprocess.DEVNULL,
                                               stdout=self.log, stderr=self.log, preexec_fn=_pin(self.cpus)))
        if len(commands) > 1:  # behind nginx
            nginx = _find_nginx()
            config = os.path.join(self.directory, "nginx.conf")
            conf = os.path.dirname(os.path.realpath(nginx)).replace("/sbin", "/etc/nginx") \
                if not os.path.isdir("/etc/nginx") else "/etc/nginx"
            with open(config, "w") as f:
                f.write(_PEER_NGINX % {"user": "user root;" if os.geteuid() == 0 else "", "dir": self.directory,
                                       "port": self.port, "pass": _PEER_PASS[commands[1]] % {"conf": conf}})
            self.processes.append(subprocess.Popen(
                [nginx, "-c", config, "-p", self.directory, "-e", os.path.join(self.directory, "nginx-error.log")],
                stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log, preexec_fn=_pin(self.cpus)))
        for process in self.processes:
            _pin_started(process.pid, self.cpus)
        self.proc = self.processes[-1]
        self.app_pid = self.processes[0].pid  # the application server (its threads are reported)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.exited():
                break
            if self.check(b"Well, hello to you too!\n") is None:
                return self
            time.sleep(0.1)
        raise RuntimeError("%s did not start:\n%s" % (self.transport, self.output()[-2000:]))

    def usage(self):
        return stack_usage(*(process.pid for process in self.processes))

    def roles(self):
        if self.transport == "floor-hop":  # its app process is forked by the front
            tree = process_tree(self.proc.pid)
            return {"front": tree[0], "app": tree[1]} if len(tree) > 1 else {"front": tree[0]}
        return {"front": self.proc.pid} if self.transport == "floor" else {}

    def exited(self):
        return any(process.poll() is not None for process in self.processes)

    def stop(self):
        import shutil
        import subprocess
        tree = process_tree(*(process.pid for process in self.processes))
        for process in reversed(self.processes):  # nginx first, then what it fronts
            if process.poll() is None:
                process.send_signal(signal.SIGTERM if process is self.processes[-1] else signal.SIGINT)
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        for pid in tree:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        self.log.close()
        if self.directory:
            shutil.rmtree(self.directory, ignore_errors=True)


# -- the report: Markdown and SVG ---------------------------------------------------------

_BENCH_COLUMNS = (("workload", "workload"), ("transport", "transport"), ("concurrency", "c"),
                  ("requests_per_s", "req/s"), ("p50_ms", "p50 ms"), ("p99_ms", "p99 ms"),
                  ("errors", "errors"), ("non_2xx", "non-2xx"), ("cpu_s_per_1k", "CPU s/1k req"),
                  ("rss_idle_mb", "RSS idle MB"), ("rss_peak_mb", "RSS peak MB"),
                  ("pss_idle_mb", "PSS idle MB"), ("pss_peak_mb", "PSS peak MB"),
                  ("front", "front RSS / PSS peak MB"), ("app", "app RSS / PSS peak MB"),
                  ("app_threads", "app threads"))


def _column_text(row, key):
    if key in ("front", "app"):  # one process of the stack: its own RSS and PSS at peak
        rss, pss = row.get(key + "_rss_peak_mb"), row.get(key + "_pss_peak_mb")
        return "–" if rss is None else "%s / %s" % (_cell_text(rss), _cell_text(pss))
    return _cell_text(row[key])


def _cell_text(value):
    if value is None:
        return "–"
    if isinstance(value, float):
        return "{:,.0f}".format(value) if value >= 100 else "%g" % value
    return str(value)


def _progress_line(done, cells, row):
    memory = row["pss_peak_mb"] if row["pss_peak_mb"] is not None else row["rss_peak_mb"]
    trouble = ""
    if row["errors"] or row["non_2xx"]:
        trouble = "  (%d errors, %d non-2xx)" % (row["errors"], row["non_2xx"])
    return "[%d/%d] %-9s %-9s c%-3d %8.0f req/s  p99 %7s ms  peak %s MB%s" % (
        done, cells, row["workload"], row["transport"], row["concurrency"], row["requests_per_s"],
        _cell_text(row["p99_ms"]), memory, trouble)


def _bench_targets(rows):
    """The ratios doordown aims at, read from the hello rows: door against proxy, FastCGI, in-process."""
    by_key = {(r["transport"], r["concurrency"]): r for r in rows
              if r.get("workload") == "hello" and "failed" not in r and "skipped" not in r}
    lines = []
    for connections in sorted({c for _, c in by_key}):
        door = by_key.get(("door", connections))
        if door is None:
            continue
        parts = []
        for other in ("proxy", "fastcgi", "inprocess") + PEERS:
            peer = by_key.get((other, connections))
            if peer and peer["requests_per_s"]:
                parts.append("%.2f× %s" % (door["requests_per_s"] / peer["requests_per_s"], other))
        memory = "pss_peak_mb" if door["pss_peak_mb"] is not None else "rss_peak_mb"
        for other in ("proxy", "fastcgi") + PEERS:
            peer = by_key.get((other, connections))
            if peer and peer[memory] is not None:
                parts.append("%s %s MB vs %s %s MB" % (memory.split("_")[0].upper(), door[memory],
                                                      other, peer[memory]))
        waitress = by_key.get(("waitress", connections))
        if waitress and door["pss_peak_mb"] is not None:  # a one-process peer: its RSS is all it uses
            parts.append("door PSS = %.2f× waitress RSS" % (door["pss_peak_mb"] / waitress["rss_peak_mb"]))
        if parts:
            lines.append("- hello c%d: door req/s = %s" % (connections, ", ".join(parts)))
    return lines


def bench_markdown(report):
    config, machine = report["config"], report["machine"]
    lines = ["", "`%s` — doordown %s, Python %s, %s CPUs, %s; load: %s; %s; doors: %s; "
             "load average %s before, %s after" % (
                 report["command"], report["doordown"], machine["python"], machine["cpus"],
                 machine["platform"], config["load"], config["placement"], config["doors"],
                 machine["load_average_before"], machine["load_average_after"]), ""]
    lines.append("| " + " | ".join(title for _, title in _BENCH_COLUMNS) + " |")
    lines.append("|" + "|".join("---" if i < 2 else "---:" for i in range(len(_BENCH_COLUMNS))) + "|")
    for row in report["results"]:
        if "skipped" in row:
            lines.append("| %s | %s | skipped, %s |" % (row["workload"], row["transport"], row["skipped"]))
        elif "failed" in row:
            lines.append("| %s | %s | failed: %s |" % (row["workload"], row["transport"],
                                                       row["failed"].replace("|", "/").splitlines()[0]))
        else:
            lines.append("| " + " | ".join(_column_text(row, key) for key, _ in _BENCH_COLUMNS) + " |")
    targets = _bench_targets(report["results"])
    if targets:
        lines += ["", *targets]
    return "\n".join(lines) + "\n"


_TRANSPORT_COLOURS = {"door": "#1b9e77", "proxy": "#d95f02", "fastcgi": "#7570b3", "cgi": "#e7298a",
                      "inprocess": "#888888"}


def _nice_ceiling(value):
    """The smallest of 1, 2, 2.5, 5 times a power of ten that is at least `value`."""
    if value <= 0:
        return 1
    power = 10 ** int(len(str(int(value))) - 1)
    for step in (1, 2, 2.5, 5, 10):
        if step * power >= value:
            return step * power
    return 10 * power


def _svg_bars(x, y, width, height, title, unit, groups, series, value_of):
    """A grouped bar chart: one group per concurrency, one bar per transport."""
    from xml.sax.saxutils import escape
    top = max([value_of(g, s) or 0 for g in groups for s in series] + [0])
    ceiling = _nice_ceiling(top * 1.15)  # room for the labels above the bars
    plot_x, plot_y, plot_w, plot_h = x + 48, y + 24, width - 56, height - 48
    out = ['<text x="%d" y="%d" class="title">%s</text>' % (x, y + 12, escape(title))]
    for i in range(6):
        value = ceiling * i / 5
        line_y = plot_y + plot_h - plot_h * i / 5
        out.append('<line x1="%d" y1="%.1f" x2="%d" y2="%.1f" class="grid"/>' % (plot_x, line_y, plot_x + plot_w, line_y))
        out.append('<text x="%d" y="%.1f" class="axis" text-anchor="end">%s</text>'
                   % (plot_x - 4, line_y + 3, "{:,.0f}".format(value) if ceiling >= 10 else "%g" % value))
    group_w = plot_w / max(1, len(groups))
    bar_w = group_w * 0.8 / max(1, len(series))
    for g, group in enumerate(groups):
        gx = plot_x + g * group_w + group_w * 0.1
        for s, name in enumerate(series):
            value = value_of(group, name)
            if value is None:
                continue
            bar_h = plot_h * value / ceiling
            bx = gx + s * bar_w
            out.append('<rect x="%.1f" y="%.1f" width="%.1f" height="%.1f" fill="%s"><title>%s c%s: %s %s</title></rect>'
                       % (bx, plot_y + plot_h - bar_h, bar_w - 1, bar_h, _TRANSPORT_COLOURS.get(name, "#444"),
                          escape(name), group, _cell_text(value), escape(unit)))
            label_x, label_y = bx + bar_w / 2, plot_y + plot_h - bar_h - 2
            turn = ' transform="rotate(-90 %.1f %.1f)"' % (label_x + 3, label_y) if bar_w < 26 else ""
            out.append('<text x="%.1f" y="%.1f" class="value" text-anchor="%s"%s>%s</text>'
                       % (label_x + (3 if turn else 0), label_y, "start" if turn else "middle", turn,
                          _cell_text(value)))
        out.append('<text x="%.1f" y="%d" class="axis" text-anchor="middle">c%s</text>'
                   % (gx + group_w * 0.4, plot_y + plot_h + 14, group))
    return out


def _cell_lookup(cells, workload, key):
    """value_of(concurrency, transport) for one workload's figure `key`."""
    return lambda group, name: (cells.get((workload, name, group)) or {}).get(key)


def bench_svg(report):
    """A chart, by hand and stdlib only: requests/s and peak memory per transport, per workload."""
    from xml.sax.saxutils import escape
    rows = [r for r in report["results"] if "failed" not in r and "skipped" not in r]
    workloads = [w for w in report["config"]["workloads"] if any(r["workload"] == w for r in rows)]
    series = [t for t in report["config"]["transports"] if any(r["transport"] == t for r in rows)]
    groups = report["config"]["concurrency"]
    memory = "pss_peak_mb" if all(r["pss_peak_mb"] is not None for r in rows) else "rss_peak_mb"
    cell = {(r["workload"], r["transport"], r["concurrency"]): r for r in rows}
    panel_w, panel_h, width = 470, 220, 960
    height = 70 + len(workloads) * (panel_h + 20) + 30
    out = ['<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" viewBox="0 0 %d %d" '
           'font-family="sans-serif">' % (width, height, width, height),
           '<style>.title{font-size:13px;font-weight:bold}.axis{font-size:10px;fill:#333}'
           '.value{font-size:8px;fill:#333}.grid{stroke:#ddd;stroke-width:1}.note{font-size:10px;fill:#555}</style>',
           '<rect width="100%" height="100%" fill="white"/>',
           '<text x="10" y="20" class="title">doordown bench: %s</text>' % escape(
               "%s, %s, doors: %s" % (report["config"]["placement"], report["config"]["load"],
                                      report["config"]["doors"]))]
    for i, name in enumerate(series):
        out.append('<rect x="%d" y="32" width="12" height="12" fill="%s"/>' % (10 + i * 110, _TRANSPORT_COLOURS.get(name, "#444")))
        out.append('<text x="%d" y="42" class="axis">%s</text>' % (26 + i * 110, escape(name)))
    for row, workload in enumerate(workloads):
        y = 60 + row * (panel_h + 20)
        out += _svg_bars(10, y, panel_w, panel_h, "%s: requests/s" % workload, "req/s", groups, series,
                         _cell_lookup(cell, workload, "requests_per_s"))
        out += _svg_bars(10 + panel_w + 10, y, panel_w, panel_h, "%s: %s of the whole stack (MB)"
                         % (workload, "peak PSS" if memory == "pss_peak_mb" else "peak RSS"), "MB",
                         groups, series, _cell_lookup(cell, workload, memory))
    out.append('<text x="10" y="%d" class="note">%s</text>' % (height - 10, escape(report["command"])))
    out.append("</svg>")
    return "\n".join(out) + "\n"


# -- the run -----------------------------------------------------------------------------

def _load_average():
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _megabytes(size):
    return None if size is None else round(size / 1048576, 1)


def _bench_cell(load, server, workload, connections, duration, warmup, idle):
    """One measured run: warm-up, then the load with the stack sampled for its peak."""
    if warmup:
        run = load.start(server.port, connections, warmup)
        while load.running(run):
            time.sleep(0.05)
        load.result(run)
    before = server.usage()
    peak_rss, peak_pss = before.rss, before.pss
    roles = server.roles()  # each process of the stack on its own too: the front, the app
    peaks = {role: (0, 0) for role in roles}
    split = {role: user_and_system_cpu(pid) for role, pid in roles.items()}
    run = load.start(server.port, connections, duration)
    while load.running(run):
        time.sleep(0.25)
        usage = server.usage()
        peak_rss = max(peak_rss, usage.rss)
        peak_pss = None if peak_pss is None or usage.pss is None else max(peak_pss, usage.pss)
        for role, pid in roles.items():
            facts = process_facts(pid)
            if facts is not None:
                peaks[role] = (max(peaks[role][0], facts.rss), max(peaks[role][1], facts.pss or 0))
    result = load.result(run)
    after = server.usage()
    for role, pid in roles.items():  # µs of user and of system CPU per request, each role
        now = user_and_system_cpu(pid)
        split[role] = None if now is None or split[role] is None or not result.requests else [
            round((now[i] - split[role][i]) * 1e6 / result.requests, 1) for i in (0, 1)]
    if server.exited():
        raise RuntimeError("the stack exited during the run:\n%s" % server.output()[-2000:])
    app = process_facts(server.app_pid, memory=False)
    return {
        "workload": workload, "transport": server.transport, "concurrency": connections,
        "requests": result.requests,
        "requests_per_s": round(result.requests / result.seconds, 1) if result.seconds else 0.0,
        "p50_ms": round(result.latencies[0] / 1000, 2) if result.requests else None,
        "p99_ms": round(result.latencies[1] / 1000, 2) if result.requests else None,
        "errors": result.errors, "non_2xx": result.non_2xx,
        "cpu_s_per_1k": round((after.cpu - before.cpu) * 1000 / result.requests, 3) if result.requests else None,
        "rss_idle_mb": _megabytes(idle.rss), "rss_peak_mb": _megabytes(peak_rss),
        "pss_idle_mb": _megabytes(idle.pss), "pss_peak_mb": _megabytes(peak_pss),
        "processes_peak": after.processes,
        **{"%s_%s_peak_mb" % (role, kind): _megabytes(peaks[role][i]) if peaks.get(role, (0, 0))[i] else None
           for role in ("front", "app") for i, kind in enumerate(("rss", "pss"))},
        "app_threads": app.threads if app is not None and server.transport != "cgi" else None,
        "cpu_user_system_us": split,
    }


# -- faults: load while the app is killed, replaced and stopped ---------------------

def _fault_kill(server):
    os.kill(server.app_pid, signal.SIGKILL)


def _fault_reload(server):
    server.proc.send_signal(signal.SIGHUP)


def _fault_stop(server):
    server.proc.send_signal(signal.SIGTERM)


FAULTS = (
    # (event, extra serve options, what to do half-way through the load)
    ("app killed (SIGKILL)", (), _fault_kill),
    ("reload (SIGHUP), new app process", (), _fault_reload),
    ("--max-requests 2000: replaced about every 2000", ("--max-requests", "2000"), None),
    ("stop (SIGTERM)", (), _fault_stop),
)


def _read_load_counts(workers):
    """The built-in load processes' raw counts, summed (failures apart from unaccepted)."""
    totals = collections.Counter()
    for pid, out_path, status in workers:
        if status is None:
            os.waitpid(pid, 0)
        with open(out_path, "rb") as f:
            totals.update(json.loads(f.readline()))
        os.unlink(out_path)
    return totals


def run_faults(args):
    """`bench --faults`: 16 keep-alive connections on the door transport while the app is
    killed, reloaded, replaced by --max-requests and stopped; requests attempted and failed
    for each event.  A failure is a request sent on an accepted connection that got no
    answer or a non-2xx one; a connection refused (or reset before any answer) after the
    front has closed its listening socket was never accepted, and is counted apart."""
    import subprocess
    seconds = args.duration or 4.0
    rows = []
    backend = door_backend(args.doors)
    _log("bench", "faults on the door transport (%s), built-in load, 16 connections, %ss each"
         % (backend.description, seconds))
    for event, options, act in FAULTS:
        server = BenchServer("door", None, args.doors, None, options).start()
        load = BuiltinLoad(False, None)
        workers = load.start(server.port, 16, seconds)
        time.sleep(seconds / 2)
        acted = time.monotonic()
        if act is not None:
            act(server)
        while load.running(workers):
            time.sleep(0.05)
        if act is _fault_stop:
            try:
                server.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        serve_exit = server.proc.poll()  # None: still serving, as it should but after a stop
        counts = _read_load_counts(workers)
        finished = time.monotonic() + 10  # on a loaded machine the new app may come after the load
        while act in (_fault_kill, _fault_reload) and time.monotonic() < finished and len(
                set(re.findall(r"\[doordown app (\d+)\] serving", server.output()))) < 2:
            time.sleep(0.05)
        log = server.output()
        server.stop()
        failed = counts["errors"] + counts["non_2xx"]
        rows.append({"event": event, "attempted": counts["requests"] + counts["errors"],
                     "answered_2xx": counts["requests"] - counts["non_2xx"], "failed": failed,
                     "unaccepted": counts["unaccepted"], "serve_exit": serve_exit,
                     "app_processes": len(set(re.findall(r"\[doordown app (\d+)\] serving", log)))})
        _log("bench", "%s: %d attempted, %d failed, %d unaccepted (%.1fs)" % (
            event, rows[-1]["attempted"], failed, counts["unaccepted"], time.monotonic() - acted))
    lines = ["| event | requests attempted | failed | answered 2xx | not accepted (after stop) | app processes "
             "| serve afterwards |", "|---|---:|---:|---:|---:|---:|---|"]
    for row in rows:
        lines.append("| %s | %d | %d | %d | %d | %d | %s |" % (
            row["event"], row["attempted"], row["failed"], row["answered_2xx"], row["unaccepted"],
            row["app_processes"], "running" if row["serve_exit"] is None else "exited %d" % row["serve_exit"]))
    sys.stdout.write("\n".join(lines) + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": " ".join(["python3 doordown.py bench"] + args.argv),
                       "doors": backend.description, "faults": rows}, f, indent=1)
            f.write("\n")
    return 0


# -- where a door request's CPU goes: bench --breakdown ------------------------------
#
# Each step of a door request is timed alone, here, on the real code (the same request wrk
# sends, the built-in hello app); the door round trip with a trivial handler in another
# process, next to a raw Unix-socket round trip of the same sizes; then the real stacks
# (door and in-process) under load give what a request costs whole.  What the door hop
# costs beyond its steps is the hand-off between threads: the app's server thread and
# the front's connection thread each woken, each taking its process's GIL.

_BREAKDOWN_REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n\r\n"  # what wrk sends


def _cpu_per_call(call, other_pid=None, seconds=0.25):
    """CPU microseconds per call of `call()` (plus `other_pid`'s CPU), the best of three runs."""
    best = None
    count = 100
    for _ in range(3):
        while True:
            other = process_facts(other_pid, memory=False).cpu if other_pid else 0.0
            start, wall = time.process_time(), time.perf_counter()
            for _ in range(count):
                call()
            used = time.process_time() - start
            if other_pid:
                used += process_facts(other_pid, memory=False).cpu - other
            if time.perf_counter() - wall >= seconds:
                break
            count *= 2
        best = used / count if best is None else min(best, used / count)
    return round(best * 1e6, 1)


def _serve_echo(sock, reply):
    """A child's loop: answer each message on `sock` with `reply`, as raw socket reads and writes."""
    while sock.recv(65536):
        sock.sendall(reply)
    os._exit(0)


class _NoServer:
    """What a FrontHandler asks of its server, for a handler timed without one."""

    stopping = False

    def busy(self, *_):
        pass

    def log_access(self, *_):
        pass


def _breakdown_steps(backend):
    """({step: CPU µs}, raw socket round trip µs, (app handler µs, the same after a nap))
    for one hello request through the door."""
    import shutil
    import tempfile
    gateway = WSGIGateway(hello_app)
    handler = FrontHandler.__new__(FrontHandler)  # a connection's handler, without a connection
    front_end, client_end = socket.socketpair()
    handler.request, handler.client_address, handler.server = front_end, ("127.0.0.1", 50000), _NoServer()
    handler.limits, handler.reader, handler.listener = Limits(), BufferedSocket(front_end), None

    def parse():
        handler.reader.buf[:] = _BREAKDOWN_REQUEST
        return handler.read_request()

    request = parse()
    env = _RequestEnv()
    env.scheme, env.remote_addr, env.remote_port = b"http", b"127.0.0.1", b"50000"
    env.server_name, env.server_port, env.script_name = b"127.0.0.1", b"8000", b""
    call = pack_message(KIND_REQUEST, 0, request_fields(request, env))
    fields = unpack_message(call, (KIND_REQUEST,))[2]
    environ = gateway.environ(fields, io.BytesIO(fields[9]), len(fields[9]))
    status, headers, body, _close = gateway.respond(environ)
    reply = pack_message(KIND_RESPONSE, 0, [status, body, *headers])
    answer = unpack_message(reply, (KIND_RESPONSE,))[2]

    import itertools
    sent = itertools.count(1)

    def send():
        handler.send_response(request, Response(answer[0], answer[2:], answer[1]))
        if next(sent) % 64 == 0:  # drain the other end now and then, not timed per call
            while len(client_end.recv(65536)) == 65536:
                pass

    steps = collections.OrderedDict()
    steps["front: parse the request head"] = _cpu_per_call(parse)
    steps["front: encode the door call"] = _cpu_per_call(
        lambda: pack_message(KIND_REQUEST, 0, request_fields(request, env)))
    steps["app: decode the call"] = _cpu_per_call(lambda: unpack_message(call, (KIND_REQUEST, KIND_PING)))
    steps["app: build the environ"] = _cpu_per_call(
        lambda: gateway.environ(fields, io.BytesIO(fields[9]), len(fields[9])))
    steps["app: run the WSGI application"] = _cpu_per_call(lambda: gateway.respond(dict(environ)))
    steps["app: encode the reply"] = _cpu_per_call(
        lambda: pack_message(KIND_RESPONSE, 0, [status, body, *headers]))
    steps["front: decode the reply"] = _cpu_per_call(
        lambda: Response(*unpack_message(reply, (KIND_RESPONSE, KIND_FAIL))[2][:2]))
    steps["front: frame and send the response"] = _cpu_per_call(send)
    front_end.close()
    client_end.close()
    # The app's whole door handler once more, run as a server thread runs it: after
    # sleeping (here 50 µs) while the request came.  What that costs on top is what a
    # thread's cold start costs on this machine, in every process, for every wake.
    caller = Caller(os.geteuid(), os.getpid())
    handler_us = _cpu_per_call(lambda: gateway(call, [], caller))

    def nap():
        time.sleep(50e-6)

    woken_us = max(0.0, _cpu_per_call(lambda: (nap(), gateway(call, [], caller))) - _cpu_per_call(nap))

    # The round trips, against a child process: through the door, and as bare socket I/O.
    directory = tempfile.mkdtemp(prefix="doordown-breakdown-")
    path = os.path.join(directory, "echo.door")
    child = os.fork()
    if child == 0:
        try:
            backend.serve(path, lambda data, fds, caller: (reply, []))
            time.sleep(3600)
        finally:
            os._exit(0)
    try:
        client = backend.open(path)
        for _ in range(500):
            try:
                client.call(call)
                break
            except DoorError:
                time.sleep(0.01)
        steps["door: round trip, both processes"] = _cpu_per_call(lambda: client.call(call), child)
        client.close()
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
        shutil.rmtree(directory, ignore_errors=True)
    ours, theirs = socket.socketpair()
    child = os.fork()
    if child == 0:
        ours.close()
        _serve_echo(theirs, b"r" * (len(reply) + _FRAME.size))
    theirs.close()
    message = b"q" * (len(call) + _FRAME.size)

    def round_trip():
        ours.sendall(message)
        ours.recv(65536)

    try:
        raw = _cpu_per_call(round_trip, child)
    finally:
        ours.close()
        os.waitpid(child, 0)
    return steps, raw, (handler_us, woken_us)


_DOOR_ONLY_STEPS = ("front: encode the door call", "app: decode the call", "app: encode the reply",
                    "front: decode the reply", "door: round trip, both processes")


def run_breakdown(args, load, server_cpus, backend):
    """bench --breakdown: the door request's CPU, step by step, beside the whole stacks'."""
    _log("bench", "timing each step of a door request alone")
    steps, raw, (handler_us, woken_us) = _breakdown_steps(backend)
    duration = args.duration or 3.0
    warmup = args.warmup if args.warmup is not None else 1.0
    connections = (args.concurrency or [16])[0]
    whole = {}
    stacks = ("door", "inprocess", "floor", "floor-hop")
    for transport in stacks:
        if transport.startswith("floor"):
            server, expected = PeerStack(transport, server_cpus), None
        else:
            server, expected = BenchServer(transport, None, args.doors, server_cpus), BENCH_WORKLOADS["hello"][1]
        try:
            server.start()
            problem = server.check(expected) if expected is not None else None
            if problem is not None:
                raise RuntimeError("wrong answer before timing: %s" % problem)
            row = _bench_cell(load, server, "hello", connections, duration, warmup, server.usage())
            whole[transport] = row
            _log("bench", _progress_line(len(whole), len(stacks), row))
        finally:
            server.stop()
    us = {name: row["cpu_s_per_1k"] * 1000 for name, row in whole.items()}
    rate = {name: row["requests_per_s"] for name, row in whole.items()}
    titles = {"door": "door", "inprocess": "in-process", "floor": PEER_TITLES["floor"],
              "floor-hop": PEER_TITLES["floor-hop"]}
    hop, floor_hop = us["door"] - us["inprocess"], us["floor-hop"] - us["floor"]
    added = sum(steps[name] for name in _DOOR_ONLY_STEPS)
    lines = ["", "Where a door request's CPU goes: hello, %s, µs of CPU per request "
             "(each step timed alone, best of three)" % backend.description, "",
             "| step | µs |", "|---|---:|"]
    lines += ["| %s | %.1f |" % (name, value) for name, value in steps.items()]
    lines += ["| sum of the steps | %.1f |" % sum(steps.values()),
              "| *for scale:* a raw Unix-socket round trip between two processes, same sizes | %.1f |" % raw,
              "| *for scale:* the app's whole door handler (decode to encode) | %.1f |" % handler_us,
              "| *for scale:* the same, run after its thread slept 50 µs, as a server thread is | %.1f |"
              % woken_us,
              "", "Whole stacks under load (%s, -c%d, %s): CPU per request, µs, of all their processes, "
              "and of the front and the app on their own (user + system)"
              % ("pinned" if server_cpus else "free", connections, load.describe()), "",
              "| stack | req/s | µs per request | front | app |", "|---|---:|---:|---:|---:|"]
    for name in stacks:
        split = whole[name]["cpu_user_system_us"]
        cells = ["%.1f + %.1f" % tuple(split[role]) if split.get(role) else "" for role in ("front", "app")]
        lines.append("| %s | %.0f | %.1f | %s | %s |" % (titles[name], rate[name], us[name], *cells))
    lines += ["",
              "- door / in-process: %.2f× the requests per second; the floor's hop / its in-process: %.2f×"
              % (rate["door"] / rate["inprocess"], rate["floor-hop"] / rate["floor"])]
    estimate = None
    if server_cpus:
        # One CPU runs every process, so the times of a request's parts add up: the floor's
        # hop adds 1/floor-hop - 1/floor seconds to each request, and a hop that does more
        # adds more.  Cells a minute apart on a machine whose speed changes: an estimate.
        floor_hop_s = 1 / rate["floor-hop"] - 1 / rate["floor"]
        if floor_hop_s > 0:
            estimate = (1 / rate["inprocess"]) / (1 / rate["inprocess"] + floor_hop_s)
            lines.append("- a door hop as cheap as the floor's (%.1f µs of a request's time here) "
                         "would have made door / in-process %.2f× in this run"
                         % (floor_hop_s * 1e6, estimate))
        else:  # cells this short are at the mercy of the machine's changes of speed
            lines.append("- the floor's hop took no time in this run: too short or noisy for an estimate")
    lines += ["- the door hop costs %.1f µs per request (door less in-process); the floor's hop %.1f µs: "
              "what two Python processes, their thread hand-offs and a Unix socket cost here, at least"
              % (hop, floor_hop),
              "- the door hop's own steps (encoding and decoding both ways, the round trip) account "
              "for %.1f µs timed alone" % added,
              "- the rest, %.1f µs, is in no step timed alone: the same code costs more in the "
              "stack than in a loop (each thread resumes cold after sleeping, as the handler timed "
              "after a nap shows), and the hand-offs cost more than the floor's; compare the user "
              "CPU of front and app with the floor's" % (hop - added) if hop > added else
              "- the steps timed alone cost more than the hop did in the stack: the machine's speed "
              "changed during the run; run it again"]
    sys.stdout.write("\n".join(lines) + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"steps_us": steps, "raw_socket_round_trip_us": raw, "whole": whole,
                       "doors": backend.description, "door_over_inprocess_with_the_floors_hop": estimate,
                       "app_handler_us": handler_us, "app_handler_after_sleep_us": woken_us}, f, indent=1)
            f.write("\n")
    return 0


def run_bench(args):
    """The `bench` command."""
    if args.faults:
        return run_faults(args)
    if args.streams:
        return run_streams(args)
    import shutil
    peers = args.peers or []
    # With --peers, by default: the door transport and the peers, hello, c16.
    transports = args.transports or (["door"] if peers else list(TRANSPORTS))
    workloads = args.workloads or (["hello"] if peers else list(BENCH_WORKLOADS))
    concurrency = args.concurrency or ([16] if args.quick or peers else [1, 16, 64])
    duration = args.duration or (1.0 if args.quick else 10.0)
    warmup = args.warmup if args.warmup is not None else (1.0 if args.quick else 2.0)
    if not os.path.isdir("/proc"):
        _log("bench", "no /proc here: CPU, memory and threads cannot be measured")
        return 1
    server_cpus = load_cpus = None
    if args.pinned:
        if (os.cpu_count() or 1) < 2:
            _log("bench", "--pinned needs two CPUs")
            return EXIT_USAGE
        server_cpus, load_cpus = {0}, {1}
    wrk = shutil.which("wrk") if args.load != "builtin" else None
    if args.load == "wrk" and wrk is None:
        _log("bench", "--load wrk, but wrk is not on PATH")
        return EXIT_USAGE
    load = WrkLoad(wrk, args.pinned, load_cpus) if wrk else BuiltinLoad(args.pinned, load_cpus)
    backend = door_backend(args.doors)
    if args.breakdown:
        try:
            return run_breakdown(args, load, server_cpus, backend)
        finally:
            load.close()
    placement = ("pinned (server stack on CPU 0, load on CPU 1)" if args.pinned
                 else "free (no pinning: the OS places server and load)")
    report = {
        "doordown": __version__,
        "command": " ".join(["python3 doordown.py bench"] + args.argv),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "machine": {"platform": sys.platform, "python": sys.version.split()[0], "cpus": os.cpu_count(),
                    "kernel": " ".join(os.uname()[2:3]), "load_average_before": _load_average()},
        "config": {"transports": transports, "workloads": workloads, "peers": peers,
                   "concurrency": concurrency, "duration_s": duration, "warmup_s": warmup,
                   "placement": "pinned" if args.pinned else "free", "load": load.describe(),
                   "doors": backend.description},
        "results": [],
    }
    cells = (len(workloads) * len(transports) + len(peers) * ("hello" in workloads)) * len(concurrency)
    _log("bench", "%d runs of %ss after %ss of warm-up; load: %s; %s; doors: %s"
         % (cells, duration, warmup, load.describe(), placement, backend.description))
    done = 0
    try:
        for workload in workloads:
            spec, expected = BENCH_WORKLOADS[workload]
            for transport in transports + (peers if workload == "hello" else []):
                first = done
                if transport in PEERS:
                    missing = _peer_commands(transport, "", 0)
                    if isinstance(missing, str):
                        _log("bench", "%s skipped: %s" % (transport, missing))
                        done += len(concurrency)
                        report["results"].append({"workload": workload, "transport": transport,
                                                  "skipped": missing})
                        continue
                    server = PeerStack(transport, server_cpus)
                else:
                    server = BenchServer(transport, spec, args.doors, server_cpus)
                try:
                    server.start()
                    problem = server.check(expected)
                    if problem is not None:
                        raise RuntimeError("wrong answer before timing: %s" % problem)
                    time.sleep(0.3)  # let start-up settle before the idle figures
                    idle = server.usage()
                    for connections in concurrency:
                        done += 1
                        row = _bench_cell(load, server, workload, connections, duration, warmup, idle)
                        report["results"].append(row)
                        _log("bench", _progress_line(done, cells, row))
                except RuntimeError as exc:
                    _log("bench", "%s over %s: %s" % (workload, transport, exc))
                    done = first + len(concurrency)
                    report["results"].append({"workload": workload, "transport": transport,
                                              "failed": str(exc)})
                finally:
                    server.stop()
    finally:
        load.close()
    report["machine"]["load_average_after"] = _load_average()
    sys.stdout.write(bench_markdown(report))
    sys.stdout.flush()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
            f.write("\n")
    if args.svg:
        with open(args.svg, "w") as f:
            f.write(bench_svg(report))
    return 0 if all("failed" not in row for row in report["results"]) else 1


###############################################################################
# Door check #################################################################
###############################################################################
#
# `doordown check` puts the doors of the machine at hand through their paces and
# prints a one-screen verdict with timings: the first door-versus-socket figures of
# their kind that a user on an illumos zone can send back.

def _check_handler(data, fds, caller):
    """The door the check calls: echo, plus a few commands that probe door semantics."""
    command, _, argument = data.partition(b":")
    if command == b"nfds":  # descriptors open in the server (to see none leak)
        _close_fds(fds)
        return b"%d" % len(os.listdir("/proc/self/fd")), []
    if command == b"fd":
        read_end, write_end = os.pipe()
        os.close(write_end)
        return b"with a descriptor", [read_end]
    if command == b"deep":  # C recursion on the door thread, over a large request
        nested = []
        for _ in range(int(argument or 900)):
            nested = [nested]
        return b"%d %s" % (len(json.dumps(nested)), _stack_facts().encode()), []
    if command == b"who":
        return b"%d %d" % (caller.euid, caller.pid), []
    if command == b"thread":
        return b"%d" % threading.get_ident(), []
    if command == b"sleep":
        time.sleep(float(argument))
        return b"%d" % threading.get_ident(), []
    if command == b"big":
        size = int(argument)
        return (bytes(range(256)) * (size // 256 + 1))[:size], []
    if command == b"fds":
        with os.fdopen(fds[0], "rb") as passed:
            received = passed.read()
        read_end, write_end = os.pipe()
        os.write(write_end, received[::-1])
        os.close(write_end)
        return b"ok", [read_end]
    _close_fds(fds)
    return data, []


_check_handler.refused_reply = WSGIGateway.refused_reply


def _stack_facts():
    """What this thread's stack is, as the system tells it (door server threads only)."""
    try:
        if is_illumos():  # thr_stksegment: the top and size libc gave this thread
            libc, segment = ctypes.CDLL("libc.so.1"), stack_t()
            if libc.thr_stksegment(ctypes.byref(segment)) == 0:
                return "thread stack %d bytes (thr_stksegment)" % segment.ss_size
        elif os.environ.get("DOORDOWN_LIBDOOR"):
            model = ctypes.CDLL(os.environ["DOORDOWN_LIBDOOR"])
            left = ctypes.cast(model.doormodel_stack_left, ctypes.CFUNCTYPE(ctypes.c_long))()
            if left >= 0:
                return "%d bytes of the model's thread stack left below the handler" % left
    except (OSError, AttributeError):
        pass
    return "stack size unknown"


def _limit_lwps():
    """illumos: let this process make no more threads (process.max-lwps at its LWP count)."""
    with open("/proc/self/psinfo", "rb") as psinfo:
        lwps = struct.unpack_from("i", psinfo.read(), 4)[0]  # psinfo_t.pr_nlwp
    import shutil
    import subprocess
    prctl = shutil.which("prctl") or "/usr/bin/prctl"
    try:
        subprocess.run([prctl, "-n", "process.max-lwps", "-t", "basic", "-v", str(lwps), "-e", "deny",
                        "-i", "process", str(os.getpid())], check=True, stdout=subprocess.DEVNULL)
    except (OSError, subprocess.CalledProcessError) as exc:
        _log("check", "could not refuse thread creation with prctl: %s" % exc)


def _serve_check_door(backend, path):
    """The check's server process: the door, and a Unix-socket echo beside it to compare."""
    server = backend.serve(path, _check_handler)
    echo = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    if os.path.exists(path + ".sock"):
        os.unlink(path + ".sock")  # left by a server the check killed
    echo.bind(path + ".sock")
    echo.listen(1)

    def echo_loop():
        conn, _ = echo.accept()
        while True:
            data = conn.recv(65536)
            if not data:
                return
            conn.sendall(data)

    threading.Thread(target=echo_loop, daemon=True).start()
    if os.environ.get("DOORDOWN_CHECK_NO_THREADS") and is_illumos():
        _limit_lwps()  # last: from here on no thread can be made, not even a Python one
    sys.stdout.write("READY\n")
    sys.stdout.flush()
    sys.stdin.read()  # until the checking process is done
    server.close(1.0)
    return server


def _start_check_server(backend, path, env=None):
    import subprocess
    child = subprocess.Popen([sys.executable, os.path.abspath(__file__), "check", "--doors",
                              backend.name, "--serve", path], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, env=env)
    if not child.stdout.readline().startswith(b"READY"):
        child.kill()
        child.wait()
        raise DoorError(errno.EIO, "the check's door server did not start (see above)")
    return child


def _stop_check_server(child, kill=False):
    if child.poll() is None:
        if kill:
            child.kill()
        else:
            child.stdin.close()  # the server revokes its door and exits
    child.wait(10)


def _what_check_tests(backend):
    """(what was tested, the verdict's words) in plain terms."""
    if backend.name == "emulated":
        return ("the EMULATION of doors over Unix-domain sockets: no illumos doors on this "
                "system, so this proves doordown runs here, not that doors do (on illumos: "
                "check --doors native)", "the door emulation works here (no real doors tested)")
    if os.environ.get("DOORDOWN_LIBDOOR"):
        return ("the door library %s: a MODEL of the illumos door ABI, which proves "
                "doordown's native code, not this machine's kernel" % os.environ["DOORDOWN_LIBDOOR"],
                "doordown's native doors work on the model")
    return ("this kernel's illumos doors, through libc.so.1", "illumos doors work here for doordown")


def run_check(args):
    import shutil
    import tempfile
    backend = door_backend(args.doors)
    if args.serve:
        _serve_check_door(backend, args.serve)
        if backend.exit_hard:
            os._exit(0)
        return 0
    directory = tempfile.mkdtemp(prefix="doordown-check-")
    path = os.path.join(directory, "check.door")
    rows, children = [], []

    def row(name, ok, detail):
        if ok is not None:  # None: not applicable here, not counted
            rows.append(ok)
        sys.stdout.write("  [%s] %-20s %s\n" % ({True: "ok", False: "FAIL", None: "n/a"}[ok], name, detail))
        sys.stdout.flush()

    def server(at, env=None):
        children.append(_start_check_server(backend, at, env))
        return children[-1]

    import platform
    tested, verdict_words = _what_check_tests(backend)
    sys.stdout.write("doordown %s check: %s, %s %s (%s), Python %s %s\n" % (
        __version__, backend.description, platform.system(), platform.release(), platform.version(),
        platform.python_implementation(), platform.python_version()))
    sys.stdout.write("tested: %s\n" % tested)
    try:
        child = server(path)
        client = backend.open(path)
        mode = stat.S_IMODE(os.stat(path).st_mode)
        row("create + attach", client.server_pid() == child.pid and mode == 0o600,
            "door %s, mode %o, server pid %d" % (path, mode, client.server_pid()))

        calls, payload = 10000, b"x" * 64
        begin = time.perf_counter()
        correct = all(client.call(payload)[0] == payload for _ in range(calls))
        door_us = (time.perf_counter() - begin) / calls * 1e6
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(path + ".sock")
            begin = time.perf_counter()
            for _ in range(calls):
                sock.sendall(payload)
                got = b""
                while len(got) < len(payload):
                    got += sock.recv(65536)
            socket_us = (time.perf_counter() - begin) / calls * 1e6
        row("10,000 calls", correct, "door round trip %.1f us; Unix-socket round trip %.1f us "
            "(both from Python, 64 bytes)" % (door_us, socket_us))

        threads = {client.call(b"thread")[0] for _ in range(1000)}
        row("thread reuse", len(threads) <= 2, "1,000 sequential calls ran on %d server thread(s)" % len(threads))

        begin = time.monotonic()
        with _thread_pool(16) as pool:
            sleepers = set(pool.map(lambda _: client.call(b"sleep:0.2")[0], range(16)))
        elapsed = time.monotonic() - begin
        row("threads on demand", elapsed < 1.0 and len(sleepers) >= 8,
            "16 concurrent 0.2 s calls took %.2f s on %d threads" % (elapsed, len(sleepers)))

        euid, pid = map(int, client.call(b"who")[0].split())
        row("credentials", (euid, pid) == (os.geteuid(), os.getpid()),
            "the server saw euid %d pid %d (we are %d, %d)" % (euid, pid, os.geteuid(), os.getpid()))

        size = 1 << 20
        big = client.call(b"big:%d" % size)[0]
        row("overflow reply", big == (bytes(range(256)) * (size // 256))[:size],
            "a 1 MiB reply past the caller's reply buffer arrived whole")

        read_end, write_end = os.pipe()
        os.write(write_end, b"descriptor")
        os.close(write_end)
        reply, fds = client.call(b"fds", [read_end])
        os.close(read_end)
        with os.fdopen(fds[0], "rb") as returned:
            passed = returned.read()
        row("descriptors", reply == b"ok" and passed == b"rotpircsed", "a pipe each way")

        _check_full_table(client, row)

        request = b"deep:900" + b" " * (60 * 1024)
        try:
            depth, _, facts = client.call(request)[0].partition(b" ")
            row("deep stack", depth == b"%d" % (2 * 901), "C recursion 900 deep under a 60 KiB "
                "request on a door thread; %s" % facts.decode())
        except DoorError as exc:
            row("deep stack", False, "the server died under C recursion 900 deep with a 60 KiB "
                "request (%s): its door threads' stacks are too small" % exc)

        _stop_check_server(child)
        try:
            client.call(payload)
            revoked = False
        except DoorRevoked:
            revoked = True
        except DoorError:
            revoked = False
        row("revoke", revoked, "a call after the server revoked its door fails cleanly (EBADF)")

        _check_stale_door(backend, os.path.join(directory, "stale.door"), server, row)
        _check_no_free_thread(backend, os.path.join(directory, "busy.door"), server, row)
    except (DoorError, OSError, ValueError) as exc:
        row("error", False, str(exc))
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
        shutil.rmtree(directory, ignore_errors=True)
    verdict = bool(rows) and all(rows)
    sys.stdout.write("verdict: %s\n" % ("PASS: " + verdict_words if verdict else "FAIL: see above"))
    if not verdict:
        sys.stdout.write("(this whole output is the report to send: it names the system, the Python "
                         "and every probe)\n")
    return 0 if verdict else 1


def _check_full_table(client, row):
    """A reply carrying a descriptor, to a caller whose descriptor table is full."""
    import resource
    before = client.call(b"nfds")[0]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    outcomes = []
    for _ in range(3):
        held = []
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 256), hard))
        try:
            try:
                while True:
                    held.append(os.open(os.devnull, os.O_RDONLY))
            except OSError:
                pass
            try:
                reply, fds = client.call(b"fd")
                _close_fds(fds)
                outcomes.append("a descriptor arrived" if fds else
                                "the server said: " + unpack_message(reply, (KIND_FAIL,))[2][1].decode())
            except (DoorError, OSError, WireError) as exc:
                outcomes.append("%s: %s" % (type(exc).__name__, exc))
        finally:
            _close_fds(held)
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    after = client.call(b"nfds")[0]
    told = all(outcome.startswith(("the server said", "DoorError")) for outcome in outcomes)
    row("full fd table", told and int(after) <= int(before),
        "3 replies with a descriptor to a caller with no descriptor free: %s; the server's open "
        "descriptors %s -> %s" % (outcomes[0], before.decode(), after.decode()))


def _check_stale_door(backend, path, server, row):
    """A server killed outright leaves its door attached: callers fail fast, a new one takes over."""
    first = server(path)
    backend.open(path).call(b"x")
    _stop_check_server(first, kill=True)
    client = backend.open(path)
    try:
        client.call(b"x")
        refused = "the call succeeded"
    except DoorRevoked as exc:
        refused = None if exc.errno == errno.EBADF or backend.name == "emulated" else str(exc)
    except DoorError as exc:
        refused = "%s: %s" % (type(exc).__name__, exc)
    second = server(path)
    answered = client.call(b"again")[0] == b"again"
    _stop_check_server(second)
    row("stale door", refused is None and answered,
        "after kill -9 of its server, a call %s; a new server replaced the stale door and answered: %s"
        % ("failed at once (EBADF)" if refused is None else "went wrong: " + refused,
           "yes" if answered else "no"))


def _check_no_free_thread(backend, path, server, row):
    """With thread creation refused and the only server thread busy, a timed call times out."""
    if backend.name == "emulated":
        row("no thread free", None, "the emulation makes its threads itself: nothing to refuse")
        return
    child = server(path, dict(os.environ, DOORDOWN_CHECK_NO_THREADS="1", DOORMODEL_MAX_LWPS="1"))
    busy_client, timed = backend.open(path), backend.open(path, 0.5)
    busy_client.call(b"x")
    busy = threading.Thread(target=busy_client.call, args=(b"sleep:2",))
    busy.start()
    time.sleep(0.3)
    begin = time.monotonic()
    try:
        timed.call(b"x")
        outcome = "it was served after %.1f s: thread creation was not refused" % (time.monotonic() - begin)
        ok = None if is_illumos() else False  # illumos: prctl may not have taken
    except DoorTimeout as exc:
        took = time.monotonic() - begin
        ok, outcome = took < 1.5, "DoorTimeout after %.2f s (%s)" % (took, exc)
    except DoorError as exc:
        ok, outcome = False, "%s: %s" % (type(exc).__name__, exc)
    busy.join()
    _stop_check_server(child)
    row("no thread free", ok, "thread creation refused, the only server thread busy, a call "
        "limited to 0.5 s: %s" % outcome)


def _thread_pool(workers):
    import concurrent.futures
    return concurrent.futures.ThreadPoolExecutor(workers)


###############################################################################
# Service files ##############################################################
###############################################################################
#
# `doordown smf [serve options]` and `doordown systemd [serve options]` print what runs
# that very serve command under the service manager, from the directory it was typed
# in.  The front stays in the foreground (SMF's duration=child, systemd's Type=notify);
# SIGTERM is its graceful stop and SIGHUP its reload.  Only the front may get them:
# a manager that signals every process of the service would also stop the app role
# behind the front's back, so systemd is told KillMode=mixed and SMF's methods signal
# the pid in the --pid file.

def _service_command(args):
    """The serve command line the service runs: this interpreter, this file, the options."""
    return [sys.executable, os.path.abspath(__file__), "serve"] + args.serve_argv


def _service_name(args):
    if args.service:
        return args.service
    return "doordown-" + re.sub(r"[^A-Za-z0-9-]", "-", args.app.partition(":")[0]) if args.app else "doordown"


def smf_manifest(args):
    """An SMF manifest (valid against illumos' service_bundle.dtd.1) for this serve command."""
    from xml.sax.saxutils import escape
    name = _service_name(args)
    pid_file = args.pid or "/var/run/%s.pid" % name
    command = _service_command(args) + ([] if args.pid else ["--pid", pid_file])
    quote = lambda word: escape(_shell_quote(word).replace("%", "%%"), {'"': "&quot;"})
    def signal_front(name):
        return "/usr/bin/kill -%s $(/usr/bin/cat %s)" % (name, quote(pid_file))
    stop_timeout = int(args.graceful_timeout) + 15
    access = ("its access log: %s" % os.path.abspath(args.access_log)
              if args.access_log not in ("-", "off") else "its access log goes there too"
              if args.access_log == "-" else "no access log")
    return """<?xml version="1.0"?>
<!DOCTYPE service_bundle SYSTEM "/usr/share/lib/xml/dtd/service_bundle.dtd.1">
<!--
  Made by `doordown smf`.  Install: svccfg import {file}.xml; svcadm enable {name}
  Log (the front's and the app's stderr): svcs -L {name}; {access}.
  svcadm refresh {name}: a new app process, no request lost; svcadm disable {name}: a
  graceful stop (SIGTERM to the front only; the front stops its app).
-->
<service_bundle type="manifest" name="{name}">
  <service name="site/{name}" type="service" version="1">
    <create_default_instance enabled="false"/>
    <single_instance/>
    <dependency name="network" grouping="require_all" restart_on="error" type="service">
      <service_fmri value="svc:/milestone/network:default"/>
    </dependency>
    <dependency name="filesystem" grouping="require_all" restart_on="error" type="service">
      <service_fmri value="svc:/system/filesystem/local"/>
    </dependency>
    <method_context working_directory="{cwd}"/>
    <exec_method type="method" name="start" timeout_seconds="{start_timeout}"
                 exec="{start}"/>
    <exec_method type="method" name="stop" timeout_seconds="{stop_timeout}"
                 exec="{stop}"/>
    <exec_method type="method" name="refresh" timeout_seconds="60"
                 exec="{refresh}"/>
    <property_group name="startd" type="framework">
      <propval name="duration" type="astring" value="child"/>
      <propval name="ignore_error" type="astring" value="core,signal"/>
    </property_group>
    <stability value="Unstable"/>
    <template>
      <common_name>
        <loctext xml:lang="C">{title}</loctext>
      </common_name>
    </template>
  </service>
</service_bundle>
""".format(file=name, name=name, access=escape(access), cwd=escape(os.getcwd(), {'"': "&quot;"}),
           start_timeout=int(args.boot_timeout) + 30, start=" ".join(quote(w) for w in command),
           stop_timeout=stop_timeout, stop=signal_front("TERM"), refresh=signal_front("HUP"),
           title=escape("doordown: %s" % _service_title(args)))


def systemd_unit(args):
    """A systemd service unit (`systemd-analyze verify` accepts it) for this serve command."""
    kill = "/bin/kill" if os.path.exists("/bin/kill") else "/usr/bin/kill"
    return """# Made by `doordown systemd`.  Install: cp {name}.service /etc/systemd/system/;
# systemctl daemon-reload; systemctl enable --now {name}.  Log: journalctl -u {name}.
# systemctl reload {name}: a new app process, no request lost (SIGHUP).
[Unit]
Description=doordown: {title}
After=network.target

[Service]
Type=notify
NotifyAccess=main
ExecStart={start}
ExecReload={kill} -HUP $MAINPID
KillSignal=SIGTERM
KillMode=mixed
TimeoutStopSec={stop_timeout}
WorkingDirectory={cwd}
Restart=on-failure
RestartPreventExitStatus={usage} {load}

[Install]
WantedBy=multi-user.target
""".format(name=_service_name(args), title=_service_title(args),
           start=" ".join(_systemd_quote(word) for word in _service_command(args)), kill=kill,
           stop_timeout=int(args.graceful_timeout) + 15, cwd=os.getcwd().replace("%", "%%"),
           usage=EXIT_USAGE, load=EXIT_APP_LOAD)


def _shell_quote(word):
    import shlex
    return shlex.quote(word)


def _systemd_quote(word):
    """One word of a systemd command line (systemd.service(5), "Command lines")."""
    word = word.replace("%", "%%").replace("$", "$$")
    if re.fullmatch(r"[\w./:@=,+-]+", word):
        return word
    return '"%s"' % word.replace("\\", "\\\\").replace('"', '\\"')


def print_service_file(args):
    if args.config:  # the site's [serve] sets the timeouts and the pid file the service must know
        try:
            site_args, _ = read_site(args.config, args.serve_argv)
        except ConfigError as exc:
            sys.stderr.write("doordown: error: %s\n" % exc)
            return EXIT_USAGE
        for name in ("graceful_timeout", "boot_timeout", "pid", "access_log"):
            setattr(args, name, getattr(site_args, name))
    sys.stdout.write(smf_manifest(args) if args.command == "smf" else systemd_unit(args))
    return 0


def _service_title(args):
    if args.config:
        return "the applications of %s" % args.config
    return args.app or "the built-in hello app"


def sd_notify(path, state):
    """Tell systemd `state` (sd_notify(3)) at NOTIFY_SOCKET `path`, when it asked for it."""
    if not path:
        return
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect("\0" + path[1:] if path[0] == "@" else path)
            sock.sendall(state.encode())
    except OSError as exc:
        _log("front", "cannot notify systemd at %s: %s" % (path, exc.strerror or exc), "warning")


###############################################################################
# Command line ###############################################################
###############################################################################

# gunicorn options that have no meaning here, and why: said instead of "unrecognized".
_NOT_FOR_DOORS = {
    "--workers": "doordown runs one application process and the OS gives it a thread per "
                 "concurrent request (a door server thread is made when every other one is "
                 "busy): there is no worker count to set",
    "--threads": "door server threads are made by the OS when every existing one is busy and "
                 "reused LIFO: there is no thread count to set (--max-connections bounds the front)",
    "--worker-class": "there is one model: every request is a door call into the application "
                      "process, run on a thread the OS provides (--transport picks a comparison)",
    "--worker-connections": "the front serves up to --max-connections connections, each on "
                            "its own thread",
    "--daemon": "doordown stays in the foreground for a service manager: `doordown smf` and "
                "`doordown systemd` print a service file for your command",
}
_NOT_FOR_DOORS.update({"-w": _NOT_FOR_DOORS["--workers"], "-k": _NOT_FOR_DOORS["--worker-class"],
                       "-D": _NOT_FOR_DOORS["--daemon"]})


class _ParserRules:
    """doordown's ways on top of argparse.ArgumentParser (build_parser() joins the two, so
    that only a process that parses a command line loads argparse)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_argument("--version", action="version", version=SERVER_SOFTWARE)

    def error(self, message):
        """A wrong option or value: one line on stderr, exit 2."""
        sys.stderr.write("%s: error: %s (try --help)\n" % (self.prog, message))
        sys.exit(EXIT_USAGE)

    def parse_known_args(self, args=None, namespace=None):
        if args is not None and self._subparsers is None:
            self._check_options(args)
        return super().parse_known_args(args, namespace)

    def _check_options(self, args):
        """Name an unknown option as such, before argparse takes it (or the value after
        it) for the positional application."""
        options = self._option_string_actions
        takes_value = False
        for arg in args:
            if takes_value:
                takes_value = False
                continue
            if arg == "--":
                return
            if arg[:1] != "-" or arg == "-":
                continue
            name = arg.partition("=")[0]
            if name[:2] in _NOT_FOR_DOORS and name[:2] not in options:  # -w4
                name = name[:2]
            if name in _NOT_FOR_DOORS:
                self.error("%s: %s" % (name, _NOT_FOR_DOORS[name]))
            action = options.get(name)
            if action is None and name.startswith("--"):  # argparse's abbreviations
                matches = [option for option in options if option.startswith(name)]
                if len(matches) > 1:
                    continue  # argparse says which it could be
                action = options[matches[0]] if matches else None
            elif action is None and name[:2] in options:  # -b127.0.0.1:8000
                continue
            if action is None:
                self.error("unknown option %s" % name)
            takes_value = action.nargs != 0 and "=" not in arg


def _invalid(message):
    """What an option's type function raises: argparse prints `message` as it is."""
    import argparse
    return argparse.ArgumentTypeError(message)


def _bind_address(text):
    """--bind, in gunicorn's forms: HOST:PORT, HOST, PORT, [IPv6]:PORT, unix:PATH, fd://N."""
    import ipaddress
    expected = "expected HOST:PORT, [IPv6]:PORT, unix:PATH or fd://N, got %r" % text
    if text.startswith("unix:"):
        path = text[5:]
        if not path:
            raise _invalid("unix: needs a path, as in unix:/run/myapp.sock")
        return ("unix", path)
    if text.startswith("fd://"):
        if not text[5:].isdigit():
            raise _invalid(expected)
        return ("fd", int(text[5:]))
    match = re.fullmatch(r"\[([^\]]*)\](?::([0-9]{1,5}))?|([A-Za-z0-9.-]*)(?::([0-9]{1,5}))?",
                         text[6:] if text.startswith("tcp://") else text)
    if match is None:
        if text.count(":") > 1 and "[" not in text:
            expected += " (an IPv6 address goes in brackets: [::1]:8000)"
        raise _invalid(expected)
    v6, v6_port, host, port = match.groups()
    if v6 is not None:
        try:
            ipaddress.IPv6Address(v6)
        except ValueError:
            raise _invalid("%r is not an IPv6 address (in %r)" % (v6, text))
        host, port = v6, v6_port
    elif port is None and host.isdigit():  # a bare port
        host, port = "", host
    port = 8000 if port is None else int(port)
    if port > 65535:
        raise _invalid("port %d out of range (in %r)" % (port, text))
    return ("tcp", host or "127.0.0.1", port)


def _positive(kind):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise _invalid("expected a positive number, got %r" % text)
        if not 0 < value < float("inf"):  # nan and inf too: every deadline would break on them
            raise _invalid("expected a positive number, got %r" % text)
        return value
    parse.__name__ = kind.__name__
    return parse


def _count(option):
    """A whole number, 0 or more (0: off)."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            value = -1
        if value < 0:
            raise _invalid("%s: expected a whole number, 0 or more, got %r" % (option, text))
        return value
    parse.__name__ = "int"
    return parse


def _max_headers(text):
    """--max-headers: positive, and no more than a door message carries (else such a
    request, within the limit, would be a 502 from the app's refusal of the call)."""
    value = _positive(int)(text)
    most = (_MAX_FIELDS - _REQUEST_FIXED) // 2
    if value > most:
        raise _invalid("--max-headers: at most %d, got %r" % (most, text))
    return value


# The largest --max-header-size: a head within it must fit in one door call with the rest of
# the request message (a length word for each field, and the fixed fields: at most a few KiB
# with --max-headers at its most), else such a request, within the limit, would be a 502.
MAX_HEADER_SIZE_MOST = DOOR_CALL_MAX - 64 * 1024


def _max_header_size(text):
    """--max-header-size: a size, and no more than a door call carries."""
    value = _size(text)
    if value > MAX_HEADER_SIZE_MOST:
        raise _invalid("--max-header-size: at most %dK (a request head must fit in a door call), got %r"
                       % (MAX_HEADER_SIZE_MOST >> 10, text))
    return value


def _rate(text):
    """--min-body-rate: a size of at least one byte (a second per byte at worst)."""
    rate = _size(text)
    if rate <= 0:
        raise _invalid("--min-body-rate must be at least 1 byte/s, got %r" % text)
    return rate


def _size(text):
    """A byte count: 1048576, 512K, 100M, 1G."""
    match = re.fullmatch(r"([0-9]+)([KMG]?)B?", text.strip().upper())
    if match is None:
        raise _invalid("expected a size like 100M, got %r" % text)
    return int(match.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[match.group(2)]


def _names(choices):
    """A comma-separated list of some of `choices`."""
    def parse(text):
        names = [name.strip() for name in text.split(",") if name.strip()]
        if not names or any(name not in choices for name in names):
            raise _invalid("expected a comma-separated list of %s, got %r"
                           % (", ".join(choices), text))
        return names
    parse.__name__ = "list"
    return parse


def _counts(text):
    """A comma-separated list of positive integers: 1,16,64."""
    try:
        counts = [int(item) for item in text.split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) <= 0:
        raise _invalid("expected positive integers like 1,16,64, got %r" % text)
    return counts


def _static_map(text):
    """/URL=DIR -> (url prefix, directory); that DIR is a directory is checked once --chdir
    has been done (prepare_serve), since a relative DIR is read from there."""
    prefix, equals, root = text.partition("=")
    if not equals or not prefix.startswith("/") or not root:
        raise _invalid("expected /URL=DIR, got %r" % text)
    return prefix, root


def _static_index(text):
    if not text or "/" in text or "\\" in text or text in (".", ".."):
        raise _invalid("expected a file name like index.html, got %r" % text)
    return text


def _app_spec(text):
    """module, module:callable, or gunicorn's factory call module:create_app('arg')."""
    module, _, attr = text.partition(":")
    script = re.fullmatch(r"(?:\./)?([\w./]+)\.py", module)
    if script:  # a file name where a module name goes
        raise _invalid("expected module:callable, got %r: name the module "
                                         "without .py, as in %r" % (text, script.group(1).replace(
                                             "/", ".") + (":" + attr if attr else "")))
    if re.fullmatch(r"[\w.]+", module) and (not attr or re.fullmatch(r"[\w.]+", attr)):
        return text
    if re.fullmatch(r"[\w.]+", module) and attr.endswith(")"):
        try:
            factory_call(attr)
        except ValueError as exc:
            raise _invalid("%s (in %r)" % (exc, text))
        return text
    raise _invalid("expected module:callable, got %r" % text)


def _env_pair(text):
    name, equals, value = text.partition("=")
    if not equals or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise _invalid("expected NAME=VALUE, got %r" % text)
    return name, value


def _octal_mode(text):
    try:
        mode = int(text, 8)
    except ValueError:
        mode = -1
    if not 0 <= mode <= 0o777:
        raise _invalid("expected an octal mode like 600 or 660, got %r" % text)
    return mode


def _log_format(text):
    try:
        compile_log_format(text)
    except ValueError as exc:
        raise _invalid(str(exc))
    return text


def build_parser():
    import argparse
    _Parser = type("_Parser", (_ParserRules, argparse.ArgumentParser), {})
    parser = _Parser(prog="doordown", description=(
        "Serve a Python WSGI application through illumos doors (emulated off illumos)."))
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    doors_help = "door backend: native (illumos), emulated (Unix sockets), auto (default)"
    app_help = ("WSGI application as module:callable (callable defaults to 'application'; "
                "module:create_app() or module:create_app('arg') calls a factory once; the "
                "current directory is on sys.path); default: the built-in hello app")

    serve = commands.add_parser("serve", help="run the HTTP front and its application",
                                description="Run the HTTP front; spawn the application "
                                            "(the app role) and forward every request to it "
                                            "with one door call.")
    serve.add_argument("app", nargs="?", type=_app_spec, help=app_help)
    serve.add_argument("-b", "--bind", type=_bind_address, action="append", metavar="ADDRESS",
                       help="listen on HOST:PORT, [IPv6]:PORT, unix:PATH or fd://N; repeatable "
                            "(default 127.0.0.1:8000; systemd's sockets when it passes some)")
    serve.add_argument("--backlog", type=_positive(int), default=2048, metavar="N",
                       help="listen backlog: connections the kernel queues before accept (default 2048)")
    serve.add_argument("--unix-socket-perms", type=_octal_mode, default=0o600, metavar="MODE",
                       help="mode of unix: sockets (default 600; 660 for a proxy in --group)")
    serve.add_argument("--certfile", metavar="FILE", help="serve HTTPS with this certificate (PEM chain)")
    serve.add_argument("--keyfile", metavar="FILE", help="its private key (default: in --certfile)")
    serve.add_argument("--ca-certs", metavar="FILE",
                       help="require client certificates signed by these CAs (PEM)")
    serve.add_argument("--doors", choices=("auto", "native", "emulated"), default="auto", help=doors_help)
    serve.add_argument("--transport", choices=TRANSPORTS, default="door",
                       help="how the front reaches the app: door (default), proxy (HTTP/1.1), "
                            "fastcgi, cgi (a process per request), or inprocess (no IPC; a "
                            "reference for benchmarks)")
    serve.add_argument("--app-door", metavar="PATH",
                       help="front an app role started separately on this door (or socket, "
                            "with --transport proxy or fastcgi); spawn none")
    serve.add_argument("-t", "--timeout", type=_positive(float), default=30.0, metavar="SECONDS",
                       help="answer 504 when the app has not started its response within this; a "
                            "stream may then run on (default 30)")
    serve.add_argument("--graceful-timeout", type=_positive(float), default=30.0, metavar="SECONDS",
                       help="on SIGTERM/SIGINT, time given to requests in flight (default 30)")
    serve.add_argument("--boot-timeout", type=_positive(float), default=30.0, metavar="SECONDS",
                       help="time for the app to answer on its door after starting (default 30)")
    serve.add_argument("--keepalive", "--keep-alive", type=_positive(float), default=Limits.keepalive,
                       metavar="SECONDS",
                       help="close idle keep-alive connections after this (default 5)")
    serve.add_argument("--header-timeout", type=_positive(float), default=Limits.header_timeout,
                       metavar="SECONDS", help="time for a request line and headers to arrive (default 10)")
    serve.add_argument("--body-timeout", type=_positive(float), default=Limits.body_timeout,
                       metavar="SECONDS", help="time for a request body to start arriving (default 30)")
    serve.add_argument("--max-connections", type=_positive(int), default=Limits.max_connections,
                       metavar="N", help="connections served at once; more wait in the backlog (default 1000)")
    serve.add_argument("--max-body", type=_size, default=Limits.max_body, metavar="SIZE",
                       help="largest request body, e.g. 100M (default); larger: 413")
    serve.add_argument("--max-line", type=_positive(int), default=Limits.max_line, metavar="BYTES",
                       help="longest request line (414) or header field (431) (default 8190)")
    serve.add_argument("--max-headers", type=_max_headers, default=Limits.max_headers, metavar="N",
                       help="most header fields in a request (default 100); more: 431")
    serve.add_argument("--max-header-size", type=_max_header_size, default=Limits.max_header_size, metavar="SIZE",
                       help="largest request head (default 64K); larger: 431")
    serve.add_argument("--access-log", "--access-logfile", default="-", metavar="-|FILE|off",
                       help="access log: - for stderr (default), a file (reopened on SIGUSR1), or off")
    serve.add_argument("--access-logformat", type=_log_format, metavar="FORMAT",
                       help="gunicorn's atoms, e.g. '%%(h)s \"%%(r)s\" %%(s)s %%(D)s' "
                            "(default: Apache combined)")
    serve.add_argument("--log-level", choices=_LOG_LEVELS, default="info",
                       help="the least severe messages logged, the app's too (default info)")
    serve.add_argument("--pid", metavar="FILE", help="write the front's pid to FILE (removed at exit)")
    serve.add_argument("-u", "--user", metavar="USER", help="run as USER once the sockets are bound")
    serve.add_argument("-g", "--group", metavar="GROUP",
                       help="and as GROUP (default: USER's group)")
    serve.add_argument("--chdir", metavar="DIR",
                       help="change to DIR first (the app is imported from there; relative paths are read from there)")
    serve.add_argument("-e", "--env", type=_env_pair, action="append", metavar="NAME=VALUE",
                       help="set an environment variable for the front and the app (repeatable)")
    serve.add_argument("--reload", action="store_true",
                       help="development: restart the app when one of its source files changes")
    serve.add_argument("--stream-idle-timeout", type=_positive(float), default=Limits.stream_idle_timeout,
                       metavar="SECONDS", help="end a streamed response after this long without a "
                                               "byte from the app, or the client not reading (default 60)")
    serve.add_argument("--min-body-rate", type=_rate, default=Limits.min_body_rate, metavar="SIZE",
                       help="bytes/s a request body must keep up once started (default 1K)")
    serve.add_argument("--max-requests", type=_count("--max-requests"), default=0, metavar="N",
                       help="replace the app (without losing a request) after N requests; 0: never")
    serve.add_argument("--max-requests-jitter", type=_count("--max-requests-jitter"), default=0, metavar="N",
                       help="add 0..N at random to --max-requests, so replacements do not align")
    serve.add_argument("--max-stuck", type=_positive(int), default=5, metavar="N",
                       help="replace the app when N requests are running past --timeout (default 5)")
    serve.add_argument("--forwarded-allow-ips", type=lambda text: [ip.strip() for ip in text.split(",")],
                       default=["127.0.0.1", "::1"], metavar="IPS",
                       help="peers whose X-Forwarded-For/-Proto are trusted, comma separated, or '*' "
                            "(default 127.0.0.1,::1); from others these headers are dropped")
    serve.add_argument("--allow-uid", type=int, action="append", metavar="UID",
                       help="also accept door calls from this euid (repeatable)")
    serve.add_argument("--config", metavar="FILE",
                       help="serve the applications of a site file: [serve] takes these options by "
                            "name, one [app:NAME] section per application; SIGHUP reads it again")
    serve.add_argument("--smart-spawn", action="store_true",
                       help="with --config: fork the apps that use serve's own python and user "
                            "from a template process, so that they share its memory")
    serve.add_argument("--control", metavar="PATH",
                       help="with --config: a control door here (0600) for doordown status, "
                            "reload, stop and start")
    serve.add_argument("--static-map", type=_static_map, action="append", metavar="/URL=DIR",
                       help="serve the files under DIR at /URL from the front itself (repeatable)")
    serve.add_argument("--static-index", type=_static_index, action="append", metavar="NAME",
                       help="for a directory under --static-map, serve its NAME, e.g. index.html "
                            "(repeatable; default: none, directories get 404)")

    app = commands.add_parser("app", help="run the app role: serve a WSGI app on a door",
                              description="Serve a WSGI application on a door; each door "
                                          "invocation runs on a thread the OS provides.")
    app.add_argument("app", nargs="?", type=_app_spec, help=app_help)
    app.add_argument("--door", "--socket", dest="door", required=True, metavar="PATH",
                     help="where to create the door (or the Unix socket of proxy and fastcgi)")
    app.add_argument("--doors", choices=("auto", "native", "emulated"), default="auto", help=doors_help)
    app.add_argument("--transport", choices=("door", "proxy", "fastcgi"), default="door",
                     help="serve a door (default), HTTP/1.1 (proxy pass) or FastCGI on a Unix socket")
    app.add_argument("--allow-uid", type=int, action="append", metavar="UID",
                     help="accept door calls from this euid too (default: only the app's own)")
    app.add_argument("--graceful-timeout", type=_positive(float), default=30.0, metavar="SECONDS",
                     help="on SIGTERM, time given to calls in flight (default 30)")
    app.add_argument("-t", "--timeout", type=_positive(float), default=30.0, metavar="SECONDS",
                     help="report requests running longer as stuck (default 30)")
    app.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)  # stop when this front dies
    app.add_argument("--log-level", choices=_LOG_LEVELS, default="info",
                     help="the least severe messages logged (default info)")
    app.add_argument("--reload", action="store_true",
                     help="ask the front (SIGHUP to --parent-pid) for a new app when a source file changes")

    cgi = commands.add_parser("cgi", help="answer one request as a CGI program (run by serve --transport cgi)",
                              description="Answer the request in the environment (RFC 3875) "
                                          "through a WSGI application, as a CGI program.")
    cgi.add_argument("app", nargs="?", type=_app_spec, help=app_help)

    bench = commands.add_parser("bench", help="measure every transport against the same workloads",
                                description="Run every transport (and the in-process reference) "
                                            "against the same workloads; report requests/s, latency, "
                                            "errors, CPU per request, memory and threads.")
    bench.add_argument("--transports", type=_names(TRANSPORTS), metavar="LIST",
                       help="comma-separated, of %s (default: all; with --peers: door)" % ",".join(TRANSPORTS))
    bench.add_argument("--workloads", type=_names(tuple(BENCH_WORKLOADS)), metavar="LIST",
                       help="comma-separated, of %s (default: all; with --peers: hello)"
                            % ",".join(BENCH_WORKLOADS))
    bench.add_argument("--peers", nargs="?", const=list(PEERS), type=_names(PEERS), metavar="LIST",
                       help="also the stacks people run instead, where installed, on hello: %s "
                            "(default: all of them); -c defaults to 16" % ",".join(PEERS))
    bench.add_argument("-c", "--concurrency", type=_counts, metavar="LIST",
                       help="connections, comma-separated (default 1,16,64; --quick: 16)")
    bench.add_argument("-d", "--duration", type=_positive(float), metavar="SECONDS",
                       help="length of each measured run (default 10; --quick: 1)")
    bench.add_argument("--warmup", type=float, metavar="SECONDS",
                       help="load before each measured run, not counted (default 2; --quick: 1; 0: none)")
    bench.add_argument("--quick", action="store_true", help="c16 only, 1 s runs: under a minute")
    bench.add_argument("--pinned", action="store_true",
                       help="server stack on CPU 0, load generator on CPU 1 (default: free, no pinning)")
    bench.add_argument("--load", choices=("auto", "wrk", "builtin"), default="auto",
                       help="load generator: wrk if on PATH (auto, default), or the built-in one")
    bench.add_argument("--doors", choices=("auto", "native", "emulated"), default="auto", help=doors_help)
    bench.add_argument("--faults", action="store_true",
                       help="instead: load the door transport while the app is killed, reloaded, "
                            "replaced and stopped; report requests attempted and failed per event")
    bench.add_argument("--streams", action="store_true",
                       help="instead: per transport, time to a stream's first event, and MB/s and "
                            "memory growth of a generated stream and of a wsgi.file_wrapper file")
    bench.add_argument("--breakdown", action="store_true",
                       help="instead: where a door request's CPU goes, step by step, beside a raw "
                            "socket round trip and the door and in-process stacks under load")
    bench.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    bench.add_argument("--svg", metavar="FILE", help="also write a chart of req/s and memory as SVG")

    for name, what in (("smf", "an SMF manifest (illumos)"), ("systemd", "a systemd unit")):
        service = commands.add_parser(name, help="print %s that runs serve with these options" % what,
                                      description="Print %s that runs `doordown serve` with the "
                                                  "options that follow, from this directory." % what)
        service.add_argument("--service", metavar="NAME",
                             help="the service's name (default: doordown-MODULE)")
        service.add_argument("serve_options", nargs="*", metavar="SERVE-OPTION",
                             help="the application and options, as serve takes them")

    for name, what in (("status", "print the state of every app of a serve --config"),
                       ("reload", "replace one app of a serve --config with a new process"),
                       ("stop", "stop one app of a serve --config; its mount answers 503"),
                       ("start", "start an app stopped with doordown stop")):
        control = commands.add_parser(name, help=what, description=what[0].upper() + what[1:] +
                                      ", through its control door.")
        if name != "status":
            control.add_argument("app", metavar="APP", help="the app's name, from its [app:NAME]")
        control.add_argument("--control", required=True, metavar="PATH", help="the serve's control door")
        control.add_argument("--doors", choices=("auto", "native", "emulated"), default="auto", help=doors_help)
        if name == "status":
            control.add_argument("--json", action="store_true", help="print JSON instead of a table")

    template = commands.add_parser("template", description="The template apps are forked "
                                   "from (started by serve --smart-spawn).")
    template.add_argument("--fd", type=int, required=True, help=argparse.SUPPRESS)
    template.add_argument("--parent-pid", type=int, required=True, help=argparse.SUPPRESS)

    check = commands.add_parser("check", help="put this machine's doors through their paces",
                                description="Create a door, attach it, make 10,000 calls and "
                                            "check thread reuse, credentials, overflow replies, "
                                            "descriptors and revocation; then the failure paths: "
                                            "a caller with a full descriptor table, a deep stack "
                                            "under a large request, a stale door, no server thread "
                                            "free. Says which doors it tested; the output is the "
                                            "report to send.")
    check.add_argument("--doors", choices=("auto", "native", "emulated"), default="auto", help=doors_help)
    check.add_argument("--serve", metavar="PATH", help=argparse.SUPPRESS)
    return parser


def prepare_serve(args):
    """What `serve` does before it spawns anything: --chdir and --env, TLS, every
    listening socket, the access log and the pid file, then the drop to --user/--group
    (after binding, so ports under 1024 and root-only key files still work).  Returns an
    exit code after one line on stderr, or None to go on."""
    def fail(code, message):
        sys.stderr.write("doordown: error: %s\n" % message)
        for listener in args.listeners:
            listener.close()
        if args.private_dir is not None:
            os.rmdir(args.private_dir)
        if args.pid:
            _remove_pid_file(args.pid)  # if it is ours: written before what failed
        return code
    args.listeners, args.tls, args.access_logger, args.private_dir = [], None, None, None
    args.notify_socket = os.environ.pop("NOTIFY_SOCKET", None)  # the front's, not the app's
    if (args.keyfile or args.ca_certs) and not args.certfile:
        return fail(EXIT_USAGE, "--keyfile and --ca-certs need --certfile")
    try:
        if args.chdir:
            os.chdir(args.chdir)
    except OSError as exc:
        return fail(EXIT_USAGE, "--chdir %s: %s" % (args.chdir, exc.strerror))
    for prefix, root in args.static_map or ():
        if not os.path.isdir(root):
            return fail(EXIT_USAGE, "--static-map %s=%s: %r is not a directory" % (prefix, root, root))
    for name, value in args.env or ():
        os.environ[name] = value  # the app role inherits them
    try:
        credentials = _credentials(args.user, args.group) if args.user or args.group else None
        if args.certfile:
            args.tls = TLSContext(args.certfile, args.keyfile, args.ca_certs)
    except BindError as exc:
        return fail(EXIT_USAGE, exc)
    # USR2 is a no-op here; not gunicorn's binary upgrade: restarting the front without
    # refusing a connection is systemd socket activation's job.
    signal.signal(signal.SIGUSR2, lambda *_: None)
    try:
        args.listeners = open_listeners(args.bind or [("tcp", "127.0.0.1", 8000)], args.backlog,
                                        args.unix_socket_perms)
    except BindError as exc:
        return fail(1, exc)
    try:
        if args.access_log != "off":
            args.access_logger = AccessLog(None if args.access_log == "-" else args.access_log,
                                           args.access_logformat)
        if args.pid:
            with open(args.pid, "w") as pid_file:
                pid_file.write("%d\n" % os.getpid())
        # The private directory is made where TMPDIR says, owned by the user dropped to,
        # who removes it at stop: so root makes it as that user (taking its effective ids
        # for the moment), and a TMPDIR that user may not write is refused now, not found
        # out at stop, when the directory could not be removed.  (TMPDIR is looked up as
        # root: tempfile, as that user, would pass over it for another without a word.)
        import tempfile
        if credentials is not None and credentials[2] is not None and os.geteuid() == 0 and credentials[0] != 0:
            where = tempfile.gettempdir()
            try:
                args.private_dir = _as_user(credentials, tempfile.mkdtemp, prefix="doordown-", dir=where)
            except PermissionError:
                return fail(1, "--user %s may not write TMPDIR %s, where serve keeps its private "
                               "directory: give one that user may write" % (args.user, where))
        else:
            args.private_dir = tempfile.mkdtemp(prefix="doordown-")  # 0700: the doors stay private
        if credentials is not None:
            # What serve imports only later is imported now: the user dropped to may not be
            # allowed to read this interpreter's library (a pyenv under /root, mode 0700).
            _import_before_the_drop()
            uid, gid, user = credentials
            os.chown(args.private_dir, uid, gid)
            for listener in args.listeners:
                if listener.path is not None:  # the proxy in --group must reach it
                    os.chown(listener.path, uid, gid)
            if user is not None and os.getuid() != uid:
                os.initgroups(user, gid)
            os.setgid(gid)
            os.setuid(uid)
    except OSError as exc:
        return fail(1, "%s: %s" % (exc.filename or "--user", exc.strerror))
    return None


# The modules serve's front and supervisor import lazily (function by function), and so
# after a drop to --user/--group: spawning and reaping apps and CGI programs, the private
# directory's removal, static files, passed bodies, the access log's %(u)s, the event loop.
_LAZY_SERVE_MODULES = ("subprocess", "selectors", "shutil", "random", "fcntl", "mmap", "binascii",
                       "http", "mimetypes", "encodings.idna")


def _import_before_the_drop():
    import importlib
    for name in _LAZY_SERVE_MODULES:
        importlib.import_module(name)


def _as_user(credentials, call, *args, **kwargs):
    """call(...) with the effective user, group and groups of `credentials`, then root's again."""
    uid, gid, user = credentials
    euid, egid, groups = os.geteuid(), os.getegid(), os.getgroups()
    try:
        os.setgroups(os.getgrouplist(user, gid))
        os.setegid(gid)
        os.seteuid(uid)
        return call(*args, **kwargs)
    finally:
        os.seteuid(euid)
        os.setegid(egid)
        os.setgroups(groups)


def _credentials(user, group):
    """(uid, gid, user name or None) for --user/--group, names or numbers."""
    import grp
    import pwd
    name, uid, gid = None, os.getuid(), os.getgid()
    if user:
        try:
            entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
        except KeyError:
            raise BindError("--user %s: no such user" % user)
        name, uid, gid = entry.pw_name, entry.pw_uid, entry.pw_gid
    if group:
        try:
            gid = grp.getgrgid(int(group)).gr_gid if group.isdigit() else grp.getgrnam(group).gr_gid
        except KeyError:
            raise BindError("--group %s: no such group" % group)
    return uid, gid, name


def _remove_pid_file(path):
    try:
        with open(path) as pid_file:
            if pid_file.read().strip() == str(os.getpid()):
                os.unlink(path)
    except OSError:
        pass  # gone already, or not ours to remove after --user


def _parse_service_command(parser, argv):
    """`smf|systemd [--service NAME] [serve options]`: the serve options, checked as serve's."""
    rest, service = [], None
    words = iter(argv[1:])
    for word in words:
        if word == "--service" or word.startswith("--service="):
            service = word.partition("=")[2] or next(words, "")
            if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_.-]*", service):
                parser.error("--service: expected a name like myapp, got %r" % service)
        else:
            rest.append(word)
    args = parser.parse_args(["serve"] + rest)
    args.command, args.service, args.serve_argv = argv[0], service, rest
    return args


def _serve_conflict(args):
    """What is wrong with serve's options taken together, or None: for serve, and for the
    service files that run it (which would otherwise describe a service that cannot start)."""
    if not args.config and (args.control or args.smart_spawn):  # a site's options: one app
        return "%s needs --config" % ("--control" if args.control else "--smart-spawn")
    if args.app_door and args.transport in ("cgi", "inprocess"):
        return "--app-door needs --transport door, proxy or fastcgi"
    return None


def _printing(run, args):
    """run(args), which prints to stdout: a reader that left (`| head`) ends it quietly, exit 1."""
    try:
        code = run(args)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush at exit
        return 1


def main(argv=None):
    # serve and app run as a script re-execute themselves from a compiled copy (see
    # relaunch_compiled), once their command line is known to be good.
    relaunch = argv is None and __name__ == "__main__" and "_compiled_from" not in globals()
    argv = sys.argv[1:] if argv is None else argv
    child = argv[:1] == ["--child"] and len(argv) == 3  # started by serve: see child_command()
    args = None
    if not child:
        parser = build_parser()
        if argv[:1] in (["smf"], ["systemd"]) and not {"-h", "--help", "--version"} & set(argv[1:]):
            args = _parse_service_command(parser, argv)
        else:
            args = parser.parse_args(argv)
        if relaunch and args.command in ("serve", "app"):
            relaunch_compiled(argv)
        _take_relaunch_image(keep=args.command == "serve")
    if getattr(args, "log_level", None):
        _log_threshold[0] = _LOG_LEVELS.index(args.log_level)
    try:
        if child:
            return _run_child(argv[1], json.loads(argv[2]))
        if args.command == "app":
            return run_app(args)
        if args.command == "check":
            return run_check(args)
        if args.command == "cgi":
            return run_cgi(args)
        if args.command == "bench":
            args.argv = argv[1:]
            return run_bench(args)
        conflict = _serve_conflict(args) if args.command in ("smf", "systemd", "serve") else None
        if conflict:
            sys.stderr.write("doordown: error: %s\n" % conflict)
            return EXIT_USAGE
        if args.command in ("smf", "systemd"):
            return _printing(print_service_file, args)
        if args.command in ("status", "reload", "stop", "start"):
            return _printing(run_control, args)
        if args.command == "template":
            return run_template(args)
        apps = None
        if args.config:
            try:
                args, apps = read_site(args.config, argv[1:])
            except ConfigError as exc:
                sys.stderr.write("doordown: error: %s\n" % exc)
                return EXIT_USAGE
        failed = prepare_serve(args)
        if failed is not None:
            return failed
        try:
            return Supervisor(args, apps).run()
        finally:
            import shutil
            shutil.rmtree(args.private_dir, ignore_errors=True)
            for listener in args.listeners:
                listener.close()
            if args.pid:
                _remove_pid_file(args.pid)
    except DoorError as exc:
        sys.stderr.write("doordown: error: %s\n" % exc.strerror)
        return 1


if __name__ == "__main__":
    sys.exit(main())
