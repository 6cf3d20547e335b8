"""Sessions and role credentials in memory: atomic swaps, and the refresher thread that rotates them.

Nothing here runs on an IMDS request: readers take ``served()``, one attribute read, and never wait for STS.
A session is held with its kind (imsa/sources: the kind names the minter that makes role credentials from it);
rotation, backoff and the swaps below are the same for every kind.
"""

import dataclasses
import datetime
import logging
import threading
from dataclasses import dataclass

from imsa import expiry
from imsa.credentials import Credentials, format_time, mask, utcnow
from imsa.errors import StsError
from imsa.limits import MAX_ROLE_DURATION, MIN_DURATION, PATTERNS
from imsa import sources

log = logging.getLogger(__name__)

# Rotate role credentials when this little is left, so that what IMDS serves keeps >= 25 min: below 15 min
# botocore refetches on every call, below ~25 min it stretches the expiry past the real one (PROTOCOL.md §1.6).
ROTATE_BEFORE = datetime.timedelta(minutes=30)
RETRY_FIRST = datetime.timedelta(seconds=5)
RETRY_MAX = datetime.timedelta(minutes=5)
# An idle refresher still wakes this often, to drop expired sessions; no busy loop.
IDLE_WAKE = datetime.timedelta(hours=1)


# Bounds of what the control plane accepts: hops before the final role (a ~/.aws/config chain), and text for people.
MAX_HOPS = 8
MAX_TEXT = 1024
HOP_FIELDS = ("role_arn", "role_session_name", "duration_seconds", "external_id")


class SpecError(ValueError):
    """A role spec sent to the control plane is malformed."""


def _check_text(name, value, limit=MAX_TEXT):
    """*value* if it is None or printable text of at most *limit* characters, else SpecError."""
    if value is not None and (not isinstance(value, str) or not 0 < len(value) <= limit or not value.isprintable()):
        raise SpecError(f"{name!r} must be printable text of 1-{limit} characters")
    return value


def _check_role(data, where=""):
    """The validated role_arn, role_session_name, duration_seconds and external_id of *data* (a spec or a hop)."""
    duration = data.get("duration_seconds", MAX_ROLE_DURATION)
    if isinstance(duration, bool) or not isinstance(duration, int) or not MIN_DURATION <= duration <= MAX_ROLE_DURATION:
        raise SpecError(f"{where}'duration_seconds' must be a whole number from {MIN_DURATION} to {MAX_ROLE_DURATION}")
    fields = {"duration_seconds": duration}
    for name in ("role_arn", "role_session_name", "external_id", "region"):
        value = data.get(name)
        if value is None:
            continue
        pattern, description = PATTERNS[name]
        if not isinstance(value, str) or not pattern.match(value):
            raise SpecError(f"{where}{name!r} must be {description}")
        fields[name] = value
    return fields


def _check_hops(value):
    """The ``via`` hops of a spec as a tuple of (role_arn, role_session_name, duration_seconds, external_id)."""
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) > MAX_HOPS:
        raise SpecError(f"'via' must be a list of at most {MAX_HOPS} roles")
    hops = []
    for number, hop in enumerate(value, 1):
        where = f"'via' role {number}: "
        if not isinstance(hop, dict) or set(hop) - set(HOP_FIELDS):
            raise SpecError(f"{where}must be an object with only {', '.join(HOP_FIELDS)}")
        fields = _check_role(hop, where)
        if "role_arn" not in fields or "role_session_name" not in fields:
            raise SpecError(f"{where}needs 'role_arn' and 'role_session_name'")
        hops.append(tuple(fields.get(name) for name in HOP_FIELDS))
    return tuple(hops)


