"""Outbound HTTP over ``wasi:http``, blocking and requests-shaped; the task's ``http`` grants
decide which URLs it may reach::

    from sluice import http

    r = http.get("https://api.example.com/items", headers={"accept": "application/json"})
    r.raise_for_status()
    items = r.json()
    created = http.post_json("https://api.example.com/items", {"name": "x"})

``request(method, url, headers=, body=, json=, timeout=)`` sends one request and reads the whole
response; ``get``, ``post``, ``put``, ``patch`` and ``delete`` are shorthands, and ``get_json`` /
``post_json`` parse the answer and raise on a status other than 2xx. A request that fails raises
:class:`HTTPError` whose ``code`` names the ``wasi:http`` error: ``HttpRequestDenied`` when the
grants do not cover the URL (the run's log names it), ``HttpResponseBodySize`` past the run's
response-bytes limit, ``ConnectionRefused``, ``ConnectionTimeout``, … The host follows no
redirects: a 3xx comes back as it is, and the ``location`` is for the task to request (under the
same grants).

A full client works too: niquests (3.21 or later) speaks ``wasi:http`` and is governed by the
same grants; install it into a directory next to the task (``pip install --target``).
"""

import json as _json
from urllib.parse import urlsplit

from componentize_py_types import Err
from wit_world.imports import outgoing_handler as _handler
from wit_world.imports import types as _t
from wit_world.imports.streams import StreamError_Closed

__all__ = [
    "HTTPError",
    "Response",
    "delete",
    "get",
    "get_json",
    "patch",
    "post",
    "post_json",
    "put",
    "request",
]

_WRITE = 4096  # the most `blocking-write-and-flush` takes in one call
_READ = 64 * 1024


class HTTPError(Exception):
    """A request that failed. ``code`` names the ``wasi:http`` error code (``HttpRequestDenied``,
    ``ConnectionRefused``, ``HttpResponseBodySize``, …), or is ``Status`` when
    :meth:`Response.raise_for_status` refused the answer (then ``response`` is set)."""

    def __init__(self, url, code, detail=None, response=None):
        self.url = url
        self.code = code
        self.detail = detail
        self.response = response
        super().__init__(f"{url}: {code}" + (f" ({detail})" if detail else ""))


def _error(url, code):
    name = type(code).__name__.removeprefix("ErrorCode_")
    value = getattr(code, "value", None)
    return HTTPError(url, name, None if value is None else str(value))


class Response:
    """A whole response: ``status_code``, ``headers`` (a list of ``(name, value)`` pairs, names in
    lower case), ``content`` (bytes), ``text``, ``json()``, ``ok``, ``header(name)``."""

    def __init__(self, url, status_code, headers, content):
        self.url = url
        self.status_code = status_code
        self.headers = headers
        self.content = content

    @property
    def ok(self):
        """Whether the status is 2xx."""
        return 200 <= self.status_code < 300

    def header(self, name, default=None):
        """The first value of header ``name`` (any case), or ``default``."""
        name = name.lower()
        return next((v for k, v in self.headers if k == name), default)

    @property
    def text(self):
        """The body decoded as UTF-8 (undecodable bytes replaced)."""
        return self.content.decode("utf-8", "replace")

    def json(self):
        """The body parsed as JSON."""
        return _json.loads(self.content)

    def raise_for_status(self):
        """``self`` when the status is 2xx; otherwise raise :class:`HTTPError` (code ``Status``)."""
        if not self.ok:
            raise HTTPError(self.url, "Status", str(self.status_code), self)
        return self

    def __repr__(self):
        return f"<Response [{self.status_code}] {self.url}>"


def request(method, url, *, headers=None, body=None, json=None, timeout=None):
    """Send one request and read the whole response.

    ``headers``: a mapping; ``body``: bytes or str; ``json``: a value sent as JSON (with
    ``content-type: application/json``); ``timeout``: seconds for connecting, for the first byte
    and between bytes (the host caps each at the run's limits)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url!r}")
    headers = dict(headers or {})
    if json is not None:
        body = _json.dumps(json).encode()
        if not any(k.lower() == "content-type" for k in headers):
            headers["content-type"] = "application/json"
    if isinstance(body, str):
        body = body.encode()
    if body is not None and not any(k.lower() == "content-length" for k in headers):
        # Without a length the host sends the body chunked, which some servers cannot read.
        headers["content-length"] = str(len(body))
    fields = [
        (str(k).lower(), v.encode() if isinstance(v, str) else bytes(v)) for k, v in headers.items()
    ]
    try:
        req = _t.OutgoingRequest(_t.Fields.from_list(fields))
    except Err as e:
        raise ValueError(f"a header is malformed or not allowed: {e.value}") from None
    known = getattr(_t, "Method_" + method.capitalize(), None) if method.isupper() else None
    req.set_method(known() if known is not None else _t.Method_Other(method))
    req.set_scheme(_t.Scheme_Https() if parts.scheme == "https" else _t.Scheme_Http())
    req.set_authority(parts.netloc.rpartition("@")[2])
    req.set_path_with_query((parts.path or "/") + (f"?{parts.query}" if parts.query else ""))
    options = None
    if timeout is not None:
        ns = int(timeout * 1e9)
        options = _t.RequestOptions()
        options.set_connect_timeout(ns)
        options.set_first_byte_timeout(ns)
        options.set_between_bytes_timeout(ns)
    # The body handle is taken before `handle` consumes the request, and written after.
    out_body = req.body()
    try:
        future = _handler.handle(req, options)
    except Err as e:
        raise _error(url, e.value) from None
    with out_body.write() as stream:
        for i in range(0, len(body or b""), _WRITE):
            stream.blocking_write_and_flush(body[i : i + _WRITE])
    _t.OutgoingBody.finish(out_body, None)
    with future:
        while (result := future.get()) is None:
            with future.subscribe() as ready:
                ready.block()
    result = result.value  # the outer result only says whether it was taken before
    if isinstance(result, Err):
        raise _error(url, result.value)
    with result.value as resp:
        status = resp.status()
        with resp.headers() as h:
            names = [(k, v.decode("latin-1")) for k, v in h.entries()]
        in_body = resp.consume()
    chunks = []
    with in_body.stream() as stream:
        while True:
            try:
                chunks.append(stream.blocking_read(_READ))
            except Err as e:
                if isinstance(e.value, StreamError_Closed):
                    break
                code = _t.http_error_code(e.value.value)
                if code is not None:
                    raise _error(url, code) from None
                raise HTTPError(url, "Stream", e.value.value.to_debug_string()) from None
    with _t.IncomingBody.finish(in_body):
        pass
    return Response(url, status, names, b"".join(chunks))


def get(url, **kw):
    """``request("GET", url, ...)``."""
    return request("GET", url, **kw)


def post(url, **kw):
    """``request("POST", url, ...)``."""
    return request("POST", url, **kw)


def put(url, **kw):
    """``request("PUT", url, ...)``."""
    return request("PUT", url, **kw)


def patch(url, **kw):
    """``request("PATCH", url, ...)``."""
    return request("PATCH", url, **kw)


def delete(url, **kw):
    """``request("DELETE", url, ...)``."""
    return request("DELETE", url, **kw)


def get_json(url, **kw):
    """GET ``url`` and parse its JSON body; a status other than 2xx raises :class:`HTTPError`."""
    return get(url, **kw).raise_for_status().json()


def post_json(url, value, **kw):
    """POST ``value`` as JSON and parse the JSON answer; a status other than 2xx raises."""
    return post(url, json=value, **kw).raise_for_status().json()
