"""Reading an HTTP request body with a size limit, for both servers."""


class BodyTooLarge(Exception):
    """The body is over the limit (each server answers 413 in its own error shape)."""


async def read_limited(request, limit):
    """The body of a Starlette `request` as bytes; `BodyTooLarge` as soon as it
    is known to exceed `limit` bytes: from its Content-Length before reading,
    or while reading (the rest is never read into memory)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(f"over the limit of {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise BodyTooLarge(f"over the limit of {limit} bytes")
    return bytes(body)
