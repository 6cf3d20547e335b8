"""``imsa log``: the service's delivery log — which process received which profile's credentials, and how.

The service keeps the records (imsa/server/deliveries.py); this asks for them over the control socket, and with
``--follow`` asks again every FOLLOW_EVERY seconds for those after the last one shown, until interrupted.
"""

import json
import time

from imsa.client import Client
from imsa.commands.common import Io
from imsa.errors import EXIT_OK

FOLLOW_EVERY = 0.5


def show_log(follow=False, profile=None, as_json=False, io=None, client=None, sleep=time.sleep):
    """Print the delivery records (of *profile* only, when given), one a line; with *follow*, keep printing new ones."""
    io = io or Io()
    client = client or Client()
    after = 0
    while True:
        answer = client.deliveries(after, profile)
        for record in answer.get("deliveries") or ():
            io.data((json.dumps(record, sort_keys=True) if as_json else describe(record)) + "\n")
        after = answer.get("last", after)
        if not follow:
            return EXIT_OK
        sleep(FOLLOW_EVERY)


def describe(record):
    """One line for people: time, profile, way, and who received it (or why that is not known)."""
    role = record.get("role_arn") or "session credentials"
    return f"{record['time']}  {record['profile']}  {record['way']}  {role}  {record.get('access_key_id')}  " \
           f"{receiver(record)}"


def receiver(record):
    """Who received a delivery, as people read it: ``pid 123 /usr/bin/curl (curl -s ...)``, with its uid."""
    uid = record.get("uid")
    parts = []
    if record.get("attributed"):
        parts.append(f"pid {record['pid']} {record.get('exe') or '?'}")
        if record.get("cmdline"):
            parts.append(f"({record['cmdline']})")
        parent = record.get("parent")
        if parent and parent.get("exe"):
            parts.append(f"from pid {parent['pid']} {parent['exe']}")
    else:
        parts.append(f"not attributed: {record.get('note') or 'unknown'}")
    via = record.get("via")
    if via:
        parts.append(f"via imsa exec pid {via['pid']}" + (f" ({via['cmdline']})" if via.get("cmdline") else ""))
    if uid is not None:
        parts.append(f"uid {uid}")
    return " ".join(parts)
