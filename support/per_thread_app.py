"""A WSGI app whose per-thread resources say on stderr when they are opened and closed."""

import itertools
import json
import sys
import threading

import doordown  # in the app role: the running doordown itself

_serials = itertools.count(1)


class Resource:
    def __init__(self):
        self.serial = next(_serials)
        sys.stderr.write("resource %d opened on %s\n" % (self.serial, threading.current_thread().name))

    def close(self):
        sys.stderr.write("resource %d closed\n" % self.serial)


resources = doordown.per_thread(Resource)
resources.get()  # the main thread never ends: only the app role's shutdown can close this one


def app(environ, start_response):
    """Which per-thread resource served this request, on which thread."""
    body = json.dumps({"resource": resources.get().serial, "thread": threading.get_ident()}).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]
