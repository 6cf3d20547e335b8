"""The secret store: imsa's encrypted file store, the keyring allow-list, and imsa add / remove / migrate end to end.

The OS keyring backends (Secret Service under its own D-Bus session, pass with a throw-away GNUPGHOME) are in
tests/test_keyrings.py.
"""

import base64
import binascii
import json
import os
import stat
import time

import pytest
import yaml

from conftest import (
    MFA_CODE, MFA_SERIAL, answer_on_terminal, one_error_line, run_imsa, run_without_terminal, start_sts, write_profiles,
)
from imsa import secrets

PASSPHRASE = "correct horse battery staple"


@pytest.fixture
def file_store(monkeypatch, isolated_env):
    """The file store, its passphrase from the environment, under the test's HOME."""
    monkeypatch.setenv(secrets.STORE_VARIABLE, "file")
    monkeypatch.setenv(secrets.PASSPHRASE_VARIABLE, PASSPHRASE)
    secrets._opened.clear()
    yield secrets.default_directory()
    secrets._opened.clear()


@pytest.fixture(scope="module")
def own_sts():
    """A fake STS of this module's own: its users' keys exist only since it started (the scan relies on it)."""
    started = time.time()
    server = start_sts()
    server.started = started
    yield server
    server.stop()


def encodings(secret):
    """*secret* as it could sit in a file: plain, base64 at each alignment, hex, UTF-16."""
    raw = secret.encode()
    forms = {raw, raw.hex().encode(), raw.hex().upper().encode(), secret.encode("utf-16-le"), secret.encode("utf-16-be")}
    for shift in range(3):
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            text = encode(b"\0" * shift + raw)
            # The characters that depend on the secret alone: skip the padding's and the edges' partial groups.
            start = (shift * 4 + 2) // 3 + 1
            forms.add(text[start:start + len(raw) * 4 // 3 - 4])
    return {form for form in forms if len(form) >= 16}


def files_holding(secret, roots, since=None):
    """Regular files under *roots* (modified after *since*, when given) that hold *secret* in any encoding."""
    forms = encodings(secret)
    found = []
    for root in roots:
        for directory, _, names in os.walk(root):
            for name in names:
                path = os.path.join(directory, name)
                try:
                    info = os.lstat(path)
                    if not stat.S_ISREG(info.st_mode) or info.st_size > 20 << 20:
                        continue
                    if since is not None and max(info.st_mtime, info.st_ctime) < since:
                        continue
                    with open(path, "rb") as handle:
                        data = handle.read()
                except OSError:
                    continue
                if any(form in data for form in forms):
                    found.append(path)
    return found


def test_the_encodings_scan_finds_a_secret_in_each_form(tmp_path):
    secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
    for number, data in enumerate([secret.encode(), base64.b64encode(b"x" + secret.encode()),
                                   binascii.hexlify(secret.encode()), secret.encode("utf-16-le")]):
        (tmp_path / f"f{number}").write_bytes(b"head " + data + b" tail")
    assert len(files_holding(secret, [tmp_path])) == 4


# --- the file store ---


def test_file_store_round_trips_in_private_files(file_store):
    store = secrets.open_store()
    assert isinstance(store, secrets.FileStore)
    secrets.put_keys("work", "AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", store)
    assert secrets.get_keys("work", store) == ("AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
    assert stat.S_IMODE(os.stat(file_store).st_mode) == 0o700
    files = os.listdir(file_store)
    assert len(files) == 1 and stat.S_IMODE(os.stat(os.path.join(file_store, files[0])).st_mode) == 0o600
    data = json.load(open(os.path.join(file_store, files[0])))
    assert data["cipher"] == "AES-256-GCM" and data["kdf"]["name"] == "scrypt" and data["kdf"]["n"] >= 1 << 17
    assert files_holding("wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", [file_store]) == []


def test_a_file_moved_to_another_item_does_not_open(file_store):
    store = secrets.open_store()
    secrets.put_keys("dev", "AKIAIOSFODNN7EXAMPLE", "dev-secret", store)
    secrets.put_keys("prod", "AKIAIOSFODNN7EXAMPL2", "prod-secret", store)
    dev, prod = store._path(secrets.keys_item("dev")), store._path(secrets.keys_item("prod"))
    data = json.load(open(dev))
    data["item"] = secrets.keys_item("prod")  # the name in the file changed too: the associated data still differs
    with open(prod, "w") as out:
        json.dump(data, out)
    with pytest.raises(secrets.SecretStoreError, match="copied from another item"):
        secrets.get_keys("prod", store)


def test_a_wrong_passphrase_is_refused_and_writes_nothing(file_store, monkeypatch):
    secrets.put_keys("dev", "AKIAIOSFODNN7EXAMPLE", "dev-secret")
    wrong = secrets.FileStore(file_store, passphrase="not it")
    with pytest.raises(secrets.SecretStoreError, match="wrong passphrase"):
        wrong.get(secrets.keys_item("dev"))
    with pytest.raises(secrets.SecretStoreError, match="wrong passphrase"):
        secrets.put_keys("other", "AKIAIOSFODNN7EXAMPL2", "x", wrong)
    assert len(os.listdir(file_store)) == 1


def test_a_store_directory_others_can_open_is_refused(file_store):
    secrets.put_keys("dev", "AKIAIOSFODNN7EXAMPLE", "dev-secret")
    os.chmod(file_store, 0o755)
    with pytest.raises(secrets.SecretStoreError, match="mode 0700"):
        secrets.get_keys("dev")


def test_without_a_passphrase_or_terminal_the_store_says_how_to_give_one(file_store, monkeypatch, isolated_env):
    monkeypatch.delenv(secrets.PASSPHRASE_VARIABLE)
    write_profiles(isolated_env / ".imsa", {"p": {"aws_access_key_id": "AKIAIOSFODNN7EXAMPLE", "secret_store": True}})
    done = run_imsa("add", "p", "--mfa-serial", MFA_SERIAL)
    line = one_error_line(done, 2)
    assert "on the terminal" in line


def test_a_passphrase_process_gives_the_passphrase(file_store, monkeypatch, tmp_path):
    monkeypatch.delenv(secrets.PASSPHRASE_VARIABLE)
    monkeypatch.setenv(secrets.PASSPHRASE_PROCESS_VARIABLE, f"printf {PASSPHRASE.replace(' ', '-')}")
    secrets.put_keys("dev", "AKIAIOSFODNN7EXAMPLE", "dev-secret")
    assert secrets.FileStore(file_store, passphrase=PASSPHRASE.replace(" ", "-")).get(secrets.keys_item("dev"))


# --- the keyring allow-list ---


def test_plaintext_keyring_is_refused_even_when_keyring_picks_it(monkeypatch, isolated_env):
    """keyrings.alt is installed for this test: with no D-Bus session keyring itself picks PlaintextKeyring."""
    import keyring
    from keyrings.alt.file import PlaintextKeyring

    monkeypatch.delenv("DBUS_SESSION_BUS_ADDRESS", raising=False)
    monkeypatch.setenv("PYTHON_KEYRING_BACKEND", "keyrings.alt.file.PlaintextKeyring")
    monkeypatch.setattr(keyring.core, "_keyring_backend", None)
    assert isinstance(keyring.get_keyring(), PlaintextKeyring)
    monkeypatch.setattr(keyring.core, "_keyring_backend", None)
    with pytest.raises(secrets.SecretStoreError, match="PlaintextKeyring is not an OS vault"):
        secrets.keyring_store()
    secrets._opened.clear()
    monkeypatch.setenv(secrets.PASSPHRASE_VARIABLE, PASSPHRASE)
    monkeypatch.setattr(keyring.core, "_keyring_backend", None)
    store = secrets.open_store()
    assert isinstance(store, secrets.FileStore)  # auto: the file store, never the plain-text file
    secrets.put_keys("p", "AKIAIOSFODNN7EXAMPLE", "never-in-plain-text", store)
    assert files_holding("never-in-plain-text", [isolated_env]) == []
    secrets._opened.clear()


def test_imsa_secret_store_keyring_fails_when_the_backend_is_not_allowed(monkeypatch):
    monkeypatch.setenv("PYTHON_KEYRING_BACKEND", "keyrings.alt.file.PlaintextKeyring")
    monkeypatch.setenv(secrets.STORE_VARIABLE, "keyring")
    done = run_imsa("add", "p")
    line = one_error_line(done, 3)
    assert "PlaintextKeyring is not an OS vault" in line


def test_a_chain_of_backends_is_allowed_only_when_every_member_is():
    from keyring.backends.chainer import ChainerBackend
    from keyrings.alt.file import PlaintextKeyring

    chain = ChainerBackend.__new__(ChainerBackend)
    chain.__dict__["backends"] = [PlaintextKeyring()]
    assert "PlaintextKeyring" in secrets.refusal(chain)


def test_a_probe_that_hangs_gives_up():
    class Hanging:
        def set_password(self, *args):
            time.sleep(30)

    with pytest.raises(secrets.SecretStoreError, match="no answer within"):
        secrets.KeyringStore(Hanging()).probe(timeout=0.5)


# --- imsa add, assume, remove, migrate ---


def add_on_terminal(name, key_id, secret, *extra):
    """Run imsa add on a pty, typing the key id and the secret at its prompts."""
    process, prompts, stdout, stderr = answer_on_terminal(["add", name, *extra], [key_id, secret])
    assert process.returncode == 0, (prompts, stderr)
    assert "Access key ID: " in prompts[0] and "Secret access key: " in prompts[1]
    assert secret not in "".join(prompts)  # not echoed
    return stderr


def test_add_then_assume_keeps_the_secret_out_of_every_file(file_store, isolated_env, own_sts, monkeypatch):
    from conftest import start_service, stop_process

    monkeypatch.setenv("AWS_ENDPOINT_URL_STS", own_sts.endpoint)
    carol = own_sts.users["carol"]
    stderr = add_on_terminal("work", carol["aws_access_key_id"], carol["aws_secret_access_key"],
                             "--mfa-serial", MFA_SERIAL)
    assert "stored key" in stderr
    profile = yaml.safe_load((isolated_env / ".imsa").read_text())["work"]
    assert profile == {"aws_access_key_id": carol["aws_access_key_id"], "secret_store": True,
                       "mfa_serial_number": MFA_SERIAL}
    with open(isolated_env / ".imsa", "a") as out:
        out.write(f"role:\n  extends: work\n  role_arn: {own_sts.roles['role-a']}\n")
    service = start_service()
    try:
        done = run_imsa("assume", "role", "--mfa-token", MFA_CODE)
        assert done.returncode == 0, done.stderr
        assert own_sts.calls("GetSessionToken") == 1
        status = run_imsa("status")
        assert "keys:       encrypted files" in status.stdout
    finally:
        stop_process(service.process)
    roots = [str(isolated_env), os.path.dirname(os.path.dirname(os.environ["IMSA_CONTROL_SOCKET"])), "/tmp"]
    if os.path.isdir(f"/run/user/{os.getuid()}"):
        roots.append(f"/run/user/{os.getuid()}")
    assert files_holding(carol["aws_secret_access_key"], roots, since=own_sts.started) == []
    os.unlink(service.log_path)


def test_remove_deletes_the_keys_and_the_reference(file_store, isolated_env):
    add_on_terminal("work", "AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
    done = run_imsa("remove", "work")
    assert done.returncode == 0, done.stderr
    assert os.listdir(file_store) == []
    assert yaml.safe_load((isolated_env / ".imsa").read_text()) == {"work": {}}
    again = run_imsa("remove", "work")
    assert "holds no keys" in one_error_line(again, 2)


def test_migrate_moves_plain_keys_with_a_backup_and_a_dry_run(file_store, isolated_env, own_sts, monkeypatch):
    alice = own_sts.users["alice"]
    config = isolated_env / ".imsa"
    config.write_text(
        "# my profiles\n"
        "base:\n"
        f"  aws_access_key_id: {alice['aws_access_key_id']}\n"
        f"  aws_secret_access_key: {alice['aws_secret_access_key']}  # old\n"
        f"  mfa_serial_number: {MFA_SERIAL}\n"
        "a:\n"
        "  extends: base\n"
        f"  role_arn: {own_sts.roles['role-a']}\n"
    )
    config.chmod(0o600)
    before = config.read_text()
    dry = run_imsa("migrate", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "would move base" in dry.stderr and config.read_text() == before and not os.path.exists(file_store)
    done = run_imsa("migrate")
    assert done.returncode == 0, done.stderr
    after = config.read_text()
    assert "# my profiles" in after and alice["aws_secret_access_key"] not in after
    assert yaml.safe_load(after)["base"] == {"aws_access_key_id": alice["aws_access_key_id"],
                                             "mfa_serial_number": MFA_SERIAL, "secret_store": True}
    backups = [name for name in os.listdir(isolated_env) if name.startswith(".imsa.bak-")]
    assert len(backups) == 1 and (isolated_env / backups[0]).read_text() == before
    assert stat.S_IMODE((isolated_env / backups[0]).stat().st_mode) == 0o600
    assert "still holds the plain-text keys" in done.stderr
    monkeypatch.setenv("AWS_ENDPOINT_URL_STS", own_sts.endpoint)
    exported = run_imsa("export", "a", "--mfa-token", MFA_CODE)
    assert exported.returncode == 0, exported.stderr
    assert "AWS_SESSION_TOKEN" in exported.stdout


def test_migrate_from_aws_credentials_leaves_a_credential_process(file_store, isolated_env):
    credentials = isolated_env / ".aws" / "credentials"
    credentials.write_text("[dev]\naws_access_key_id = AKIAIOSFODNN7EXAMPLE\naws_secret_access_key = s3cr3t-dev-key\n"
                           "region = eu-west-1\n\n[tmp]\naws_access_key_id = ASIAIOSFODNN7EXAMPLE\n"
                           "aws_secret_access_key = x\naws_session_token = y\n")
    done = run_imsa("migrate", "--from-aws-credentials")
    assert done.returncode == 0, done.stderr
    text = credentials.read_text()
    assert "s3cr3t-dev-key" not in text and "credential_process = imsa credential-process dev" in text
    assert "aws_session_token = y" in text  # temporary keys are not long-term keys: left alone
    assert yaml.safe_load((isolated_env / ".imsa").read_text()) == {
        "dev": {"aws_access_key_id": "AKIAIOSFODNN7EXAMPLE", "secret_store": True}}
    assert secrets.get_keys("dev") == ("AKIAIOSFODNN7EXAMPLE", "s3cr3t-dev-key")


def test_a_key_id_that_differs_from_the_stored_one_is_a_config_error(file_store, isolated_env, sts_env):
    add_on_terminal("work", "AKIAIOSFODNN7EXAMPLE", "secret")
    text = (isolated_env / ".imsa").read_text().replace("AKIAIOSFODNN7EXAMPLE", "AKIAIOSFODNN7EXAMPL2")
    (isolated_env / ".imsa").write_text(text)
    done = run_imsa("export", "work", "--mfa-token", MFA_CODE)
    assert done.returncode == 3 and done.stdout == ""
    assert done.stderr.splitlines()[-1].startswith("imsa: error: the secret store holds key ****MPLE")


# --- imsa edit ---


def editor_writing(tmp_path, text):
    """An $EDITOR that replaces the file it is given with *text*."""
    script = tmp_path / "editor.py"
    source = tmp_path / "content.yaml"
    source.write_text(text)
    script.write_text(f"import shutil, sys\nshutil.copyfile({str(source)!r}, sys.argv[1])\n")
    return f"{os.sys.executable} {script}"


def test_edit_saves_a_valid_file(isolated_env, tmp_path, monkeypatch):
    write_profiles(isolated_env / ".imsa", {"p": {"aws_access_key_id": "AKIAIOSFODNN7EXAMPLE", "secret_store": True}})
    monkeypatch.setenv("EDITOR", editor_writing(tmp_path, "p:\n  aws_access_key_id: AKIAIOSFODNN7EXAMPLE\n"
                                                          "  secret_store: true\n  region: eu-west-1\n"))
    done = run_without_terminal("edit")
    assert done.returncode == 0, done.stderr
    assert yaml.safe_load((isolated_env / ".imsa").read_text())["p"]["region"] == "eu-west-1"
    assert stat.S_IMODE((isolated_env / ".imsa").stat().st_mode) == 0o600


def test_edit_keeps_the_old_file_when_the_new_one_is_invalid(isolated_env, tmp_path, monkeypatch):
    write_profiles(isolated_env / ".imsa", {"p": {"aws_access_key_id": "AKIAIOSFODNN7EXAMPLE", "secret_store": True}})
    before = (isolated_env / ".imsa").read_text()
    monkeypatch.setenv("EDITOR", editor_writing(tmp_path, "p:\n  regoin: eu-west-1\n"))
    done = run_without_terminal("edit")
    assert done.returncode == 3
    assert "unknown key" in done.stderr and "did you mean 'region'" in done.stderr
    assert (isolated_env / ".imsa").read_text() == before
    assert [name for name in os.listdir(isolated_env) if name.startswith(".imsa-edit-")] == []


def test_plain_keys_are_warned_about_on_a_terminal_only(isolated_env, service, sts_env):
    import subprocess
    import sys

    users = sts_env.users
    write_profiles(isolated_env / ".imsa", {
        name: {"aws_access_key_id": users[user]["aws_access_key_id"], "mfa_serial_number": MFA_SERIAL,
               "aws_secret_access_key": users[user]["aws_secret_access_key"]}
        for name, user in (("p", "bob"), ("q", "alice"))})
    master, slave = os.openpty()
    try:
        done = subprocess.run([sys.executable, "-m", "imsa", "export", "p", "--mfa-token", MFA_CODE],
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave, timeout=60,
                              env=dict(os.environ))
        os.close(slave)
        seen = b""
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
    finally:
        os.close(master)
    assert done.returncode == 0
    assert b"p's secret key is in plain text" in seen and b"imsa migrate" in seen
    piped = run_imsa("export", "q", "--mfa-token", MFA_CODE)  # a new session too, but stderr is no terminal
    assert piped.returncode == 0, piped.stderr
    assert "new MFA session" in piped.stderr and "plain text" not in piped.stderr
