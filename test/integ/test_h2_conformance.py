"""RFC 9113 connection and stream error handling, proven with raw frames on
h2c and on TLS (ALPN h2): the cases a strict conformance suite found
(HEADERS on a lower stream id, streams beyond SETTINGS_MAX_CONCURRENT_STREAMS,
a plain HTTP request) and their neighbours (frame sizes, flow-control
windows, CONTINUATION, SETTINGS, stream states)."""

import os
import shutil
import struct
import tempfile
import time

import pytest

import h2raw as h
import sectest as st

HEALTH = "/grpc.health.v1.Health/Check"


def _server(kind):
    d = tempfile.mkdtemp(prefix="zm-h2-")
    env = {"GRPC_MAX_CONCURRENT_STREAMS": "8"}
    ca = None
    if kind == "tls":
        pki = st.Pki(d)
        crt, key = pki.server_cert()
        env.update(GRPC_TLS_CERT_FILE=crt, GRPC_TLS_KEY_FILE=key)
        ca = pki.ca
    s = st.TestServer(env, tmp=d).start()
    s.ca = ca
    yield s
    s.stop()
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module", params=["h2c", "tls"])
def srv(request):
    yield from _server(request.param)


@pytest.fixture(params=["h2c", "tls"])
def lone_srv(request):
    """A server of one test's own: its counters are that test's."""
    yield from _server(request.param)


def conn(srv, **settings):
    return h.Conn(st.raw_socket(srv, ca=srv.ca)).handshake(**settings)


def health_req(c, sid, end_stream=True):
    c.headers(sid, st.grpc_headers(HEALTH), end_stream=False)
    c.send_frame(h.DATA, h.END_STREAM if end_stream else 0, sid, st.grpc_frame(b""))


def answered(c, sid):
    f = c.expect(lambda f: f.sid == sid and f.type == h.HEADERS and f.flags & h.END_STREAM)
    return f


def connection_error(c, code, timeout=5.0):
    g = c.goaway(timeout)
    assert g.error_code() == code, g.error_code()
    # and the connection ends
    c.frames(2.0)
    assert c.closed


def test_health_over_raw_frames(srv):
    c = conn(srv)
    health_req(c, 1)
    answered(c, 1)
    c.close()


def decoded_answer(c, sid):
    """Response headers and trailers of sid, every header block decoded in
    order (so the client's HPACK decoder follows the server's encoder)."""
    got = {}
    while True:
        f = c.expect(lambda f: f.sid == sid and f.type == h.HEADERS)
        got.update(c.decode(f))
        if f.flags & h.END_STREAM:
            return got


def test_idle_connection_is_trimmed_and_keeps_its_hpack_state(lone_srv):
    # An idle connection gives back its buffers (conn_trim_idle); what it
    # must keep stays: the dynamic tables both encoders index into (the
    # client's hpack indexes :path, content-type, te...) and the stream ids.
    srv = lone_srv
    c = conn(srv)
    health_req(c, 1)
    r = decoded_answer(c, 1)
    assert r[":status"] == "200" and r["grpc-status"] == "0", r
    deadline = time.monotonic() + 10
    while True:
        now = srv.stats()
        if now.get("idle_trims", 0) > 0 and now.get("trimmed_bytes", 0) > 0:
            break
        assert time.monotonic() < deadline, now
    if srv.ca is not None:
        # beyond nghttp2's two pages: the TLS session's unused bulk went too
        assert now["trimmed_bytes"] > 2 * 4096, now
    for sid in (3, 5):
        health_req(c, sid)
        r = decoded_answer(c, sid)
        assert r[":status"] == "200" and r["content-type"] == "application/grpc", r
        assert r["grpc-status"] == "0", r
    # a closed stream's id stays used up
    c.headers(3, st.grpc_headers(HEALTH), end_stream=True)
    connection_error(c, h.PROTOCOL_ERROR)


def test_headers_with_lower_stream_id_is_protocol_error(srv):
    # RFC 9113 5.1.1
    c = conn(srv)
    health_req(c, 5)
    answered(c, 5)
    c.headers(3, st.grpc_headers(HEALTH), end_stream=True)
    connection_error(c, h.PROTOCOL_ERROR)


def test_reused_closed_stream_id_is_protocol_error(srv):
    c = conn(srv)
    health_req(c, 1)
    answered(c, 1)
    c.headers(1, st.grpc_headers(HEALTH), end_stream=True)
    g = c.expect(lambda f: f.type in (h.GOAWAY, h.RST_STREAM))
    assert g.error_code() in (h.PROTOCOL_ERROR, h.STREAM_CLOSED)


