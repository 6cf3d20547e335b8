"""Sessions that survive a restart: the service seals the sessions it holds (temporary material only, never a
long-term key) and the profile it serves into files of its own, and reads them back when it starts again.

Where the key comes from. The files are sealed with AES-256-GCM under a random 256-bit key that lives in the
secret store (imsa/secrets.py, item SESSION_KEY_ITEM), not beside the files; the fingerprint (or ``active``) is
the associated data, so a file renamed over another does not open. The service opens the store itself, as the
user and never as root, without a terminal: the OS keyring when its environment reaches one (then saving is on
by default), else the file store with a passphrase from IMSA_FILE_PASSPHRASE or IMSA_PASSPHRASE_PROCESS in the
service's environment (then only with ``imsa start --keep-sessions``). It reads no other item of the store.

Threat model (README, "Sessions that survive a restart"): a copy of the disk, a backup or another user who can
read the directory gets ciphertext only while the store stays locked. Any process of the owner can already use
the sessions through the control socket, so it is not a threat this defends against. An expired session is
never restored, and ``imsa logout`` deletes the files.
"""

import base64
import json
import logging
import os
import secrets as random
import stat

from imsa.files import replace_atomically
from imsa.paths import xdg_dir

log = logging.getLogger(__name__)

STATE_VARIABLE = "IMSA_STATE_DIR"
SESSION_SUFFIX = ".session"
ACTIVE_NAME = "active.session"
VERSION = 1
NONCE_BYTES = 12


class SavedError(Exception):
    """The saved sessions cannot be used (no store, no key, a directory that is not private)."""


def preload():
    """Import what sealing and the file store need while the code is surely readable (before the drop); the
    OS keyring's package is imported later, as the user, since finding its backend reads the user's files."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # noqa: F401
    from cryptography.hazmat.primitives.kdf.scrypt import Scrypt  # noqa: F401

    from imsa import secrets  # noqa: F401


def default_directory(environ=None):
    """``$IMSA_STATE_DIR``, else ``$XDG_STATE_HOME/imsa/sessions`` (``~/.local/state/imsa/sessions``)."""
    environ = os.environ if environ is None else environ
    if environ.get(STATE_VARIABLE):
        return environ[STATE_VARIABLE]
    return xdg_dir("XDG_STATE_HOME", "sessions", environ=environ)


def session_key(store):
    """The service's 256-bit key for its saved sessions, from *store*; made and stored on first use."""
    from imsa import secrets

    value = store.get(secrets.SESSION_KEY_ITEM)
    if value is None:
        value = base64.b64encode(random.token_bytes(32)).decode("ascii")
        store.set(secrets.SESSION_KEY_ITEM, value)
    key = base64.b64decode(value)
    if len(key) != 32:
        raise SavedError("the secret store's session key is damaged")
    return key


def open_for_service(keep=None, environ=None):
    """SavedSessions for the service, or None when saving is off. *keep*: True (``--keep-sessions``: any store, an
    error when none opens), False (off), None (on when the store is the OS keyring)."""
    if keep is False:
        return None
    from imsa import secrets

    try:
        store = secrets.open_store(interactive=False, environ=environ)
        if keep is None and store.kind != "keyring":
            log.info("sessions are kept in memory only (the secret store is %s; imsa start --keep-sessions saves "
                     "them there)", store.name)
            return None
        saved = SavedSessions(default_directory(environ), session_key(store), store.name)
        saved.check_directory()
    except Exception as error:  # whatever a keyring backend raises: the service still serves, from memory
        if keep:
            raise SavedError(f"cannot keep sessions across restarts: {error}") from None
        log.warning("sessions are kept in memory only: %s: %s", type(error).__name__, error)
        return None
    return saved


def forget_files(fingerprint=None, environ=None):
    """Delete saved session files without the key (``imsa logout`` while no service runs): one or all; a count."""
    directory = default_directory(environ)
    try:
        names = os.listdir(directory)
    except OSError:
        return 0
    removed = 0
    for name in names:
        if name.endswith(SESSION_SUFFIX) and (fingerprint is None or name == fingerprint + SESSION_SUFFIX):
            try:
                os.unlink(os.path.join(directory, name))
                removed += 1
            except OSError:
                pass
    return removed


class SavedSessions:
    """Sealed files in a private directory: one per session (by fingerprint) and one for the active profile."""

    def __init__(self, directory, key, store_name=""):
        self.directory = directory
        self.store_name = store_name
        self._key = key

    def describe(self):
        """Where sessions are saved, for status."""
        return f"{self.directory} (key in {self.store_name})"

    def check_directory(self):
        """Make the directory (0700) and refuse one that is not this user's alone."""
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        info = os.lstat(self.directory)
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or stat.S_IMODE(info.st_mode) & 0o077:
            raise SavedError(f"{self.directory} must be a directory of the service's user alone (mode 0700)")

    def _seal(self, name, data):
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        nonce = random.token_bytes(NONCE_BYTES)
        sealed = AESGCM(self._key).encrypt(nonce, json.dumps(data).encode(), self._aad(name))
        return {"version": VERSION, "nonce": base64.b64encode(nonce).decode(), "sealed": base64.b64encode(sealed).decode()}

    def _open(self, name, box):
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        nonce, sealed = base64.b64decode(box["nonce"]), base64.b64decode(box["sealed"])
        return json.loads(AESGCM(self._key).decrypt(nonce, sealed, self._aad(name)))

    @staticmethod
    def _aad(name):
        return f"imsa-session-v{VERSION}\0{name}".encode()

    def _write(self, name, data):
        replace_atomically(os.path.join(self.directory, name), json.dumps(self._seal(name, data)))

    def _remove(self, name):
        try:
            os.unlink(os.path.join(self.directory, name))
        except FileNotFoundError:
            pass

    def save_session(self, fingerprint, kind, material, label, settings):
        """Seal one session: its kind, material (JSON), label and StsSettings (JSON)."""
        self._write(fingerprint + SESSION_SUFFIX, {"fingerprint": fingerprint, "kind": kind, "material": material,
                                                   "label": label, "sts": settings})

    def forget_session(self, fingerprint):
        """Delete one session's file."""
        self._remove(fingerprint + SESSION_SUFFIX)

    def save_active(self, spec):
        """Seal the active profile's RoleSpec (JSON); None forgets it."""
        if spec is None:
            self._remove(ACTIVE_NAME)
        else:
            self._write(ACTIVE_NAME, spec)

    def load(self):
        """(sessions, active spec or None) as saved; a file that does not open is logged and deleted."""
        sessions, active = [], None
        for name in sorted(os.listdir(self.directory)):
            if not name.endswith(SESSION_SUFFIX):
                continue
            try:
                with open(os.path.join(self.directory, name), encoding="utf-8") as handle:
                    data = self._open(name, json.load(handle))
            except Exception as error:  # any damage: the session is lost, never the service
                log.warning("saved session %s cannot be opened (%s); deleting it", name, type(error).__name__)
                self._remove(name)
                continue
            if name == ACTIVE_NAME:
                active = data
            else:
                sessions.append(data)
        return sessions, active
