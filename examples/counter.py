"""A hit counter that keeps one database connection per door server thread, and no pool.

Serve it from the directory that holds doordown.py:

    python3 doordown.py serve examples.counter:app          # SQLite, in ./data
    DATABASE_URL=postgresql:///mydb python3 doordown.py serve examples.counter:app
    COUNTER_CONNECTIONS=per-request python3 doordown.py serve examples.counter:app

    curl localhost:8000/         record a hit; the reply says which thread and connection served it
    curl localhost:8000/latest   the last five hits (a read: retried once if its connection was lost)
    curl localhost:8000/stats    connections opened vs requests served

    python3 examples/counter.py bench    per-thread vs per-request connections, side by side

Settings, from the environment (the app role inherits the front's):
    DATABASE_URL          PostgreSQL through psycopg 3 (pip install 'psycopg[binary]');
                          SQLite when unset
    COUNTER_DATA_DIR      SQLite's directory (default ./data)
    COUNTER_CONNECTIONS   per-thread (default): each door thread keeps its connection;
                          per-request: open and close one for every request, to compare
"""

import argparse
import contextlib
import json
import os
import re
import select
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # where doordown.py is
if __name__ == "__main__":  # the bench, run as a script
    sys.path.insert(0, ROOT)
import doordown  # noqa: E402  (under the app role this is the running doordown itself)

MODES = ("per-thread", "per-request")
HOLD_MAX = 10.0  # seconds a request may ask to hold its connection (?hold=S, for tests)


# -- the two databases ----------------------------------------------------------------
#
# Same small interface: connect() -> (driver connection, server pid or None),
# is_usable(conn) (cheap, no round trip), was_lost(conn, exc), record_hit(), latest().

class SQLite:
    """A file in the data directory; the natural fit, a sqlite3 connection being bound to a thread."""

    name = "sqlite"

    def __init__(self, data_dir):
        os.makedirs(data_dir, exist_ok=True)
        self.path = os.path.join(data_dir, "counter.sqlite3")
        with contextlib.closing(sqlite3.connect(self.path)) as conn:
            conn.execute("PRAGMA journal_mode=WAL")  # readers do not wait for the writer
            conn.execute("CREATE TABLE IF NOT EXISTS hits"
                         " (id INTEGER PRIMARY KEY, thread TEXT, connection INTEGER)")
            conn.commit()

    def connect(self):
        # Each connection is used only by the thread that opened it, but close_all() closes
        # it from the app role's main thread at shutdown: hence check_same_thread=False.
        conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        # WAL with synchronous=NORMAL: no fsync per commit; a power cut may undo the last few.
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn, None

    @staticmethod
    def is_usable(conn):
        return True  # a file, not a server: nothing closes it behind our back

    @staticmethod
    def was_lost(conn, exc):
        return False

    @staticmethod
    def record_hit(conn, thread, serial, hold):
        time.sleep(hold)
        return conn.execute("INSERT INTO hits (thread, connection) VALUES (?, ?)",
                            (thread, serial)).lastrowid

    @staticmethod
    def latest(conn, hold):
        time.sleep(hold)
        return conn.execute("SELECT id, thread, connection FROM hits ORDER BY id DESC LIMIT 5").fetchall()


