"""Strictness tests of the OpenZiti controller simulator (test/sim/ziti_sim.py).

Run: /usr/bin/python3 -m pytest -q test/integ/test_sim.py
"""

import base64
import datetime
import hashlib
import http.client
import json
import os
import re
import socket
import ssl
import subprocess
import sys
import time
import urllib.parse
import uuid

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "sim"))
from simctl import Sim  # noqa: E402

MGMT = "/edge/management/v1"
CLIENT = "/edge/client/v1"
UNAUTH_MSG = "The request could not be completed. The session is not authorized or the credentials are invalid"
WWW_MISSING = ('zt-session realm="zt-session" error="missing" error_description="no matching token was provided",'
               'Bearer realm="openziti-oidc" error="missing" error_description="no matching token was provided"')
WWW_INVALID = 'zt-session realm="zt-session" error="invalid" error_description="token is invalid"'
ERROR_META = {"apiEnrollmentVersion": "0.0.1", "apiVersion": "0.0.1"}
ID_RE = re.compile(r"^[0-9a-zA-Z.\-]{9,}$")


# ----------------------------------------------------------------------------- helpers


class Resp:
    def __init__(self, status, headers, body):
        self.status = status
        self.headers = headers  # list of (name, value) as sent
        self.body = body

    def header(self, name):
        vals = [v for k, v in self.headers if k.lower() == name.lower()]
        return vals[0] if vals else None

    def json(self):
        return json.loads(self.body)


class Client:
    """Keep-alive HTTPS client; cert/key optional."""

    def __init__(self, sim, cert=None, key=None):
        self.sim = sim
        self.ctx = ssl.create_default_context(cafile=sim.ca_file)
        if cert:
            self.ctx.load_cert_chain(cert, key)
        self.conn = None
        self.token = None

    def _connect(self):
        if self.conn is None:
            self.conn = http.client.HTTPSConnection("127.0.0.1", self.sim.port, context=self.ctx, timeout=20)
        return self.conn

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def req(self, method, path, body=None, headers=None, auth=True):
        hdrs = dict(headers or {})
        if auth and self.token and "zt-session" not in {k.lower() for k in hdrs}:
            hdrs["zt-session"] = self.token
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
            hdrs.setdefault("Content-Type", "application/json")
        c = self._connect()
        try:
            c.request(method, path, body=body, headers=hdrs)
            r = c.getresponse()
            data = r.read()
        except Exception:
            self.close()
            raise
        if r.will_close:
            self.close()
        return Resp(r.status, r.getheaders(), data)

    def authenticate(self):
        r = self.req("POST", MGMT + "/authenticate?method=cert", body=b"{}",
                     headers={"Content-Type": "application/json"}, auth=False)
        assert r.status == 200, r.body
        self.token = r.header("zt-session")
        return r

    def create(self, name, external_id=None, ott=True, roles=None):
        body = {"name": name, "type": "Device", "isAdmin": False, "roleAttributes": roles or ["agents"],
                "enrollment": {"ott": ott}}
        if external_id is not None:
            body["externalId"] = external_id
        r = self.req("POST", MGMT + "/identities", body=body)
        assert r.status == 201, r.body
        return r.json()["data"]["id"]


def assert_error(r, status, code, cause=None):
    assert r.status == status, (r.status, r.body)
    assert r.header("content-type") == "application/json"
    assert r.body.endswith(b"\n")
    doc = r.json()
    assert set(doc) == {"error", "meta"}
    assert doc["meta"] == ERROR_META
    err = doc["error"]
    assert err["code"] == code, err
    assert uuid.UUID(err["requestId"])
    assert isinstance(err["message"], str) and err["message"]
    if cause is not None:
        assert err.get("cause") == cause, err
    return err


def make_csr(cn, key=None, blank_line=False):
    key = key or ec.generate_private_key(ec.SECP384R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
                                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "NetFoundry"),
                                    x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
           .sign(key, hashes.SHA256()))
    pem = csr.public_bytes(serialization.Encoding.PEM)
    if blank_line:
        pem += b"\n"
    return key, pem


def enroll(client, token, csr_pem, ctype="application/x-pem-file", accept=None, method="ott"):
    hdrs = {"Content-Type": ctype}
    if accept:
        hdrs["Accept"] = accept
    q = urllib.parse.urlencode({"method": method, "token": token})
    return client.req("POST", CLIENT + "/enroll?" + q, body=csr_pem, headers=hdrs, auth=False)


def load_certs_pem(text):
    return x509.load_pem_x509_certificates(text.encode()) if hasattr(x509, "load_pem_x509_certificates") else [
        x509.load_pem_x509_certificate(("-----BEGIN CERTIFICATE-----" + p).encode())
        for p in text.split("-----BEGIN CERTIFICATE-----")[1:]]


def jwt_parts(token):
    def dec(s):
        return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))
    h, c, s = token.split(".")
    return json.loads(dec(h)), json.loads(dec(c)), dec(s), (h + "." + c).encode()


