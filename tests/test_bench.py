"""scripts/bench.py --quick as a smoke test: it completes and prints every row. Nothing is asserted about time.

About 50 s (the first run also builds the regular install it measures the CLI from: up to a minute more);
deselect with ``-m "not bench"``.
"""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = [
    f"{kind}_c{concurrency}_{conn}"
    for concurrency in (1, 8) for conn in ("keepalive", "newconn") for kind in ("seq", "cpu", "p50", "p99")
] + [
    f"burst_{size}_{key}" for size in (64, 256) for key in ("failures", "p50", "p99", "max")
] + [
    f"cli_{install}{command}" for install in ("", "editable_")
    for command in ("status", "status_short", "export", "credential_process", "complete", "shell_init", "python")
] + [
    "boto3_get_credentials", "botocore_fetcher", "cli_assume", "shell_hook", "rss", "idle_cpu", "idle_wakeups",
    "rss_after_bursts",
]


def test_quick_bench_completes_and_prints_every_row():
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "bench.py"), "--quick", "--json"],
        capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL, cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert sorted(entry["id"] for entry in report["rows"]) == sorted(ROWS)
    for entry in report["rows"]:
        assert entry["imsa"] is not None, entry
        if entry["id"].startswith("burst_") and not entry["id"].endswith("_failures"):
            assert entry["stdlib"] is not None and entry["flask"] is not None, entry  # every server answered
    sequences = [entry for entry in report["rows"] if entry["id"].startswith("seq_")]
    assert all(entry["stdlib"] and entry["flask"] for entry in sequences), "every server answered"
    assert all(not entry["detail"]["errors"] for entry in sequences), [entry["detail"] for entry in sequences]
    assert next(entry for entry in report["rows"] if entry["id"] == "cli_assume")["detail"]["assume_role_calls"] == 2
    assert report["machine"]["usable_cpus"] >= 1
