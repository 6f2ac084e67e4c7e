"""What every request passes before the routes: the Host allow-list, the API key, the body-size limit.

Host check: only requests whose ``Host`` header names an allowed host (any port) are answered,
others get a 421 (code ``host_not_allowed``). ``nanoseek serve`` on a loopback address allows
``localhost``, ``127.0.0.1`` and ``[::1]`` plus ``--allowed-host`` names
(:func:`allowed_hosts_for`), so a web page cannot reach the API through DNS rebinding (a name of
its own that resolves to 127.0.0.1).

API key: when one is set, ``/v1/*`` and ``/metrics`` need ``Authorization: Bearer KEY`` (401
otherwise); the page and ``/health`` stay open.

Body limit: a body over ``max_body_bytes`` gets a 413 (code ``request_too_large``), refused from
its ``Content-Length`` before it is read, or, sent chunked, as soon as it passes the limit. The
connection then closes, but only after a "lingering close" (as HTTP servers do): what the client still
sends is read and dropped for up to :data:`LINGER_SECONDS` and :data:`LINGER_LIMITS` times the limit,
since closing a socket with unread bytes makes the kernel reset the connection, which can destroy the
413 before a client that is still sending its body has read it.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
from typing import Iterable, NamedTuple

from fastapi.responses import JSONResponse

from .metrics import Metrics
from .protocol import APIError

MIB = 1 << 20
DEFAULT_MAX_BODY_BYTES = 4 * MIB
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")  # Host names a loopback server answers to by default
#: a refused body's lingering close: read and drop at most this many body limits' worth, this many seconds
LINGER_LIMITS = 4
LINGER_SECONDS = 2.0
_ENDPOINTS = ("/v1/models", "/v1/completions", "/v1/chat/completions", "/health", "/metrics", "/")


class TooLarge(NamedTuple):
    """A body over the limit: its 413, and whether the client still has more of the body to send."""
    response: JSONResponse
    more_body: bool


class Gate:
    """Pure ASGI middleware: the Host allow-list, the API-key check on ``/v1/*`` and ``/metrics``, the
    request-body limit, and request counting by endpoint/status.

    The body is read here, at most ``max_body_bytes`` of it: a declared ``Content-Length`` over the
    limit is refused before any of the body is read, a chunked body as soon as it passes the limit
    (413, ``Connection: close``, then :meth:`_linger`); the app gets the body that was read in one message.
    """

    def __init__(self, app, metrics: Metrics, allowed_hosts: tuple[str, ...] | None, api_key: str | None,
                 max_body_bytes: int):
        self.app = app
        self.metrics = metrics
        self.allowed_hosts = allowed_hosts
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        """Refuse the request here, or pass it on with its body read."""
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = endpoint_label(scope.get("path", ""))
        counted = False

        async def counting_send(message) -> None:
            nonlocal counted
            if message["type"] == "http.response.start" and not counted:
                counted = True
                self.metrics.count_request(endpoint, message["status"])
            await send(message)

        refusal = self._host_refusal(scope) or self._key_refusal(scope)
        if refusal is not None:
            return await refusal(scope, receive, counting_send)
        body = await self._read_body(scope, receive)
        if isinstance(body, TooLarge):
            return await self._linger(body, receive, counting_send)
        if body is None:
            return  # the client went away before its body was complete: nobody to answer
        await self.app(scope, _replay(body, receive), counting_send)

    async def _linger(self, refused: TooLarge, receive, send) -> None:
        """Send the 413 whole, then read and drop the rest of the request body, if any (until it ends,
        the client leaves, or :data:`LINGER_SECONDS` / :data:`LINGER_LIMITS` run out), before the final
        (empty) body message lets the server close the connection."""
        response = refused.response
        await send({"type": "http.response.start", "status": response.status_code, "headers": response.raw_headers})
        await send({"type": "http.response.body", "body": response.body, "more_body": True})
        loop = asyncio.get_running_loop()
        deadline, dropped = loop.time() + LINGER_SECONDS, 0
        while refused.more_body and dropped <= LINGER_LIMITS * self.max_body_bytes:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                break
            if message["type"] != "http.request" or not message.get("more_body", False):
                break
            dropped += len(message.get("body", b""))
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    def _host_refusal(self, scope) -> JSONResponse | None:
        """A 421 for a Host header that is not allowed (none: an HTTP/1.0 client, never a browser)."""
        allowed = self.allowed_hosts
        host = _header(scope, b"host")
        if allowed is None or host is None or host_name(host) in allowed:
            return None
        name = host_name(host).strip("[]") or host
        response = APIError(421, f"this server does not answer to the Host {host!r} (only {', '.join(allowed)}): "
                                 f"requests under other names are refused, as a web page could reach a "
                                 f"loopback server through a name it controls (DNS rebinding); to serve under "
                                 f"that name, start the server with --allowed-host {name}",
                            code="host_not_allowed").response()
        response.headers["Connection"] = "close"
        return response

    def _key_refusal(self, scope) -> JSONResponse | None:
        """A 401 for a missing or wrong API key on ``/v1/*`` and ``/metrics`` (CORS preflights pass)."""
        key, path = self.api_key, scope.get("path", "")
        if not key or not (path.startswith("/v1/") or path == "/metrics") or scope.get("method") == "OPTIONS":
            return None
        header = _header(scope, b"authorization") or ""
        scheme, _, given = header.partition(" ")
        if not header:
            error = APIError(401, "missing API key: send the header 'Authorization: Bearer KEY'",
                             code="invalid_api_key")
        elif scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
            error = APIError(401, "incorrect API key provided", code="invalid_api_key")
        else:
            return None
        response = error.response()
        response.headers["WWW-Authenticate"] = "Bearer"
        return response

    async def _read_body(self, scope, receive) -> bytes | TooLarge | None:
        """The whole body; a 413 as soon as it is known to pass the limit; None if the client left first."""
        limit = self.max_body_bytes
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isascii() and declared.isdigit() and int(declared) > limit:
            return TooLarge(_too_large(f"the request body is {int(declared)} bytes", limit), more_body=True)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return TooLarge(_too_large(f"the request body is more than {limit} bytes", limit),
                                more_body=message.get("more_body", False))
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def endpoint_label(path: str) -> str:
    """The ``endpoint`` label of a path (unknown paths share one label, so they cannot blow up /metrics)."""
    if path in _ENDPOINTS:
        return path
    if path.startswith("/v1/models/"):
        return "/v1/models/{model}"
    return "other"


def host_name(host: str) -> str:
    """A Host header (or an allowed name) without its port, lower case: ``[::1]:8000`` → ``[::1]``."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[: host.find("]") + 1] if "]" in host else host
    if host.count(":") > 1:  # a bare IPv6 address (an --allowed-host value)
        return f"[{host}]"
    name, sep, port = host.rpartition(":")
    host = name if sep and port.isascii() and port.isdigit() else host
    return host[:-1] if host.endswith(".") else host  # 'localhost.' is 'localhost'


def is_loopback(host: str) -> bool:
    """Whether a bind address is this machine only (``localhost``, 127.0.0.0/8, ``::1``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def allowed_hosts_for(bind_host: str, extra: Iterable[str] = ()) -> list[str] | None:
    """The Host names ``nanoseek serve --host BIND_HOST --allowed-host EXTRA...`` answers to (None: any).

    A loopback server answers to ``localhost``, ``127.0.0.1`` and ``[::1]`` (any port) and the
    ``extra`` names: a web page cannot reach it through a name of its own that resolves to 127.0.0.1
    (DNS rebinding), key or no key. Other binds check the Host only when ``extra`` names are given;
    ``*`` among them turns the check off.
    """
    extra = [h for h in extra or () if h]
    if "*" in extra:
        return None
    if not extra and not is_loopback(bind_host):
        return None
    names = list(LOOPBACK_HOSTS)
    if bind_host and bind_host not in ("0.0.0.0", "::", "[::]"):
        names.append(bind_host)
    return list(dict.fromkeys(host_name(h) for h in names + extra))


def _replay(body: bytes, receive):
    """An ASGI ``receive`` that gives the whole ``body`` first, then the client's next messages (disconnect)."""
    unread = [body]

    async def replay():
        if unread:
            return {"type": "http.request", "body": unread.pop(), "more_body": False}
        return await receive()

    return replay


def _header(scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


def _too_large(what: str, limit: int) -> JSONResponse:
    response = APIError(413, f"{what}; this server accepts at most {limit} bytes ({limit / MIB:g} MiB, "
                             "nanoseek serve --max-body-mb)", code="request_too_large").response()
    response.headers["Connection"] = "close"  # the rest of the body is dropped (Gate._linger), never parsed
    return response