def verify_jwt(token, server_cert):
    header, claims, sig, signing_input = jwt_parts(token)
    pub = server_cert.public_key()
    if isinstance(pub, rsa.RSAPublicKey):
        assert header["alg"] == "RS256"
        pub.verify(sig, signing_input, padding.PKCS1v15(), hashes.SHA256())
    else:
        size = (pub.curve.key_size + 7) // 8
        alg, h = {32: ("ES256", hashes.SHA256()), 48: ("ES384", hashes.SHA384()),
                  66: ("ES512", hashes.SHA512())}[size]
        assert header["alg"] == alg
        assert len(sig) == 2 * size
        der = encode_dss_signature(int.from_bytes(sig[:size], "big"), int.from_bytes(sig[size:], "big"))
        pub.verify(der, signing_input, ec.ECDSA(h))
    return header, claims


def server_cert(sim):
    with open(sim.server_cert_file, "rb") as f:
        return x509.load_pem_x509_certificate(f.read())


def raw_exchange(sim, data, cert=None, key=None, read_until_close=True):
    ctx = ssl.create_default_context(cafile=sim.ca_file)
    if cert:
        ctx.load_cert_chain(cert, key)
    s = socket.create_connection(("127.0.0.1", sim.port), timeout=10)
    ss = ctx.wrap_socket(s, server_hostname="127.0.0.1")
    try:
        ss.sendall(data)
        out = b""
        while True:
            try:
                chunk = ss.recv(65536)
            except (ssl.SSLError, ConnectionResetError):
                break
            if not chunk:
                break
            out += chunk
            if not read_until_close:
                break
        return out
    finally:
        ss.close()


def dechunk(body):
    pos, out, n = 0, b"", 0
    while True:
        eol = body.index(b"\r\n", pos)
        size = int(body[pos:eol], 16)
        pos = eol + 2
        if size == 0:
            assert body[pos:pos + 2] == b"\r\n"
            return out, n
        out += body[pos:pos + size]
        assert body[pos + size:pos + size + 2] == b"\r\n"
        pos += size + 2
        n += 1


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    s = Sim.start(str(tmp_path_factory.mktemp("sim")))
    yield s
    s.stop()


@pytest.fixture
def api(sim):
    sim.reset()
    c = Client(sim, sim.cert_file, sim.key_file)
    c.authenticate()
    yield c
    c.close()
    sim.clear_faults()
    sim.refuse(False)


@pytest.fixture
def anon(sim):
    c = Client(sim)
    yield c
    c.close()


def enrolled_identity(api, tmp_path, name):
    ident = api.create(name)
    tok = api.req("GET", MGMT + "/identities/" + ident).json()["data"]["enrollment"]["ott"]["token"]
    key, csr = make_csr(ident)
    r = enroll(api, tok, csr)
    assert r.status == 200, r.body
    cert_path = tmp_path / (name + ".pem")
    key_path = tmp_path / (name + ".key")
    cert_path.write_text(r.json()["data"]["cert"])
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                           serialization.NoEncryption()))
    return ident, str(cert_path), str(key_path), r.json()["data"]["cert"]


# ----------------------------------------------------------------------------- authentication


def test_authenticate_ok(sim, api):
    r = api.authenticate()
    assert r.header("content-type") == "application/json"
    assert r.body.endswith(b"\n") and b"\n" not in r.body[:-1]
    assert r.header("server").startswith("ziti-controller/")
    assert r.header("ziti-instance-id")
    names = [k for k, _ in r.headers]
    assert "Zt-Session" in names  # Go-canonical header names on HTTP/1.1
    tok = r.header("zt-session")
    assert str(uuid.UUID(tok)) == tok
    assert int(r.header("expiration-seconds")) == 1800
    doc = r.json()
    assert doc["meta"] == {}
    d = doc["data"]
    assert d["token"] == tok
    assert d["identity"]["name"] == "Default Admin"
    assert d["identityId"] == d["identity"]["id"] == sim.state()["admin_id"]
    for k in ("authenticatorId", "expiresAt", "expirationSeconds", "lastActivityAt", "isMfaRequired", "createdAt"):
        assert k in d
    # empty body is allowed too
    r2 = api.req("POST", MGMT + "/authenticate?method=cert", auth=False)
    assert r2.status == 200 and r2.header("zt-session") != tok


def test_authenticate_quirks(sim, api, anon):
    r = api.req("POST", MGMT + "/authenticate", body=b"{}", headers={"Content-Type": "application/json"}, auth=False)
    assert_error(r, 602, "COULD_NOT_VALIDATE",
                 {"field": "method", "reason": "method in query is required", "value": ""})
    r = api.req("POST", MGMT + "/authenticate?method=magic", body=b"{}",
                headers={"Content-Type": "application/json"}, auth=False)
    assert_error(r, 606, "COULD_NOT_VALIDATE")["cause"]["value"] == "magic"
    r = api.req("POST", MGMT + "/authenticate?method=cert", body=b"{}", headers={"Content-Type": "text/plain"},
                auth=False)
    err = assert_error(r, 415, "COULD_NOT_VALIDATE")
    assert err["cause"]["field"] == "Content-Type"
    r = api.req("POST", MGMT + "/authenticate?method=cert", body=b"{nope", headers={"Content-Type": "application/json"},
                auth=False)
    assert_error(r, 400, "COULD_NOT_PARSE_BODY")
    # no client certificate
    r = anon.req("POST", MGMT + "/authenticate?method=cert", body=b"{}", headers={"Content-Type": "application/json"})
    assert_error(r, 401, "INVALID_AUTH")
    assert r.json()["error"]["message"] == "The authentication request failed"
    # password method without updb authenticator
    r = api.req("POST", MGMT + "/authenticate?method=password", body=b'{"username":"a","password":"b"}',
                headers={"Content-Type": "application/json"}, auth=False)
    assert_error(r, 401, "INVALID_AUTH")


