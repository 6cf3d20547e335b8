"""imsa/paths.py: the XDG rules (unset, empty and relative values fall back to the default) and the system dir."""

import os

import pytest

from imsa import paths


@pytest.mark.parametrize("value", [None, "", "relative/dir"])
def test_xdg_dir_falls_back_to_home_for_unset_empty_or_relative(value, monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    environ = {} if value is None else {"XDG_STATE_HOME": value}
    assert paths.xdg_dir("XDG_STATE_HOME", "trust", environ=environ) == os.path.join(
        str(tmp_path), ".local", "state", "imsa", "trust")


def test_xdg_dir_uses_an_absolute_variable(tmp_path):
    environ = {"XDG_DATA_HOME": str(tmp_path)}
    assert paths.xdg_dir("XDG_DATA_HOME", "keys", environ=environ) == os.path.join(str(tmp_path), "imsa", "keys")


def test_each_kind_of_directory_has_its_own_default(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert paths.xdg_dir("XDG_CONFIG_HOME", environ={}) == os.path.join(str(tmp_path), ".config", "imsa")
    assert paths.xdg_dir("XDG_DATA_HOME", environ={}) == os.path.join(str(tmp_path), ".local", "share", "imsa")


def test_system_config_dir_default_and_override():
    assert paths.system_config_dir(environ={}) == "/etc/imsa"
    assert paths.system_config_dir(environ={"IMSA_SYSTEM_CONFIG_DIR": "/srv/x"}) == "/srv/x"
