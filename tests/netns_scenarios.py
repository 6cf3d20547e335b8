"""Scenarios that need real non-loopback addresses; each runs inside a fresh network namespace.

Run as ``unshare -n python tests/netns_scenarios.py NAME`` (tests/test_netns.py does this): lo is brought up
and addresses are added inside that namespace only, so nothing leaves it. Prints one JSON object.
"""

import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

IMDS_IP = "169.254.169.254"
OUTSIDER_IP = "10.9.9.9"


def ip(*args):
    subprocess.run(["ip", *args], check=True, capture_output=True)


def setup_lo(*addresses):
    ip("link", "set", "lo", "up")
    for address in addresses:
        ip("address", "add", f"{address}/32", "dev", "lo")


def peer_filter():
    """A client whose source address is not loopback (nor the listen address) is refused."""
    from conftest import http, start_service, stop_process

    setup_lo(IMDS_IP, OUTSIDER_IP)
    service = start_service(["--listen", f"{IMDS_IP}:80"])
    ttl = {"X-aws-ec2-metadata-token-ttl-seconds": "60"}
    try:
        results = {}
        for name, source in (("outsider", OUTSIDER_IP), ("loopback", "127.0.0.1"), ("listen", IMDS_IP)):
            status, _, body = http(IMDS_IP, 80, "PUT", "/latest/api/token", ttl, host_header=IMDS_IP, source=source)
            results[name] = [status, body.decode(errors="replace")]
        return results
    finally:
        stop_process(service.process)


if __name__ == "__main__":
    print(json.dumps(globals()[sys.argv[1]]()))
