#!/usr/bin/python3
"""Strict simulator of the OpenZiti controller endpoints used by ziti-management.

Behaviour follows /work/shared/openziti-facts.md (envelopes, error shapes, 401 forms,
go-openapi quirks, enrollment). Stdlib + python3-cryptography only. One asyncio loop,
a hand-written bounded HTTP/1.1 parser with keep-alive, and a plain-HTTP control API
for tests (faults, refuse, session expiry, seeding). See README.md next to this file.
"""

import argparse
import asyncio
import base64
import ctypes
import ctypes.util
import datetime
import hashlib
import ipaddress
import json
import os
import re
import secrets
import signal
import ssl
import sys
import time
import uuid

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VERSION = "v1.1.15-sim"
MAX_HEADER_BYTES = 64 * 1024
MAX_BODY_BYTES = 4 * 1024 * 1024
MAX_HEADERS = 100
IDLE_TIMEOUT = 5.0       # DefaultHttpIdleTimeout
READ_TIMEOUT = 5.0       # DefaultHttpReadTimeout
HANDLER_TIMEOUT_MS = 10000  # api.TimeoutHandler -> 503 TIMEOUT
TRUST_DOMAIN = "sim"
CTRLS = ["tls:127.0.0.1:6262"]
ID_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-"
ERROR_META = {"apiEnrollmentVersion": "0.0.1", "apiVersion": "0.0.1"}
MGMT = "/edge/management/v1"
CLIENT = "/edge/client/v1"
IDENTITY_FILTERABLE = ["id", "createdAt", "updatedAt", "tags", "name", "externalId", "isAdmin",
                       "isDefaultAdmin", "isSystem", "type", "authPolicyId", "roleAttributes"]

# ----------------------------------------------------------------------------- helpers

_SURR = re.compile("[\ud800-\udfff]")


def clean_str(s):
    """Go replaces invalid UTF-8 / lone surrogates with U+FFFD."""
    return _SURR.sub("\ufffd", s) if _SURR.search(s) else s


def jdump(obj):
    s = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    if "\u2028" in s or "\u2029" in s:
        s = s.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
    return (s + "\n").encode("utf-8")


def now_ts():
    return time.time()


def fmt_time(ts):
    """go-openapi strfmt.DateTime: RFC3339 with milliseconds, UTC."""
    dt = datetime.datetime.fromtimestamp(ts, tz=datetime.timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + "%03dZ" % (dt.microsecond // 1000)


def new_id():
    n = 9 + secrets.randbelow(2)
    return "".join(secrets.choice(ID_ALPHABET) for _ in range(n))


def b64url(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode("ascii")


def is_uuid(s):
    try:
        uuid.UUID(s)
    except (ValueError, AttributeError, TypeError):
        return False
    return len(s) in (32, 36, 38, 45)


def pct_decode(s, plus_space):
    """Go url.QueryUnescape / PathUnescape semantics. Raises ValueError on bad escapes."""
    if plus_space:
        s = s.replace("+", " ")
    if "%" not in s:
        return s
    out = bytearray()
    i, n = 0, len(s)
    while i < n:
        c = s[i]
        if c == "%":
            h = s[i + 1:i + 3]
            if len(h) != 2 or not all(ch in "0123456789abcdefABCDEF" for ch in h):
                raise ValueError("invalid URL escape")
            out.append(int(h, 16))
            i += 3
        else:
            out += c.encode("utf-8")
            i += 1
    return out.decode("utf-8", "replace")


def parse_query(qs):
    """Go url.ParseQuery as used by r.URL.Query(): bad pairs are dropped."""
    res = {}
    if not qs:
        return res
    for part in qs.split("&"):
        if not part or ";" in part:
            continue
        k, _, v = part.partition("=")
        try:
            k = pct_decode(k, True)
            v = pct_decode(v, True)
        except ValueError:
            continue
        res.setdefault(k, []).append(v)
    return res


def media_type(ct):
    return ct.split(";", 1)[0].strip().lower()


# ----------------------------------------------------------------------------- errors


class ApiError(Exception):
    def __init__(self, status, code, message, cause=None, headers=None):
        super().__init__(code)
        self.status = status
        self.code = code
        self.message = message
        self.cause = cause
        self.headers = headers or []


UNAUTH_MSG = "The request could not be completed. The session is not authorized or the credentials are invalid"
WWW_MISSING = ('zt-session realm="zt-session" error="missing" error_description="no matching token was provided",'
               'Bearer realm="openziti-oidc" error="missing" error_description="no matching token was provided"')
WWW_INVALID = 'zt-session realm="zt-session" error="invalid" error_description="token is invalid"'
WWW_OIDC_INVALID = 'Bearer realm="openziti-oidc" error="invalid" error_description="token is invalid"'


def err_not_found():
    return ApiError(404, "NOT_FOUND", "The resource requested was not found or is no longer available")


def err_method_not_allowed(allowed):
    return ApiError(405, "METHOD_NOT_ALLOWED", "The resource requested does not support this HTTP verb",
                    headers=[("Allow", ",".join(allowed))])


def err_unhandled(msg):
    return ApiError(500, "UNHANDLED", "An unhandled error occurred", {"code": "UNHANDLED", "message": msg})


def field_cause(field, reason, value):
    return {"field": field, "reason": reason, "value": value}


def err_validate(field, reason, value, status=400):
    return ApiError(status, "COULD_NOT_VALIDATE", "The supplied request contains an invalid document",
                    field_cause(field, reason, value))


def err_parse_body(msg):
    return ApiError(400, "COULD_NOT_PARSE_BODY", "The body of the request could not be parsed",
                    {"code": "UNHANDLED", "message": msg})


def err_content_type(ct, allowed):
    # go-openapi errors.InvalidContentType (415), surfaced as COULD_NOT_VALIDATE
    reason = 'unsupported media type "%s", only [%s] are allowed' % (ct, " ".join(allowed))
    return err_validate("Content-Type", reason, ct, status=415)


def err_invalid_filter(msg):
    return ApiError(400, "INVALID_FILTER", "The filter query supplied is invalid: " + msg,
                    {"code": "UNHANDLED", "message": msg})


def err_csr(msg):
    return ApiError(400, "COULD_NOT_PROCESS_CSR", "The supplied csr could not be processed",
                    {"code": "UNHANDLED", "message": msg})


FAULT_CODES = {
    429: ("SERVER_TOO_MANY_REQUESTS",
          "Too many requests to alter state have been issued. Please slow your request rate or try again later."),
    500: ("UNHANDLED", "An unhandled error occurred"),
    502: ("BAD_GATEWAY", "Bad gateway"),
    503: ("TIMEOUT", "Timeout"),
    504: ("GATEWAY_TIMEOUT", "Gateway timeout"),
    400: ("COULD_NOT_VALIDATE", "The supplied request contains an invalid document"),
    401: ("UNAUTHORIZED", UNAUTH_MSG),
    404: ("NOT_FOUND", "The resource requested was not found or is no longer available"),
}

# ----------------------------------------------------------------------------- PKI


def _name(cn):
    return x509.Name([x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Ziti Sim"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _hash_for(key):
    if isinstance(key, ec.EllipticCurvePrivateKey):
        size = key.curve.key_size
        return hashes.SHA512() if size > 384 else hashes.SHA384() if size > 256 else hashes.SHA256()
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return None
    return hashes.SHA256()


def _gen_key(kind):
    if kind == "ec-p256":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "ec-p384":
        return ec.generate_private_key(ec.SECP384R1())
    if kind == "ec-p521":
        return ec.generate_private_key(ec.SECP521R1())
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raise ValueError("unknown key type " + kind)


def _key_kind(key):
    if isinstance(key, rsa.RSAPrivateKey):
        return "rsa"
    return {256: "ec-p256", 384: "ec-p384", 521: "ec-p521"}.get(key.curve.key_size, "?")


def _write_atomic(path, data, mode=0o644):
    tmp = path + ".tmp.%d" % os.getpid()
    with open(tmp, "wb") as f:
        f.write(data)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _key_pem(key):
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption())


def _cert_pem(cert):
    return cert.public_bytes(serialization.Encoding.PEM)


class Pki:
    """root CA -> edge signing CA (intermediate) -> client certs; root -> server cert."""

    def __init__(self, directory, server_key_kind):
        self.dir = os.path.join(directory, "pki")
        os.makedirs(self.dir, exist_ok=True)
        now = datetime.datetime.now(datetime.timezone.utc)
        self.root_key, self.root = self._load_or("root", lambda: self._mk_root(now))
        self.int_key, self.inter = self._load_or("intermediate", lambda: self._mk_inter(now))
        if self.inter.issuer != self.root.subject:
            self.int_key, self.inter = self._store("intermediate", *self._mk_inter(now))
        self.srv_key, self.server = self._load_or("server", lambda: self._mk_server(now, server_key_kind))
        if _key_kind(self.srv_key) != server_key_kind or self.server.issuer != self.root.subject:
            self.srv_key, self.server = self._store("server", *self._mk_server(now, server_key_kind))
        self.adm_key, self.admin = self._load_or("admin", lambda: self._mk_admin(now))
        if self.admin.issuer != self.inter.subject:
            self.adm_key, self.admin = self._store("admin", *self._mk_admin(now))
        self.server_der = self.server.public_bytes(serialization.Encoding.DER)
        self.kid = hashlib.sha1(self.server_der).hexdigest()
        self.inter_pem = _cert_pem(self.inter).decode()
        self.root_pem = _cert_pem(self.root).decode()
        self.ca_pem = self.root_pem + self.inter_pem
        p7 = pkcs7.serialize_certificates([self.root, self.inter], serialization.Encoding.DER)
        b = base64.b64encode(p7)
        self.cacerts_body = b"\n".join(b[i:i + 64] for i in range(0, len(b), 64))
        self.inter_ski = self.inter.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        self.inter_pub = self.inter.public_key()
        self.root_pub = self.root.public_key()
        self._verify_cache = {}
        k = self.srv_key
        if isinstance(k, rsa.RSAPrivateKey):
            self.jwt_alg, self.jwt_size = "RS256", 0
        else:
            size = k.curve.key_size
            self.jwt_alg = {256: "ES256", 384: "ES384", 521: "ES512"}[size]
            self.jwt_size = (size + 7) // 8

    def _paths(self, name):
        return os.path.join(self.dir, name + ".key"), os.path.join(self.dir, name + ".pem")

    def _load_or(self, name, make):
        kp, cp = self._paths(name)
        if os.path.exists(kp) and os.path.exists(cp):
            try:
                with open(kp, "rb") as f:
                    key = serialization.load_pem_private_key(f.read(), None)
                with open(cp, "rb") as f:
                    cert = x509.load_pem_x509_certificate(f.read())
                return key, cert
            except (ValueError, TypeError):
                pass
        return self._store(name, *make())

    def _store(self, name, key, cert):
        kp, cp = self._paths(name)
        _write_atomic(kp, _key_pem(key), 0o600)
        _write_atomic(cp, _cert_pem(cert))
        return key, cert

    def _base(self, subject, issuer, pub, now, days):
        return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(pub)
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=days)))

    def _mk_root(self, now):
        key = ec.generate_private_key(ec.SECP256R1())
        b = self._base(_name("Ziti Sim Root CA"), _name("Ziti Sim Root CA"), key.public_key(), now, 3650)
        b = b.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        b = b.add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        b = b.add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        return key, b.sign(key, hashes.SHA256())

    def _mk_inter(self, now):
        key = ec.generate_private_key(ec.SECP256R1())
        b = self._base(_name("Ziti Sim Edge Signing CA"), self.root.subject, key.public_key(), now, 3650)
        b = b.add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        b = b.add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        b = b.add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        b = b.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.root_key.public_key()),
                            critical=False)
        return key, b.sign(self.root_key, hashes.SHA256())

    def _mk_server(self, now, kind):
        key = _gen_key(kind)
        b = self._base(_name("localhost"), self.root.subject, key.public_key(), now, 825)
        b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                         x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                            critical=False)
        b = b.add_extension(x509.KeyUsage(True, kind == "rsa", False, False, kind != "rsa", False, False, False, False),
                            critical=True)
        b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        b = b.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.root_key.public_key()),
                            critical=False)
        return key, b.sign(self.root_key, hashes.SHA256())

    def _mk_admin(self, now):
        key = ec.generate_private_key(ec.SECP256R1())
        b = self._base(_name("Default Admin"), self.inter.subject, key.public_key(), now, 3650)
        b = b.add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
        b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        b = b.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.int_key.public_key()),
                            critical=False)
        return key, b.sign(self.int_key, hashes.SHA256())

    # -- operations

    @staticmethod
    def _verify_sig(pub, cert):
        try:
            if isinstance(pub, ec.EllipticCurvePublicKey):
                pub.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm))
            elif isinstance(pub, rsa.RSAPublicKey):
                pub.verify(cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(),
                           cert.signature_hash_algorithm)
            else:
                return False
        except (InvalidSignature, ValueError, TypeError):
            return False
        return True

    def chains_to_ca(self, der):
        """True when the leaf is signed by the intermediate or the root (validity window ignored)."""
        hit = self._verify_cache.get(der)
        if hit is not None:
            return hit
        try:
            cert = x509.load_der_x509_certificate(der)
        except ValueError:
            ok = False
        else:
            if cert.issuer == self.inter.subject:
                ok = self._verify_sig(self.inter_pub, cert)
            elif cert.issuer == self.root.subject:
                ok = self._verify_sig(self.root_pub, cert)
            else:
                ok = False
        if len(self._verify_cache) > 10000:
            self._verify_cache.clear()
        self._verify_cache[der] = ok
        return ok

    def sign_jwt(self, claims):
        header = {"alg": self.jwt_alg, "kid": self.kid, "typ": "JWT"}
        signing_input = (b64url(json.dumps(header, separators=(",", ":")).encode()) + "." +
                         b64url(json.dumps(claims, separators=(",", ":")).encode())).encode("ascii")
        k = self.srv_key
        if isinstance(k, rsa.RSAPrivateKey):
            sig = k.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
        else:
            der = k.sign(signing_input, ec.ECDSA(_hash_for(k)))
            r, s = decode_dss_signature(der)
            sig = r.to_bytes(self.jwt_size, "big") + s.to_bytes(self.jwt_size, "big")
        return signing_input.decode("ascii") + "." + b64url(sig)

    def sign_client(self, csr, identity_id):
        now = datetime.datetime.now(datetime.timezone.utc)
        b = (x509.CertificateBuilder().subject_name(csr.subject).issuer_name(self.inter.subject)
             .public_key(csr.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=1))
             .not_valid_after(now + datetime.timedelta(days=365)))
        b = b.add_extension(x509.KeyUsage(True, False, True, True, False, False, False, False, False), critical=True)
        b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        b = b.add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(self.inter_ski),
                            critical=False)
        b = b.add_extension(x509.SubjectAlternativeName(
            [x509.UniformResourceIdentifier("spiffe://%s/identity/%s" % (TRUST_DOMAIN, identity_id))]),
            critical=False)
        return b.sign(self.int_key, hashes.SHA256())