class PostgreSQL:
    """A real server through psycopg 3, connections in autocommit: no transaction outlives a request."""

    name = "postgresql"

    def __init__(self, url):
        try:
            import psycopg
        except ImportError:
            raise RuntimeError("DATABASE_URL is set, so this example needs psycopg 3: "
                               "python3 -m pip install 'psycopg[binary]'") from None
        self.psycopg, self.url = psycopg, url
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS hits"
                         " (id bigserial PRIMARY KEY, thread text, connection integer)")

    def connect(self):
        conn = self.psycopg.connect(self.url, autocommit=True, application_name="doordown-counter")
        return conn, conn.info.backend_pid

    @staticmethod
    def is_usable(conn):
        # An idle connection has nothing to read.  A readable socket means the server has
        # said goodbye (pg_terminate_backend, a restart, idle_session_timeout) and closed
        # it: replace it before the request uses it, at the cost of one poll(), no round trip.
        if conn.closed:
            return False
        idle = select.poll()
        idle.register(conn.fileno(), select.POLLIN)
        return not idle.poll(0)

    def was_lost(self, conn, exc):
        return isinstance(exc, self.psycopg.OperationalError) and conn.closed

    @staticmethod
    def record_hit(conn, thread, serial, hold):
        if hold:
            conn.execute("SELECT pg_sleep(%s)", (hold,))
        return conn.execute("INSERT INTO hits (thread, connection) VALUES (%s, %s) RETURNING id",
                            (thread, serial)).fetchone()[0]

    @staticmethod
    def latest(conn, hold):
        if hold:
            conn.execute("SELECT pg_sleep(%s)", (hold,))
        return conn.execute("SELECT id, thread, connection FROM hits ORDER BY id DESC LIMIT 5").fetchall()


# -- connections: one per door thread, or one per request ----------------------------------

class ConnectionLost(Exception):
    """The database connection died under a request that is not retried."""


class Connection:
    """A driver connection and what the replies report about it."""

    __slots__ = ("raw", "serial", "backend_pid", "uses")

    def __init__(self, raw, serial, backend_pid):
        self.raw, self.serial, self.backend_pid = raw, serial, backend_pid
        self.uses = 0


class Counter:
    """The WSGI application: routes, connection handling, and the figures /stats shows."""

    def __init__(self, database, mode):
        if mode not in MODES:
            raise ValueError("COUNTER_CONNECTIONS must be one of %s, not %r" % (", ".join(MODES), mode))
        self.database, self.mode = database, mode
        self.lock = threading.Lock()
        self.figures = {"requests": 0, "opened": 0, "closed": 0}
        self.threads = set()
        if mode == "per-thread":
            self.connections = doordown.per_thread(self.open_connection, close=self.close_connection,
                                                   check=lambda conn: database.is_usable(conn.raw))

    def count(self, figure):
        with self.lock:
            self.figures[figure] += 1
            return self.figures[figure]

    def open_connection(self):
        raw, backend_pid = self.database.connect()
        return Connection(raw, self.count("opened"), backend_pid)

    def close_connection(self, conn):
        conn.raw.close()
        self.count("closed")

    @contextlib.contextmanager
    def connection(self):
        """This door thread's connection (per-thread), or a new one closed afterwards (per-request)."""
        if self.mode == "per-thread":
            yield self.connections.get()
            return
        conn = self.open_connection()
        try:
            yield conn
        finally:
            self.close_connection(conn)

    def run(self, work, idempotent):
        """work(conn) -> (result, conn, retried).  A read whose connection was lost is run
        once more on a new one; a write is not, since it may have been done already."""
        for attempt in (1, 2):
            with self.connection() as conn:
                conn.uses += 1
                try:
                    return work(conn), conn, attempt == 2
                except Exception as exc:
                    if not self.database.was_lost(conn.raw, exc):
                        raise
                    if attempt == 2 or not idempotent:
                        raise ConnectionLost(exc) from exc
                # per-thread: the next get() finds this connection closed and replaces it

    # -- WSGI ---------------------------------------------------------------------------
    def __call__(self, environ, start_response):
        path = environ["PATH_INFO"]
        if path == "/stats":
            return self.reply(start_response, self.stats())
        if path not in ("/", "/latest"):
            return self.reply(start_response, {"error": "no such page"}, "404 Not Found")
        hold = _hold(environ.get("QUERY_STRING", ""))
        thread = threading.current_thread().name
        self.threads.add(threading.get_ident())
        self.count("requests")
        database = self.database
        if path == "/":
            def work(conn):
                return {"hit": database.record_hit(conn.raw, thread, conn.serial, hold)}
        else:
            def work(conn):
                return {"latest": [list(row) for row in database.latest(conn.raw, hold)]}
        try:
            body, conn, retried = self.run(work, idempotent=(path == "/latest"))
        except ConnectionLost as exc:
            environ["wsgi.errors"].write("counter: %s %s: the database connection was lost: %s\n"
                                         % (environ["REQUEST_METHOD"], path, exc))
            error = "the database connection was lost during this request"
            if path == "/":
                error += " (a write is not retried: it may have been done)"
            return self.reply(start_response, {"error": error}, "503 Service Unavailable")
        body.update(database=database.name, connections=self.mode, thread=thread,
                    thread_id=threading.get_ident(), connection=conn.serial,
                    backend_pid=conn.backend_pid, connection_uses=conn.uses, retried=retried)
        return self.reply(start_response, body)

    def stats(self):
        with self.lock:
            figures = dict(self.figures)
        return {"database": self.database.name, "connections": self.mode,
                "requests": figures["requests"], "connections_opened": figures["opened"],
                "connections_open": figures["opened"] - figures["closed"],
                "threads_seen": len(self.threads),
                "requests_per_connection": round(figures["requests"] / max(figures["opened"], 1), 1)}

    @staticmethod
    def reply(start_response, data, status="200 OK"):
        body = (json.dumps(data) + "\n").encode()
        start_response(status, [("Content-Type", "application/json"),
                                ("Content-Length", str(len(body)))])
        return [body]