def _self_signed(tmp_path, name, issuer_key=None, issuer_cert=None):
    key = ec.generate_private_key(ec.SECP256R1())
    subj = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subj)
            .issuer_name(issuer_cert.subject if issuer_cert else subj).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=2))
            .not_valid_after(now - datetime.timedelta(days=1))  # expired on purpose
            .sign(issuer_key or key, hashes.SHA256()))
    cp, kp = tmp_path / (name + ".pem"), tmp_path / (name + ".key")
    cp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    kp.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()))
    return str(cp), str(kp)


def test_authenticate_untrusted_and_unregistered_certs(sim, tmp_path):
    # an untrusted self-signed cert is accepted in the handshake (RequestClientCert) and refused by /authenticate
    cp, kp = _self_signed(tmp_path, "stranger")
    c = Client(sim, cp, kp)
    r = c.req("POST", MGMT + "/authenticate?method=cert", body=b"{}", headers={"Content-Type": "application/json"})
    assert_error(r, 401, "INVALID_AUTH")
    c.close()
    # signed by the edge signing CA (chain ok, expired is fine) but no authenticator registered
    with open(os.path.join(sim.dir, "pki", "intermediate.key"), "rb") as f:
        ikey = serialization.load_pem_private_key(f.read(), None)
    with open(os.path.join(sim.dir, "pki", "intermediate.pem"), "rb") as f:
        icert = x509.load_pem_x509_certificate(f.read())
    cp, kp = _self_signed(tmp_path, "unregistered", ikey, icert)
    c = Client(sim, cp, kp)
    r = c.req("POST", MGMT + "/authenticate?method=cert", body=b"{}", headers={"Content-Type": "application/json"})
    assert_error(r, 401, "INVALID_AUTH")
    c.close()


def test_401_forms_and_check_order(sim, api, anon, tmp_path):
    r = anon.req("GET", MGMT + "/identities")
    assert_error(r, 401, "UNAUTHORIZED")
    assert r.json()["error"]["message"] == UNAUTH_MSG
    assert r.header("www-authenticate") == WWW_MISSING
    assert "Www-Authenticate" in [k for k, _ in r.headers]
    for bad in (str(uuid.uuid4()), "not-a-uuid"):
        r = anon.req("GET", MGMT + "/identities", headers={"zt-session": bad})
        assert_error(r, 401, "UNAUTHORIZED")
        assert r.header("www-authenticate") == WWW_INVALID
    # token presence is checked before binding ...
    r = anon.req("POST", MGMT + "/identities", body={"type": "Device", "isAdmin": False})
    assert_error(r, 401, "UNAUTHORIZED")
    assert r.header("www-authenticate") == WWW_MISSING
    # ... binding (400) before session validity (401)
    r = anon.req("POST", MGMT + "/identities", body={"type": "Device", "isAdmin": False},
                 headers={"zt-session": str(uuid.uuid4())})
    assert_error(r, 400, "COULD_NOT_VALIDATE")
    r = anon.req("GET", MGMT + "/identities?limit=abc", headers={"zt-session": str(uuid.uuid4())})
    assert_error(r, 601, "COULD_NOT_VALIDATE")
    # a valid session of a non-admin identity -> plain 401 (no WWW-Authenticate)
    ident, cp, kp, _ = enrolled_identity(api, tmp_path, "nonadmin")
    c = Client(sim, cp, kp)
    c.authenticate()
    r = c.req("GET", MGMT + "/identities")
    assert_error(r, 401, "UNAUTHORIZED")
    assert r.header("www-authenticate") is None
    r = c.req("GET", MGMT + "/current-api-session")
    assert r.status == 200 and r.json()["data"]["identityId"] == ident
    c.close()


# ----------------------------------------------------------------------------- identities