def parse_csr_pem(data):
    """ZT common/cert ParseCsrPem: exactly one PEM block, nothing after it; signature checked."""
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise err_csr("could not parse PEM")
    start = text.find("-----BEGIN ")
    if start < 0:
        raise err_csr("could not parse PEM")
    eol = text.find("\n", start)
    if eol < 0:
        raise err_csr("could not parse PEM")
    first = text[start:eol].rstrip("\r")
    if not first.endswith("-----") or len(first) <= len("-----BEGIN ") + 5:
        raise err_csr("could not parse PEM")
    typ = first[len("-----BEGIN "):-5]
    end_marker = "-----END " + typ + "-----"
    end = text.find(end_marker, eol)
    if end < 0:
        raise err_csr("could not parse PEM")
    body = text[eol + 1:end]
    rest = text[end + len(end_marker):]
    if rest.startswith("\r\n"):
        rest = rest[2:]
    elif rest.startswith("\n"):
        rest = rest[1:]
    if rest:
        raise err_csr("unexpected PEM blocks at end of CSR")
    if ":" in body:
        raise err_csr("could not parse PEM")
    try:
        der = base64.b64decode("".join(body.split()), validate=True)
        csr = x509.load_der_x509_csr(der)
    except (ValueError, TypeError):
        raise err_csr("could not parse CSR")
    if not csr.is_signature_valid:
        raise err_csr("x509: ECDSA verification failure")
    return csr


# ----------------------------------------------------------------------------- ZitiQL subset

_KEYWORDS = {"and", "or", "not", "contains", "icontains", "in", "true", "false", "null", "sort", "by", "asc",
             "desc", "skip", "limit", "anyof", "allof", "startswith", "endswith"}
_STRING_FIELDS = {"id", "name", "externalId", "type", "authPolicyId"}
_BOOL_FIELDS = {"isAdmin", "isDefaultAdmin", "isSystem"}
_SET_FIELDS = {"roleAttributes"}
_ESCAPES = {'"': '"', "\\": "\\", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}


class FilterError(Exception):
    pass


def _tokenize(s):
    """Tokens as (kind, value, blank_before, pos, blank_after)."""
    toks = []
    i, n = 0, len(s)
    while True:
        ws = False
        while i < n and s[i] in " \t\r\n":
            i += 1
            ws = True
        if i >= n:
            break
        c = s[i]
        if c == '"':
            j = i + 1
            out = []
            while True:
                if j >= n:
                    raise FilterError("unterminated string at %d" % i)
                ch = s[j]
                if ch == '"':
                    break
                if ch == "\\":
                    if j + 1 >= n or s[j + 1] not in _ESCAPES:
                        raise FilterError("invalid escape at %d" % j)
                    out.append(_ESCAPES[s[j + 1]])
                    j += 2
                    continue
                out.append(ch)
                j += 1
            toks.append(["str", "".join(out), ws, i])
            i = j + 1
        elif c in "()[],":
            toks.append([c, c, ws, i])
            i += 1
        elif c in "=!<>":
            if s.startswith("!=", i) or s.startswith("<=", i) or s.startswith(">=", i):
                toks.append(["op", s[i:i + 2], ws, i])
                i += 2
            elif c == "!":
                raise FilterError("unexpected '!' at %d" % i)
            else:
                toks.append(["op", c, ws, i])
                i += 1
        elif c.isdigit() or (c == "-" and i + 1 < n and s[i + 1].isdigit()):
            j = i + 1
            while j < n and (s[j].isdigit() or s[j] == "."):
                j += 1
            txt = s[i:j]
            try:
                val = float(txt) if "." in txt else int(txt)
            except ValueError:
                raise FilterError("bad number at %d" % i)
            toks.append(["num", val, ws, i])
            i = j
        elif c.isascii() and c.isalpha():
            # IDENTIFIER (storage zitiql/ZitiQl.g4): dotted segments, each a letter then letters or '_' ('-' too
            # after the first); no digits
            j = i + 1
            while j < n and s[j].isascii() and (s[j].isalpha() or s[j] == "_" or (s[j] == "-" and "." in s[i:j])
                                                or (s[j] == "." and j + 1 < n and s[j + 1].isascii()
                                                    and s[j + 1].isalpha())):
                j += 1
            word = s[i:j]
            if word.lower() in _KEYWORDS:
                toks.append(["kw", word.lower(), ws, i])
            else:
                toks.append(["ident", word, ws, i])
            i = j
        else:
            raise FilterError("unexpected character %r at %d" % (c, i))
    for k, t in enumerate(toks):
        t.append(toks[k + 1][2] if k + 1 < len(toks) else True)
    return [tuple(t) for t in toks]


class _FilterParser:
    def __init__(self, text, strings=None, bools=None, sets=None):
        self.strings = _STRING_FIELDS if strings is None else strings
        self.bools = _BOOL_FIELDS if bools is None else bools
        self.sets = _SET_FIELDS if sets is None else sets
        self.toks = _tokenize(text)
        self.i = 0
        self.sort = None
        self.skip = None
        self.limit = None

    def peek(self):
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self):
        t = self.peek()
        if t is None:
            raise FilterError("unexpected end of query")
        self.i += 1
        return t

    def kw(self, word, need_blanks=True):
        t = self.peek()
        if t and t[0] == "kw" and t[1] == word:
            if need_blanks and not (t[2] and t[4]):
                raise FilterError("keyword '%s' at %d needs surrounding blanks" % (word, t[3]))
            self.i += 1
            return True
        return False

    def parse(self):
        expr = None
        t = self.peek()
        if t is not None and not (t[0] == "kw" and t[1] in ("sort", "skip", "limit")):
            expr = self.expr()
        if self.kw("sort"):
            if not self.kw("by"):
                raise FilterError("expected 'by'")
            self.sort = []
            while True:
                f = self.take()
                if f[0] != "ident" or f[1] not in self.strings | self.bools:
                    raise FilterError("invalid sort field")
                desc = False
                if self.kw("desc", False):
                    desc = True
                else:
                    self.kw("asc", False)
                self.sort.append((f[1], desc))
                t = self.peek()
                if t and t[0] == ",":
                    self.i += 1
                    continue
                break
        if self.kw("skip"):
            t = self.take()
            if t[0] != "num" or not isinstance(t[1], int) or t[1] < 0:
                raise FilterError("invalid skip")
            self.skip = t[1]
        if self.kw("limit"):
            t = self.peek()
            if t and t[0] == "ident" and t[1].lower() == "none":
                self.i += 1
                self.limit = -1
            else:
                t = self.take()
                if t[0] != "num" or not isinstance(t[1], int):
                    raise FilterError("invalid limit")
                self.limit = t[1]
        if self.peek() is not None:
            raise FilterError("unexpected token at %d" % self.peek()[3])
        return expr

    def expr(self):
        left = self.and_expr()
        while self.kw("or"):
            right = self.and_expr()
            left = ("or", left, right)
        return left

    def and_expr(self):
        left = self.not_expr()
        while self.kw("and"):
            right = self.not_expr()
            left = ("and", left, right)
        return left

    def not_expr(self):
        t = self.peek()
        if t and t[0] == "kw" and t[1] == "not":
            self.i += 1
            return ("not", self.not_expr())
        return self.primary()

    def value(self):
        t = self.take()
        if t[0] == "str":
            return t[1]
        if t[0] == "num":
            return t[1]
        if t[0] == "kw" and t[1] in ("true", "false"):
            return t[1] == "true"
        if t[0] == "kw" and t[1] == "null":
            return None
        raise FilterError("expected a value at %d" % t[3])

    def primary(self):
        t = self.take()
        if t[0] == "(":
            e = self.expr()
            c = self.take()
            if c[0] != ")":
                raise FilterError("expected ')'")
            return e
        if t[0] == "kw" and t[1] in ("anyof", "allof"):
            if self.take()[0] != "(":
                raise FilterError("expected '('")
            f = self.take()
            if f[0] != "ident" or f[1] not in self.sets:
                raise FilterError("invalid set field")
            if self.take()[0] != ")":
                raise FilterError("expected ')'")
            field = (t[1], f[1])
        elif t[0] == "ident":
            if t[1] in self.sets:
                raise FilterError("set field '%s' requires anyOf/allOf" % t[1])
            if not t[1].startswith("tags.") and t[1] not in self.strings and t[1] not in self.bools:
                raise FilterError("unknown field '%s'" % t[1])
            field = ("one", t[1])
        else:
            raise FilterError("unexpected token at %d" % t[3])
        negate = False
        if self.kw("not"):
            negate = True
        if self.kw("in"):
            if self.take()[0] != "[":
                raise FilterError("expected '['")
            vals = [self.value()]
            while True:
                c = self.take()
                if c[0] == "]":
                    break
                if c[0] != ",":
                    raise FilterError("expected ',' or ']'")
                vals.append(self.value())
            self._check_types(field, vals, self)
            return ("cmp", field, "in", vals, negate)
        for op in ("contains", "icontains", "startswith", "endswith"):
            if self.kw(op):
                v = self.value()
                if not isinstance(v, str):
                    raise FilterError("%s requires a string" % op)
                if field[0] == "one" and field[1] not in self.strings and not field[1].startswith("tags."):
                    raise FilterError("%s requires a string field" % op)
                return ("cmp", field, op, v, negate)
        if negate:
            raise FilterError("expected in/contains after not")
        o = self.take()
        if o[0] != "op":
            raise FilterError("expected an operator at %d" % o[3])
        v = self.value()
        self._check_types(field, [v], self)
        if v is None and o[1] not in ("=", "!="):
            raise FilterError("null only with = and !=")
        return ("cmp", field, o[1], v, False)

    @staticmethod
    def _check_types(field, vals, p=None):
        name = field[1]
        strings = p.strings if p else _STRING_FIELDS
        sets = p.sets if p else _SET_FIELDS
        bools = p.bools if p else _BOOL_FIELDS
        for v in vals:
            if v is None:
                continue
            if (name in strings or name in sets or name.startswith("tags.")) and not isinstance(v, str):
                raise FilterError("field '%s' requires string values" % name)
            if name in bools and not isinstance(v, bool):
                raise FilterError("field '%s' requires boolean values" % name)


