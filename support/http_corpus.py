"""Malicious and malformed HTTP/1.1 requests, with the status doordown's front must answer.

Written from RFC 9110/9112 and the published request-smuggling advisories (CL.TE and
TE.CL desync, obs-fold, bare CR/LF, non-decimal lengths, duplicate framing headers,
underscores posing as dashes, trailer framing).  Each REFUSED request is sent with a
second request pipelined behind it: the front must answer the first with the status
given here, close the connection, and never parse the second.  ACCEPTED ones are odd
but valid shapes that a strict parser must not refuse; each comes with what the
application must see of it (PATH_INFO, QUERY_STRING, the body, other environ keys).
"""

H = b"Host: example\r\n"
END = b"\r\n"


def _post(*header_lines, body=b""):
    return b"POST / HTTP/1.1\r\n" + H + b"".join(line + b"\r\n" for line in header_lines) + END + body


def _chunked(body):
    return _post(b"Transfer-Encoding: chunked", body=body)


REFUSED = [
    # -- request line --------------------------------------------------------------
    ("no-version", b"GET /\r\n" + H + END, 400),
    ("http-0.9-style", b"GET\r\n" + H + END, 400),
    ("extra-token", b"GET / HTTP/1.1 extra\r\n" + H + END, 400),
    ("two-spaces", b"GET  / HTTP/1.1\r\n" + H + END, 400),
    ("tab-separator", b"GET\t/ HTTP/1.1\r\n" + H + END, 400),
    ("leading-space", b" GET / HTTP/1.1\r\n" + H + END, 400),
    ("lowercase-version", b"GET / http/1.1\r\n" + H + END, 400),
    ("version-1.10", b"GET / HTTP/1.10\r\n" + H + END, 400),
    ("version-no-minor", b"GET / HTTP/1\r\n" + H + END, 400),
    ("version-2", b"GET / HTTP/2.0\r\n" + H + END, 505),
    ("version-0.9", b"GET / HTTP/0.9\r\n" + H + END, 505),
    ("method-not-token", b"G<T / HTTP/1.1\r\n" + H + END, 400),
    ("method-with-nul", b"GE\x00T / HTTP/1.1\r\n" + H + END, 400),
    ("space-in-target", b"GET /a b HTTP/1.1\r\n" + H + END, 400),
    ("nul-in-target", b"GET /\x00 HTTP/1.1\r\n" + H + END, 400),
    ("del-in-target", b"GET /\x7f HTTP/1.1\r\n" + H + END, 400),
    ("relative-target", b"GET foo HTTP/1.1\r\n" + H + END, 400),
    ("fragment-in-target", b"GET /a?b=c#frag HTTP/1.1\r\n" + H + END, 400),
    ("fragment-only-target", b"GET /# HTTP/1.1\r\n" + H + END, 400),
    ("asterisk-not-options", b"GET * HTTP/1.1\r\n" + H + END, 400),
    ("authority-form", b"CONNECT example:443 HTTP/1.1\r\n" + H + END, 400),
    ("bare-lf-lines", b"GET / HTTP/1.1\nHost: example\n\n", 400),
    ("bare-cr-in-line", b"GET / HTTP/1.1\rX\r\n" + H + END, 400),
    # -- header fields -------------------------------------------------------------
    ("no-host-1.1", b"GET / HTTP/1.1\r\n" + END, 400),
    ("two-hosts", b"GET / HTTP/1.1\r\n" + H + b"Host: other\r\n" + END, 400),
    ("space-before-colon", b"GET / HTTP/1.1\r\nHost : example\r\n" + END, 400),
    ("tab-before-colon", b"GET / HTTP/1.1\r\n" + H + b"X-A\t: b\r\n" + END, 400),
    ("no-colon", b"GET / HTTP/1.1\r\n" + H + b"X-A b\r\n" + END, 400),
    ("empty-name", b"GET / HTTP/1.1\r\n" + H + b": b\r\n" + END, 400),
    ("separator-in-name", b"GET / HTTP/1.1\r\n" + H + b"X(A): b\r\n" + END, 400),
    ("space-in-name", b"GET / HTTP/1.1\r\n" + H + b"X A: b\r\n" + END, 400),
    ("non-ascii-name", b"GET / HTTP/1.1\r\n" + H + b"X-\xe9: b\r\n" + END, 400),
    ("nul-in-value", b"GET / HTTP/1.1\r\n" + H + b"X-A: a\x00b\r\n" + END, 400),
    ("bel-in-value", b"GET / HTTP/1.1\r\n" + H + b"X-A: a\x07b\r\n" + END, 400),
    ("del-in-value", b"GET / HTTP/1.1\r\n" + H + b"X-A: a\x7fb\r\n" + END, 400),
    ("vt-in-value", b"GET / HTTP/1.1\r\n" + H + b"X-A: a\x0bb\r\n" + END, 400),
    ("bare-cr-splits-header", b"GET / HTTP/1.1\r\n" + H + b"X: a\rContent-Length: 9\r\n" + END, 400),
    ("bare-lf-splits-header", b"GET / HTTP/1.1\r\n" + H + b"X: a\nContent-Length: 9\r\n" + END, 400),
    ("obs-fold", b"GET / HTTP/1.1\r\n" + H + b"X-A: a\r\n folded\r\n" + END, 400),
    ("obs-fold-tab", b"GET / HTTP/1.1\r\n" + H + b"X-A: a\r\n\tfolded\r\n" + END, 400),
    ("first-header-indented", b"GET / HTTP/1.1\r\n Host: example\r\n" + END, 400),
    ("unknown-expectation", b"GET / HTTP/1.1\r\n" + H + b"Expect: magic\r\n" + END, 417),
    # -- framing: Content-Length ----------------------------------------------------
    ("cl-twice-equal", _post(b"Content-Length: 3", b"Content-Length: 3", body=b"abc"), 400),
    ("cl-twice-different", _post(b"Content-Length: 3", b"Content-Length: 4", body=b"abc"), 400),
    ("cl-list", _post(b"Content-Length: 3, 3", body=b"abc"), 400),
    ("cl-plus", _post(b"Content-Length: +3", body=b"abc"), 400),
    ("cl-minus", _post(b"Content-Length: -1"), 400),
    ("cl-hex", _post(b"Content-Length: 0x3", body=b"abc"), 400),
    ("cl-underscore", _post(b"Content-Length: 1_0", body=b"abcdefghij"), 400),
    ("cl-arabic-digit", _post(b"Content-Length: \xd9\xa3", body=b"abc"), 400),
    ("cl-empty", _post(b"Content-Length:"), 400),
    ("cl-internal-space", _post(b"Content-Length: 1 0", body=b"abcdefghij"), 400),
    ("cl-too-many-digits", _post(b"Content-Length: 0000000000000000000003", body=b"abc"), 400),
    ("cl-over-limit", _post(b"Content-Length: 99999999999"), 413),
    # -- framing: Transfer-Encoding -------------------------------------------------
    ("cl-and-te", _post(b"Content-Length: 5", b"Transfer-Encoding: chunked", body=b"0\r\n\r\n"), 400),
    ("te-and-cl", _post(b"Transfer-Encoding: chunked", b"Content-Length: 5", body=b"0\r\n\r\n"), 400),
    ("te-twice", _post(b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked", body=b"0\r\n\r\n"), 400),
    ("te-chunked-chunked", _post(b"Transfer-Encoding: chunked, chunked", body=b"0\r\n\r\n"), 400),
    ("te-chunked-not-last", _post(b"Transfer-Encoding: chunked, gzip", body=b"0\r\n\r\n"), 400),
    ("te-gzip-only", _post(b"Transfer-Encoding: gzip", body=b"x"), 400),
    ("te-unknown", _post(b"Transfer-Encoding: xchunked", body=b"0\r\n\r\n"), 501),
    ("te-unknown-before-chunked", _post(b"Transfer-Encoding: magic, chunked", body=b"0\r\n\r\n"), 501),
    ("te-vertical-tab", _post(b"Transfer-Encoding: \x0bchunked", body=b"0\r\n\r\n"), 400),
    ("te-in-http-1.0", b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    ("te-underscore-ignored-cl-wins", _post(b"Transfer_Encoding: chunked", b"Content-Length: +1"), 400),
    # -- chunked bodies and trailers ------------------------------------------------
    ("chunk-size-not-hex", _chunked(b"z\r\nhello\r\n0\r\n\r\n"), 400),
    ("chunk-size-0x", _chunked(b"0x5\r\nhello\r\n0\r\n\r\n"), 400),
    ("chunk-size-plus", _chunked(b"+5\r\nhello\r\n0\r\n\r\n"), 400),
    ("chunk-size-negative", _chunked(b"-1\r\nhello\r\n0\r\n\r\n"), 400),
    ("chunk-size-empty", _chunked(b"\r\nhello\r\n0\r\n\r\n"), 400),
    ("chunk-size-overflow", _chunked(b"1" + b"0" * 20 + b"\r\nhello\r\n0\r\n\r\n"), 400),
    ("chunk-size-over-limit", _chunked(b"fffffffffff\r\nhello\r\n0\r\n\r\n"), 413),
    ("chunk-line-bare-lf", _chunked(b"5\nhello\r\n0\r\n\r\n"), 400),
    ("chunk-line-bare-cr", _chunked(b"5\rhello\r\n0\r\n\r\n"), 400),
    ("chunk-data-too-long", _chunked(b"3\r\nhello\r\n0\r\n\r\n"), 400),
    ("chunk-data-bare-lf-end", _chunked(b"5\r\nhello\n0\r\n\r\n"), 400),
    ("chunk-ext-with-ctl", _chunked(b"5;a=\x00\r\nhello\r\n0\r\n\r\n"), 400),
    ("chunk-size-trailing-space", _chunked(b"0 \r\n\r\n"), 400),
    ("chunk-size-trailing-tab", _chunked(b"5\t\r\nhello\r\n0\r\n\r\n"), 400),
    ("chunk-size-leading-space", _chunked(b" 5\r\nhello\r\n0\r\n\r\n"), 400),
    ("last-chunk-no-final-crlf", _chunked(b"0\r\n"), 400),
    ("trailer-content-length", _chunked(b"0\r\nContent-Length: 5\r\n\r\n"), 400),
    ("trailer-transfer-encoding", _chunked(b"0\r\nTransfer-Encoding: chunked\r\n\r\n"), 400),
    ("trailer-host", _chunked(b"0\r\nHost: evil\r\n\r\n"), 400),
    ("trailer-malformed", _chunked(b"0\r\nX-T : v\r\n\r\n"), 400),
    # -- limits -------------------------------------------------------------------------
    ("request-line-too-long", b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n" + H + END, 414),
    ("header-line-too-long", b"GET / HTTP/1.1\r\n" + H + b"X-A: " + b"b" * 9000 + b"\r\n" + END, 431),
    ("too-many-headers", b"GET / HTTP/1.1\r\n" + H + b"X-A: b\r\n" * 101 + END, 431),
    ("head-too-large", b"GET / HTTP/1.1\r\n" + H + (b"X-A: " + b"b" * 8000 + b"\r\n") * 9 + END, 431),
]

C = b"Connection: close\r\n"


def _seen(path="/", query="", body="", **environ):
    return dict(environ, PATH_INFO=path, QUERY_STRING=query, body=body)


ACCEPTED = [
    ("empty-line-before-request", b"\r\nGET / HTTP/1.1\r\n" + H + C + END, _seen()),
    ("absolute-form", b"GET http://example/p?q=1 HTTP/1.1\r\n" + H + C + END, _seen("/p", "q=1")),
    ("options-asterisk", b"OPTIONS * HTTP/1.1\r\n" + H + C + END, _seen("*", REQUEST_METHOD="OPTIONS")),
    ("http-1.0-no-host", b"GET / HTTP/1.0\r\n" + END, _seen(SERVER_PROTOCOL="HTTP/1.0")),
    ("percent-decoded-path", b"GET /a%20b/%41%2f?x=%20&y HTTP/1.1\r\n" + H + C + END,
     _seen("/a b/A/", "x=%20&y")),
    ("ows-around-value", b"GET / HTTP/1.1\r\nHost:\t example \t\r\n" + C + END, _seen(HTTP_HOST="example")),
    ("long-blank-run-in-value", b"GET / HTTP/1.1\r\n" + H + b"X-A: a" + b" \t" * 3000 + b"b  \r\n" + C + END,
     _seen(HTTP_X_A="a" + " \t" * 3000 + "b")),
    ("no-space-after-colon", b"GET / HTTP/1.1\r\nHost:example\r\n" + C + END, _seen(HTTP_HOST="example")),
    ("tab-inside-value", b"GET / HTTP/1.1\r\n" + H + b"X-A: a\tb\r\n" + C + END, _seen(HTTP_X_A="a\tb")),
    ("latin-1-in-value", b"GET / HTTP/1.1\r\n" + H + b"X-A: caf\xe9\r\n" + C + END, _seen(HTTP_X_A="caf\xe9")),
    ("te-mixed-case", _post(b"Transfer-Encoding: Chunked", C[:-2], body=b"5\r\nhello\r\n0\r\n\r\n"),
     _seen(body="hello", CONTENT_LENGTH="5")),
    ("chunk-extension", _post(b"Transfer-Encoding: chunked", C[:-2],
                              body=b"5;name=value\r\nhello\r\n0\r\nX-Trailer: ok\r\n\r\n"), _seen(body="hello")),
    ("chunk-bws-before-extension", _post(b"Transfer-Encoding: chunked", C[:-2],
                                         body=b"5 \t;a=b\r\nhello\r\n0 ;last\r\n\r\n"), _seen(body="hello")),
    ("chunk-size-upper-hex", _post(b"Transfer-Encoding: chunked", C[:-2],
                                   body=b"A\r\n0123456789\r\n0\r\n\r\n"), _seen(body="0123456789")),
    ("cl-zero", _post(b"Content-Length: 0", C[:-2]), _seen(CONTENT_LENGTH="0")),
    ("cl-body", _post(b"Content-Length: 5", C[:-2], body=b"hello"), _seen(body="hello", CONTENT_LENGTH="5")),
    ("lowercase-method-is-a-token", b"get / HTTP/1.1\r\n" + H + C + END, _seen(REQUEST_METHOD="get")),
]