def test_create_identity_and_validation(sim, api):
    r = api.req("POST", MGMT + "/identities", body={"name": "agent-1", "type": "Device", "isAdmin": False,
                                                    "roleAttributes": ["agents", "agent-1"], "externalId": "ext-1",
                                                    "enrollment": {"ott": True}, "unknownField": {"x": 1}})
    assert r.status == 201
    doc = r.json()
    ident = doc["data"]["id"]
    assert ID_RE.match(ident)
    assert doc == {"data": {"_links": {"self": {"href": "./identities/" + ident}}, "id": ident}, "meta": {}}
    assert r.body == (json.dumps(doc, separators=(",", ":")) + "\n").encode()

    dup = api.req("POST", MGMT + "/identities", body={"name": "agent-1", "type": "Device", "isAdmin": False})
    assert_error(dup, 400, "COULD_NOT_VALIDATE",
                 {"field": "name", "reason": "duplicate value 'agent-1' in unique index on identities store",
                  "value": "agent-1"})
    dup = api.req("POST", MGMT + "/identities", body={"name": "agent-2", "type": "Device", "isAdmin": False,
                                                      "externalId": "ext-1"})
    assert_error(dup, 400, "COULD_NOT_VALIDATE",
                 {"field": "externalId", "reason": "duplicate value 'ext-1' in unique index on identities store",
                  "value": "ext-1"})
    # empty externalId is not unique-indexed
    for n in ("e1", "e2"):
        assert api.req("POST", MGMT + "/identities", body={"name": n, "type": "User", "isAdmin": False,
                                                           "externalId": ""}).status == 201
    # required fields, alphabetical order: isAdmin, name, type
    r = api.req("POST", MGMT + "/identities", body={"type": "Nope"})
    assert_error(r, 400, "COULD_NOT_VALIDATE", {"field": "isAdmin", "reason": "isAdmin in body is required",
                                                "value": "<nil>"})
    r = api.req("POST", MGMT + "/identities", body={"type": "Device", "isAdmin": False, "name": None})
    assert_error(r, 400, "COULD_NOT_VALIDATE", {"field": "name", "reason": "name in body is required",
                                                "value": "<nil>"})
    r = api.req("POST", MGMT + "/identities", body={"name": "x1", "isAdmin": False, "type": "Robot"})
    assert_error(r, 400, "COULD_NOT_VALIDATE",
                 {"field": "type", "reason": "type in body should be one of [User Device Service Router Default]",
                  "value": "Robot"})
    r = api.req("POST", MGMT + "/identities", body={"name": 5, "type": "Device", "isAdmin": False})
    assert_error(r, 400, "COULD_NOT_PARSE_BODY")
    r = api.req("POST", MGMT + "/identities", body=b"", headers={"Content-Type": "application/json"})
    assert_error(r, 602, "COULD_NOT_VALIDATE")
    r = api.req("POST", MGMT + "/identities", body=b'{"name":"x2"', headers={"Content-Type": "application/json"})
    assert_error(r, 400, "COULD_NOT_PARSE_BODY")
    r = api.req("POST", MGMT + "/identities", body=b'{"name":"x3","type":"Device","isAdmin":false}',
                headers={"Content-Type": "text/plain"})
    assert_error(r, 415, "COULD_NOT_VALIDATE")
    r = api.req("POST", MGMT + "/identities", body={"name": "", "type": "Device", "isAdmin": False})
    assert_error(r, 500, "UNHANDLED")
    # Go decoding: case-insensitive keys, trailing bytes ignored, later duplicate wins
    r = api.req("POST", MGMT + "/identities", body=b'{"NAME":"first","Name":"ci-name","TYPE":"Service",'
                                                   b'"isadmin":false} trailing junk',
                headers={"Content-Type": "application/json"})
    assert r.status == 201, r.body
    got = api.req("GET", MGMT + "/identities/" + r.json()["data"]["id"]).json()["data"]
    assert got["name"] == "ci-name"
    assert got["type"]["id"] == "Default" and got["typeId"] == "Default"  # stored type is always Default
    assert got["enrollment"] == {} and got["externalId"] is None


