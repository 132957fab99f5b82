"""An application slow to start and slow to stop, for the supervisor tests.

$BOOT_DELAY_FILE names a file holding how many seconds its import takes (read at each
start, so a test can make only a replacement slow); $STOP_DELAY is how many seconds
closing its per-thread resources takes when the app role stops.
"""

import json
import os
import time

import doordown  # in the app role: the running doordown itself

with open(os.environ.get("BOOT_DELAY_FILE", os.devnull)) as _delay:
    time.sleep(float(_delay.read().strip() or 0))


_closed = []


class _Resource:
    def close(self):
        if not _closed:  # one slow close a process, however many door threads it served on
            _closed.append(self)
            time.sleep(float(os.environ.get("STOP_DELAY", "0")))


_resources = doordown.per_thread(_Resource)


def application(environ, start_response):
    _resources.get()
    body = json.dumps({"pid": os.getpid()}).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]
