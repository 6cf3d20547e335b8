"""The profile picker, driven through a pty: filter, choose, cancel (exit 130, nothing changed)."""

import os

from conftest import (
    MFA_CODE, finish_terminal as finish, read_terminal, run_imsa, run_without_terminal, with_terminal, write_config,
)
from imsa.commands.picker import Picker, matches


def test_filter_keeps_the_names_holding_every_word():
    assert matches(["prod-admin", "prod-read", "dev-admin"], "ADMIN prod") == ["prod-admin"]
    picker = Picker(["a", "b", "c"], active="b")
    picker.key(b"\x1b[B")
    assert picker.key(b"\r") == "b"
    assert "* b" in picker.render()


def test_pick_by_filter_then_enter(active_service):
    process, master = with_terminal(["assume", "--mfa-token", MFA_CODE])
    screen = read_terminal(master, b"profile> ")
    assert b"* a" in screen  # the profile the service serves is marked
    os.write(master, b"r")
    screen = read_terminal(master, b"1/6")  # a, b, base, c, d, r: only r holds an r
    assert b"1/6" in screen
    os.write(master, b"\r")
    stdout, stderr = finish(process, master)
    assert process.returncode == 0, stderr
    assert "r active" in stderr
    assert active_service.client.status()["active"]["profile"] == "r"


def test_arrows_move_the_choice_and_export_prints_only_exports(active_service):
    process, master = with_terminal(["export", "--mfa-token", MFA_CODE])
    read_terminal(master, b"profile> ")
    os.write(master, b"\x1b[B")  # a -> b (sorted: a, b, base, c, d, r)
    read_terminal(master, b"profile> ")
    os.write(master, b"\r")
    stdout, stderr = finish(process, master)
    assert process.returncode == 0, stderr
    assert "export IMSA_PROFILE=b" in stdout and "profile>" not in stdout


def test_cancel_exits_130_and_changes_nothing(active_service):
    before = active_service.client.status()["active"]
    process, master = with_terminal(["assume", "--mfa-token", MFA_CODE])
    read_terminal(master, b"profile> ")
    os.write(master, b"d")
    read_terminal(master, b"profile> d")
    os.write(master, b"\x1b")
    stdout, stderr = finish(process, master)
    assert process.returncode == 130, stderr
    assert active_service.client.status()["active"] == before


def test_without_a_terminal_a_profile_must_be_named(isolated_env, sts_env):
    write_config(isolated_env, sts_env)
    done = run_without_terminal("assume")
    assert done.returncode == 2 and "name the PROFILE" in done.stderr
    assert run_imsa("console", "--print").returncode == 2