def test_get_identity_with_enrollment_jwt(sim, api):
    ident = api.create("jwt-holder", external_id="agent-42", roles=["agents", "agent-42"])
    r = api.req("GET", MGMT + "/identities/" + urllib.parse.quote(ident, safe=""))
    assert r.status == 200
    d = r.json()["data"]
    assert d["id"] == ident and d["name"] == "jwt-holder" and d["externalId"] == "agent-42"
    assert d["roleAttributes"] == ["agents", "agent-42"]
    assert d["isAdmin"] is False and d["isDefaultAdmin"] is False
    assert d["authPolicyId"] == "default" and d["authenticators"] == {}
    assert d["type"]["name"] == "Default"
    ott = d["enrollment"]["ott"]
    assert set(ott) == {"id", "jwt", "token", "expiresAt"}
    srv = server_cert(sim)
    header, claims = verify_jwt(ott["jwt"], srv)
    assert header == {"alg": "ES256", "kid": hashlib.sha1(srv.public_bytes(serialization.Encoding.DER)).hexdigest(),
                      "typ": "JWT"}
    assert claims["iss"] == sim.url
    assert claims["sub"] == ident
    assert claims["aud"] == [""]
    assert claims["em"] == "ott"
    assert claims["jti"] == ott["token"] and str(uuid.UUID(claims["jti"])) == claims["jti"]
    assert isinstance(claims["ctrls"], list) and claims["ctrls"]
    assert "iat" not in claims and "nbf" not in claims
    assert abs(claims["exp"] - (time.time() + 180 * 60)) < 120
    exp_at = datetime.datetime.strptime(ott["expiresAt"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(
        tzinfo=datetime.timezone.utc)
    assert abs(exp_at.timestamp() - claims["exp"]) < 2
    # a tampered JWT does not verify
    h, c, s = ott["jwt"].split(".")
    with pytest.raises(Exception):
        verify_jwt(h + "." + c + "." + s[:-4] + ("AAAA" if s[-4:] != "AAAA" else "BBBB"), srv)
    assert_error(api.req("GET", MGMT + "/identities/doesNotExist1"), 404, "NOT_FOUND")


@pytest.mark.parametrize("kind,alg", [("ec-p384", "ES384"), ("ec-p521", "ES512"), ("rsa", "RS256")])
def test_jwt_alg_follows_server_key(tmp_path, kind, alg):
    with Sim.start(str(tmp_path / kind), server_key=kind) as s:
        c = Client(s, s.cert_file, s.key_file)
        c.authenticate()
        ident = c.create("k-" + kind)
        jwt = c.req("GET", MGMT + "/identities/" + ident).json()["data"]["enrollment"]["ott"]["jwt"]
        header, claims = verify_jwt(jwt, server_cert(s))
        assert header["alg"] == alg and claims["sub"] == ident
        c.close()


def test_delete_identity(sim, api, tmp_path):
    ident, cp, kp, _ = enrolled_identity(api, tmp_path, "to-delete")
    before = sim.state()["sessions"]
    other = Client(sim, cp, kp)
    other.authenticate()
    assert sim.state()["sessions"] == before + 1
    r = api.req("DELETE", MGMT + "/identities/" + ident)
    assert r.status == 200 and r.body == b'{"data":{},"meta":{}}\n'
    assert sim.state()["sessions"] == before  # its API sessions are gone
    assert_error(api.req("DELETE", MGMT + "/identities/" + ident), 404, "NOT_FOUND")
    assert_error(api.req("GET", MGMT + "/identities/" + ident), 404, "NOT_FOUND")
    r = other.req("GET", MGMT + "/current-api-session")
    assert_error(r, 401, "UNAUTHORIZED")
    other.close()
    admin_id = sim.state()["admin_id"]
    assert_error(api.req("DELETE", MGMT + "/identities/" + admin_id), 400, "ENTITY_CAN_NOT_BE_DELETED")


def test_list_filter_pagination_chunked(sim, api):
    ids = sorted(api.create("lst-%d" % i, external_id="ext-%d" % i) for i in range(7))
    weird = 'we "ird\\ x'
    wid = api.create("lst-weird", external_id=weird)
    f = "name contains \"lst-\""
    seen = []
    offset = 0
    while True:
        r = api.req("GET", MGMT + "/identities?" + urllib.parse.urlencode({"filter": f, "limit": 3,
                                                                           "offset": offset}))
        assert r.status == 200
        assert r.header("transfer-encoding") == "chunked" and r.header("content-length") is None
        doc = r.json()
        p = doc["meta"]["pagination"]
        assert p == {"limit": 3, "offset": offset, "totalCount": 8}
        assert "externalId" in doc["meta"]["filterableFields"]
        seen += [i["id"] for i in doc["data"]]
        if offset + len(doc["data"]) >= p["totalCount"]:
            break
        offset += 3
    assert seen == sorted(ids + [wid])  # ordered by id
    # externalId with strconv.Quote escapes; '+' decodes as space
    q = json.dumps(weird)
    r = api.req("GET", MGMT + "/identities?filter=" + urllib.parse.quote_plus("externalId=" + q))
    assert [i["id"] for i in r.json()["data"]] == [wid]
    r = api.req("GET", MGMT + "/identities?filter=name+%3D+%22lst-3%22+or+externalId%3D%22ext-4%22")
    assert sorted(i["name"] for i in r.json()["data"]) == ["lst-3", "lst-4"]
    r = api.req("GET", MGMT + "/identities?filter=" + urllib.parse.quote('name="nobody"'))
    assert r.json()["data"] == [] and r.json()["meta"]["pagination"]["totalCount"] == 0
    # strictness
    # identifiers as ZitiQl.g4 has them: no digits, '/' or ':', each dotted segment starting with a letter
    for bad in ('name="a"and name="b"', 'bogus="x"', 'name="unterminated', 'name="\\q"', 'name=5', 'name ~ "x"',
                'tags.env2="x"', 'tags.agyn.io/x="x"', 'tags.a:b="x"', 'tags._a="x"', 'tags.a..b="x"'):
        r = api.req("GET", MGMT + "/identities?filter=" + urllib.parse.quote(bad))
        assert_error(r, 400, "INVALID_FILTER")
    assert_error(api.req("GET", MGMT + "/identities?offset=x1"), 601, "COULD_NOT_VALIDATE")
    r = api.req("GET", MGMT + "/identities?filter=" + urllib.parse.quote('tags.agyn.managed-by="x"'))
    assert r.status == 200 and r.json()["data"] == []
    # limit rules: 0 -> 10, > 500 -> 500, -1 -> all
    assert api.req("GET", MGMT + "/identities?limit=0").json()["meta"]["pagination"]["limit"] == 10
    assert api.req("GET", MGMT + "/identities?limit=100000").json()["meta"]["pagination"]["limit"] == 500
    r = api.req("GET", MGMT + "/identities?limit=-1").json()
    assert len(r["data"]) == r["meta"]["pagination"]["totalCount"] == 9  # 8 + Default Admin
    # raw wire check: list responses are really chunked, in more than one chunk
    raw = raw_exchange(sim, ("GET %s/identities?limit=-1 HTTP/1.1\r\nHost: x\r\nzt-session: %s\r\n"
                             "Connection: close\r\n\r\n" % (MGMT, api.token)).encode())
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"\r\nTransfer-Encoding: chunked\r\n" in head + b"\r\n"
    data, nchunks = dechunk(body)
    assert nchunks >= 2 and json.loads(data)["meta"]["pagination"]["totalCount"] == 9


# ----------------------------------------------------------------------------- enrollment


def test_enroll_ott(sim, api):
    ident = api.create("enrollee")
    d = api.req("GET", MGMT + "/identities/" + ident).json()["data"]
    tok = d["enrollment"]["ott"]["token"]
    key, csr = make_csr(ident)
    r = enroll(api, tok, csr)
    assert r.status == 200, r.body
    assert r.header("content-type") == "application/json"
    doc = r.json()
    assert doc["meta"] == {} and isinstance(doc["data"]["controllers"], list)
    certs = load_certs_pem(doc["data"]["cert"])
    assert len(certs) == 2
    leaf, inter = certs
    with open(sim.ca_file) as f:
        ca = load_certs_pem(f.read())
    assert inter == ca[1] and leaf.issuer == ca[1].subject
    assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == ident
    assert leaf.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "NetFoundry"
    assert leaf.public_key().public_numbers() == key.public_key().public_numbers()
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://sim/identity/" + ident]
    assert leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value == \
        x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])
    ku = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and ku.key_encipherment and ku.data_encipherment and not ku.key_cert_sign
    life = leaf.not_valid_after - leaf.not_valid_before
    assert datetime.timedelta(days=364) < life < datetime.timedelta(days=366)
    # chains to the trust bundle (openssl verify)
    leaf_path = os.path.join(sim.dir, "leaf-%s.pem" % ident)
    with open(leaf_path, "wb") as f:
        f.write(leaf.public_bytes(serialization.Encoding.PEM))
    v = subprocess.run(["openssl", "verify", "-purpose", "sslclient", "-CAfile", sim.ca_file, leaf_path],
                       capture_output=True, text=True)
    assert v.returncode == 0, v.stdout + v.stderr
    # identity now has a cert authenticator and no pending enrollment
    d = api.req("GET", MGMT + "/identities/" + ident).json()["data"]
    assert d["enrollment"] == {}
    assert d["authenticators"]["cert"]["fingerprint"] == \
        hashlib.sha1(leaf.public_bytes(serialization.Encoding.DER)).hexdigest()
    assert [i["enrolled"] for i in sim.state()["identities"] if i["id"] == ident] == [True]
    # second use of the token
    _, csr2 = make_csr(ident)
    assert_error(enroll(api, tok, csr2), 400, "INVALID_ENROLLMENT_TOKEN")


