"""The secret store: long-term keys (and the service's key for saved sessions) out of plain text.

Two stores, chosen once per process (``IMSA_SECRET_STORE``: ``auto`` by default, ``keyring`` or ``file``):

- the OS keyring through ``keyring``, used only when the backend it resolves to is on ALLOWED_BACKENDS (Secret
  Service, KWallet, macOS Keychain, Windows, ``pass``) *and* passes a write/read/delete probe within
  PROBE_TIMEOUT. keyring's own choice depends on the environment (with keyrings.alt installed and no D-Bus
  session it silently picks PlaintextKeyring, base64 in a file), so it is never trusted as it is;
- otherwise imsa's own file store: one file per item under ``$XDG_DATA_HOME/imsa/keys`` (directory 0700, files
  0600, atomic replace), each sealed with AES-256-GCM under a key derived from a passphrase with scrypt (its
  parameters and salt stored in the file, so they can be raised later) and the item's name as associated data,
  so a file copied over another item's fails to open. The passphrase comes from ``IMSA_FILE_PASSPHRASE``, the
  command in ``IMSA_PASSPHRASE_PROCESS`` (run without a shell), or the terminal.

There is no plain-text store. Items are named ``keys:PROFILE`` (a profile's access key id and secret, as JSON)
and SESSION_KEY_ITEM (the service's key for the sessions it saves; imsa/server/saved.py).
"""

import base64
import hashlib
import json
import os
import secrets as random
import shlex
import stat
import subprocess
import threading

from imsa.errors import ConfigError
from imsa.files import replace_atomically
from imsa.paths import xdg_dir

STORE_VARIABLE = "IMSA_SECRET_STORE"
PASSPHRASE_VARIABLE = "IMSA_FILE_PASSPHRASE"
PASSPHRASE_PROCESS_VARIABLE = "IMSA_PASSPHRASE_PROCESS"
DIRECTORY_VARIABLE = "IMSA_SECRETS_DIR"
# The keyring service name every item is filed under.
KEYRING_SERVICE = "imsa"
# The backends whose secrets live in an OS vault (module.Class as keyring names them). Not PlaintextKeyring,
# EncryptedKeyring (unauthenticated AES-CFB, 1000 PBKDF2 rounds), the null or fail backends.
ALLOWED_BACKENDS = frozenset((
    "keyring.backends.SecretService.Keyring",
    "keyring.backends.kwallet.DBusKeyring",
    "keyring.backends.kwallet.DBusKeyringKWallet4",
    "keyring.backends.macOS.Keyring",
    "keyring.backends.Windows.WinVaultKeyring",
    "keyring_pass.PasswordStoreBackend",
))
# A locked collection on a headless machine can block on an unlock prompt nobody sees: the probe gives up then.
PROBE_TIMEOUT = 10
PASSPHRASE_PROCESS_TIMEOUT = 60
SESSION_KEY_ITEM = "service:session-key"
# The file store's format, and its KDF: scrypt n=2^17, r=8 (128 MiB, about 0.4 s here), per OWASP's guidance.
FILE_VERSION = 1
SCRYPT_N, SCRYPT_R, SCRYPT_P = 1 << 17, 8, 1
SALT_BYTES = 16
NONCE_BYTES = 12


class SecretStoreError(ConfigError):
    """The secret store cannot be opened or an item in it cannot be read (exit 3, configuration)."""


def keys_item(profile):
    """The name of the item that holds *profile*'s long-term keys."""
    return f"keys:{profile}"


# --- the OS keyring ---


def backend_name(backend):
    """``module.Class`` of a keyring backend, as ALLOWED_BACKENDS lists them."""
    return f"{type(backend).__module__}.{type(backend).__qualname__}"


def refusal(backend):
    """Why *backend* is not used (None when it is allowed): a ChainerBackend only when all its members are."""
    name = backend_name(backend)
    if name == "keyring.backends.chainer.ChainerBackend":
        members = list(getattr(backend, "backends", ()))
        if not members:
            return "keyring found no backend"
        for member in members:
            reason = refusal(member)
            if reason:
                return reason
        return None
    if name not in ALLOWED_BACKENDS:
        return f"keyring's backend {name} is not an OS vault imsa trusts (plain text or weak encryption)"
    return None