def _cmp_one(val, op, v):
    if op == "in":
        return val in v
    if op == "contains":
        return isinstance(val, str) and v in val
    if op == "icontains":
        return isinstance(val, str) and v.lower() in val.lower()
    if op == "startswith":
        return isinstance(val, str) and val.startswith(v)
    if op == "endswith":
        return isinstance(val, str) and val.endswith(v)
    if op == "=":
        return val == v
    if op == "!=":
        return val != v
    if val is None or v is None:
        return False
    try:
        return {"<": val < v, "<=": val <= v, ">": val > v, ">=": val >= v}[op]
    except TypeError:
        return False


def eval_filter(node, ident):
    kind = node[0]
    if kind == "and":
        return eval_filter(node[1], ident) and eval_filter(node[2], ident)
    if kind == "or":
        return eval_filter(node[1], ident) or eval_filter(node[2], ident)
    if kind == "not":
        return not eval_filter(node[1], ident)
    _, field, op, v, negate = node
    if field[0] == "one":
        res = _cmp_one(ident.field(field[1]), op, v)
    else:
        vals = (ident.set_field(field[1]) if hasattr(ident, "set_field") else ident.role_attributes) or []
        if field[0] == "anyof":
            res = any(_cmp_one(x, op, v) for x in vals)
        else:
            res = bool(vals) and all(_cmp_one(x, op, v) for x in vals)
    return not res if negate else res


# ----------------------------------------------------------------------------- model


class Identity:
    __slots__ = ("id", "name", "external_id", "role_attributes", "is_admin", "is_default_admin", "created",
                 "updated", "tags", "app_data", "enrollment", "cert_auth", "default_hosting_cost",
                 "default_hosting_precedence", "auth_policy_id")

    def __init__(self, name, external_id=None, role_attributes=None, is_admin=False):
        self.id = new_id()
        self.name = name
        self.external_id = external_id
        self.role_attributes = list(role_attributes) if role_attributes is not None else []
        self.is_admin = is_admin
        self.is_default_admin = False
        self.created = self.updated = now_ts()
        self.tags = {}
        self.app_data = {}
        self.enrollment = None  # Enrollment
        self.cert_auth = None   # (authenticator id, fingerprint)
        self.default_hosting_cost = 0
        self.default_hosting_precedence = "default"
        self.auth_policy_id = "default"

    def field(self, name):
        if name == "id":
            return self.id
        if name == "name":
            return self.name
        if name == "externalId":
            return self.external_id
        if name == "type":
            return "Default"
        if name == "authPolicyId":
            return self.auth_policy_id
        if name == "isAdmin":
            return self.is_admin
        if name == "isDefaultAdmin":
            return self.is_default_admin
        if name == "isSystem":
            return False
        if name.startswith("tags."):
            v = (self.tags or {}).get(name[5:])
            return v if isinstance(v, str) else None
        return None


class Enrollment:
    __slots__ = ("id", "token", "method", "identity_id", "expires", "jwt", "created")

    def __init__(self, identity_id, expires, jwt, token):
        self.id = new_id()
        self.token = token
        self.method = "ott"
        self.identity_id = identity_id
        self.expires = expires
        self.jwt = jwt
        self.created = now_ts()


class Session:
    __slots__ = ("id", "token", "identity_id", "authenticator_id", "created", "last", "ip")

    def __init__(self, identity_id, authenticator_id, ip):
        self.id = new_id()
        self.token = str(uuid.uuid4())
        self.identity_id = identity_id
        self.authenticator_id = authenticator_id
        self.created = self.last = now_ts()
        self.ip = ip


def _link(href):
    return {"href": href}


def _entity_ref(entity, eid, name):
    return {"_links": {"self": _link("./%s/%s" % (entity, eid))}, "entity": entity, "id": eid, "name": name}


# ----------------------------------------------------------------------------- request / response


class Request:
    __slots__ = ("method", "target", "path", "query", "version", "headers", "body", "keep_alive", "conn",
                 "route", "params")

    def header(self, name, default=None):
        v = self.headers.get(name)
        return v[0] if v else default


class Response:
    __slots__ = ("status", "headers", "body", "chunked")

    def __init__(self, status, body=b"", headers=None, chunked=False):
        self.status = status
        self.body = body
        self.headers = headers if headers is not None else []
        self.chunked = chunked


REASONS = {100: "Continue", 200: "OK", 201: "Created", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
           405: "Method Not Allowed", 408: "Request Timeout", 413: "Request Entity Too Large",
           415: "Unsupported Media Type", 429: "Too Many Requests", 431: "Request Header Fields Too Large",
           500: "Internal Server Error", 501: "Not Implemented", 502: "Bad Gateway", 503: "Service Unavailable",
           504: "Gateway Timeout"}


class HttpError(Exception):
    def __init__(self, status, text):
        super().__init__(text)
        self.status = status
        self.text = text


_TOKEN_CHARS = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


def parse_request(buf):
    """Parse one request from buf (bytearray). Returns (Request, consumed, expect_continue) or None if
    incomplete. Raises HttpError for malformed input. Bounded by MAX_HEADER_BYTES / MAX_BODY_BYTES."""
    end = buf.find(b"\r\n\r\n", 0, MAX_HEADER_BYTES + 4)
    if end < 0:
        if len(buf) > MAX_HEADER_BYTES:
            raise HttpError(431, "431 Request Header Fields Too Large")
        return None
    head = bytes(buf[:end])
    lines = head.split(b"\r\n")
    # Go skips leading blank lines? (net/http does not); be strict
    rl = lines[0].split(b" ")
    if len(rl) != 3:
        raise HttpError(400, "400 Bad Request")
    method, target, version = rl
    if not method or not all(c in _TOKEN_CHARS for c in method):
        raise HttpError(400, "400 Bad Request")
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):
        if version.startswith(b"HTTP/"):
            raise HttpError(505, "505 HTTP Version Not Supported")
        raise HttpError(400, "400 Bad Request")
    if len(lines) - 1 > MAX_HEADERS:
        raise HttpError(431, "431 Request Header Fields Too Large")
    headers = {}
    for line in lines[1:]:
        c = line.find(b":")
        if c <= 0:
            raise HttpError(400, "400 Bad Request: malformed MIME header line")
        name = line[:c]
        if not all(ch in _TOKEN_CHARS for ch in name):
            raise HttpError(400, "400 Bad Request: invalid header name")
        val = line[c + 1:].strip(b" \t")
        if any(ch < 0x20 and ch != 0x09 for ch in val) or 0x7f in val:
            raise HttpError(400, "400 Bad Request: invalid header value")
        headers.setdefault(name.decode("ascii").lower(), []).append(val.decode("latin-1"))
    req = Request()
    req.method = method.decode("ascii")
    req.version = version
    req.headers = headers
    try:
        t = target.decode("ascii")
    except UnicodeDecodeError:
        raise HttpError(400, "400 Bad Request")
    if not t.startswith("/"):
        raise HttpError(400, "400 Bad Request")
    req.target = t
    p, _, q = t.partition("?")
    try:
        req.path = pct_decode(p, False)
    except ValueError:
        raise HttpError(400, "400 Bad Request")
    req.query = q
    conn_hdr = ",".join(headers.get("connection", [])).lower()
    if version == b"HTTP/1.1":
        req.keep_alive = "close" not in conn_hdr
        if "host" not in headers:
            raise HttpError(400, "400 Bad Request: missing required Host header")
        if len(headers["host"]) > 1:
            raise HttpError(400, "400 Bad Request: too many Host headers")
    else:
        req.keep_alive = "keep-alive" in conn_hdr
    body_start = end + 4
    te = headers.get("transfer-encoding")
    cl = headers.get("content-length")
    expect = ",".join(headers.get("expect", [])).lower()
    if te:
        if cl:
            raise HttpError(400, "400 Bad Request")
        if ",".join(te).strip().lower() != "chunked":
            raise HttpError(501, "501 Not Implemented: unsupported transfer encoding")
        r = _parse_chunked(buf, body_start)
        if r is None:
            return None if not expect else (None, 0, "100-continue" in expect)
        req.body, consumed = r
        return req, consumed, False
    if cl:
        vals = set(v.strip() for v in ",".join(cl).split(","))
        if len(vals) != 1:
            raise HttpError(400, "400 Bad Request: invalid Content-Length")
        v = vals.pop()
        if not v.isdigit() or len(v) > 12:
            raise HttpError(400, "400 Bad Request: invalid Content-Length")
        n = int(v)
        if n > MAX_BODY_BYTES:
            raise HttpError(413, "413 Request Entity Too Large")
        if len(buf) - body_start < n:
            return (None, 0, "100-continue" in expect) if expect else None
        req.body = bytes(buf[body_start:body_start + n])
        return req, body_start + n, False
    req.body = b""
    return req, body_start, False


def _parse_chunked(buf, pos):
    body = bytearray()
    while True:
        eol = buf.find(b"\r\n", pos, pos + 1024)
        if eol < 0:
            if len(buf) - pos > 1024:
                raise HttpError(400, "400 Bad Request: bad chunk size line")
            return None
        size_s = bytes(buf[pos:eol]).split(b";", 1)[0].strip()
        try:
            size = int(size_s, 16)
        except ValueError:
            raise HttpError(400, "400 Bad Request: bad chunk size")
        if size < 0 or len(body) + size > MAX_BODY_BYTES:
            raise HttpError(413, "413 Request Entity Too Large")
        pos = eol + 2
        if size == 0:
            # trailers until empty line
            while True:
                eol = buf.find(b"\r\n", pos, pos + 8192)
                if eol < 0:
                    if len(buf) - pos > 8192:
                        raise HttpError(400, "400 Bad Request: bad trailer")
                    return None
                if eol == pos:
                    return bytes(body), eol + 2
                pos = eol + 2
        if len(buf) < pos + size + 2:
            return None
        body += buf[pos:pos + size]
        if buf[pos + size:pos + size + 2] != b"\r\n":
            raise HttpError(400, "400 Bad Request: bad chunk terminator")
        pos += size + 2


# ----------------------------------------------------------------------------- Go json decoding of identityCreate

_IC_FIELDS = {f.lower(): f for f in ("appData", "authPolicyId", "defaultHostingCost", "defaultHostingPrecedence",
                                     "enrollment", "externalId", "isAdmin", "name", "permissions", "roleAttributes",
                                     "serviceHostingCosts", "serviceHostingPrecedences", "tags", "type")}
_IDENTITY_TYPES = ["User", "Device", "Service", "Router", "Default"]
_PRECEDENCES = ["default", "required", "failed"]
_GO_TYPES = {"name": "string", "externalId": "string", "authPolicyId": "string", "type": "rest_model.IdentityType",
             "isAdmin": "bool", "defaultHostingCost": "rest_model.TerminatorCost",
             "defaultHostingPrecedence": "rest_model.TerminatorPrecedence"}


def _json_kind(v):
    if isinstance(v, _Pairs):
        return "object"
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, (int, float)):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, list):
        return "array"
    if isinstance(v, dict) or isinstance(v, _Pairs):
        return "object"
    return "null"


class _Pairs(list):
    """An object's key/value pairs in document order (Go applies duplicates in order)."""


def _type_err(field, v, gotype):
    return err_parse_body('parsing identity body from "" failed, because json: cannot unmarshal %s into Go struct '
                          'field IdentityCreate.%s of type %s' % (_json_kind(v), field, gotype))


def _to_plain(v):
    if isinstance(v, _Pairs):
        return {clean_str(k): _to_plain(x) for k, x in v}
    if isinstance(v, list):
        return [_to_plain(x) for x in v]
    if isinstance(v, str):
        return clean_str(v)
    return v


def decode_json_body(body, what):
    """Go json.Decoder.Decode of the first value; trailing bytes ignored. Returns value or raises.
    Empty / whitespace-only body -> io.EOF -> 602 required."""
    text = body.decode("utf-8", "replace")
    i = 0
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    if i >= len(text):
        raise err_validate(what, "%s in body is required" % what, "", status=602)
    try:
        val, _ = json.JSONDecoder(object_pairs_hook=_Pairs, parse_constant=_bad_const).raw_decode(text, i)
    except (ValueError, RecursionError) as e:
        raise err_parse_body('parsing %s body from "" failed, because %s' % (what, str(e).split(":")[0]))
    return val


