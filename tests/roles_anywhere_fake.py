"""A strict IAM Roles Anywhere for the tests (moto has none), and the PKI each test makes for it.

``FakeRolesAnywhere`` is a stdlib HTTPS server on 127.0.0.1 (a thread of the test process; clients reach it over
loopback only) that verifies what AWS verifies before it mints anything:
1. ``Authorization`` parses strictly: one of the two documented algorithms, a scope ``DATE/REGION/rolesanywhere/
   aws4_request`` whose date is X-Amz-Date's;
2. ``host``, ``x-amz-date``, ``x-amz-x509`` (and ``x-amz-x509-chain`` when sent) are signed, the list sorted;
3. X-Amz-Date is within MAX_SKEW of the fake's clock;
4. the leaf comes from X-Amz-X509, its serial is the one in ``Credential=``, its key type matches the algorithm;
5. the canonical request and string to sign are rebuilt from what arrived, and the signature is verified with the
   leaf's public key (always over SHA-256);
6. leaf -> chain -> the trust anchor's CA is walked with ``verify_directly_issued_by``, every certificate inside its
   validity window, the leaf not a CA;
7. the trust anchor and profile exist, the profile lists the role, ``roleSessionName`` only where the profile
   accepts it, the duration within the profile's range.
Then it mints through moto: AssumeRole of the role with a user's keys, so the credentials it returns are ones moto
authenticates. Every refusal is recorded (``refusals``) with its reason; every success too (``sessions``).
"""

import base64
import datetime
import hashlib
import ipaddress
import json
import os
import re
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID

ACCOUNT = "123456789012"
REGION = "eu-west-1"
TRUST_ANCHOR_ARN = f"arn:aws:rolesanywhere:{REGION}:{ACCOUNT}:trust-anchor/0f7e6d5c-1111-2222-3333-444455556666"
PROFILE_ARN = f"arn:aws:rolesanywhere:{REGION}:{ACCOUNT}:profile/aa11bb22-1111-2222-3333-444455556666"
MAX_SKEW = datetime.timedelta(minutes=5)
AUTH = re.compile(
    r"^(?P<alg>AWS4-X509-RSA-SHA256|AWS4-X509-ECDSA-SHA256) Credential=(?P<serial>\d+)/(?P<date>\d{8})/"
    r"(?P<region>[a-z0-9-]+)/rolesanywhere/aws4_request, SignedHeaders=(?P<signed>[a-z0-9;-]+), "
    r"Signature=(?P<sig>[0-9a-f]+)$")


def now():
    """UTC now, aware."""
    return datetime.datetime.now(datetime.timezone.utc)


# --- PKI ---

def new_key(kind):
    """A private key: 'rsa', 'p256' or 'p384'."""
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ec.generate_private_key(ec.SECP256R1() if kind == "p256" else ec.SECP384R1())


def certificate(subject, key, issuer=None, issuer_key=None, ca=False, hash_name="sha256", not_before=None,
                not_after=None, serial=None, ip=None):
    """A certificate for *key* named *subject*, signed by *issuer_key* (self-signed without it)."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    start = not_before or now() - datetime.timedelta(hours=1)
    builder = (x509.CertificateBuilder().subject_name(name)
               .issuer_name(issuer.subject if issuer is not None else name)
               .public_key(key.public_key()).serial_number(serial or x509.random_serial_number())
               .not_valid_before(start).not_valid_after(not_after or now() + datetime.timedelta(days=30))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ip:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]),
                                        critical=False)
    digest = {"sha256": hashes.SHA256(), "sha384": hashes.SHA384()}[hash_name]
    return builder.sign(issuer_key or key, digest)


def pem(cert):
    """A certificate as PEM bytes."""
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key, passphrase=None):
    """A private key as PKCS#8 PEM, encrypted with *passphrase* when given."""
    encryption = (serialization.BestAvailableEncryption(passphrase.encode()) if passphrase
                  else serialization.NoEncryption())
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)