def test_enroll_failures_leave_token_usable(sim, api):
    ident = api.create("retry-enroll")
    tok = api.req("GET", MGMT + "/identities/" + ident).json()["data"]["enrollment"]["ott"]["token"]
    key, csr = make_csr(ident, blank_line=True)
    err = assert_error(enroll(api, tok, csr), 400, "COULD_NOT_PROCESS_CSR")
    assert "unexpected PEM blocks at end of CSR" in json.dumps(err)
    # tampered CSR (signature no longer verifies)
    _, good = make_csr(ident, key=key)
    der = bytearray(x509.load_pem_x509_csr(good).public_bytes(serialization.Encoding.DER))
    idx = der.find(ident.encode())
    der[idx] ^= 0x01
    bad = b"-----BEGIN CERTIFICATE REQUEST-----\n" + base64.encodebytes(bytes(der)) + \
        b"-----END CERTIFICATE REQUEST-----\n"
    assert_error(enroll(api, tok, bad), 400, "COULD_NOT_PROCESS_CSR")
    assert_error(enroll(api, tok, b"garbage"), 400, "COULD_NOT_PROCESS_CSR")
    assert_error(enroll(api, str(uuid.uuid4()), good), 400, "INVALID_ENROLLMENT_TOKEN")
    assert_error(enroll(api, tok, good, method="updb"), 400, "INVALID_ENROLL_METHOD")
    r = enroll(api, tok, good, accept="text/html")
    assert_error(r, 415, "UNSUPPORTED_MEDIA")
    assert_error(enroll(api, tok, good, ctype="application/xml"), 415, "COULD_NOT_VALIDATE")
    # still usable: text/plain legacy content type and an explicit JSON accept
    r = enroll(api, tok, good, ctype="text/plain", accept="application/json")
    assert r.status == 200, r.body
    assert sim.state()["pending_enrollments"] == 0


def test_enroll_ott_json_variant(sim, api):
    ident = api.create("json-enroll")
    tok = api.req("GET", MGMT + "/identities/" + ident).json()["data"]["enrollment"]["ott"]["token"]
    _, csr = make_csr(ident)
    r = api.req("POST", CLIENT + "/enroll/ott", body={"token": tok, "clientCsr": csr.decode()}, auth=False)
    assert r.status == 200, r.body
    assert len(load_certs_pem(r.json()["data"]["cert"])) == 2


def test_enroll_expired(tmp_path):
    with Sim.start(str(tmp_path / "exp"), enrollment_minutes=0.001) as s:
        c = Client(s, s.cert_file, s.key_file)
        c.authenticate()
        ident = c.create("expires-fast")
        tok = c.req("GET", MGMT + "/identities/" + ident).json()["data"]["enrollment"]["ott"]["token"]
        time.sleep(0.3)
        _, csr = make_csr(ident)
        assert_error(enroll(c, tok, csr), 400, "ENROLLMENT_EXPIRED")
        c.close()