@dataclass(frozen=True)
class RoleSpec:
    """What the service needs to make one profile's credentials; hashable, so it keys the role cache."""

    profile: str
    fingerprint: str
    role_arn: str = None
    role_session_name: str = "imsa"
    duration_seconds: int = MAX_ROLE_DURATION
    external_id: str = None
    region: str = None
    # The roles assumed before role_arn, in order (a ~/.aws/config chain): (role_arn, role_session_name,
    # duration_seconds, external_id) each; and the file the profile came from, for status.
    via: tuple = ()
    origin: str = None
    # False: the profile is kept off the global endpoint (``imds: false`` in ~/.imsa); /activate refuses it.
    imds: bool = True

    @classmethod
    def from_json(cls, data):
        """Validate a control-plane body; SpecError names the first bad field."""
        if not isinstance(data, dict):
            raise SpecError("the body must be a JSON object")
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise SpecError(f"unknown field {sorted(unknown)[0]!r}")
        profile = data.get("profile")
        if not isinstance(profile, str) or not 0 < len(profile) <= 128 or "/" in profile:
            raise SpecError("'profile' must be a name of 1-128 characters without '/'")
        fingerprint = data.get("fingerprint")
        if not _is_fingerprint(fingerprint):
            raise SpecError("'fingerprint' must be 32 hex characters")
        fields = _check_role(data)
        via = _check_hops(data.get("via"))
        if via and "role_arn" not in fields:
            raise SpecError("'via' needs a final 'role_arn'")
        imds = data.get("imds", True)
        if not isinstance(imds, bool):
            raise SpecError("'imds' must be true or false")
        return cls(profile=profile, fingerprint=fingerprint, via=via, origin=_check_text("origin", data.get("origin")),
                   imds=imds, **fields)

    @property
    def role_name(self):
        """The name IMDS lists: the role's name, or the profile's when it serves session credentials."""
        if self.role_arn:
            return self.role_arn.rsplit("/", 1)[-1]
        return self.profile

    @property
    def account_id(self):
        """The role's account, when known."""
        return self.role_arn.split(":")[4] if self.role_arn else None


def _is_fingerprint(value):
    return isinstance(value, str) and len(value) == 32 and all(c in "0123456789abcdef" for c in value)


@dataclass(frozen=True)
class Served:
    """The active profile and its credentials, swapped as one object so a reader never mixes two roles.

    *previous* is what was served before the last switch to another profile, and *since* when that switch
    happened: IMDS still answers the previous role by name for a moment (imds.SWITCH_GRACE), because an SDK
    that listed it just before the switch asks for it just after.
    """

    spec: RoleSpec
    credentials: Credentials
    previous: "Served" = None
    since: datetime.datetime = None


@dataclass(frozen=True)
class Session:
    """A session as the service holds it: its kind (which minter makes role credentials from it), the material
    (for ``credentials``: Credentials), when it ends, and the label that tells people its source (no secret)."""

    kind: str
    material: object
    expiration: datetime.datetime
    label: str = None
    # How long before its end the service warns (expiry.WARN_BEFORE unless the CLI sent the user's window).
    warn_before: datetime.timedelta = expiry.WARN_BEFORE

    def expired(self, now):
        """True once the session has ended."""
        return self.expiration <= now

    def remaining(self, now):
        """Time left before the session ends (negative once it has)."""
        return self.expiration - now


@dataclass
class _Entry:
    credentials: Credentials = None
    failures: int = 0
    retry_at: datetime.datetime = None
    error: str = None