def _hold(query):
    match = re.search(r"(?:^|&)hold=([0-9]+(?:\.[0-9]+)?)(?:&|$)", query)
    return min(float(match.group(1)), HOLD_MAX) if match else 0.0


def app_from_environment():
    url = os.environ.get("DATABASE_URL")
    database = PostgreSQL(url) if url else SQLite(os.environ.get("COUNTER_DATA_DIR", "data"))
    return Counter(database, os.environ.get("COUNTER_CONNECTIONS", "per-thread"))


# -- bench: per-thread against per-request connections ----------------------------------------

def bench(argv):
    parser = argparse.ArgumentParser(
        prog="counter.py bench",
        description="Serve this app with per-thread and with per-request connections, on SQLite "
                    "and (with DATABASE_URL) PostgreSQL, interleaved, under the same load; print "
                    "requests/s and connections opened.")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds measured per run (5)")
    parser.add_argument("--connections", type=int, default=32, help="concurrent HTTP connections (32)")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each configuration, interleaved (2)")
    parser.add_argument("--pin", action="store_true",
                        help="server on CPU 0, load generator on CPU 1 (the database server is not pinned)")
    args = parser.parse_args(argv)
    databases = ["sqlite"] + (["postgresql"] if os.environ.get("DATABASE_URL") else [])
    load = "wrk" if shutil.which("wrk") else "python"
    print("load: %s, %d connections, %.0f s per run after 1 s of warm-up, %d round(s), %s; "
          "doors: %s" % (load, args.connections, args.duration, args.rounds,
                         "pinned (server CPU 0, load CPU 1)" if args.pin else "not pinned",
                         doordown.door_backend().description))
    if "postgresql" not in databases:
        print("PostgreSQL: skipped (set DATABASE_URL to include it)")
    results = {}
    print("opened: connections opened in the measured seconds; in all: since the server started")
    print("%-5s  %-10s  %-11s  %8s  %9s  %7s  %7s  %s" % (
        "round", "database", "connections", "req/s", "requests", "opened", "in all", "failures"))
    for round_number in range(1, args.rounds + 1):
        for database in databases:
            for mode in MODES:
                run = _bench_run(database, mode, args, load)
                results.setdefault((database, mode), []).append(run)
                print("%-5d  %-10s  %-11s  %8.0f  %9d  %7d  %7d  %d non-2xx, %d socket errors" % (
                    round_number, database, mode, run["rate"], run["requests"], run["opened"],
                    run["stats"]["connections_opened"], run["non_2xx"], run["errors"]), flush=True)
    print("\nmedians (requests per connection: all requests a server answered, warm-up included, "
          "over all the connections it opened)")
    print("%-10s  %-11s  %8s  %14s  %12s  %12s" % (
        "database", "connections", "req/s", "opened in all", "door threads", "req/conn"))
    for (database, mode), runs in results.items():
        print("%-10s  %-11s  %8.0f  %14.0f  %12.0f  %12.1f" % (
            database, mode, statistics.median(run["rate"] for run in runs),
            statistics.median(run["stats"]["connections_opened"] for run in runs),
            statistics.median(run["stats"]["threads_seen"] for run in runs),
            statistics.median(run["stats"]["requests_per_connection"] for run in runs)))
    return 0


