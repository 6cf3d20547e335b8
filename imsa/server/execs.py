"""The service's table of running ``imsa exec`` commands: which profile each one uses, for as long as it runs.

Each ``imsa exec`` registers its profile on the control socket (``POST /bindings``); the binding is tied to the pid
of the ``imsa exec`` process that asked (SO_PEERCRED, so it cannot be claimed for another process). Meanwhile the
profile is pinned in the store, whose refresher keeps it rotated, and ``imsa status`` lists it. A binding ends when
``imsa exec`` revokes it, or when its process is gone (a reaper thread looks while bindings exist).

No token and no endpoint here: ``imsa exec`` serves its command itself (container.py) and asks the service for the
credentials over the control socket on each request.
"""

import logging
import os
import secrets
import select
import threading

from imsa.credentials import format_time, utcnow

log = logging.getLogger(__name__)

# The table is bounded; dead owners are reaped before a new binding is refused, so only live ones count.
MAX_BINDINGS = 1024
# While bindings exist, the reaper looks for owners that died without revoking this often; with none it sleeps.
REAP_EVERY = 2.0


class BindingError(Exception):
    """A binding cannot be made (no owner pid, table full)."""


class _Binding:
    """One exec's profile and owner; the owner is watched through a pidfd where Linux offers one."""

    __slots__ = ("id", "spec", "pid", "pidfd", "created")

    def __init__(self, binding_id, spec, pid, pidfd, created):
        self.id = binding_id
        self.spec = spec
        self.pid = pid
        self.pidfd = pidfd
        self.created = created

    def owner_alive(self):
        """True while the ``imsa exec`` process that made the binding exists."""
        if self.pidfd is not None:
            # A pidfd names one process for good: it becomes readable when that process exits, and a recycled pid
            # cannot make a dead owner look alive.
            poller = select.poll()
            poller.register(self.pidfd, select.POLLIN)
            return not poller.poll(0)
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # exists, but runs as another uid (root ran imsa exec against this service)
            return True
        return True


def _open_pidfd(pid):
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):  # Python < 3.9, Linux < 5.3, or the pid is already gone
        return None


class BindingTable:
    """The live ``imsa exec`` processes, each bound to a RoleSpec that is pinned in the store meanwhile."""

    def __init__(self, store, limit=MAX_BINDINGS, reap_every=REAP_EVERY, clock=utcnow):
        self._store = store
        self._limit = limit
        self._reap_every = reap_every
        self._clock = clock
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._bindings = {}
        self._stopping = False
        self._thread = None

    def create(self, spec, pid):
        """Bind *spec* to the process *pid* and pin it; returns the binding id."""
        if not isinstance(pid, int) or pid <= 0:
            raise BindingError("the caller's pid is unknown (SO_PEERCRED); cannot watch it, so no binding")
        self.reap()
        binding_id = secrets.token_hex(8)
        binding = _Binding(binding_id, spec, pid, _open_pidfd(pid), self._clock())
        # Pin before the binding can be found (and so revoked): an unpin must never come before its pin.
        self._store.pin(spec)
        with self._lock:
            full = len(self._bindings) >= self._limit
            if not full:
                self._bindings[binding_id] = binding
                self._changed.notify_all()
        if full:
            if binding.pidfd is not None:
                os.close(binding.pidfd)
            self._store.unpin(spec)
            raise BindingError(f"too many exec bindings ({self._limit}); end some imsa exec commands")
        log.info("exec binding %s for %s (pid %d)", binding_id, spec.profile, pid)
        return binding_id

    def revoke(self, binding_id, reason="revoked"):
        """End a binding; False when there is no such binding (already gone)."""
        with self._lock:
            binding = self._bindings.pop(binding_id, None)
            # Closed under the lock: owner checks poll pidfds under it too, so none polls a recycled fd number.
            if binding is not None and binding.pidfd is not None:
                os.close(binding.pidfd)
                binding.pidfd = None
        if binding is None:
            return False
        self._store.unpin(binding.spec)
        log.info("exec binding %s for %s ended: %s", binding_id, binding.spec.profile, reason)
        return True

    def reap(self):
        """End every binding whose ``imsa exec`` process is gone; returns how many."""
        with self._lock:
            dead = [binding for binding in self._bindings.values() if not binding.owner_alive()]
        for binding in dead:
            self.revoke(binding.id, f"imsa exec (pid {binding.pid}) is gone")
        return len(dead)

    def status(self):
        """The bindings: id, profile, role, owner pid, creation time."""
        with self._lock:
            bindings = sorted(self._bindings.values(), key=lambda b: b.created)
        return [
            {"id": b.id, "profile": b.spec.profile, "role_arn": b.spec.role_arn, "pid": b.pid, "created": format_time(b.created)}
            for b in bindings
        ]

    def __len__(self):
        with self._lock:
            return len(self._bindings)

    # --- the reaper ---

    def _run(self):
        while True:
            with self._changed:
                while not self._bindings and not self._stopping:
                    self._changed.wait()
                if self._stopping:
                    return
                self._changed.wait(self._reap_every)
                if self._stopping:
                    return
            try:
                self.reap()
            except Exception:  # the reaper must survive anything; it looks again next time
                log.exception("reaping exec bindings failed")

    def start(self):
        """Start the reaper thread."""
        self._thread = threading.Thread(target=self._run, name="imsa-exec-reaper", daemon=True)
        self._thread.start()

    def stop(self):
        """Stop the reaper thread and end every binding."""
        with self._changed:
            self._stopping = True
            self._changed.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:
            ids = list(self._bindings)
        for binding_id in ids:
            self.revoke(binding_id, "the service stops")