class Store:
    """MFA sessions by fingerprint, role credentials by RoleSpec, the active profile, and their refresher."""

    def __init__(self, assume=None, clock=utcnow):
        # One minter per session kind (sources.KINDS), imported when first used; *assume* replaces the minter of
        # ``credentials`` sessions (tests inject a fake STS).
        self._minters = {"credentials": assume} if assume is not None else {}
        self._clock = clock
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._changed = False
        self._stopping = False
        self._sessions = {}
        self._sts = {}
        self._entries = {}
        self._pins = {}
        self._active = None
        self._served = None
        self._thread = None
        # Where sessions are saved to survive a restart (imsa/server/saved.py), or None: memory only.
        self.saver = None
        # {fingerprint: the expiration already warned about}: one warning per session, again for a new one.
        self._warned = {}

    # --- sessions ---

    def put_session(self, fingerprint, credentials, settings=None, kind="credentials", label=None, warn_before=None):
        """Keep a session pushed by the CLI — *credentials* is its material, of *kind* — with the StsSettings it was
        made with (every call from it reaches STS that way) and how long before its end to warn (*warn_before*);
        ValueError if it is already expired or of no known kind."""
        if not _is_fingerprint(fingerprint):
            raise ValueError("'fingerprint' must be 32 hex characters")
        if kind not in sources.KINDS:
            raise ValueError(f"unknown session kind {kind!r}")
        if credentials.expired(self._clock()):
            raise ValueError("the session has already expired")
        with self._lock:
            window = expiry.WARN_BEFORE if warn_before is None else warn_before
            self._sessions[fingerprint] = Session(kind, credentials, credentials.expiration, label, window)
            self._sts[fingerprint] = settings
            for spec, entry in self._entries.items():
                if spec.fingerprint == fingerprint:
                    entry.failures, entry.retry_at, entry.error = 0, None, None
            self._poke()
        log.info("session %s stored, expires %s", fingerprint[:8], format_time(credentials.expiration))
        self._save(lambda saver: saver.save_session(fingerprint, kind, credentials.to_json(), label,
                                                    settings.to_json() if settings is not None else None))

    def _save(self, action):
        """Apply *action* to the saved sessions, if they are kept; a failure is logged, never raised."""
        if self.saver is None:
            return
        try:
            action(self.saver)
        except Exception as error:  # the session is still held in memory; only the restart would miss it
            log.warning("cannot save sessions: %s: %s", type(error).__name__, error)

    def forget(self, fingerprint=None):
        """Drop the session of *fingerprint* (every session when None), the role credentials made from it, and
        stop serving its profile; the saved copies go too. Returns how many sessions were held."""
        with self._lock:
            gone = [fp for fp in self._sessions if fingerprint is None or fp == fingerprint]
            for fp in gone:
                del self._sessions[fp]
                self._sts.pop(fp, None)
            for spec in [spec for spec in self._entries if fingerprint is None or spec.fingerprint == fingerprint]:
                del self._entries[spec]
            stop_serving = self._active is not None and (fingerprint is None or self._active.fingerprint == fingerprint)
            if stop_serving:
                self._active, self._served = None, None
            self._poke()
        for fp in gone:
            self._save(lambda saver, fp=fp: saver.forget_session(fp))
        if fingerprint is not None and fingerprint not in gone:
            self._save(lambda saver: saver.forget_session(fingerprint))
        if stop_serving:
            self._save(lambda saver: saver.save_active(None))
        log.info("forgot %d session(s)%s", len(gone), "" if fingerprint is None else f" of {fingerprint[:8]}")
        return len(gone)

    def restore(self, saver):
        """Hold the sessions *saver* kept that are still valid, then keep saving there; the saved active RoleSpec
        (or None) is returned for the caller to activate once the refresher runs."""
        from imsa.sts_settings import StsSettings

        sessions, active = saver.load()
        for data in sessions:
            try:
                material = sources.material_class(data["kind"]).from_json(data["material"])
                settings = StsSettings.from_json(data["sts"]) if data.get("sts") is not None else None
                self.put_session(data["fingerprint"], material, settings, kind=data["kind"], label=data.get("label"))
            except (ValueError, KeyError, TypeError) as error:  # expired, or of a kind this version does not know
                log.info("saved session %s not restored: %s", str(data.get("fingerprint"))[:8], error)
                saver.forget_session(str(data.get("fingerprint")))
        self.saver = saver
        if active is not None:
            try:
                spec = RoleSpec.from_json(active)
            except SpecError:
                return None
            if self.session(spec.fingerprint) is not None:
                return spec
        saver.save_active(None)
        return None

    def session(self, fingerprint):
        """The Session for *fingerprint* if it has not expired, else None."""
        with self._lock:
            session = self._sessions.get(fingerprint)
        if session is None or session.expired(self._clock()):
            return None
        return session

    def settings(self, fingerprint):
        """The StsSettings the session of *fingerprint* was made with, or None."""
        with self._lock:
            return self._sts.get(fingerprint)

    def _minter(self, kind):
        """The minter of sessions of *kind*, imported on first use."""
        if kind not in self._minters:
            self._minters[kind] = sources.minter(kind)
        return self._minters[kind]

    # --- role credentials ---

    def credentials_for(self, spec):
        """Credentials for *spec*, from the cache while fresh, else made now (STS outside the lock)."""
        now = self._clock()
        with self._lock:
            entry = self._entries.get(spec)
            # Credentials their source marked no_cache (a credential server's NoCache) are made anew for each asker.
            if entry and entry.credentials and not _due(entry.credentials, now) and \
                    not getattr(entry.credentials, "no_cache", False):
                return entry.credentials
        return self._make(spec)

    def _make(self, spec):
        """Make credentials for *spec* from its session and cache them; StsError when that cannot be done."""
        session = self.session(spec.fingerprint)
        if session is None:
            raise StsError(f"no valid session for profile {spec.profile!r} (its MFA session or sign-in ended); run: "
                           f"imsa assume {spec.profile}")
        if spec.role_arn:
            with self._lock:
                settings = self._sts.get(spec.fingerprint)
            credentials = self._minter(session.kind)(session.material, dict(_spec_dict(spec), sts=settings))
        else:
            credentials = session.material
        with self._lock:
            entry = self._entries.setdefault(spec, _Entry())
            entry.credentials, entry.failures, entry.retry_at, entry.error = credentials, 0, None, None
            if self._active == spec:
                self._served = dataclasses.replace(self._served, credentials=credentials)
            self._poke()
        log.info("%s: credentials %s until %s", spec.profile, mask(credentials.access_key_id), format_time(credentials.expiration))
        return credentials

    def activate(self, spec):
        """Make *spec* the profile IMDS serves: its credentials are made first, then swapped in atomically."""
        credentials = self.credentials_for(spec)
        with self._lock:
            self._entries.setdefault(spec, _Entry(credentials=credentials))
            self._active = spec
            old = self._served
            if old is not None and old.spec == spec:
                self._served = dataclasses.replace(old, credentials=credentials)
            else:  # keep one step of history only: the previous snapshot loses its own
                previous = Served(old.spec, old.credentials) if old is not None else None
                self._served = Served(spec, credentials, previous=previous, since=self._clock())
            self._poke()
        log.info("active profile is now %s", spec.profile)
        self._save(lambda saver: saver.save_active(dict(_spec_dict(spec), fingerprint=spec.fingerprint,
                                                        origin=spec.origin)))
        return credentials

    def pin(self, spec):
        """Keep *spec* rotated even when it is not active (an exec binding holds it)."""
        with self._lock:
            self._pins[spec] = self._pins.get(spec, 0) + 1
            self._poke()

    def unpin(self, spec):
        """Release one pin() of *spec*."""
        with self._lock:
            count = self._pins.get(spec, 0) - 1
            if count > 0:
                self._pins[spec] = count
            else:
                self._pins.pop(spec, None)

    def cached(self, spec):
        """What the store holds for *spec* (rotated by the refresher while active or pinned), never calling STS."""
        with self._lock:
            entry = self._entries.get(spec)
            return entry.credentials if entry else None

    def served(self):
        """The active profile and its credentials as one snapshot, or None before any assume."""
        return self._served

    def status(self):
        """A JSON-ready summary, without secrets."""
        now = self._clock()
        served = self._served
        with self._lock:
            sessions = dict(self._sessions)
            settings = dict(self._sts)
            entry = self._entries.get(served.spec) if served else None
            error = entry.error if entry else None
        data = {"active": None, "sessions": []}
        for fingerprint, held in sorted(sessions.items()):
            data["sessions"].append({
                "fingerprint": fingerprint,
                "kind": held.kind,
                "source": held.label,
                "expiration": format_time(held.expiration),
                "valid": not held.expired(now),
                "ending": expiry.ending(held.expiration, now, held.warn_before),
                "sts": _describe(settings.get(fingerprint)),
            })
        if served:
            spec, creds = served.spec, served.credentials
            session = sessions.get(spec.fingerprint)
            data["active"] = {
                "profile": spec.profile,
                "role_arn": spec.role_arn,
                "role_name": spec.role_name,
                "via": [hop[0] for hop in spec.via],
                "origin": spec.origin,
                "source": session.label if session else None,
                "region": spec.region,
                "access_key_id": mask(creds.access_key_id),
                "expiration": format_time(creds.expiration),
                "valid": not creds.expired(now),
                "session_expiration": format_time(session.expiration) if session else None,
                "session_kind": session.kind if session else None,
                "last_error": error,
                # How this role's AssumeRole reaches STS: its session's settings, in the profile's own region.
                "sts": _describe(settings[spec.fingerprint].for_region(spec.region))
                if spec.role_arn and settings.get(spec.fingerprint) else None,
            }
        return data

    # --- the refresher ---

    def refresh_once(self):
        """Rotate every active or pinned role that is due; return when to look again (None: nothing to do)."""
        now = self._clock()
        with self._lock:
            for fingerprint in [fp for fp, held in self._sessions.items() if held.expired(now)]:
                del self._sessions[fingerprint]
                self._sts.pop(fingerprint, None)
                self._warned.pop(fingerprint, None)
                log.info("session %s expired", fingerprint[:8])
                self._save(lambda saver, fp=fingerprint: saver.forget_session(fp))
            ending = []
            for fingerprint, held in self._sessions.items():
                if self._warned.get(fingerprint) != held.expiration and expiry.ending(held.expiration, now,
                                                                                      held.warn_before):
                    self._warned[fingerprint] = held.expiration
                    ending.append((fingerprint, held, self._profiles_on(fingerprint)))
            watched = set(self._pins)
            if self._active is not None:
                watched.add(self._active)
            due = []
            for spec in watched:
                entry = self._entries.setdefault(spec, _Entry())
                if spec.role_arn is None:
                    held = self._sessions.get(spec.fingerprint)
                    session = held.material if held is not None else None
                    if session is not None and (entry.credentials is None or entry.credentials != session):
                        entry.credentials = session
                        if self._active == spec:
                            self._served = dataclasses.replace(self._served, credentials=session)
                    continue
                if entry.credentials is not None and not _due(entry.credentials, now):
                    continue
                if entry.retry_at is not None and now < entry.retry_at:
                    continue
                due.append(spec)
        for fingerprint, held, profiles in ending:
            self._warn_ending(fingerprint, held, profiles, now)
        for spec in due:
            try:
                self._make(spec)
            except StsError as error:
                self._failed(spec, error, now)
        return self._next_check(self._clock())

    def _profiles_on(self, fingerprint):
        """The names of the active and pinned profiles on session *fingerprint* (call with the lock held)."""
        watched = set(self._pins) | ({self._active} if self._active is not None else set())
        return sorted({spec.profile for spec in watched if spec.fingerprint == fingerprint})

    def _warn_ending(self, fingerprint, held, profiles, now):
        """Say, in the log and on the desktop, that a session ends soon and what renews it."""
        source = f" from {held.label}" if held.label else ""
        renew = f"imsa assume {profiles[0]}" if profiles else "imsa assume PROFILE"
        using = f" ({', '.join(profiles)} use it)" if profiles else ""
        message = (f"session {fingerprint[:8]}{source} ends in {expiry.left(held.expiration, now)}, at "
                   f"{format_time(held.expiration)}{using}; after that nothing is served from it until {renew}")
        log.warning("%s", message)
        expiry.notify("imsa: session ending", message)

    def _failed(self, spec, error, now):
        with self._lock:
            entry = self._entries.setdefault(spec, _Entry())
            entry.failures += 1
            delay = min(RETRY_FIRST * (2 ** (entry.failures - 1)), RETRY_MAX)
            entry.retry_at = now + delay
            entry.error = str(error)
            still = entry.credentials is not None and not entry.credentials.expired(now)
        log.warning(
            "%s: rotation failed (%s); %s; next try in %d s",
            spec.profile, error, "still serving valid credentials" if still else "nothing valid to serve",
            delay.total_seconds(),
        )

    def _next_check(self, now):
        with self._lock:
            watched = set(self._pins)
            if self._active is not None:
                watched.add(self._active)
            moments = [held.expiration for held in self._sessions.values()]
            moments += [held.expiration - held.warn_before for fingerprint, held in self._sessions.items()
                        if held.warn_before and self._warned.get(fingerprint) != held.expiration]
            for spec in watched:
                entry = self._entries.get(spec)
                if entry is None or entry.credentials is None:
                    if entry is not None and entry.retry_at is not None:
                        moments.append(entry.retry_at)
                    continue
                if entry.retry_at is not None:
                    moments.append(entry.retry_at)
                else:
                    moments.append(entry.credentials.expiration - _window(entry.credentials))
        if not moments:
            return None
        return max(min(moments), now)

    def _poke(self):
        """Wake the refresher (call with the lock held)."""
        self._changed = True
        self._wake.notify_all()

    def _run(self):
        while True:
            try:
                due = self.refresh_once()
            except Exception:  # the refresher must survive anything; the next pass retries
                log.exception("refresher pass failed")
                due = self._clock() + RETRY_MAX
            with self._wake:
                if self._stopping:
                    return
                if not self._changed:
                    limit = IDLE_WAKE if due is None else min(due - self._clock(), IDLE_WAKE)
                    self._wake.wait(max(limit.total_seconds(), 0.0))
                self._changed = False
                if self._stopping:
                    return

    def start(self):
        """Start the refresher thread."""
        self._thread = threading.Thread(target=self._run, name="imsa-refresher", daemon=True)
        self._thread.start()

    def stop(self):
        """Stop the refresher thread."""
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=5)


def _window(credentials):
    """How long before expiry to rotate: ROTATE_BEFORE, or half the lifetime of short-lived credentials."""
    if credentials.issued is not None:
        lifetime = credentials.expiration - credentials.issued
        return min(ROTATE_BEFORE, lifetime / 2)
    return ROTATE_BEFORE


def _due(credentials, now):
    return credentials.expiration - now <= _window(credentials)


def _describe(settings):
    """StsSettings for status (with the endpoint botocore resolves from them), or None."""
    if settings is None:
        return None
    from imsa import sts

    return sts.describe(settings)


def _spec_dict(spec):
    return {
        "profile": spec.profile,
        "role_arn": spec.role_arn,
        "role_session_name": spec.role_session_name,
        "duration_seconds": spec.duration_seconds,
        "external_id": spec.external_id,
        "region": spec.region,
        "via": [dict(zip(HOP_FIELDS, hop)) for hop in spec.via],
    }