def _bench_run(database, mode, args, load):
    """One server, checked, warmed up, measured, stopped: the load's figures, the
    connections opened and requests served while it was measured, and the final /stats."""
    with tempfile.TemporaryDirectory(prefix="counter-bench-") as data_dir:
        env = dict(os.environ, COUNTER_CONNECTIONS=mode, COUNTER_DATA_DIR=data_dir)
        if database == "sqlite":
            env.pop("DATABASE_URL", None)
        command = [sys.executable, os.path.join(ROOT, "doordown.py"), "serve", "examples.counter:app",
                   "--bind", "127.0.0.1:0", "--access-log", "off"]
        if args.pin:
            command = ["taskset", "-c", "0"] + command
        server = subprocess.Popen(command, cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            url = "http://127.0.0.1:%d/" % _started_port(server)
            with urllib.request.urlopen(url) as reply:  # check the answer before timing it
                if reply.status != 200 or json.loads(reply.read())["connections"] != mode:
                    raise RuntimeError("unexpected answer from the counter")
            _load(load, url, args.connections, 1.0, args.pin)
            before = _json(url + "stats")
            result = _load(load, url, args.connections, args.duration, args.pin)
            after = _json(url + "stats")
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(30)
        result["opened"] = after["connections_opened"] - before["connections_opened"]
        result["requests"] = after["requests"] - before["requests"]
        result["stats"] = after
        return result


def _started_port(server):
    lines = []
    for raw in server.stderr:
        line = raw.decode("utf-8", "replace")
        lines.append(line)
        match = re.search(r"serving .* at http://[^ ]+:(\d+)/", line)
        if match:  # keep draining stderr, so that a chatty server never blocks on it
            threading.Thread(target=server.stderr.read, daemon=True).start()
            return int(match.group(1))
    raise RuntimeError("the server did not start:\n" + "".join(lines))


def _json(url):
    with urllib.request.urlopen(url) as reply:
        return json.loads(reply.read())


def _load(load, url, connections, duration, pin):
    """Keep-alive GETs of `url` for `duration` seconds: rate, non-2xx and socket errors."""
    if load == "wrk":
        command = ["wrk", "-t1", "-c%d" % connections, "-d%.0fs" % max(duration, 1), url]
        if pin:
            command = ["taskset", "-c", "1"] + command
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        rate = float(re.search(r"Requests/sec:\s+([0-9.]+)", out).group(1))
        non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
        return {"rate": rate, "non_2xx": int(non_2xx.group(1)) if non_2xx else 0,
                "errors": sum(map(int, errors.groups())) if errors else 0}
    return _python_load(url, connections, duration)


def _python_load(url, connections, duration):
    """The fallback when wrk is missing: it under-reports a fast server (see the README)."""
    import http.client
    host, port = re.match(r"http://([^:/]+):(\d+)/", url).groups()
    deadline = time.monotonic() + duration
    tallies = []

    def client():
        done = non_2xx = errors = 0
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        while time.monotonic() < deadline:
            try:
                conn.request("GET", "/")
                reply = conn.getresponse()
                reply.read()
                done += 1
                non_2xx += not 200 <= reply.status < 300
            except OSError:
                errors += 1
                conn.close()
        conn.close()
        tallies.append((done, non_2xx, errors))

    threads = [threading.Thread(target=client) for _ in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"rate": sum(t[0] for t in tallies) / duration, "non_2xx": sum(t[1] for t in tallies),
            "errors": sum(t[2] for t in tallies)}


if __name__ == "__main__":
    if sys.argv[1:2] != ["bench"]:
        sys.exit("usage: python3 examples/counter.py bench [--help]   (to serve it: "
                 "python3 doordown.py serve examples.counter:app)")
    sys.exit(bench(sys.argv[2:]))
else:
    app = app_from_environment()