def _with_timeout(function, timeout):
    """Run *function* in a daemon thread; its result, or TimeoutError when it has not returned in *timeout* s."""
    outcome = {}

    def call():
        try:
            outcome["value"] = function()
        except BaseException as error:  # handed back to the caller below
            outcome["error"] = error

    thread = threading.Thread(target=call, name="imsa-keyring-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError(f"no answer within {timeout} s (a locked keyring waiting for a prompt?)")
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


class KeyringStore:
    """Items in the OS keyring, under the service name ``imsa``."""

    def __init__(self, backend):
        self.backend = backend
        self.name = f"OS keyring ({backend_name(backend)})"
        self.kind = "keyring"

    def probe(self, timeout=PROBE_TIMEOUT):
        """Write, read back and delete a random item; SecretStoreError when any step fails or hangs."""
        item, value = f"probe:{random.token_hex(8)}", random.token_hex(16)

        def round_trip():
            self.backend.set_password(KEYRING_SERVICE, item, value)
            try:
                return self.backend.get_password(KEYRING_SERVICE, item) == value
            finally:
                self.backend.delete_password(KEYRING_SERVICE, item)

        try:
            ok = _with_timeout(round_trip, timeout)
        except Exception as error:
            raise SecretStoreError(f"{self.name} failed its probe: {type(error).__name__}: {error}") from None
        if not ok:
            raise SecretStoreError(f"{self.name} failed its probe: what was written did not read back")

    def get(self, item):
        """The value of *item*, or None."""
        return self._call(self.backend.get_password, KEYRING_SERVICE, item)

    def set(self, item, value):
        """Store *value* as *item*, replacing what was there."""
        self._call(self.backend.set_password, KEYRING_SERVICE, item, value)

    def delete(self, item):
        """Remove *item*; False when there was none."""
        import keyring.errors

        try:
            self._call(self.backend.delete_password, KEYRING_SERVICE, item, passthrough=keyring.errors.PasswordDeleteError)
        except keyring.errors.PasswordDeleteError:
            return False
        return True

    def _call(self, function, *args, passthrough=()):
        try:
            return _with_timeout(lambda: function(*args), PROBE_TIMEOUT)
        except passthrough:
            raise
        except Exception as error:
            raise SecretStoreError(f"{self.name}: {type(error).__name__}: {error}") from None


class _QuietStderr:
    """Send file descriptor 2 to /dev/null for a while: keyring's backend discovery runs programs (``pass``) that
    complain on stderr about stores that are not set up, which is no news for the person running imsa."""

    def __enter__(self):
        import sys

        sys.stderr.flush()
        self._saved = os.dup(2)
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 2)
        os.close(null)

    def __exit__(self, *_exc):
        os.dup2(self._saved, 2)
        os.close(self._saved)


def keyring_store(probe=True):
    """The OS keyring as a store; SecretStoreError saying why not (not installed, not allowed, probe failed)."""
    try:
        import keyring
    except ImportError:
        raise SecretStoreError("the keyring package is not installed") from None
    try:
        with _QuietStderr():
            backend = keyring.get_keyring()
    except Exception as error:  # a backend's own check failing (no bus of ours, pass not set up): not usable
        raise SecretStoreError(f"keyring found no usable backend: {type(error).__name__}: {error}") from None
    reason = refusal(backend)
    if reason:
        raise SecretStoreError(reason)
    store = KeyringStore(backend)
    if probe:
        with _QuietStderr():
            store.probe()
    return store


# --- imsa's own file store ---


def default_directory(environ=None):
    """Where the file store keeps its items: ``$IMSA_SECRETS_DIR``, else ``$XDG_DATA_HOME/imsa/keys``."""
    environ = os.environ if environ is None else environ
    if environ.get(DIRECTORY_VARIABLE):
        return environ[DIRECTORY_VARIABLE]
    return xdg_dir("XDG_DATA_HOME", "keys", environ=environ)


def _b64(data):
    return base64.b64encode(data).decode("ascii")


def _unb64(text):
    return base64.b64decode(text.encode("ascii"), validate=True)


def _derive(passphrase, kdf):
    """The 256-bit key *kdf* (the parameters stored in a file) makes of *passphrase*."""
    from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

    if kdf.get("name") != "scrypt":
        raise SecretStoreError(f"unknown key derivation {kdf.get('name')!r} (written by a newer imsa?)")
    return Scrypt(salt=_unb64(kdf["salt"]), length=32, n=kdf["n"], r=kdf["r"], p=kdf["p"]).derive(passphrase.encode())


def associated_data(item):
    """What binds a sealed value to its item: the format version and the item's name."""
    return f"imsa-secret-v{FILE_VERSION}\0{item}".encode()