def _bad_const(name):
    raise ValueError("invalid character '%s' looking for beginning of value" % name[0])


def decode_identity_create(body):
    val = decode_json_body(body, "identity")
    out = {}
    if val is None:
        return out
    if not isinstance(val, _Pairs):
        raise err_parse_body('parsing identity body from "" failed, because json: cannot unmarshal %s into Go value '
                             'of type rest_model.IdentityCreate' % _json_kind(val))
    for key, v in val:
        f = _IC_FIELDS.get(key) or _IC_FIELDS.get(key.lower())
        if f is None:
            continue
        if v is None:
            if f in ("roleAttributes", "tags", "appData", "permissions", "serviceHostingCosts",
                     "serviceHostingPrecedences", "enrollment"):
                out.pop(f, None)
            continue  # null leaves pointers/strings untouched (Go semantics)
        if f in ("name", "externalId", "authPolicyId", "type", "defaultHostingPrecedence"):
            if not isinstance(v, str):
                raise _type_err(f, v, _GO_TYPES[f])
            out[f] = clean_str(v)
        elif f == "isAdmin":
            if not isinstance(v, bool):
                raise _type_err(f, v, "bool")
            out[f] = v
        elif f == "defaultHostingCost":
            if isinstance(v, bool) or not isinstance(v, int) or not (-2 ** 63 <= v < 2 ** 63):
                raise _type_err(f, v, _GO_TYPES[f])
            out[f] = v
        elif f in ("roleAttributes", "permissions"):
            if not isinstance(v, list):
                raise _type_err(f, v, "rest_model.Attributes" if f == "roleAttributes" else "rest_model.Permissions")
            items = []
            for x in v:
                if x is None:
                    items.append("")
                elif not isinstance(x, str):
                    raise _type_err(f, x, "string")
                else:
                    items.append(clean_str(x))
            out[f] = items
        elif f in ("tags", "appData"):
            if not isinstance(v, _Pairs):
                raise _type_err(f, v, "rest_model.Tags")
            out[f] = _to_plain(v)
        elif f in ("serviceHostingCosts", "serviceHostingPrecedences"):
            if not isinstance(v, _Pairs):
                raise _type_err(f, v, "rest_model.TerminatorCostMap")
            out[f] = _to_plain(v)
        elif f == "enrollment":
            if not isinstance(v, _Pairs):
                raise _type_err(f, v, "rest_model.IdentityCreateEnrollment")
            enr = dict(out.get("enrollment") or {})
            for ek, ev in v:
                el = ek.lower()
                if el == "ott":
                    if ev is None:
                        continue
                    if not isinstance(ev, bool):
                        raise _type_err("enrollment.ott", ev, "bool")
                    enr["ott"] = ev
                elif el in ("ottca", "updb"):
                    if ev is None:
                        continue
                    if not isinstance(ev, str):
                        raise _type_err("enrollment." + el, ev, "string")
                    enr[el] = ev
            out["enrollment"] = enr
    return out


def validate_identity_create(d):
    """go-swagger IdentityCreate.Validate, fields in alphabetical order, first error reported."""
    if "defaultHostingCost" in d:
        c = d["defaultHostingCost"]
        if c < 0:
            raise err_validate("defaultHostingCost", "defaultHostingCost in body should be greater than or equal to 0",
                               str(c))
        if c > 65535:
            raise err_validate("defaultHostingCost",
                               "defaultHostingCost in body should be less than or equal to 65535", str(c))
    if "defaultHostingPrecedence" in d and d["defaultHostingPrecedence"] not in _PRECEDENCES:
        v = d["defaultHostingPrecedence"]
        raise err_validate("defaultHostingPrecedence",
                           "defaultHostingPrecedence in body should be one of [default required failed]", v)
    if "isAdmin" not in d:
        raise err_validate("isAdmin", "isAdmin in body is required", "<nil>")
    if "name" not in d:
        raise err_validate("name", "name in body is required", "<nil>")
    if "type" not in d:
        raise err_validate("type", "type in body is required", "<nil>")
    if d["type"] not in _IDENTITY_TYPES:
        raise err_validate("type", "type in body should be one of [User Device Service Router Default]", d["type"])


# ----------------------------------------------------------------------------- the simulator


# ---- services, configs, service policies (management.yml: serviceCreate,
# configCreate, servicePolicyCreate, *Patch; list envelopes as identities)

HOST_V1_ID = "NH5p4FpGR"
INTERCEPT_V1_ID = "g7cIWbcGg"
CONFIG_TYPES = {HOST_V1_ID: "host.v1", INTERCEPT_V1_ID: "intercept.v1"}
_OBJ_STRINGS = {"id", "name"}
_CONFIG_STRINGS = {"id", "name", "configTypeId"}
_POLICY_STRINGS = {"id", "name", "type", "semantic"}


class Entity:
    def __init__(self, name):
        self.id = new_id()
        self.name = name
        self.tags = {}
        self.created = self.updated = now_ts()

    def field(self, name):
        if name == "id":
            return self.id
        if name == "name":
            return self.name
        if name.startswith("tags."):
            v = (self.tags or {}).get(name[5:])
            return v if isinstance(v, str) else None
        return getattr(self, "_f_" + name, None)

    def set_field(self, name):
        return getattr(self, {"roleAttributes": "role_attributes", "identityRoles": "identity_roles",
                              "serviceRoles": "service_roles"}.get(name, "role_attributes"), [])

    def base_json(self, coll):
        return {"_links": {"self": _link("./%s/%s" % (coll, self.id))}, "id": self.id, "name": self.name,
                "tags": self.tags, "createdAt": fmt_time(self.created), "updatedAt": fmt_time(self.updated)}


class Service(Entity):
    def __init__(self, name, role_attributes, configs, encryption_required):
        super().__init__(name)
        self.role_attributes = list(role_attributes or [])
        self.configs = list(configs or [])
        self.encryption_required = encryption_required

    def to_json(self):
        d = self.base_json("services")
        d.update({"roleAttributes": self.role_attributes, "configs": self.configs,
                  "encryptionRequired": self.encryption_required, "terminatorStrategy": "smartrouting",
                  "maxIdleTimeMillis": 0, "permissions": ["Bind", "Dial"], "config": {}, "postureQueries": []})
        return d


class Config(Entity):
    def __init__(self, name, type_id, data):
        super().__init__(name)
        self.type_id = type_id
        self.data = data
        self._f_configTypeId = type_id

    def to_json(self):
        d = self.base_json("configs")
        d.update({"configTypeId": self.type_id, "data": self.data,
                  "configType": _entity_ref("config-types", self.type_id, CONFIG_TYPES[self.type_id])})
        return d


class Policy(Entity):
    def __init__(self, name, ptype, semantic, identity_roles, service_roles, posture_roles):
        super().__init__(name)
        self.type = ptype
        self.semantic = semantic
        self.identity_roles = list(identity_roles or [])
        self.service_roles = list(service_roles or [])
        self.posture_roles = list(posture_roles or [])
        self._f_type = ptype
        self._f_semantic = semantic

    def to_json(self):
        d = self.base_json("service-policies")
        d.update({"type": self.type, "semantic": self.semantic, "identityRoles": self.identity_roles,
                  "serviceRoles": self.service_roles, "postureCheckRoles": self.posture_roles,
                  "identityRolesDisplay": [], "serviceRolesDisplay": [], "postureCheckRolesDisplay": []})
        return d


def _obj_body(body, what):
    val = decode_json_body(body, what)
    if not isinstance(val, _Pairs):
        raise err_parse_body('parsing %s body from "" failed, because json: cannot unmarshal %s into Go value'
                             % (what, _json_kind(val)))
    out = {}
    for k, v in val:
        out[k] = v  # Go matches keys case-insensitively; the service sends exact names
    return out


def _want_str(d, key, required=False):
    v = d.get(key)
    if v is None:
        if required:
            raise err_validate(key, "%s in body is required" % key, "<nil>")
        return None
    if not isinstance(v, str):
        raise err_parse_body("json: cannot unmarshal %s into Go struct field .%s of type string"
                             % (_json_kind(v), key))
    return clean_str(v)


def _want_strs(d, key):
    v = d.get(key)
    if v is None:
        return None
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise err_parse_body("json: cannot unmarshal %s into Go struct field .%s of type []string"
                             % (_json_kind(v), key))
    return [clean_str(x) for x in v]


def _want_tags(d):
    v = d.get("tags")
    if v is None:
        return None
    if not isinstance(v, _Pairs):
        raise err_parse_body("json: cannot unmarshal %s into Go struct field .tags of type rest_model.Tags"
                             % _json_kind(v))
    return _to_plain(v)


def _check_config_data(type_id, data):
    """The config type's JSON schema, the parts the service's bodies exercise."""
    if not isinstance(data, dict):
        raise err_validate("data", "data in body must be of type object", str(data))
    ranges_ok = lambda rs: isinstance(rs, list) and all(
        isinstance(r, dict) and set(r) == {"low", "high"} and all(isinstance(r[k], int) and 0 <= r[k] <= 65535
                                                                  for k in r) for r in rs)
    if type_id == INTERCEPT_V1_ID:
        for k in ("protocols", "addresses", "portRanges"):
            if k not in data:
                raise err_validate("data", "(root): %s is required" % k, "")
        if not all(p in ("tcp", "udp") for p in data["protocols"]):
            raise err_validate("data", "protocols.0: must be one of [tcp udp]", "")
        if not ranges_ok(data["portRanges"]):
            raise err_validate("data", "portRanges: invalid", "")
        allowed = {"protocols", "addresses", "portRanges", "dialOptions", "sourceIp"}
    else:
        if "protocol" not in data and not data.get("forwardProtocol"):
            raise err_validate("data", "(root): Must validate one and only one schema (oneOf)", "")
        if "address" not in data and not data.get("forwardAddress"):
            raise err_validate("data", "(root): Must validate one and only one schema (oneOf)", "")
        if "port" not in data and not data.get("forwardPort"):
            raise err_validate("data", "(root): Must validate one and only one schema (oneOf)", "")
        if "allowedPortRanges" in data and not ranges_ok(data["allowedPortRanges"]):
            raise err_validate("data", "allowedPortRanges: invalid", "")
        allowed = {"protocol", "address", "port", "forwardProtocol", "forwardAddress", "forwardPort",
                   "allowedProtocols", "allowedAddresses", "allowedPortRanges", "allowedSourceAddresses",
                   "listenOptions", "portChecks", "httpChecks"}
    extra = set(data) - allowed
    if extra:
        raise err_validate("data", "(root): Additional property %s is not allowed" % sorted(extra)[0], "")


class Fault:
    __slots__ = ("method", "path_prefix", "action", "status", "retry_after", "count", "skip", "ms", "apply",
                 "code", "seen", "hits")

    def __init__(self, d):
        if not isinstance(d, dict):
            raise ValueError("rule must be an object")
        self.method = d.get("method")
        self.path_prefix = d.get("path_prefix", "")
        self.action = d.get("action", "status")
        if self.action not in ("status", "drop", "delay", "drop_mid"):
            raise ValueError("unknown action %r" % self.action)
        self.status = int(d.get("status", 500))
        self.retry_after = d.get("retry_after")
        self.count = int(d.get("count", -1))
        self.skip = int(d.get("skip", 0))
        self.ms = int(d.get("ms", 0))
        self.apply = bool(d.get("apply", False))
        self.code = d.get("code")
        if self.method is not None and not isinstance(self.method, str):
            raise ValueError("method must be a string")
        if not isinstance(self.path_prefix, str):
            raise ValueError("path_prefix must be a string")
        self.seen = 0
        self.hits = 0

    def take(self, method, path):
        if self.method and self.method.upper() != method:
            return False
        if self.path_prefix and not path.startswith(self.path_prefix):
            return False
        self.seen += 1
        if self.seen <= self.skip:
            return False
        if self.count >= 0 and self.hits >= self.count:
            return False
        self.hits += 1
        return True


