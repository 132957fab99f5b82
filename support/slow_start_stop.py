"""An application slow to start and slow to stop, for the supervisor tests.

$BOOT_DELAY_FILE names a file holding how many seconds its import takes (read at each
start, so a test can make only a replacement slow); $STOP_DELAY is how many seconds
the app role's stop takes (closing the resource its main thread holds).
"""

import json
import os
import time

import doordown  # in the app role: the running doordown itself

with open(os.environ.get("BOOT_DELAY_FILE", os.devnull)) as _delay:
    time.sleep(float(_delay.read().strip() or 0))


class _Resource:
    def close(self):
        if self is _held_by_main:  # closed by the app role's stop, and only by it
            time.sleep(float(os.environ.get("STOP_DELAY", "0")))


_resources = doordown.per_thread(_Resource)
_held_by_main = _resources.get()  # the main thread never ends: the stop itself closes it


def application(environ, start_response):
    _resources.get()
    body = json.dumps({"pid": os.getpid()}).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]
