"""One soak client, run as its own process by tests/test_soak.py: ``python soak_client.py HOST PORT SECONDS``.

For SECONDS it fetches credentials exactly as an SDK does (token PUT, role list, role, each with a 1 s timeout:
botocore's) and prints one JSON summary: how many fetches, the errors and timeouts (first few of each in full),
the slowest fetch, and every distinct (role, AccessKeyId, SecretAccessKey, Token, Expiration) it was served.
"""

import calendar
import json
import os
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from imdsv2 import ImdsError, fetch_credentials  # noqa: E402

TIMEOUT = 1.0


def main():
    host, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    fetches = 0
    errors, timeouts, expired = [], [], []
    slowest = 0.0
    served = set()
    stop_at = time.monotonic() + seconds
    while time.monotonic() < stop_at:
        started = time.monotonic()
        sent = time.time()
        try:
            role, creds = fetch_credentials(host, port, timeout=TIMEOUT)
        except socket.timeout as error:
            timeouts.append(repr(error))
            continue
        except (ImdsError, OSError, ValueError) as error:
            errors.append(repr(error))
            continue
        finally:
            slowest = max(slowest, time.monotonic() - started)
            fetches += 1
        expiration = calendar.timegm(time.strptime(creds["Expiration"], "%Y-%m-%dT%H:%M:%SZ"))
        if expiration <= sent:
            expired.append(creds["Expiration"])
        served.add((role, creds["AccessKeyId"], creds["SecretAccessKey"], creds["Token"], creds["Expiration"]))
    print(json.dumps({
        "fetches": fetches, "errors": len(errors), "timeouts": len(timeouts), "expired": len(expired),
        "examples": errors[:5] + timeouts[:5] + expired[:5], "slowest": slowest, "served": sorted(served),
    }))


if __name__ == "__main__":
    main()