class Sim:
    def __init__(self, args):
        self.args = args
        self.loop = None
        self.pki = Pki(args.dir, args.server_key)
        self.identities = {}     # id -> Identity
        self.services = {}       # id -> Service
        self.configs = {}        # id -> Config
        self.policies = {}       # id -> Policy
        self.by_name = {}
        self.by_ext = {}
        self.enrollments = {}    # token -> Enrollment
        self.sessions = {}       # token -> Session
        self.fingerprints = {}   # fingerprint -> identity id
        self.counters = {}
        self.tls_ciphers = {}    # negotiated cipher suite -> API connections
        self.faults = []
        self.latency_ms = 0
        self.faults_applied = 0
        self.late_applied = 0
        self.requests = 0
        self.conns = set()
        self.server = None
        self.refusing = False
        self.port = 0
        self.instance_id = new_id()
        self._date = (0, b"")
        admin = Identity("Default Admin", is_admin=True)
        admin.is_default_admin = True
        self._add_identity(admin)
        fp = hashlib.sha1(self.pki.admin.public_bytes(serialization.Encoding.DER)).hexdigest()
        admin.cert_auth = (new_id(), fp)
        self.fingerprints[fp] = admin.id
        self.admin = admin

    # -- store

    def _add_identity(self, ident):
        while ident.id in self.identities:
            ident.id = new_id()
        self.identities[ident.id] = ident
        self.by_name[ident.name] = ident.id
        if ident.external_id:
            self.by_ext[ident.external_id] = ident.id

    def create_identity(self, name, external_id, role_attributes, is_admin, ott, tags=None, app_data=None):
        if name in self.by_name:
            raise err_validate("name", "duplicate value '%s' in unique index on identities store" % name, name)
        if external_id and external_id in self.by_ext:
            raise err_validate("externalId",
                               "duplicate value '%s' in unique index on identities store" % external_id, external_id)
        if name == "":
            raise err_unhandled("index on identities.name does not allow null or empty values")
        ident = Identity(name, external_id, role_attributes, is_admin)
        if tags:
            ident.tags = tags
        if app_data:
            ident.app_data = app_data
        self._add_identity(ident)
        if ott:
            self._new_enrollment(ident)
        return ident

    def _new_enrollment(self, ident):
        expires = now_ts() + self.args.enrollment_minutes * 60
        token = str(uuid.uuid4())
        claims = {"iss": "https://127.0.0.1:%d" % self.port, "sub": ident.id, "aud": [""], "exp": int(expires),
                  "jti": token, "em": "ott", "ctrls": CTRLS}
        enr = Enrollment(ident.id, expires, self.pki.sign_jwt(claims), token)
        ident.enrollment = enr
        self.enrollments[token] = enr

    def delete_identity(self, ident):
        del self.identities[ident.id]
        if self.by_name.get(ident.name) == ident.id:
            del self.by_name[ident.name]
        if ident.external_id and self.by_ext.get(ident.external_id) == ident.id:
            del self.by_ext[ident.external_id]
        if ident.enrollment is not None:
            self.enrollments.pop(ident.enrollment.token, None)
        if ident.cert_auth is not None:
            self.fingerprints.pop(ident.cert_auth[1], None)
        for tok in [t for t, s in self.sessions.items() if s.identity_id == ident.id]:
            del self.sessions[tok]

    # -- rendering

    def identity_json(self, ident):
        now = now_ts()
        links = {k: _link("./identities/%s/%s" % (ident.id, k)) for k in
                 ("authenticators", "edge-router-policies", "edge-routers", "enrollments", "failed-service-requests",
                  "posture-data", "service-configs", "service-policies", "services")}
        links["auth-policies"] = _link("./auth-policies/" + ident.auth_policy_id)
        links["self"] = _link("./identities/" + ident.id)
        auths = {}
        if ident.cert_auth is not None:
            auths["cert"] = {"fingerprint": ident.cert_auth[1], "id": ident.cert_auth[0]}
        enr = {}
        e = ident.enrollment
        if e is not None:
            enr["ott"] = {"expiresAt": fmt_time(e.expires), "id": e.id, "jwt": e.jwt, "token": e.token}
        has_session = any(s.identity_id == ident.id and now - s.last <= self.args.session_timeout
                          for s in self.sessions.values())
        return {
            "_links": links, "createdAt": fmt_time(ident.created), "id": ident.id, "tags": ident.tags,
            "updatedAt": fmt_time(ident.updated), "appData": ident.app_data,
            "authPolicy": _entity_ref("auth-policies", ident.auth_policy_id, "Default"),
            "authPolicyId": ident.auth_policy_id, "authenticators": auths,
            "defaultHostingCost": ident.default_hosting_cost,
            "defaultHostingPrecedence": ident.default_hosting_precedence, "disabled": False,
            "edgeRouterConnectionStatus": "offline", "enrollment": enr, "envInfo": {},
            "externalId": ident.external_id, "hasApiSession": has_session, "hasEdgeRouterConnection": False,
            "isAdmin": ident.is_admin, "isDefaultAdmin": ident.is_default_admin, "isMfaEnabled": False,
            "name": ident.name, "permissions": [], "roleAttributes": ident.role_attributes, "sdkInfo": {},
            "serviceHostingCosts": {}, "serviceHostingPrecedences": {},
            "type": _entity_ref("identity-types", "Default", "Default"), "typeId": "Default",
        }

    def session_json(self, s):
        ident = self.identities.get(s.identity_id)
        exp = s.last + self.args.session_timeout
        return {
            "_links": {"self": _link("./current-api-session")}, "createdAt": fmt_time(s.created), "id": s.id,
            "tags": {}, "updatedAt": fmt_time(s.last), "authQueries": [], "authenticatorId": s.authenticator_id,
            "cachedLastActivityAt": fmt_time(s.last), "configTypes": [], "expirationSeconds":
                int(self.args.session_timeout), "expiresAt": fmt_time(exp),
            "identity": _entity_ref("identities", s.identity_id, ident.name if ident else ""),
            "identityId": s.identity_id, "ipAddress": s.ip, "isCertExtendRequested": False,
            "isCertExtendable": False, "isCertKeyRollRequested": False, "isMfaComplete": False,
            "isMfaRequired": False, "lastActivityAt": fmt_time(s.last), "token": s.token,
        }

    # -- responses

    def date_header(self):
        t = int(time.time())
        if self._date[0] != t:
            self._date = (t, time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(t)).encode())
        return self._date[1]

    def ok(self, data, status=200, headers=None):
        return Response(status, jdump({"data": data, "meta": {}}), [(b"Content-Type", b"application/json")] +
                        (headers or []))

    def error_response(self, e):
        err = {}
        if e.cause is not None:
            err["cause"] = e.cause
        err["code"] = e.code
        err["message"] = e.message
        err["requestId"] = str(uuid.uuid4())
        hdrs = [(b"Content-Type", b"application/json")]
        for k, v in e.headers:
            hdrs.append((k.encode(), v.encode()))
        return Response(e.status, jdump({"error": err, "meta": ERROR_META}), hdrs)

    def serialize(self, resp, close):
        reason = REASONS.get(resp.status) or "status code %d" % resp.status
        parts = [b"HTTP/1.1 %d %s\r\n" % (resp.status, reason.encode())]
        for k, v in resp.headers:
            parts.append(k + b": " + v + b"\r\n")
        parts.append(b"Date: " + self.date_header() + b"\r\nServer: ziti-controller/" + VERSION.encode() +
                     b"\r\nZiti-Instance-Id: " + self.instance_id.encode() + b"\r\n")
        if close:
            parts.append(b"Connection: close\r\n")
        body = resp.body
        if resp.chunked and body:
            parts.append(b"Transfer-Encoding: chunked\r\n\r\n")
            head = b"".join(parts)
            step = max(1, min(1024, (len(body) + 1) // 2))
            chunks = []
            for i in range(0, len(body), step):
                c = body[i:i + step]
                chunks.append(b"%x\r\n" % len(c) + c + b"\r\n")
            chunks.append(b"0\r\n\r\n")
            return head, head + b"".join(chunks)
        parts.append(b"Content-Length: %d\r\n\r\n" % len(body))
        head = b"".join(parts)
        return head, head + body

    # -- routing

    def route(self, req):
        """Returns (template, handler, allowed_methods). Unknown -> (None, None, None)."""
        path = req.path
        if not (path.startswith("/edge/") or path.startswith("/fabric/") or path.startswith("/.well-known/")
                or path in ("/edge", "/fabric", "/.well-known")):
            path = CLIENT + (path if path != "/" else "/")
        req.params = {}
        if path in ("/.well-known/est/cacerts", CLIENT + "/.well-known/est/cacerts",
                    MGMT + "/.well-known/est/cacerts"):
            return path, {"GET": self.h_cacerts}
        for base in (MGMT, CLIENT):
            if not path.startswith(base):
                continue
            rest = path[len(base):]
            if rest in ("", "/", "/version"):
                return base + rest, {"GET": self.h_version}
            if rest == "/authenticate":
                return base + rest, {"POST": self.h_authenticate}
            if rest == "/current-api-session":
                return base + rest, {"GET": self.h_current_session, "DELETE": self.h_logout}
            if base == MGMT:
                if rest == "/identities":
                    return base + rest, {"GET": self.h_list_identities, "POST": self.h_create_identity}
                if rest.startswith("/identities/"):
                    ident_id = rest[len("/identities/"):]
                    if ident_id and "/" not in ident_id:
                        req.params["id"] = ident_id
                        return base + "/identities/{id}", {"GET": self.h_get_identity,
                                                           "DELETE": self.h_delete_identity,
                                                           "PATCH": self.h_patch_identity}
                for coll, lst, one in (("services", {"GET": self.h_list_services, "POST": self.h_create_service},
                                        {"GET": self.h_get_service, "PATCH": self.h_patch_service,
                                         "DELETE": self.h_delete_service}),
                                       ("configs", {"GET": self.h_list_configs, "POST": self.h_create_config},
                                        {"GET": self.h_get_config, "PATCH": self.h_patch_config,
                                         "DELETE": self.h_delete_config}),
                                       ("service-policies", {"GET": self.h_list_policies,
                                                             "POST": self.h_create_policy},
                                        {"GET": self.h_get_policy, "DELETE": self.h_delete_policy})):
                    if rest == "/" + coll:
                        return base + rest, lst
                    if rest.startswith("/" + coll + "/"):
                        parts = rest[len(coll) + 2:].split("/")
                        if len(parts) == 1 and parts[0]:
                            req.params["id"] = parts[0]
                            return base + "/%s/{id}" % coll, one
                        if coll == "services" and len(parts) == 2 and parts[0] and parts[1] == "configs":
                            req.params["id"] = parts[0]
                            return base + "/services/{id}/configs", {"GET": self.h_service_configs}
            else:
                if rest == "/enroll":
                    return base + rest, {"POST": self.h_enroll}
                if rest == "/enroll/ott":
                    return base + rest, {"POST": self.h_enroll_ott}
        return None, None

    def dispatch(self, req):
        template, methods = req.route
        try:
            if template is None:
                raise err_not_found()
            h = methods.get(req.method)
            if h is None:
                raise err_method_not_allowed(sorted(methods))
            return h(req)
        except ApiError as e:
            return self.error_response(e)

    # -- auth

    def auth_token(self, req):
        """Token presence check (before binding). Returns the zt-session token or raises 401 missing."""
        tok = req.header("zt-session")
        if tok:
            return tok
        authz = req.header("authorization")
        if authz and authz[:7].lower() == "bearer ":
            raise ApiError(401, "UNAUTHORIZED", UNAUTH_MSG, headers=[("Www-Authenticate", WWW_OIDC_INVALID)])
        raise ApiError(401, "UNAUTHORIZED", UNAUTH_MSG, headers=[("Www-Authenticate", WWW_MISSING)])

    def auth_session(self, tok, admin=True):
        s = self.sessions.get(tok)
        now = now_ts()
        if s is not None and now - s.last > self.args.session_timeout:
            del self.sessions[tok]
            s = None
        if s is None or s.identity_id not in self.identities:
            raise ApiError(401, "UNAUTHORIZED", UNAUTH_MSG, headers=[("Www-Authenticate", WWW_INVALID)])
        s.last = now
        ident = self.identities[s.identity_id]
        if admin and not (ident.is_admin or ident.is_default_admin):
            raise ApiError(401, "UNAUTHORIZED", UNAUTH_MSG)
        return s

    def check_json_ct(self, req):
        """go-openapi content type binding for bodies: 415 unless application/json."""
        if not req.body:
            return
        ct = req.header("content-type")
        mt = media_type(ct) if ct else "application/octet-stream"
        if mt != "application/json":
            raise err_content_type(ct if ct else "application/octet-stream", ["application/json"])

    # -- handlers

    def h_version(self, req):
        return self.ok({"apiVersions": {"edge": {"v1": {"path": "/edge/client/v1"}},
                                        "edge-client": {"v1": {"path": CLIENT}},
                                        "edge-management": {"v1": {"path": MGMT}}},
                        "buildDate": "2024-01-01T00:00:00Z", "capabilities": [], "revision": "sim",
                        "runtimeVersion": "sim", "version": VERSION})

    def h_cacerts(self, req):
        return Response(200, self.pki.cacerts_body, [(b"Content-Transfer-Encoding", b"base64"),
                                                     (b"Content-Type", b"application/pkcs7-mime")])

    def h_authenticate(self, req):
        q = parse_query(req.query)
        if "method" not in q:
            raise err_validate("method", "method in query is required", "", status=602)
        method = q["method"][0]
        if method not in ("password", "cert", "ext-jwt"):
            raise err_validate("method", "method in query should be one of [password cert ext-jwt]", method,
                               status=606)
        self.check_json_ct(req)
        if req.body and req.body.strip(b" \t\r\n"):
            val = decode_json_body(req.body, "auth")
            if val is not None and not isinstance(val, _Pairs):
                raise err_parse_body('parsing auth body from "" failed, because json: cannot unmarshal %s into Go '
                                     'value of type rest_model.Authenticate' % _json_kind(val))
        invalid = ApiError(401, "INVALID_AUTH", "The authentication request failed")
        if method != "cert":
            raise invalid
        der = req.conn.peer_der
        if not der or not self.pki.chains_to_ca(der):
            raise invalid
        fp = hashlib.sha1(der).hexdigest()
        ident_id = self.fingerprints.get(fp)
        ident = self.identities.get(ident_id) if ident_id else None
        if ident is None:
            raise invalid
        s = Session(ident.id, ident.cert_auth[0], req.conn.peer_ip)
        self.sessions[s.token] = s
        exp = s.last + self.args.session_timeout
        hdrs = [(b"Expiration-Seconds", b"%d" % int(self.args.session_timeout)),
                (b"Expires-At", fmt_time(exp).encode()), (b"Zt-Session", s.token.encode())]
        return self.ok(self.session_json(s), headers=hdrs)

    def h_current_session(self, req):
        tok = self.auth_token(req)
        s = self.auth_session(tok, admin=False)
        return self.ok(self.session_json(s))

    def h_logout(self, req):
        tok = self.auth_token(req)
        self.auth_session(tok, admin=False)
        self.sessions.pop(tok, None)
        return self.ok({})

    def h_create_identity(self, req):
        tok = self.auth_token(req)
        self.check_json_ct(req)
        d = decode_identity_create(req.body)
        validate_identity_create(d)
        self.auth_session(tok)
        enr = d.get("enrollment") or {}
        ident = self.create_identity(d["name"], d.get("externalId"), d.get("roleAttributes"), d["isAdmin"],
                                     bool(enr.get("ott")), d.get("tags"), d.get("appData"))
        if "defaultHostingCost" in d:
            ident.default_hosting_cost = d["defaultHostingCost"]
        if "defaultHostingPrecedence" in d:
            ident.default_hosting_precedence = d["defaultHostingPrecedence"]
        return self.ok({"_links": {"self": _link("./identities/" + ident.id)}, "id": ident.id}, status=201)

    def h_get_identity(self, req):
        self.auth_session(self.auth_token(req))
        ident = self.identities.get(req.params["id"])
        if ident is None:
            raise err_not_found()
        return self.ok(self.identity_json(ident))

    def h_delete_identity(self, req):
        self.auth_session(self.auth_token(req))
        ident = self.identities.get(req.params["id"])
        if ident is None:
            raise err_not_found()
        if ident.is_default_admin:
            raise ApiError(400, "ENTITY_CAN_NOT_BE_DELETED", "The entity requested for delete can not be deleted",
                           {"code": "UNHANDLED", "message": "cannot delete default admin"})
        self.delete_identity(ident)
        return self.ok({})

    @staticmethod
    def _int_param(q, name):
        if name not in q:
            return None
        raw = q[name][0]
        if not re.fullmatch(r"[+-]?[0-9]+", raw) or not (-2 ** 63 <= int(raw) < 2 ** 63):
            raise err_validate(name, "%s in query must be of type int64: \"%s\"" % (name, raw), raw, status=601)
        return int(raw)

    def h_list_identities(self, req):
        tok = self.auth_token(req)
        q = parse_query(req.query)
        limit = self._int_param(q, "limit")
        offset = self._int_param(q, "offset")
        self.auth_session(tok)
        ftext = q.get("filter", [""])[0]
        node = None
        fsort = fskip = flimit = None
        if ftext.strip():
            try:
                p = _FilterParser(ftext)
                node = p.parse()
                fsort, fskip, flimit = p.sort, p.skip, p.limit
            except FilterError as e:
                raise err_invalid_filter(str(e))
        if limit is None:
            limit = flimit
        if offset is None:
            offset = fskip
        if limit is None or limit == 0 or limit < -1:
            limit = 10
        elif limit > 500:
            limit = 500
        if offset is None or offset < 0:
            offset = 0
        elif offset > 100000:
            offset = 100000
        items = [i for i in self.identities.values() if node is None or eval_filter(node, i)]
        items.sort(key=lambda i: i.id)
        if fsort:
            for fname, desc in reversed(fsort):
                items.sort(key=lambda i, f=fname: (i.field(f) is not None, i.field(f) or ""), reverse=desc)
        total = len(items)
        page = items[offset:] if limit == -1 else items[offset:offset + limit]
        body = jdump({"data": [self.identity_json(i) for i in page],
                      "meta": {"filterableFields": IDENTITY_FILTERABLE,
                               "pagination": {"limit": limit, "offset": offset, "totalCount": total}}})
        return Response(200, body, [(b"Content-Type", b"application/json")], chunked=True)

    # -- identity PATCH

    def h_patch_identity(self, req):
        tok = self.auth_token(req)
        self.check_json_ct(req)
        d = _obj_body(req.body, "identity")
        self.auth_session(tok)
        ident = self.identities.get(req.params["id"])
        if ident is None:
            raise err_not_found()
        roles = _want_strs(d, "roleAttributes")
        tags = _want_tags(d)
        name = _want_str(d, "name")
        if roles is not None:
            ident.role_attributes = roles
        if tags is not None:
            ident.tags = tags
        if name is not None:
            if name in self.by_name and self.by_name[name] != ident.id:
                raise err_validate("name", "duplicate value '%s' in unique index on identities store" % name, name)
            del self.by_name[ident.name]
            ident.name = name
            self.by_name[name] = ident.id
        ident.updated = now_ts()
        return self.ok({})

    # -- services, configs, service policies

    def _list_objects(self, req, objs, strings, sets, filterable):
        tok = self.auth_token(req)
        q = parse_query(req.query)
        limit = self._int_param(q, "limit")
        offset = self._int_param(q, "offset")
        self.auth_session(tok)
        ftext = q.get("filter", [""])[0]
        node = None
        if ftext.strip():
            try:
                node = _FilterParser(ftext, strings, set(), sets).parse()
            except FilterError as e:
                raise err_invalid_filter(str(e))
        if limit is None or limit == 0 or limit < -1:
            limit = 10
        elif limit > 500:
            limit = 500
        if offset is None or offset < 0:
            offset = 0
        elif offset > 100000:
            offset = 100000
        items = sorted((o for o in objs if node is None or eval_filter(node, o)), key=lambda o: o.id)
        page = items[offset:] if limit == -1 else items[offset:offset + limit]
        body = jdump({"data": [o.to_json() for o in page],
                      "meta": {"filterableFields": filterable,
                               "pagination": {"limit": limit, "offset": offset, "totalCount": len(items)}}})
        return Response(200, body, [(b"Content-Type", b"application/json")], chunked=True)

    def _unique(self, objs, name, store):
        if name == "":
            raise err_unhandled("index on %s.name does not allow null or empty values" % store)
        if any(o.name == name for o in objs):
            raise err_validate("name", "duplicate value '%s' in unique index on %s store" % (name, store), name)

    def _created(self, coll, obj):
        return self.ok({"_links": {"self": _link("./%s/%s" % (coll, obj.id))}, "id": obj.id}, status=201)

    def h_create_service(self, req):
        tok = self.auth_token(req)
        self.check_json_ct(req)
        d = _obj_body(req.body, "service")
        name = _want_str(d, "name", True)
        enc = d.get("encryptionRequired")
        if enc is None:
            raise err_validate("encryptionRequired", "encryptionRequired in body is required", "<nil>")
        if not isinstance(enc, bool):
            raise err_parse_body("json: cannot unmarshal %s into Go struct field ServiceCreate.encryptionRequired "
                                 "of type bool" % _json_kind(enc))
        roles = _want_strs(d, "roleAttributes")
        configs = _want_strs(d, "configs")
        tags = _want_tags(d)
        self.auth_session(tok)
        self._unique(self.services.values(), name, "services")
        for c in configs or []:
            if c not in self.configs:
                raise ApiError(404, "NOT_FOUND", "The resource requested was not found or is no longer available",
                               field_cause("configs", "no config with id %s" % c, c))
        svc = Service(name, roles, configs, enc)
        if tags:
            svc.tags = tags
        self.services[svc.id] = svc
        return self._created("services", svc)

    def h_list_services(self, req):
        return self._list_objects(req, list(self.services.values()), _OBJ_STRINGS, {"roleAttributes"},
                                  ["id", "name", "roleAttributes", "tags", "createdAt", "updatedAt"])

    def _get(self, objs, req):
        self.auth_session(self.auth_token(req))
        o = objs.get(req.params["id"])
        if o is None:
            raise err_not_found()
        return o

    def h_get_service(self, req):
        return self.ok(self._get(self.services, req).to_json())

    def h_patch_service(self, req):
        tok = self.auth_token(req)
        self.check_json_ct(req)
        d = _obj_body(req.body, "service")
        self.auth_session(tok)
        svc = self.services.get(req.params["id"])
        if svc is None:
            raise err_not_found()
        name = _want_str(d, "name")
        roles = _want_strs(d, "roleAttributes")
        configs = _want_strs(d, "configs")
        tags = _want_tags(d)
        for c in configs or []:
            if c not in self.configs:
                raise ApiError(404, "NOT_FOUND", "The resource requested was not found or is no longer available",
                               field_cause("configs", "no config with id %s" % c, c))
        if name is not None:
            self._unique([o for o in self.services.values() if o is not svc], name, "services")
            svc.name = name
        if roles is not None:
            svc.role_attributes = roles
        if configs is not None:
            svc.configs = configs
        if tags is not None:
            svc.tags = tags
        svc.updated = now_ts()
        self.counters["service_patches"] = self.counters.get("service_patches", 0) + 1
        return self.ok({})

    def h_delete_service(self, req):
        svc = self._get(self.services, req)
        del self.services[svc.id]
        return self.ok({})

    def h_service_configs(self, req):
        svc = self.services.get(req.params["id"])
        objs = [self.configs[c] for c in (svc.configs if svc else []) if c in self.configs]
        return self._list_objects(req, objs, _CONFIG_STRINGS, set(), ["id", "name", "configTypeId"])

    def h_create_config(self, req):
        tok = self.auth_token(req)
        self.check_json_ct(req)
        d = _obj_body(req.body, "config")
        name = _want_str(d, "name", True)
        type_id = _want_str(d, "configTypeId", True)
        if "data" not in d or d["data"] is None:
            raise err_validate("data", "data in body is required", "<nil>")
        data = _to_plain(d["data"])
        tags = _want_tags(d)
        self.auth_session(tok)
        if type_id not in CONFIG_TYPES:
            raise ApiError(404, "NOT_FOUND", "The resource requested was not found or is no longer available",
                           field_cause("configTypeId", "no config type with id %s" % type_id, type_id))
        _check_config_data(type_id, data)
        self._unique(self.configs.values(), name, "configs")
        cfg = Config(name, type_id, data)
        if tags:
            cfg.tags = tags
        self.configs[cfg.id] = cfg
        return self._created("configs", cfg)

    def h_list_configs(self, req):
        return self._list_objects(req, list(self.configs.values()), _CONFIG_STRINGS, set(),
                                  ["id", "name", "configTypeId", "tags"])

    def h_get_config(self, req):
        return self.ok(self._get(self.configs, req).to_json())

    def h_patch_config(self, req):
        tok = self.auth_token(req)
        self.check_json_ct(req)
        d = _obj_body(req.body, "config")
        self.auth_session(tok)
        cfg = self.configs.get(req.params["id"])
        if cfg is None:
            raise err_not_found()
        name = _want_str(d, "name")
        tags = _want_tags(d)
        data = _to_plain(d["data"]) if d.get("data") is not None else cfg.data
        _check_config_data(cfg.type_id, data)  # re-validated even when absent
        if name is not None:
            self._unique([o for o in self.configs.values() if o is not cfg], name, "configs")
            cfg.name = name
        cfg.data = data
        if tags is not None:
            cfg.tags = tags
        cfg.updated = now_ts()
        return self.ok({})

    def h_delete_config(self, req):
        cfg = self._get(self.configs, req)
        users = [s.id for s in self.services.values() if cfg.id in s.configs]
        if users:
            raise ApiError(409, "CAN_NOT_DELETE_REFERENCED_ENTITY",
                           "The entity requested for delete can not be deleted because it is referenced by "
                           "other entities", {"code": "UNHANDLED", "message": "referenced by services %s" % users})
        del self.configs[cfg.id]
        return self.ok({})

    def h_create_policy(self, req):
        tok = self.auth_token(req)
        self.check_json_ct(req)
        d = _obj_body(req.body, "servicePolicy")
        name = _want_str(d, "name", True)
        ptype = _want_str(d, "type", True)
        semantic = _want_str(d, "semantic", True)
        if ptype not in ("Dial", "Bind"):
            raise err_validate("type", "type in body should be one of [Dial Bind]", ptype)
        if semantic not in ("AllOf", "AnyOf"):
            raise err_validate("semantic", "semantic in body should be one of [AllOf AnyOf]", semantic)
        idr = _want_strs(d, "identityRoles")
        svr = _want_strs(d, "serviceRoles")
        pcr = _want_strs(d, "postureCheckRoles")
        tags = _want_tags(d)
        self.auth_session(tok)
        self._unique(self.policies.values(), name, "servicePolicies")
        pol = Policy(name, ptype, semantic, idr, svr, pcr)
        if tags:
            pol.tags = tags
        self.policies[pol.id] = pol
        return self._created("service-policies", pol)

    def h_list_policies(self, req):
        return self._list_objects(req, list(self.policies.values()), _POLICY_STRINGS,
                                  {"identityRoles", "serviceRoles"}, ["id", "name", "type", "semantic", "tags"])

    def h_get_policy(self, req):
        return self.ok(self._get(self.policies, req).to_json())

    def h_delete_policy(self, req):
        pol = self._get(self.policies, req)
        del self.policies[pol.id]
        return self.ok({})

    # -- enrollment

    def _accepts_json(self, req):
        vals = req.headers.get("accept")
        if not vals:
            return True
        for v in vals:
            for part in v.split(","):
                if media_type(part) in ("application/json", "*/*", "application/*"):
                    return True
        return False

    def h_enroll(self, req):
        ct = req.header("content-type", "").strip()
        q = parse_query(req.query)
        method = q.get("method", [""])[0] or "ott"
        token = q.get("token", [""])[0]
        mt = media_type(ct) if ct else ""
        if ct and mt in ("application/pkcs7", "application/x-pem-file", "text/plain"):
            if not self._accepts_json(req):
                raise ApiError(415, "UNSUPPORTED_MEDIA",
                               "No suitable accept media types were detected, supports: application/json")
            return self._do_enroll(method, token, req.body)
        # spec-compliant path (go-openapi binding)
        allowed = ["application/pkcs7", "application/json", "application/x-pem-file", "text/plain"]
        if req.body and mt != "application/json":
            raise err_content_type(ct or "application/octet-stream", allowed)
        if "token" in q and not is_uuid(token):
            raise err_validate("token", "token in query must be of type uuid: \"%s\"" % token, token, status=601)
        csr = ""
        if req.body and req.body.strip(b" \t\r\n"):
            val = decode_json_body(req.body, "body")
            if isinstance(val, _Pairs):
                for k, v in val:
                    if k.lower() == "clientcsr":
                        if not isinstance(v, str):
                            raise err_parse_body("json: cannot unmarshal %s into Go struct field "
                                                 "EnrollmentCreate.clientCsr of type string" % _json_kind(v))
                        csr = v
        return self._do_enroll(method, token, csr.encode("utf-8"))

    def h_enroll_ott(self, req):
        self.check_json_ct(req)
        val = decode_json_body(req.body, "ottEnrollmentRequest")
        token = csr = None
        if isinstance(val, _Pairs):
            for k, v in val:
                kl = k.lower()
                if kl in ("token", "clientcsr") and v is not None and not isinstance(v, str):
                    raise err_parse_body("json: cannot unmarshal %s into Go struct field OttEnrollmentRequest.%s "
                                         "of type string" % (_json_kind(v), k))
                if kl == "token":
                    token = v
                elif kl == "clientcsr":
                    csr = v
        elif val is not None:
            raise err_parse_body("json: cannot unmarshal %s into Go value of type rest_model.OttEnrollmentRequest"
                                 % _json_kind(val))
        if csr is None:
            raise err_validate("clientCsr", "clientCsr in body is required", "<nil>")
        if token is None:
            raise err_validate("token", "token in body is required", "<nil>")
        return self._do_enroll("ott", token, csr.encode("utf-8"))

    def _do_enroll(self, method, token, csr_pem):
        if method not in ("ott", "ottca", "ca", "updb", "erott"):
            raise ApiError(400, "INVALID_ENROLL_METHOD", "The supplied enrollment method is not valid")
        enr = self.enrollments.get(token)
        if enr is None or enr.identity_id not in self.identities:
            raise ApiError(400, "INVALID_ENROLLMENT_TOKEN", "The supplied token is not valid")
        if enr.method != method:
            raise ApiError(400, "INVALID_ENROLL_METHOD", "The supplied enrollment method is not valid")
        if now_ts() > enr.expires:
            raise ApiError(400, "ENROLLMENT_EXPIRED", "The window for this enrollment has expired")
        csr = parse_csr_pem(csr_pem)
        ident = self.identities[enr.identity_id]
        try:
            cert = self.pki.sign_client(csr, ident.id)
        except (ValueError, TypeError) as e:
            raise err_csr(str(e))
        der = cert.public_bytes(serialization.Encoding.DER)
        fp = hashlib.sha1(der).hexdigest()
        del self.enrollments[token]
        ident.enrollment = None
        ident.cert_auth = (new_id(), fp)
        ident.updated = now_ts()
        self.fingerprints[fp] = ident.id
        chain = _cert_pem(cert).decode() + self.pki.inter_pem
        return self.ok({"cert": chain, "controllers": CTRLS})

    # -- control API

    def state(self):
        idents = []
        for i in sorted(self.identities.values(), key=lambda x: x.id):
            if i.is_default_admin:
                continue
            idents.append({"id": i.id, "name": i.name, "externalId": i.external_id,
                           "roleAttributes": i.role_attributes, "isAdmin": i.is_admin,
                           "enrolled": i.cert_auth is not None, "createdAt": fmt_time(i.created)})
        now = now_ts()
        live = sum(1 for s in self.sessions.values() if now - s.last <= self.args.session_timeout)
        objs = {"services": [o.to_json() for o in sorted(self.services.values(), key=lambda x: x.id)],
                "configs": [o.to_json() for o in sorted(self.configs.values(), key=lambda x: x.id)],
                "policies": [o.to_json() for o in sorted(self.policies.values(), key=lambda x: x.id)]}
        for i in idents:
            src = self.identities[i["id"]]
            i["tags"] = src.tags
        return {"identities": idents, "counters": dict(self.counters), "tls_ciphers": dict(self.tls_ciphers),
                "sessions": live, **objs,
                "connections": len(self.conns), "requests": self.requests, "faults_applied": self.faults_applied,
                "late_applied": self.late_applied,
                "pending_enrollments": len(self.enrollments), "refusing": self.refusing,
                "admin_id": self.admin.id}

    def set_faults(self, d):
        if not isinstance(d, dict):
            raise ValueError("faults must be an object")
        rules = [Fault(r) for r in d.get("rules", [])]
        latency = int(d.get("latency_ms", 0))
        self.faults = rules
        self.latency_ms = latency

    def match_fault(self, req):
        for f in self.faults:
            if f.take(req.method, req.path):
                self.faults_applied += 1
                return f
        return None

    def rotate_admin_cert(self):
        """An operator renews the admin certificate (`ziti edge extend`, or a new enrollment): the authenticator
        matches only the new certificate, the sessions made with the old one end, and the files the service was
        configured with are replaced (atomically) by the new certificate and key."""
        now = datetime.datetime.now(datetime.timezone.utc)
        pki = self.pki
        pki.adm_key, pki.admin = pki._store("admin", *pki._mk_admin(now))
        fp = hashlib.sha1(pki.admin.public_bytes(serialization.Encoding.DER)).hexdigest()
        auth_id, old = self.admin.cert_auth
        self.fingerprints.pop(old, None)
        self.fingerprints[fp] = self.admin.id
        self.admin.cert_auth = (auth_id, fp)
        self.sessions.clear()
        d = self.args.dir
        _write_atomic(os.path.join(d, "admin.pem"), _cert_pem(pki.admin))
        _write_atomic(os.path.join(d, "admin.key"), _key_pem(pki.adm_key), 0o600)
        return fp

    def reset(self):
        for i in list(self.identities.values()):
            if not i.is_default_admin:
                self.delete_identity(i)
        self.services.clear()
        self.configs.clear()
        self.policies.clear()
        self.faults = []
        self.latency_ms = 0
        self.counters.clear()
        self.tls_ciphers.clear()
        self.faults_applied = 0
        self.late_applied = 0
        self.requests = 0

    def fault_response(self, f):
        code, msg = FAULT_CODES.get(f.status, ("UNHANDLED", "An unhandled error occurred"))
        if f.code:
            code = str(f.code)
        e = ApiError(f.status, code, msg)
        if f.retry_after is not None:
            e.headers.append(("Retry-After", str(f.retry_after)))
        return self.error_response(e)

    # -- listening

    async def listen(self, host, port):
        ctx = make_server_ctx(self.pki, self.args.dir)
        self.ssl_ctx = ctx
        self.server = await self.loop.create_server(lambda: ApiConn(self), host, port, ssl=ctx, backlog=1024,
                                                    ssl_handshake_timeout=10)
        self.port = self.server.sockets[0].getsockname()[1]

    async def refuse(self, on):
        if on and not self.refusing:
            self.refusing = True
            self.server.close()
            for c in list(self.conns):
                c.abort()
            await self.server.wait_closed()
        elif not on and self.refusing:
            self.server = await self.loop.create_server(lambda: ApiConn(self), self.args.host, self.port,
                                                        ssl=self.ssl_ctx, backlog=1024, ssl_handshake_timeout=10)
            self.refusing = False

    def sweep(self):
        now = time.monotonic()
        for c in list(self.conns):
            c.check_timeout(now)
        self._sweeps = getattr(self, "_sweeps", 0) + 1
        if self._sweeps % 40 == 0:  # every ~10 s: forget expired API sessions
            wall = now_ts()
            for tok in [t for t, x in self.sessions.items() if wall - x.last > self.args.session_timeout]:
                del self.sessions[tok]
        self.loop.call_later(0.25, self.sweep)


# ----------------------------------------------------------------------------- TLS


_VERIFY_CB_TYPE = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_void_p)


@_VERIFY_CB_TYPE
def _accept_any_cert(preverify_ok, store_ctx):
    return 1


def _install_accept_any(ctx):
    """Python's ssl cannot 'request a client cert but not verify it' (Go's tls.RequestClientCert).
    Install an OpenSSL verify callback that accepts any certificate on the SSL_CTX behind ctx.
    The SSL_CTX* is the first field after PyObject_HEAD in PySSLContext. Returns True on success."""
    try:
        try:
            lib = ctypes.CDLL("libssl.so.3")  # what Debian's _ssl module links against
        except OSError:
            lib = ctypes.CDLL(ctypes.util.find_library("ssl"))
        set_verify = lib.SSL_CTX_set_verify
        set_verify.argtypes = [ctypes.c_void_p, ctypes.c_int, _VERIFY_CB_TYPE]
        set_verify.restype = None
        get_mode = lib.SSL_CTX_get_verify_mode
        get_mode.argtypes = [ctypes.c_void_p]
        get_mode.restype = ctypes.c_int
        ptr = ctypes.c_void_p.from_address(id(ctx) + 2 * ctypes.sizeof(ctypes.c_void_p)).value
        if not ptr or get_mode(ptr) != 1:  # SSL_VERIFY_PEER expected (CERT_OPTIONAL)
            return False
        set_verify(ptr, 1, _accept_any_cert)
        return True
    except (OSError, AttributeError, ValueError):
        return False


def make_server_ctx(pki, directory):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    # Go's crypto/tls picks the AEAD the client lists first between AES-GCM
    # and ChaCha20-Poly1305 (it orders ChaCha first when the client does);
    # Python sets OpenSSL's server preference, which would pick its own.
    ctx.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.load_cert_chain(os.path.join(pki.dir, "server.pem"), os.path.join(pki.dir, "server.key"))
    ctx.verify_mode = ssl.CERT_OPTIONAL
    ctx.check_hostname = False
    if not _install_accept_any(ctx):
        # fallback: certificates must chain to the sim CA at handshake time
        sys.stderr.write("ziti_sim: warning: could not install accept-any verify callback\n")
        ctx.load_verify_locations(os.path.join(directory, "ca.pem"))
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


# ----------------------------------------------------------------------------- connections


class ApiConn(asyncio.Protocol):
    def __init__(self, sim):
        self.sim = sim
        self.tr = None
        self.buf = bytearray()
        self.busy = False
        self.closed = False
        self.last = time.monotonic()
        self.req_start = None
        self.peer_der = None
        self.peer_ip = ""
        self.paused = False
        self.sent_continue = False

    def connection_made(self, tr):
        self.tr = tr
        self.sim.conns.add(self)
        so = tr.get_extra_info("ssl_object")
        if so is not None:
            try:
                self.peer_der = so.getpeercert(True)
            except (ValueError, ssl.SSLError):
                self.peer_der = None
            c = so.cipher()
            if c:
                self.sim.tls_ciphers[c[0]] = self.sim.tls_ciphers.get(c[0], 0) + 1
        pn = tr.get_extra_info("peername")
        self.peer_ip = pn[0] if pn else ""
        self.last = time.monotonic()

    def connection_lost(self, exc):
        self.closed = True
        self.sim.conns.discard(self)

    def abort(self):
        if not self.closed:
            self.closed = True
            self.tr.abort()

    def close(self):
        if not self.closed:
            self.closed = True
            self.tr.close()

    def check_timeout(self, now):
        if self.closed or self.busy:
            return
        if self.buf:
            if self.req_start is not None and now - self.req_start > READ_TIMEOUT:
                self.abort()
        elif now - self.last > IDLE_TIMEOUT:
            self.close()

    def data_received(self, data):
        if self.closed:
            return
        if not self.buf:
            self.req_start = time.monotonic()
        self.buf += data
        if len(self.buf) > MAX_HEADER_BYTES + MAX_BODY_BYTES + 65536 and not self.paused:
            self.paused = True
            self.tr.pause_reading()
        if not self.busy:
            self.process()

    def eof_received(self):
        return False

    def _send_plain_error(self, e):
        body = e.text.encode()
        head = (b"HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\nConnection: close\r\n"
                b"Content-Length: %d\r\n\r\n" % (e.status, REASONS.get(e.status, "Error").encode(), len(body)))
        self.tr.write(head + body)
        self.close()

    def process(self):
        sim = self.sim
        while not self.busy and not self.closed and self.buf:
            try:
                r = parse_request(self.buf)
            except HttpError as e:
                self._send_plain_error(e)
                return
            if r is None:
                break
            req, consumed, expect = r
            if req is None:
                if expect and not self.sent_continue:
                    self.sent_continue = True
                    self.tr.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                break
            self.sent_continue = False
            del self.buf[:consumed]
            self.req_start = time.monotonic() if self.buf else None
            req.conn = self
            req.route = sim.route(req)
            sim.requests += 1
            key = req.method + " " + (req.route[0] if req.route[0] else "(unknown)")
            sim.counters[key] = sim.counters.get(key, 0) + 1
            fault = sim.match_fault(req) if sim.faults else None
            delay = sim.latency_ms
            if fault is not None and fault.action == "delay":
                delay += fault.ms
            if fault is not None and fault.action == "drop" and not fault.apply:
                self.abort()
                return
            if delay > 0:
                self.busy = True
                timeout = delay > HANDLER_TIMEOUT_MS
                sim.loop.call_later(min(delay, HANDLER_TIMEOUT_MS) / 1000.0, self.finish, req, fault, timeout)
                return
            self.finish(req, fault, False)
        if self.paused and len(self.buf) < MAX_HEADER_BYTES and not self.closed:
            self.paused = False
            self.tr.resume_reading()

    def finish(self, req, fault, timed_out):
        sim = self.sim
        self.busy = False
        if self.closed:
            # The client went away while the request was held. A Go handler
            # is not stopped by that (net/http only cancels the context), so
            # with apply:true a delayed request is still carried out: the
            # create or delete a client gave up on lands late.
            if fault is not None and fault.action == "delay" and fault.apply:
                try:
                    sim.dispatch(req)
                except Exception:  # nobody to answer
                    pass
                sim.late_applied += 1
            return
        if fault is not None and fault.action == "status" and not fault.apply:
            resp = sim.fault_response(fault)
        else:
            try:
                resp = sim.dispatch(req)
            except Exception as e:  # never crash the loop: report as Go would (500 UNHANDLED)
                resp = sim.error_response(err_unhandled("%s: %s" % (type(e).__name__, e)))
            if fault is not None and fault.action == "status":
                resp = sim.fault_response(fault)
        if timed_out:
            resp = sim.error_response(ApiError(503, "TIMEOUT", "Timeout"))
        close = not req.keep_alive
        head, data = sim.serialize(resp, close)
        if fault is not None and fault.action == "drop":
            self.abort()
            return
        if fault is not None and fault.action == "drop_mid":
            self.tr.write(head[:max(1, len(head) // 2)])
            self.close()
            return
        self.tr.write(data)
        self.last = time.monotonic()
        if close:
            self.close()
            return
        if self.buf:
            self.process()


class MtlsConn(asyncio.Protocol):
    def connection_made(self, tr):
        cn = "?"
        so = tr.get_extra_info("ssl_object")
        der = so.getpeercert(True) if so is not None else None
        if der:
            try:
                c = x509.load_der_x509_certificate(der)
                attrs = c.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
                if attrs:
                    cn = attrs[0].value
            except ValueError:
                pass
        tr.write(("hello %s\n" % cn).encode("utf-8"))
        tr.close()

    def data_received(self, data):
        pass


# ----------------------------------------------------------------------------- control API (plain HTTP)


class CtlConn(asyncio.Protocol):
    def __init__(self, sim):
        self.sim = sim
        self.buf = bytearray()
        self.tr = None
        self.done = False

    def connection_made(self, tr):
        self.tr = tr

    def data_received(self, data):
        if self.done:
            return
        self.buf += data
        try:
            r = parse_request(self.buf)
        except HttpError as e:
            self.reply(e.status, {"error": e.text})
            return
        if r is None or r[0] is None:
            return
        self.done = True
        req = r[0]
        asyncio.ensure_future(self.handle(req))

    def reply(self, status, obj):
        body = jdump(obj)
        self.tr.write(b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nConnection: close\r\n"
                      b"Content-Length: %d\r\n\r\n" % (status, REASONS.get(status, "Status").encode(), len(body))
                      + body)
        self.tr.close()

    async def handle(self, req):
        sim = self.sim
        try:
            body = json.loads(req.body.decode("utf-8")) if req.body.strip() else {}
        except ValueError as e:
            self.reply(400, {"error": "bad json: %s" % e})
            return
        try:
            p, m = req.path, req.method
            if p == "/state" and m == "GET":
                self.reply(200, sim.state())
            elif p == "/faults" and m == "POST":
                sim.set_faults(body)
                self.reply(200, {"ok": True})
            elif p == "/refuse" and m == "POST":
                await sim.refuse(bool(body.get("on", True)))
                self.reply(200, {"ok": True, "refusing": sim.refusing})
            elif p == "/rotate_admin_cert" and m == "POST":
                self.reply(200, {"ok": True, "fingerprint": sim.rotate_admin_cert()})
            elif p == "/expire_sessions" and m == "POST":
                n = len(sim.sessions)
                sim.sessions.clear()
                self.reply(200, {"ok": True, "expired": n})
            elif p == "/identities" and m == "POST" and "count" in body:
                # bulk seeding for benchmarks: names <name>-<n>, no enrollment unless ott true
                prefix = str(body.get("name", "bulk"))
                ids = []
                for k in range(int(body["count"])):
                    ident = sim.create_identity("%s-%d" % (prefix, k), None, body.get("roleAttributes"),
                                                False, bool(body.get("ott", False)))
                    ids.append(ident.id)
                self.reply(201, {"ids": ids})
            elif p == "/identities" and m == "POST":
                if not isinstance(body.get("name"), str):
                    self.reply(400, {"error": "name (string) required"})
                    return
                try:
                    ident = sim.create_identity(body["name"], body.get("externalId"), body.get("roleAttributes"),
                                                bool(body.get("isAdmin", False)), bool(body.get("ott", True)))
                except ApiError as e:
                    self.reply(409, {"error": e.code, "cause": e.cause})
                    return
                self.reply(201, sim.identity_json(ident))
            elif p.startswith("/identities/") and m == "GET":
                ident = sim.identities.get(p[len("/identities/"):])
                if ident is None:
                    self.reply(404, {"error": "not found"})
                else:
                    self.reply(200, sim.identity_json(ident))
            elif p == "/reset" and m == "POST":
                sim.reset()
                self.reply(200, {"ok": True})
            else:
                self.reply(404, {"error": "unknown control endpoint"})
        except (ValueError, TypeError, KeyError) as e:
            self.reply(400, {"error": str(e)})


# ----------------------------------------------------------------------------- main


def write_outputs(sim, args, ctl_port, mtls_port):
    d = args.dir
    _write_atomic(os.path.join(d, "ca.pem"), sim.pki.ca_pem.encode())
    _write_atomic(os.path.join(d, "admin.pem"), _cert_pem(sim.pki.admin))
    _write_atomic(os.path.join(d, "admin.key"), _key_pem(sim.pki.adm_key), 0o600)
    _write_atomic(os.path.join(d, "server.pem"), _cert_pem(sim.pki.server))
    info = {"url": "https://127.0.0.1:%d" % sim.port, "port": sim.port, "ctl_port": ctl_port,
            "mtls_port": mtls_port, "ca_file": os.path.join(d, "ca.pem"),
            "cert_file": os.path.join(d, "admin.pem"), "key_file": os.path.join(d, "admin.key"),
            "server_cert_file": os.path.join(d, "server.pem"), "pid": os.getpid()}
    _write_atomic(os.path.join(d, "sim.json"), jdump(info))


async def amain(args):
    loop = asyncio.get_running_loop()
    os.makedirs(args.dir, exist_ok=True)
    sim = Sim(args)
    sim.loop = loop
    # ca.pem is needed by the fallback TLS path and the mTLS port
    _write_atomic(os.path.join(args.dir, "ca.pem"), sim.pki.ca_pem.encode())
    await sim.listen(args.host, args.port)
    ctl = await loop.create_server(lambda: CtlConn(sim), "127.0.0.1", args.ctl_port)
    mctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    mctx.minimum_version = ssl.TLSVersion.TLSv1_2
    mctx.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE  # as make_server_ctx
    mctx.load_cert_chain(os.path.join(sim.pki.dir, "server.pem"), os.path.join(sim.pki.dir, "server.key"))
    mctx.verify_mode = ssl.CERT_REQUIRED
    mctx.load_verify_locations(os.path.join(args.dir, "ca.pem"))
    mtls = await loop.create_server(MtlsConn, args.host, args.mtls_port, ssl=mctx)
    ctl_port = ctl.sockets[0].getsockname()[1]
    mtls_port = mtls.sockets[0].getsockname()[1]
    write_outputs(sim, args, ctl_port, mtls_port)
    loop.call_later(0.25, sim.sweep)
    stop = asyncio.Event()
    for s in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(s, stop.set)
    await stop.wait()
    for srv in (sim.server, ctl, mtls):
        if srv is not None:
            srv.close()
    for c in list(sim.conns):
        c.abort()


def main(argv=None):
    ap = argparse.ArgumentParser(description="OpenZiti controller simulator")
    ap.add_argument("--dir", required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--ctl-port", type=int, default=0)
    ap.add_argument("--mtls-port", type=int, default=0)
    ap.add_argument("--server-key", default="ec-p256", choices=["ec-p256", "ec-p384", "ec-p521", "rsa"])
    ap.add_argument("--session-timeout", type=float, default=1800.0)
    ap.add_argument("--enrollment-minutes", type=float, default=180.0)
    args = ap.parse_args(argv)
    args.dir = os.path.abspath(args.dir)
    asyncio.run(amain(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