class Pki:
    """An EC P-384 root (the trust anchor's CA), an RSA intermediate, a foreign CA, a TLS certificate for
    127.0.0.1, and leaves made on demand; files written under *directory*."""

    def __init__(self, directory, owner=None):
        self.directory = directory
        self.owner = owner  # (uid, gid) of every file written: the service may read them as another user
        self.root_key = new_key("p384")
        self.root = certificate("imsa test root", self.root_key, ca=True, hash_name="sha384")
        self.intermediate_key = new_key("rsa")
        self.intermediate = certificate("imsa test intermediate", self.intermediate_key, self.root, self.root_key,
                                        ca=True)
        self.foreign_key = new_key("p256")
        self.foreign = certificate("someone else's root", self.foreign_key, ca=True)
        tls_key = new_key("p256")
        tls = certificate("127.0.0.1", tls_key, self.root, self.root_key, ip="127.0.0.1")
        self.tls_cert = self.write("tls.pem", pem(tls))
        self.tls_key = self.write("tls-key.pem", key_pem(tls_key))
        self.ca_bundle = self.write("ca.pem", pem(self.root))

    def write(self, name, data, mode=0o600):
        """Write *data* to *name* under the directory; its path."""
        path = os.path.join(self.directory, name)
        # Renewed as certificate tools renew: a new file renamed over the old, so no reader sees half of one.
        with open(path + ".new", "wb") as handle:
            handle.write(data)
        os.chmod(path + ".new", mode)
        if self.owner is not None:
            os.chown(path + ".new", *self.owner)
        os.replace(path + ".new", path)
        return path

    def leaf(self, name, kind="rsa", via="intermediate", form="fullchain", hash_name="sha256", passphrase=None,
             **options):
        """Write a leaf of key *kind* issued by the intermediate, the root or the foreign CA (*via*); *form*
        'fullchain' puts the chain in the certificate file, 'separate' in NAME-chain.pem, 'leaf' nowhere.
        Returns {certificate, private_key, intermediates, cert, key}."""
        key = new_key(kind)
        issuer, issuer_key, chain = {
            "intermediate": (self.intermediate, self.intermediate_key, [self.intermediate]),
            "root": (self.root, self.root_key, []),
            "foreign": (self.foreign, self.foreign_key, []),
        }[via]
        cert = certificate(name, key, issuer, issuer_key, hash_name=hash_name, **options)
        files = {"cert": cert, "key": key, "intermediates": None}
        body = pem(cert)
        if form == "fullchain":
            body += b"".join(pem(c) for c in chain)
        elif form == "separate" and chain:
            files["intermediates"] = self.write(f"{name}-chain.pem", b"".join(pem(c) for c in chain))
        files["certificate"] = self.write(f"{name}.pem", body)
        files["private_key"] = self.write(f"{name}-key.pem", key_pem(key, passphrase))
        return files


# --- the server ---