def test_cacerts(sim, anon):
    with open(sim.ca_file) as f:
        ca = load_certs_pem(f.read())
    for path in ("/.well-known/est/cacerts", CLIENT + "/.well-known/est/cacerts",
                 MGMT + "/.well-known/est/cacerts"):
        r = anon.req("GET", path)
        assert r.status == 200
        assert r.header("content-type") == "application/pkcs7-mime"
        assert r.header("content-transfer-encoding") == "base64"
        lines = r.body.split(b"\n")
        assert all(len(x) == 64 for x in lines[:-1]) and 0 < len(lines[-1]) <= 64
        certs = pkcs7.load_der_pkcs7_certificates(base64.b64decode(r.body))
        assert len(certs) == 2
        assert sorted(c.fingerprint(hashes.SHA256()) for c in certs) == \
            sorted(c.fingerprint(hashes.SHA256()) for c in ca)


# ----------------------------------------------------------------------------- protocol details


def test_routing_and_http_details(sim, api):
    assert_error(api.req("GET", MGMT + "/nothing-here"), 404, "NOT_FOUND")
    r = api.req("PUT", MGMT + "/identities")
    assert_error(r, 405, "METHOD_NOT_ALLOWED")
    assert r.header("allow") == "GET,POST"
    r = api.req("GET", "/version", auth=False)
    assert r.status == 200 and "version" in r.json()["data"]
    # keep-alive: several requests on one connection
    api.req("GET", MGMT + "/identities")
    sock = api.conn.sock
    for _ in range(3):
        assert api.req("GET", MGMT + "/identities").status == 200
    assert api.conn.sock is sock
    # a chunked request body is accepted
    body = json.dumps({"name": "chunky", "type": "Device", "isAdmin": False}).encode()
    chunked = b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (5, body[:5], len(body) - 5, body[5:])
    raw = raw_exchange(sim, ("POST %s/identities HTTP/1.1\r\nHost: x\r\nzt-session: %s\r\nContent-Type: "
                             "application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                             % (MGMT, api.token)).encode() + chunked)
    assert raw.startswith(b"HTTP/1.1 201 Created\r\n")
    # malformed request line -> 400 and close
    raw = raw_exchange(sim, b"GARBAGE\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 400 ")
    # missing Host on HTTP/1.1
    assert raw_exchange(sim, b"GET / HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 400 ")


def test_idle_keepalive_timeout(sim):
    ctx = ssl.create_default_context(cafile=sim.ca_file)
    s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", sim.port), timeout=15), server_hostname="127.0.0.1")
    s.sendall(b"GET /version HTTP/1.1\r\nHost: x\r\n\r\n")
    first = s.recv(65536)
    assert first.startswith(b"HTTP/1.1 200 ")
    t0 = time.monotonic()
    try:
        rest = s.recv(65536)
    except (ssl.SSLError, ConnectionResetError):
        rest = b""
    assert rest == b""  # server closed the idle connection
    assert time.monotonic() - t0 >= 4.5
    s.close()


# ----------------------------------------------------------------------------- faults / control


def test_fault_status_and_retry_after(sim, api):
    sim.faults({"rules": [{"method": "POST", "path_prefix": MGMT + "/identities", "action": "status",
                           "status": 500, "count": 1, "skip": 1}]})
    body = {"name": "f0", "type": "Device", "isAdmin": False}
    assert api.req("POST", MGMT + "/identities", body=body).status == 201  # skipped
    body["name"] = "f1"
    assert_error(api.req("POST", MGMT + "/identities", body=body), 500, "UNHANDLED")
    assert "f1" not in [i["name"] for i in sim.state()["identities"]]  # not applied
    assert api.req("POST", MGMT + "/identities", body=body).status == 201  # count exhausted
    sim.faults({"rules": [{"path_prefix": MGMT + "/identities", "action": "status", "status": 429,
                           "retry_after": 3, "count": -1}]})
    for _ in range(2):
        r = api.req("GET", MGMT + "/identities")
        assert_error(r, 429, "SERVER_TOO_MANY_REQUESTS")
        assert r.header("retry-after") == "3"
    # apply=true: the handler runs but the client sees the error
    sim.faults({"rules": [{"method": "POST", "action": "status", "status": 503, "count": 1, "apply": True}]})
    body["name"] = "applied"
    assert_error(api.req("POST", MGMT + "/identities", body=body), 503, "TIMEOUT")
    assert "applied" in [i["name"] for i in sim.state()["identities"]]
    sim.faults({})
    assert api.req("GET", MGMT + "/identities").status == 200
    assert sim.state()["counters"]["POST " + MGMT + "/identities"] == 4


def test_fault_drop_drop_mid_delay(sim, api):
    sim.faults({"rules": [{"method": "GET", "path_prefix": MGMT + "/identities", "action": "drop", "count": 1}]})
    with pytest.raises((http.client.RemoteDisconnected, ConnectionError, ssl.SSLError)):
        api.req("GET", MGMT + "/identities")
    assert api.req("GET", MGMT + "/identities").status == 200
    sim.faults({"rules": [{"action": "drop_mid", "count": 1}]})
    raw = raw_exchange(sim, ("GET %s/identities HTTP/1.1\r\nHost: x\r\nzt-session: %s\r\n\r\n"
                             % (MGMT, api.token)).encode())
    assert raw.startswith(b"HTTP/1.1 200") and b"\r\n\r\n" not in raw
    sim.faults({"latency_ms": 150, "rules": [{"action": "delay", "ms": 250, "count": 1}]})
    t0 = time.monotonic()
    assert api.req("GET", MGMT + "/identities").status == 200
    assert time.monotonic() - t0 >= 0.4
    sim.faults({})


def _post_and_hang_up(sim, token, name):
    """Sends a create and closes the connection without reading the answer."""
    body = json.dumps({"name": name, "type": "Device", "isAdmin": False}).encode()
    ctx = ssl.create_default_context(cafile=sim.ca_file)
    s = socket.create_connection(("127.0.0.1", sim.port), timeout=10)
    ss = ctx.wrap_socket(s, server_hostname="127.0.0.1")
    ss.sendall(("POST %s/identities HTTP/1.1\r\nHost: x\r\nzt-session: %s\r\nContent-Type: application/json"
                "\r\nContent-Length: %d\r\n\r\n" % (MGMT, token, len(body))).encode() + body)
    time.sleep(0.1)
    ss.close()


@pytest.mark.parametrize("apply", [False, True])
def test_fault_delay_client_gone(sim, api, apply):
    """A delayed request whose client hung up is dropped, unless apply:true:
    then it is carried out late (as a Go handler that ignores its context)."""
    sim.faults({"rules": [{"method": "POST", "path_prefix": MGMT + "/identities", "action": "delay", "ms": 400,
                           "count": 1, "apply": apply}]})
    _post_and_hang_up(sim, api.token, "late-1")
    assert "late-1" not in [i["name"] for i in sim.state()["identities"]]
    time.sleep(0.8)
    names = [i["name"] for i in sim.state()["identities"]]
    assert ("late-1" in names) == apply
    assert sim.state()["late_applied"] == (1 if apply else 0)


def test_refuse(sim, api):
    assert api.req("GET", MGMT + "/identities").status == 200
    sim.refuse(True)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", sim.port), timeout=5)
    with pytest.raises((http.client.RemoteDisconnected, ConnectionError, ssl.SSLError, OSError)):
        api.req("GET", MGMT + "/identities")  # the existing connection was closed
    sim.refuse(False)
    assert api.req("GET", MGMT + "/identities").status == 200


def test_session_expiry_and_reauth(sim, api):
    assert api.req("GET", MGMT + "/identities").status == 200
    sim.expire_sessions()
    assert sim.state()["sessions"] == 0
    r = api.req("GET", MGMT + "/identities")
    assert_error(r, 401, "UNAUTHORIZED")
    assert r.header("www-authenticate") == WWW_INVALID
    api.authenticate()
    assert api.req("GET", MGMT + "/identities").status == 200


def test_session_inactivity_timeout(tmp_path):
    with Sim.start(str(tmp_path / "st"), session_timeout=1) as s:
        c = Client(s, s.cert_file, s.key_file)
        c.authenticate()
        assert c.req("GET", MGMT + "/identities").status == 200
        time.sleep(1.3)
        r = c.req("GET", MGMT + "/identities")
        assert_error(r, 401, "UNAUTHORIZED")
        assert r.header("www-authenticate") == WWW_INVALID
        c.authenticate()
        assert c.req("GET", MGMT + "/identities").status == 200
        c.close()


def test_control_seed_state_reset(sim, api):
    d = sim.seed_identity("leftover-1", external_id="agent-x", role_attributes=["agents"])
    assert ID_RE.match(d["id"]) and d["enrollment"]["ott"]["jwt"].count(".") == 2
    r = api.req("GET", MGMT + "/identities?filter=" + urllib.parse.quote('externalId="agent-x"'))
    assert [i["id"] for i in r.json()["data"]] == [d["id"]]
    st = sim.state()
    assert [i["name"] for i in st["identities"]] == ["leftover-1"]
    assert st["counters"]["GET " + MGMT + "/identities"] == 1
    sim.reset()
    st = sim.state()
    assert st["identities"] == [] and st["counters"] == {}


def _s_client(sim, cert=None, key=None):
    cmd = ["openssl", "s_client", "-connect", "127.0.0.1:%d" % sim.mtls_port, "-CAfile", sim.ca_file,
           "-verify_return_error", "-quiet"]
    if cert:
        cmd += ["-cert", cert, "-key", key]
    return subprocess.run(cmd, input=b"", capture_output=True, timeout=20)


def test_mtls_port(sim, api, tmp_path):
    ident, cp, kp, chain = enrolled_identity(api, tmp_path, "mtls-user")
    # present leaf + intermediate like an SDK would
    r = _s_client(sim, cp, kp)
    assert ("hello %s\n" % ident).encode() in r.stdout, r.stdout + r.stderr
    r = _s_client(sim)
    assert b"hello" not in r.stdout
    # an untrusted client cert is refused too
    sp, sk = _self_signed(tmp_path, "mtls-stranger")
    r = _s_client(sim, sp, sk)
    assert b"hello" not in r.stdout