def test_streams_beyond_max_concurrent_are_refused(srv):
    # RFC 9113 5.1.2: the server advertised 8
    c = conn(srv)
    assert c.server_settings.get(3) == 8
    for i in range(8):
        c.headers(1 + 2 * i, st.grpc_headers(HEALTH), end_stream=False)
    c.headers(17, st.grpc_headers(HEALTH), end_stream=False)
    f = c.expect(lambda f: (f.type == h.RST_STREAM and f.sid == 17) or f.type == h.GOAWAY)
    assert f.error_code() in (h.REFUSED_STREAM, h.PROTOCOL_ERROR)
    if f.type == h.RST_STREAM:
        # the 8 admitted streams are still served
        for i in range(8):
            c.send_frame(h.DATA, h.END_STREAM, 1 + 2 * i, st.grpc_frame(b""))
        for i in range(8):
            answered(c, 1 + 2 * i)
    c.close()


def test_plain_http_get_gets_status_and_body(srv):
    c = conn(srv)
    c.headers(1, [(":method", "GET"), (":scheme", "https"), (":path", "/"), (":authority", "localhost")])
    f = c.expect(lambda f: f.type == h.HEADERS and f.sid == 1)
    hd = c.decode(f)
    assert hd[":status"] == "405"
    assert hd["content-type"].startswith("text/plain")
    assert not f.flags & h.END_STREAM
    body = b""
    while True:
        d = c.expect(lambda f: f.type == h.DATA and f.sid == 1)
        body += d.payload
        if d.flags & h.END_STREAM:
            break
    assert b"gRPC" in body
    c.close()


def test_window_update_and_priority_on_half_closed_stream(srv):
    # the client half-closes with its request; WINDOW_UPDATE and PRIORITY
    # are allowed on a half-closed (remote) stream and must not fail it
    c = conn(srv, INITIAL_WINDOW_SIZE=1)  # the body waits for our window
    c.headers(1, [(":method", "GET"), (":scheme", "https"), (":path", "/"), (":authority", "localhost")])
    c.expect(lambda f: f.type == h.HEADERS and f.sid == 1)
    c.send_frame(h.PRIORITY, 0, 1, struct.pack(">IB", 0, 15))
    c.send_frame(h.WINDOW_UPDATE, 0, 1, struct.pack(">I", 100000))
    body = b""
    while True:
        f = c.expect(lambda f: f.sid == 1 or f.type == h.GOAWAY)
        assert f.type == h.DATA, f
        body += f.payload
        if f.flags & h.END_STREAM:
            break
    assert body.startswith(b"405")
    c.close()


def test_content_type_not_grpc_gets_415(srv):
    c = conn(srv)
    c.headers(1, [(":method", "POST"), (":scheme", "https"), (":path", HEALTH),
                  (":authority", "localhost"), ("content-type", "application/json")])
    f = c.expect(lambda f: f.type == h.HEADERS and f.sid == 1)
    assert c.decode(f)[":status"] == "415"
    c.close()


# ---- neighbours: each is a connection error with this code ---------------

def _data_too_large(c):
    health_req(c, 1, end_stream=False)
    c.send_frame(h.DATA, 0, 1, b"\0" * 16385)  # > SETTINGS_MAX_FRAME_SIZE


def _continuation_other_stream(c):
    c.headers(1, st.grpc_headers(HEALTH), end_stream=True, end_headers=False)
    c.send_frame(h.CONTINUATION, h.END_HEADERS, 3, b"")


def _continuation_without_headers(c):
    c.send_frame(h.CONTINUATION, h.END_HEADERS, 1, c.hblock(st.grpc_headers(HEALTH)))


def _frame_between_headers_and_continuation(c):
    c.headers(1, st.grpc_headers(HEALTH), end_stream=True, end_headers=False)
    c.send_frame(h.PING, 0, 0, b"\0" * 8)


def _settings_bad_window(c):
    c.send_frame(h.SETTINGS, 0, 0, struct.pack(">HI", 4, 2 ** 31))


def _settings_bad_frame_size(c):
    c.send_frame(h.SETTINGS, 0, 0, struct.pack(">HI", 5, 16383))


def _settings_bad_length(c):
    c.send_frame(h.SETTINGS, 0, 0, b"\0" * 5)


def _settings_ack_with_payload(c):
    c.send_frame(h.SETTINGS, h.ACK, 0, b"\0" * 6)


def _settings_on_stream(c):
    c.send_frame(h.SETTINGS, 0, 1, b"")


def _ping_bad_length(c):
    c.send_frame(h.PING, 0, 0, b"\0" * 7)


