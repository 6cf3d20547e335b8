"""The suite's own rules under CI, checked on a small inner run with this conftest: a security test that skips
fails the run (CI runs as root, so such a skip means the test silently did not run), other skips do not, and
hypothesis is derandomized so that a failing property test fails the same way on every run."""

import os
import shutil
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))

INNER = '''
import os

import pytest
from hypothesis import given, settings, strategies as st


@pytest.mark.skipif(True, reason="needs root to run a client as another uid")
def test_needs_root():
    pass


@pytest.mark.skipif(True, reason="needs root, unshare(1) and ip(8) to make a network namespace")
def test_needs_a_network_namespace():
    pass


@pytest.mark.security
def test_marked_security():
    pytest.skip("no such device here")


@pytest.mark.skipif(True, reason="fish is not installed")
def test_needs_fish():
    pass


def test_passes():
    pass


SEEN = []


@settings(max_examples=5)
@given(st.integers())
def test_property(number):
    SEEN.append(number)


def test_hypothesis_is_derandomized_in_ci():
    assert settings.default.derandomize is (os.environ.get("CI") == "true")
    print()
    print("examples:", SEEN)
'''


def run_inner(tmp_path, ci, select=None):
    """Run the inner test file with this suite's conftest; CI unset when *ci* is None."""
    shutil.copy(os.path.join(HERE, "conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_inner.py").write_text(INNER)
    env = {name: value for name, value in os.environ.items() if name != "CI"}
    if ci is not None:
        env["CI"] = ci
    argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rs", "-s", "-q", str(tmp_path / "test_inner.py")]
    if select:
        argv += ["-k", select]
    return subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)


def test_outside_ci_skipped_security_tests_only_skip(tmp_path):
    done = run_inner(tmp_path, None)
    assert done.returncode == 0, done.stdout[-3000:]
    assert "4 skipped" in done.stdout and "security tests skipped" not in done.stdout


def test_in_ci_a_skipped_security_test_fails_the_run_and_says_which(tmp_path):
    done = run_inner(tmp_path, "true")
    assert done.returncode == 1, done.stdout[-3000:]
    section = done.stdout.split("security tests skipped under CI", 1)[1]
    for name in ("test_needs_root", "test_needs_a_network_namespace", "test_marked_security"):
        assert f"test_inner.py::{name}: " in section, section
    assert "test_needs_fish" not in section
    assert "3 security test(s) did not run" in section


def test_in_ci_other_skips_still_pass(tmp_path):
    done = run_inner(tmp_path, "true", select="fish or passes or property or derandomized")
    assert done.returncode == 0, done.stdout[-3000:]
    assert "1 skipped" in done.stdout and "security tests skipped" not in done.stdout


def test_in_ci_property_tests_draw_the_same_examples_every_run(tmp_path):
    runs = [run_inner(tmp_path, "true", select="property or derandomized") for _ in range(2)]
    examples = []
    for done in runs:
        assert done.returncode == 0, done.stdout[-3000:]
        examples.append([line for line in done.stdout.splitlines() if line.startswith("examples:")])
    assert examples[0] and examples[0] == examples[1]


@pytest.mark.parametrize("ci", [None, "true"])
def test_no_property_test_of_the_suite_opts_out_of_derandomizing(ci):
    # Settings a test passes explicitly win over the loaded profile: derandomize=False there undoes CI's.
    env = {name: value for name, value in os.environ.items() if name != "CI"}
    if ci:
        env["CI"] = ci
    code = ("import test_config, test_fuzz\n"
            "print(test_fuzz.FUZZ.derandomize,"
            "      test_config.test_any_text_gives_a_config_or_a_config_error._hypothesis_internal_use_settings.derandomize)")
    done = subprocess.run([sys.executable, "-c", code], cwd=HERE, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(bool(ci))] * 2
