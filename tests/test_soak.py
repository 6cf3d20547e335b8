"""Soak: 8 concurrent SDK-like clients fetch credentials through IMDS while the active profile switches between
two roles every 0.5 s and each role's credentials rotate every ~10 s.

0 errors, 0 timeouts (botocore's 1 s), nothing expired, and every served triple — key, secret and token — is
one that the fake STS issued together, for the role it was served as (checked against its ``--issued-log``).
30 s by default; ``IMSA_SOAK_SECONDS`` sets another length.
"""

import json
import os
import subprocess
import sys
import tempfile
import threading
import time

from conftest import HERE, MFA_CODE, run_imsa, start_service, start_sts, stop_process, write_config
from imsa import config
from imsa.client import Client

SECONDS = float(os.environ.get("IMSA_SOAK_SECONDS", "30"))
CLIENTS = 8
SWITCH_EVERY = 0.5
ROLE_LIFETIME = 20  # imsa rotates at half of it: about every 10 s per role, during the soak


def test_soak_concurrent_clients_while_switching_roles_and_rotating(isolated_env, monkeypatch):
    issued_log = tempfile.NamedTemporaryFile(prefix="imsa-issued-", suffix=".jsonl", delete=False).name
    sts = start_sts(extra_args=["--role-lifetime", str(ROLE_LIFETIME), "--issued-log", issued_log])
    service = None
    try:
        write_config(isolated_env, sts)
        env = dict(os.environ, AWS_ENDPOINT_URL_STS=sts.endpoint)
        service = start_service(env=env)
        assert run_imsa("assume", "a", "--mfa-token", MFA_CODE, env=env).returncode == 0
        assert run_imsa("assume", "b", env=env).returncode == 0
        profiles = config.load()
        specs = [profiles.get("a").role_spec(), profiles.get("b").role_spec()]
        control = Client(service.socket, timeout=5)

        switches, switch_errors = [0], []
        stop = threading.Event()

        def switcher():
            while not stop.wait(SWITCH_EVERY):
                try:
                    control.activate(specs[switches[0] % 2])
                    switches[0] += 1
                except Exception as error:  # noqa: BLE001 — reported by the assertions below
                    switch_errors.append(repr(error))

        workers = [subprocess.Popen([sys.executable, os.path.join(HERE, "soak_client.py"), service.host,
                                     str(service.port), str(SECONDS)], stdout=subprocess.PIPE, text=True)
                   for _ in range(CLIENTS)]
        thread = threading.Thread(target=switcher, daemon=True)
        thread.start()
        try:
            outputs = [worker.communicate(timeout=SECONDS + 60)[0] for worker in workers]
        finally:
            stop.set()
            thread.join(10)
            for worker in workers:
                stop_process(worker)
        results = [json.loads(output) for output in outputs]

        issued = {}
        with open(issued_log) as handle:
            for line in handle:
                entry = json.loads(line)
                issued[entry["AccessKeyId"]] = entry
        fetches = sum(result["fetches"] for result in results)
        problems = [example for result in results for example in result["examples"]]
        assert sum(result["errors"] for result in results) == 0, problems
        assert sum(result["timeouts"] for result in results) == 0, problems
        assert sum(result["expired"] for result in results) == 0, problems
        assert switch_errors == [] and switches[0] >= SECONDS / SWITCH_EVERY * 0.8, (switches, switch_errors)
        served = {tuple(entry) for result in results for entry in result["served"]}
        for role, key_id, secret, token, expiration in served:
            origin = issued.get(key_id)
            assert origin is not None, f"served key {key_id[-4:]} was never issued by STS"
            assert (origin["SecretAccessKey"], origin["SessionToken"]) == (secret, token), (
                f"key {key_id[-4:]} served with another answer's secret or token")
            assert origin["RoleArn"].endswith(":role/" + role), f"{role} served credentials of {origin['RoleArn']}"
            assert origin["Expiration"] == expiration
        roles_served = {entry[0] for entry in served}
        assert roles_served == {"role-a", "role-b"}
        rotations = sum(1 for entry in issued.values() if entry["action"] == "AssumeRole")
        assert rotations >= 2 + int(SECONDS // (ROLE_LIFETIME / 2)), rotations  # the two first, then rotations
        assert fetches >= CLIENTS * SECONDS, fetches  # at least one whole fetch per client per second
        print(f"soak: {fetches} fetches by {CLIENTS} clients in {SECONDS:.0f} s, {switches[0]} switches, "
              f"{rotations} AssumeRole, slowest fetch {max(r['slowest'] for r in results):.3f} s")
        time.sleep(0.2)
        log = service.log()
        assert "Traceback" not in log and "request failed" not in log, log[-3000:]
    finally:
        if service is not None:
            stop_process(service.process)
        sts.stop()
        os.unlink(issued_log)
