"""A raw HTTP/2 client for conformance and abuse tests: frames are built by
hand (so invalid sequences can be sent), HPACK comes from python3-hpack."""

import socket
import struct
import time

import hpack

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM, ACK, END_HEADERS, PADDED, PRIO = 0x1, 0x1, 0x4, 0x8, 0x20
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR, SETTINGS_TIMEOUT, STREAM_CLOSED, \
    FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL, COMPRESSION_ERROR, CONNECT_ERROR, ENHANCE_YOUR_CALM = range(12)


def frame(ftype, flags, sid, payload=b""):
    return struct.pack(">I", len(payload))[1:] + bytes([ftype, flags]) + struct.pack(">I", sid) + payload


def settings(**kv):
    ids = {"HEADER_TABLE_SIZE": 1, "ENABLE_PUSH": 2, "MAX_CONCURRENT_STREAMS": 3,
           "INITIAL_WINDOW_SIZE": 4, "MAX_FRAME_SIZE": 5, "MAX_HEADER_LIST_SIZE": 6}
    return b"".join(struct.pack(">HI", ids[k], v) for k, v in kv.items())


class Frame:
    def __init__(self, t, flags, sid, payload):
        self.type, self.flags, self.sid, self.payload = t, flags, sid, payload

    def error_code(self):
        if self.type == GOAWAY:
            return struct.unpack(">I", self.payload[4:8])[0]
        if self.type == RST_STREAM:
            return struct.unpack(">I", self.payload[:4])[0]
        return None

    def __repr__(self):
        return "Frame(type=%d flags=%#x sid=%d len=%d)" % (self.type, self.flags, self.sid, len(self.payload))


class Conn:
    def __init__(self, sock):
        self.s = sock
        self.enc = hpack.Encoder()
        self.dec = hpack.Decoder()
        self.buf = b""
        self.closed = False
        self.server_settings = {}

    def send(self, data):
        self.s.sendall(data)

    def send_frame(self, t, flags, sid, payload=b""):
        self.send(frame(t, flags, sid, payload))

    def handshake(self, **kv):
        self.send(PREFACE + frame(SETTINGS, 0, 0, settings(**kv)))
        f = self.expect(lambda f: f.type == SETTINGS and not f.flags & ACK)
        for i in range(0, len(f.payload), 6):
            k, v = struct.unpack(">HI", f.payload[i:i + 6])
            self.server_settings[k] = v
        self.send_frame(SETTINGS, ACK, 0)
        return self

    def hblock(self, headers):
        return self.enc.encode(headers)

    def headers(self, sid, headers, end_stream=True, end_headers=True):
        flags = (END_STREAM if end_stream else 0) | (END_HEADERS if end_headers else 0)
        self.send_frame(HEADERS, flags, sid, self.hblock(headers))

    def read_frame(self, timeout=5.0):
        deadline = time.monotonic() + timeout
        while True:
            if len(self.buf) >= 9:
                n = struct.unpack(">I", b"\0" + self.buf[:3])[0]
                if len(self.buf) >= 9 + n:
                    t, fl = self.buf[3], self.buf[4]
                    sid = struct.unpack(">I", self.buf[5:9])[0] & 0x7FFFFFFF
                    p = self.buf[9:9 + n]
                    self.buf = self.buf[9 + n:]
                    return Frame(t, fl, sid, p)
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.s.settimeout(left)
            try:
                d = self.s.recv(65536)
            except socket.timeout:
                return None
            except (ConnectionResetError, OSError):
                d = b""
            if not d:
                self.closed = True
                return None
            self.buf += d

    def expect(self, pred, timeout=5.0):
        """Reads until pred(frame); returns that frame or raises."""
        deadline = time.monotonic() + timeout
        seen = []
        while time.monotonic() < deadline:
            f = self.read_frame(deadline - time.monotonic())
            if f is None:
                break
            seen.append(f)
            if f.type == PING and not f.flags & ACK:
                self.send_frame(PING, ACK, 0, f.payload)
            if pred(f):
                return f
        raise AssertionError("expected frame not seen (closed=%s): %r" % (self.closed, seen[-20:]))

    def frames(self, timeout=1.0):
        """Everything the server sends within timeout (or until EOF)."""
        out = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            f = self.read_frame(deadline - time.monotonic())
            if f is None:
                break
            out.append(f)
        return out

    def goaway(self, timeout=5.0):
        return self.expect(lambda f: f.type == GOAWAY, timeout)

    def decode(self, f):
        return dict((k if isinstance(k, str) else k.decode(), v if isinstance(v, str) else v.decode())
                    for k, v in self.dec.decode(f.payload))

    def close(self):
        try:
            self.s.close()
        except OSError:
            pass
