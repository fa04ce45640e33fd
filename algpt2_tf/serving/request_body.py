"""What both servers share: the checks before a request reaches the model (the body's size
and read time, the API key, whether the server may listen beyond loopback) and `run_app`,
which serves an app until interrupted."""

import asyncio
import ipaddress
import logging
import secrets
import sys


class BodyTooLarge(Exception):
    """The body is over the limit (each server answers 413 in its own error shape)."""


class BodyTimeout(Exception):
    """The body did not arrive in time (each server answers 408 in its own error shape)."""


async def read_limited(request, limit, timeout_s):
    """The body of a Starlette `request` as bytes.

    Raises `BodyTooLarge` as soon as it is known to exceed `limit` bytes (from
    its Content-Length before reading, or while reading: the rest is never
    read into memory), and `BodyTimeout` when it has not all arrived within
    `timeout_s` seconds (a Content-Length larger than what the client sends
    would otherwise hold the request open forever)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(f"over the limit of {limit} bytes")

    async def read():
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise BodyTooLarge(f"over the limit of {limit} bytes")
        return bytes(body)

    try:
        return await asyncio.wait_for(read(), timeout_s)
    except asyncio.TimeoutError:
        raise BodyTimeout(f"The request body did not arrive within {timeout_s:g} s.") from None


def is_loopback(host):
    """Whether `host` (an address or "localhost") is reachable from this machine only."""
    if host.strip().lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_binding(host, api_key, insecure_no_auth=False):
    """Refuses (`ValueError`) to listen beyond loopback without an API key, unless the
    caller says `insecure_no_auth`. Returns a warning line to log loudly, or None."""
    if is_loopback(host) or api_key:
        return None
    if not insecure_no_auth:
        raise ValueError(f"--host {host} listens beyond this machine and no API key is set: "
                         "anyone who can reach the port could use the model. Set --api-key "
                         "(or $ALGPT2_API_KEY), or pass --insecure-no-auth to serve without one.")
    return (f"WARNING: serving on {host} WITHOUT authentication (--insecure-no-auth): anyone who "
            "can reach this port can use the model.")


class RequireAPIKey:
    """ASGI middleware: every HTTP request (the API, /docs and /openapi.json alike) needs
    `Authorization: Bearer <api_key>`; others get `reject()`, a response (401).

    Plain ASGI rather than `@app.middleware("http")`, whose wrapper passes every
    streamed chunk through an extra in-memory stream.

    Args:
        app: the ASGI app.
        api_key: the key.
        reject: returns the 401 response, in the server's own error shape.
    """

    def __init__(self, app, api_key, reject):
        self.app, self.expected, self.reject = app, f"Bearer {api_key}".encode(), reject

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(given, self.expected):
                await self.reject()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def run_app(make_app, close, host, port, banner, warning=None):
    """Serves the FastAPI app `make_app()` makes on `host:port` until interrupted, then
    calls `close()` (also when `make_app` refuses its settings with a `ValueError`).
    `warning` (from `check_binding`) goes to the log and stderr, `banner` to stdout once
    the app exists (the line a user, or a test, waits for)."""
    import uvicorn  # deferred: imports uvicorn

    try:
        app = make_app()
    except ValueError:
        close()
        raise
    if warning:
        logging.getLogger("algpt2.serve").warning(warning)
        print(warning, file=sys.stderr, flush=True)
    print(banner, flush=True)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        close()