class Refused(Exception):
    """A request refused: HTTP status and the message AWS-like clients print."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status
        self.message = message


class FakeRolesAnywhere:
    """The strict CreateSession endpoint; ``url`` once started. *profiles*: profile ARN -> {role_arns,
    accept_role_session_name, duration_max}; *anchors*: trust anchor ARN -> CA certificate."""

    def __init__(self, pki, sts_endpoint, keys, role_arns, clock=now, lifetime=None):
        self.pki = pki
        self.lifetime = lifetime  # a knob: credentials expire this many seconds after they are issued
        self.sts_endpoint = sts_endpoint
        self.keys = keys
        self.clock = clock
        self.anchors = {TRUST_ANCHOR_ARN: pki.root}
        self.profiles = {PROFILE_ARN: {"role_arns": list(role_arns), "accept_role_session_name": False,
                                       "duration_max": 43200}}
        self.refusals = []
        self.sessions = []
        self._lock = threading.Lock()
        self._server = None
        self._thread = None
        self.url = None

    def start(self):
        """Serve on 127.0.0.1, a port the kernel picks."""
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_args):
                pass

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                headers = {name.lower(): value for name, value in self.headers.items()}
                try:
                    status, answer = 201, fake.create_session(self.command, self.path, headers, body)
                except Refused as refusal:
                    with fake._lock:
                        fake.refusals.append(refusal.message)
                    status, answer = refusal.status, {"message": refusal.message}
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.pki.tls_cert, self.pki.tls_key)
        self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self):
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()

    def create_session(self, method, path, h, body):
        """Verify one CreateSession as AWS does; the answer, or Refused."""
        if method != "POST" or path != "/sessions":
            raise Refused(404, "unknown operation")
        match = AUTH.match(h.get("authorization", ""))
        if not match:
            raise Refused(403, "malformed Authorization header")
        signed = match["signed"].split(";")
        if signed != sorted(signed) or not {"host", "x-amz-date", "x-amz-x509"} <= set(signed):
            raise Refused(403, "SignedHeaders must be sorted and include host, x-amz-date and x-amz-x509")
        if "x-amz-x509-chain" in h and "x-amz-x509-chain" not in signed:
            raise Refused(403, "x-amz-x509-chain is sent but not signed")
        if any(name not in h for name in signed):
            raise Refused(403, "a signed header is missing")
        try:
            stamp = datetime.datetime.strptime(h["x-amz-date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=datetime.timezone.utc)
        except ValueError:
            raise Refused(403, "X-Amz-Date is not a date") from None
        if abs(self.clock() - stamp) > MAX_SKEW:
            raise Refused(403, "Signature expired: X-Amz-Date is too far from the server's time")
        if match["date"] != h["x-amz-date"][:8] or match["region"] != REGION:
            raise Refused(403, "credential scope does not match the date or region")
        try:
            leaf = x509.load_der_x509_certificate(base64.b64decode(h["x-amz-x509"], validate=True))
            chain = [x509.load_der_x509_certificate(base64.b64decode(part, validate=True))
                     for part in h.get("x-amz-x509-chain", "").split(",") if part]
        except ValueError:
            raise Refused(403, "X-Amz-X509 or its chain is not a DER certificate") from None
        if str(leaf.serial_number) != match["serial"]:
            raise Refused(403, "the certificate's serial number is not the one in Credential")
        public = leaf.public_key()
        if isinstance(public, rsa.RSAPublicKey) != (match["alg"] == "AWS4-X509-RSA-SHA256"):
            raise Refused(403, "the signing algorithm does not match the certificate's key")
        canonical = "\n".join([method, path, "", "".join(f"{name}:{' '.join(h[name].split())}\n" for name in signed),
                               match["signed"], hashlib.sha256(body).hexdigest()])
        to_sign = "\n".join([match["alg"], h["x-amz-date"], f"{match['date']}/{REGION}/rolesanywhere/aws4_request",
                             hashlib.sha256(canonical.encode()).hexdigest()])
        try:
            if isinstance(public, rsa.RSAPublicKey):
                public.verify(bytes.fromhex(match["sig"]), to_sign.encode(), padding.PKCS1v15(), hashes.SHA256())
            else:
                public.verify(bytes.fromhex(match["sig"]), to_sign.encode(), ec.ECDSA(hashes.SHA256()))
        except Exception:
            raise Refused(403, "the signature does not verify") from None
        request = json.loads(body)
        anchor = self.anchors.get(request.get("trustAnchorArn"))
        if anchor is None:
            raise Refused(403, "unknown trust anchor")
        moment = self.clock()
        for cert in [leaf, *chain]:
            if not cert.not_valid_before_utc <= moment <= cert.not_valid_after_utc:
                raise Refused(403, f"certificate {cert.subject.rfc4514_string()} is not valid now (expired or not "
                                   "yet valid)")
        if leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            raise Refused(403, "the end-entity certificate is a CA")
        try:
            for child, parent in zip([leaf, *chain], [*chain, anchor]):
                child.verify_directly_issued_by(parent)
        except Exception:
            raise Refused(403, "untrusted certificate chain: it does not lead to the trust anchor") from None
        profile = self.profiles.get(request.get("profileArn"))
        if profile is None:
            raise Refused(403, "unknown profile")
        if request.get("roleArn") not in profile["role_arns"]:
            raise Refused(403, "the profile does not list this role")
        if "roleSessionName" in request and not profile["accept_role_session_name"]:
            raise Refused(400, "the profile does not accept a role session name")
        duration = request.get("durationSeconds", 3600)
        if not isinstance(duration, int) or not 900 <= duration <= profile["duration_max"]:
            raise Refused(400, "durationSeconds out of range")
        credentials = self._assume(request["roleArn"], leaf.serial_number, duration)
        if self.lifetime:
            credentials["Expiration"] = (self.clock() + datetime.timedelta(seconds=self.lifetime)).replace(microsecond=0)
        with self._lock:
            self.sessions.append({"serial": leaf.serial_number, "role_arn": request["roleArn"],
                                  "algorithm": match["alg"]})
        return {"credentialSet": [{"credentials": {
            "accessKeyId": credentials["AccessKeyId"], "secretAccessKey": credentials["SecretAccessKey"],
            "sessionToken": credentials["SessionToken"],
            "expiration": credentials["Expiration"].strftime("%Y-%m-%dT%H:%M:%SZ")},
            "roleArn": request["roleArn"], "sourceIdentity": f"CN={leaf.subject.rfc4514_string()}",
            "packedPolicySize": 0, "assumedRoleUser": {}}],
            "subjectArn": f"arn:aws:rolesanywhere:{REGION}:{ACCOUNT}:subject/{leaf.serial_number}"}

    def _assume(self, role_arn, serial, duration):
        import boto3

        client = boto3.client("sts", endpoint_url=self.sts_endpoint, region_name="us-east-1", **self.keys)
        answer = client.assume_role(RoleArn=role_arn, RoleSessionName=f"ra-{serial}"[:64],
                                    DurationSeconds=min(duration, 3600))
        return answer["Credentials"]

