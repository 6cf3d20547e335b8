"""The control-plane client: JSON over the service's Unix socket, with the standard library only (no proxies)."""

import http.client
import json
import socket

from imsa import config
from imsa.errors import ServiceError, ServiceNotRunning, StsError

TIMEOUT = 30


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path, timeout):
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class Client:
    """Talks to the service of the current user."""

    def __init__(self, path=None, timeout=TIMEOUT):
        self.path = path or config.control_socket_path()
        self.timeout = timeout

    def _request(self, method, route, body=None):
        connection = _UnixConnection(self.path, self.timeout)
        headers = {}
        payload = None
        if body is not None:
            payload = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        try:
            connection.request(method, route, body=payload, headers=headers)
            response = connection.getresponse()
            raw = response.read()
        except (FileNotFoundError, ConnectionRefusedError):
            raise ServiceNotRunning(f"the imsa service is not running (no service at {self.path}); start it with: imsa start") from None
        except PermissionError:
            raise ServiceNotRunning(f"cannot open {self.path}: permission denied (is the service someone else's?)") from None
        except socket.timeout:
            raise ServiceNotRunning(f"the imsa service at {self.path} did not answer within {self.timeout} s") from None
        except (OSError, http.client.HTTPException) as error:
            raise ServiceNotRunning(f"cannot talk to the imsa service at {self.path}: {error}") from None
        finally:
            connection.close()
        try:
            data = json.loads(raw or b"{}")
        except ValueError:
            raise ServiceError(f"the imsa service answered {response.status} with a body that is not JSON") from None
        return response.status, data

    def _call(self, method, route, body=None, missing_ok=False):
        status, data = self._request(method, route, body)
        if status == 200:
            return data
        if missing_ok and status == 404:
            return None
        message = data.get("error", f"HTTP {status}") if isinstance(data, dict) else f"HTTP {status}"
        if status == 502 and data.get("kind") == "sts":
            raise StsError(message)
        raise ServiceError(f"the imsa service refused: {message}")

    def status(self):
        """The service's status JSON."""
        return self._call("GET", "/status")

    def session(self, fingerprint):
        """The session the service holds for *fingerprint* ({fingerprint, expiration}) or None."""
        return self._call("GET", f"/sessions/{fingerprint}", missing_ok=True)

    def put_session(self, fingerprint, credentials):
        """Hand a new MFA session (temporary credentials only) to the service."""
        return self._call("POST", "/sessions", {"fingerprint": fingerprint, "credentials": credentials.to_json()})

    def activate(self, spec):
        """Make the profile of *spec* the one IMDS serves."""
        return self._call("POST", "/activate", spec)

    def credentials(self, spec):
        """Credentials for *spec* without changing what IMDS serves."""
        return self._call("POST", "/credentials", spec)

    def stop(self):
        """Ask the service to stop."""
        return self._call("POST", "/stop", {})