def seal(passphrase, item, value):
    """*value* (text) sealed for *item*: a JSON-ready dict with the KDF parameters, nonce and ciphertext."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    kdf = {"name": "scrypt", "salt": _b64(random.token_bytes(SALT_BYTES)), "n": SCRYPT_N, "r": SCRYPT_R, "p": SCRYPT_P}
    nonce = random.token_bytes(NONCE_BYTES)
    sealed = AESGCM(_derive(passphrase, kdf)).encrypt(nonce, value.encode(), associated_data(item))
    return {"version": FILE_VERSION, "item": item, "kdf": kdf, "cipher": "AES-256-GCM", "nonce": _b64(nonce),
            "ciphertext": _b64(sealed)}


def unseal(passphrase, item, data):
    """The text sealed in *data* for *item*; SecretStoreError for a wrong passphrase or a changed or moved file."""
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    try:
        if data.get("version") != FILE_VERSION or data.get("cipher") != "AES-256-GCM":
            raise SecretStoreError(f"the secret store's item {item!r} has an unknown format")
        key = _derive(passphrase, data["kdf"])
        return AESGCM(key).decrypt(_unb64(data["nonce"]), _unb64(data["ciphertext"]), associated_data(item)).decode()
    except InvalidTag:
        raise SecretStoreError(f"cannot open {item!r} in the secret store: wrong passphrase, or the file was changed "
                               "or copied from another item") from None
    except (KeyError, TypeError, ValueError, AttributeError):
        raise SecretStoreError(f"the secret store's item {item!r} is damaged") from None


def read_passphrase_process(command):
    """The passphrase the command *command* prints (run without a shell, like mfa_process)."""
    try:
        argv = shlex.split(command)
    except ValueError as error:
        raise SecretStoreError(f"{PASSPHRASE_PROCESS_VARIABLE} cannot be parsed: {error}") from None
    if not argv:
        raise SecretStoreError(f"{PASSPHRASE_PROCESS_VARIABLE} is empty")
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=PASSPHRASE_PROCESS_TIMEOUT, check=False)
    except FileNotFoundError:
        raise SecretStoreError(f"{PASSPHRASE_PROCESS_VARIABLE}: command not found: {argv[0]}") from None
    except subprocess.TimeoutExpired:
        raise SecretStoreError(f"{PASSPHRASE_PROCESS_VARIABLE} did not finish within "
                               f"{PASSPHRASE_PROCESS_TIMEOUT} s") from None
    except OSError as error:
        raise SecretStoreError(f"{PASSPHRASE_PROCESS_VARIABLE}: cannot run {argv[0]}: {error.strerror}") from None
    if done.returncode != 0:
        raise SecretStoreError(f"{PASSPHRASE_PROCESS_VARIABLE} failed with exit status {done.returncode}")
    passphrase = done.stdout.rstrip("\n")
    if not passphrase:
        raise SecretStoreError(f"{PASSPHRASE_PROCESS_VARIABLE} printed no passphrase")
    return passphrase


def ask_passphrase(text):
    """A passphrase typed on the terminal, not echoed; SecretStoreError when there is no terminal."""
    import getpass

    from imsa.sts import open_terminal

    tty = open_terminal()
    if tty is None:
        raise SecretStoreError(f"the secret store needs its passphrase and there is no terminal to ask on; set "
                               f"{PASSPHRASE_VARIABLE} or {PASSPHRASE_PROCESS_VARIABLE}")
    tty.close()
    # getpass reads /dev/tty itself, with echo off, and writes the prompt there.
    return getpass.getpass(text)


class FileStore:
    """imsa's own store: one sealed JSON file per item in a private directory."""

    kind = "file"

    def __init__(self, directory, passphrase=None, interactive=True, environ=None):
        self.directory = directory
        self.name = f"encrypted files ({directory})"
        self._passphrase = passphrase
        self._interactive = interactive
        self._environ = os.environ if environ is None else environ

    def _path(self, item):
        # Items are named by a hash: a profile name never becomes a path, whatever characters it has.
        return os.path.join(self.directory, hashlib.sha256(item.encode()).hexdigest()[:32] + ".json")

    def _check_directory(self, create):
        """The directory, made 0700 when *create*; refused when another user owns it or others may open it."""
        if create:
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
        try:
            info = os.lstat(self.directory)
        except FileNotFoundError:
            return False
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or stat.S_IMODE(info.st_mode) & 0o077:
            raise SecretStoreError(f"{self.directory}: the secret store's directory must be yours and private "
                                   f"(a directory, mode 0700); fix it with: chmod 700 {self.directory}")
        return True

    def _items(self):
        try:
            return [name for name in os.listdir(self.directory) if name.endswith(".json")]
        except FileNotFoundError:
            return []

    def passphrase(self, new=False):
        """The store's passphrase: given, the environment, the passphrase process, else asked (twice for a new
        store) on the terminal; kept for this process."""
        if self._passphrase:
            return self._passphrase
        if self._environ.get(PASSPHRASE_VARIABLE):
            self._passphrase = self._environ[PASSPHRASE_VARIABLE]
        elif self._environ.get(PASSPHRASE_PROCESS_VARIABLE):
            self._passphrase = read_passphrase_process(self._environ[PASSPHRASE_PROCESS_VARIABLE])
        elif not self._interactive:
            raise SecretStoreError(f"the secret store needs its passphrase: set {PASSPHRASE_VARIABLE} or "
                                   f"{PASSPHRASE_PROCESS_VARIABLE} (no terminal is asked here)")
        elif new and not self._items():
            first = ask_passphrase("New passphrase for imsa's secret store: ")
            if not first:
                raise SecretStoreError("the passphrase must not be empty")
            if ask_passphrase("The same passphrase again: ") != first:
                raise SecretStoreError("the two passphrases differ; nothing was stored")
            self._passphrase = first
        else:
            self._passphrase = ask_passphrase("Passphrase of imsa's secret store: ")
        return self._passphrase

    def get(self, item):
        """The value of *item*, or None."""
        if not self._check_directory(create=False):
            return None
        try:
            with open(self._path(item), encoding="utf-8") as handle:
                data = json.load(handle)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            raise SecretStoreError(f"the secret store's item {item!r} cannot be read") from None
        if not isinstance(data, dict) or data.get("item") != item:
            raise SecretStoreError(f"the secret store's file for {item!r} holds another item")
        return unseal(self.passphrase(), item, data)

    def set(self, item, value):
        """Seal *value* as *item*, replacing the file atomically (a new 0600 file renamed over the old)."""
        self._check_directory(create=True)
        data = seal(self.passphrase(new=True), item, value)
        self._check_passphrase(item)
        replace_atomically(self._path(item), json.dumps(data))
        directory = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)

    def _check_passphrase(self, writing):
        """One store, one passphrase: a passphrase that opens none of the other items is refused before writing."""
        others = [name for name in self._items() if os.path.join(self.directory, name) != self._path(writing)]
        if not others:
            return
        with open(os.path.join(self.directory, others[0]), encoding="utf-8") as handle:
            data = json.load(handle)
        unseal(self.passphrase(), data.get("item", ""), data)

    def delete(self, item):
        """Remove *item*; False when there was none."""
        try:
            os.unlink(self._path(item))
        except FileNotFoundError:
            return False
        return True