def _ping_on_stream(c):
    c.send_frame(h.PING, 0, 1, b"\0" * 8)


def _window_update_zero(c):
    c.send_frame(h.WINDOW_UPDATE, 0, 0, struct.pack(">I", 0))


def _window_overflow(c):
    c.send_frame(h.WINDOW_UPDATE, 0, 0, struct.pack(">I", 2 ** 31 - 1))
    c.send_frame(h.WINDOW_UPDATE, 0, 0, struct.pack(">I", 2 ** 31 - 1))


def _data_on_idle_stream(c):
    c.send_frame(h.DATA, 0, 1, b"abc")


def _headers_on_stream_zero(c):
    c.send_frame(h.HEADERS, h.END_HEADERS | h.END_STREAM, 0, c.hblock(st.grpc_headers(HEALTH)))


def _even_stream_id(c):
    c.headers(2, st.grpc_headers(HEALTH))


def _push_promise_from_client(c):
    c.send_frame(h.PUSH_PROMISE, h.END_HEADERS, 1, struct.pack(">I", 2))


def _goaway_on_stream(c):
    c.send_frame(h.GOAWAY, 0, 1, struct.pack(">II", 0, 0))


def _rst_on_idle_stream(c):
    c.send_frame(h.RST_STREAM, 0, 1, struct.pack(">I", h.CANCEL))


def _window_update_bad_length(c):
    c.send_frame(h.WINDOW_UPDATE, 0, 0, b"\0\0\0")


def _bad_hpack(c):
    c.send_frame(h.HEADERS, h.END_HEADERS | h.END_STREAM, 1, b"\xff\xff\xff\xff\xff")


def _uppercase_header(c):
    c.headers(1, st.grpc_headers(HEALTH, [("X-Upper", "1")]))


CONNECTION_ERRORS = [
    (_data_too_large, h.FRAME_SIZE_ERROR),
    (_continuation_other_stream, h.PROTOCOL_ERROR),
    (_continuation_without_headers, h.PROTOCOL_ERROR),
    (_frame_between_headers_and_continuation, h.PROTOCOL_ERROR),
    (_settings_bad_window, h.FLOW_CONTROL_ERROR),
    (_settings_bad_frame_size, h.PROTOCOL_ERROR),
    (_settings_bad_length, h.FRAME_SIZE_ERROR),
    (_settings_ack_with_payload, h.FRAME_SIZE_ERROR),
    (_settings_on_stream, h.PROTOCOL_ERROR),
    (_ping_bad_length, h.FRAME_SIZE_ERROR),
    (_ping_on_stream, h.PROTOCOL_ERROR),
    (_window_update_zero, h.PROTOCOL_ERROR),
    (_window_overflow, h.FLOW_CONTROL_ERROR),
    (_data_on_idle_stream, h.PROTOCOL_ERROR),
    (_headers_on_stream_zero, h.PROTOCOL_ERROR),
    (_even_stream_id, h.PROTOCOL_ERROR),
    (_push_promise_from_client, h.PROTOCOL_ERROR),
    (_goaway_on_stream, h.PROTOCOL_ERROR),
    (_rst_on_idle_stream, h.PROTOCOL_ERROR),
    (_window_update_bad_length, h.FRAME_SIZE_ERROR),
    (_bad_hpack, h.COMPRESSION_ERROR),
]


@pytest.mark.parametrize("send,code", CONNECTION_ERRORS, ids=[f.__name__[1:] for f, _ in CONNECTION_ERRORS])
def test_connection_errors(srv, send, code):
    c = conn(srv)
    send(c)
    connection_error(c, code)


def test_malformed_request_is_stream_error(srv):
    # RFC 9113 8.2.1: uppercase field names are malformed -> stream error
    c = conn(srv)
    _uppercase_header(c)
    f = c.expect(lambda f: f.type in (h.RST_STREAM, h.GOAWAY))
    assert f.error_code() == h.PROTOCOL_ERROR
    c.close()


def test_stream_window_overflow_is_stream_error(srv):
    c = conn(srv)
    c.headers(1, st.grpc_headers(HEALTH), end_stream=False)
    c.send_frame(h.WINDOW_UPDATE, 0, 1, struct.pack(">I", 2 ** 31 - 1))
    f = c.expect(lambda f: f.type in (h.RST_STREAM, h.GOAWAY))
    assert f.error_code() == h.FLOW_CONTROL_ERROR
    assert f.type == h.RST_STREAM
    c.close()


def test_server_survives(srv):
    c = conn(srv)
    health_req(c, 1)
    answered(c, 1)
    c.close()
