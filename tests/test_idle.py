"""A service with nothing to do sleeps: its event loop is not woken while no connection is open (it was, once a
second, by waitress's poll timeout), and still serves the next request. (A slow client's connection is still closed
at its deadline while it is open: tests/test_attacks.py.)"""

import time

from conftest import http

# The window watched; the old loop woke about once a second in it.
IDLE_WINDOW = 3.0
SETTLE = 1.5  # longer than the loop's timeout while a connection is open (process.BUSY_POLL_TIMEOUT)


def switches(pid):
    """How often the service's main thread (its event loop) has been scheduled to run so far."""
    with open(f"/proc/{pid}/task/{pid}/schedstat", encoding="ascii") as handle:
        return int(handle.read().split()[2])


def test_an_idle_service_is_not_woken_and_still_answers(active_service):
    service = active_service
    assert http(service.host, service.port, "GET", "/latest/meta-data/instance-id")[0] in (200, 401)
    time.sleep(SETTLE)  # the connection above is gone and the loop has noticed
    before = switches(service.pid)
    time.sleep(IDLE_WINDOW)
    woken = switches(service.pid) - before
    assert woken <= 1, f"the event loop woke {woken} times in {IDLE_WINDOW} s with nothing to do"
    status, _, _ = http(service.host, service.port, "PUT", "/latest/api/token",
                        headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"})
    assert status == 200