_opened = {}


def open_store(interactive=True, environ=None):
    """The store this process uses (IMSA_SECRET_STORE: auto, keyring or file), opened once and kept."""
    environ = os.environ if environ is None else environ
    choice = (environ.get(STORE_VARIABLE) or "auto").lower()
    if choice not in ("auto", "keyring", "file"):
        raise SecretStoreError(f"{STORE_VARIABLE} must be auto, keyring or file, not {choice!r}")
    cached = _opened.get((choice, interactive))
    if cached is not None:
        return cached
    store = None
    if choice in ("auto", "keyring"):
        try:
            store = keyring_store()
        except SecretStoreError as error:
            if choice == "keyring":
                raise SecretStoreError(f"{STORE_VARIABLE}=keyring, but {error}") from None
    if store is None:
        store = FileStore(default_directory(environ), interactive=interactive, environ=environ)
    _opened[(choice, interactive)] = store
    return store


def store_name(environ=None):
    """The name of the store open_store would choose, without its probe (``imsa status`` runs on every prompt: a
    write/read/delete in the keyring each time, bounded only by PROBE_TIMEOUT, is not for it). A keyring that fails
    its probe when keys are read falls back as open_store says."""
    environ = os.environ if environ is None else environ
    choice = (environ.get(STORE_VARIABLE) or "auto").lower()
    if choice in ("auto", "keyring"):
        try:
            return keyring_store(probe=False).name
        except SecretStoreError as error:
            if choice == "keyring":
                return f"no secret store: {STORE_VARIABLE}=keyring, but {error}"
    return f"encrypted files ({default_directory(environ)})"


def get_keys(profile, store=None):
    """(access key id, secret) of *profile* from the store; SecretStoreError when the store has none."""
    store = store or open_store()
    value = store.get(keys_item(profile))
    if value is None:
        raise SecretStoreError(f"the secret store ({store.name}) holds no keys for profile {profile!r}; "
                               f"store them with: imsa add {profile}")
    try:
        data = json.loads(value)
        return data["aws_access_key_id"], data["aws_secret_access_key"]
    except (ValueError, KeyError, TypeError):
        raise SecretStoreError(f"the secret store's keys for {profile!r} are damaged; store them again: "
                               f"imsa add {profile}") from None


def put_keys(profile, access_key_id, secret_access_key, store=None):
    """Store *profile*'s long-term keys."""
    store = store or open_store()
    store.set(keys_item(profile), json.dumps({"aws_access_key_id": access_key_id,
                                              "aws_secret_access_key": secret_access_key}))
    return store
