"""The HTTP endpoint of `uffd-pager serve --metrics HOST:PORT`: GET /metrics.

It runs on the pager's own event loop, not in prometheus_client's server
thread: a scrape then reads the region table between two of the loop's
callbacks, never while it changes (a thread would walk the table as regions
come and go, and scan descriptors being closed), and costs the fault path
only the few milliseconds it takes, once per scrape.
"""
from __future__ import annotations

import asyncio
import logging

from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import CollectorRegistry

log = logging.getLogger("uffd_pager.metrics")

_HEAD_LIMIT = 16 << 10  # bytes of request line and headers
_HEAD_TIMEOUT = 10.0  # seconds a client may take to send them


def parse_listen_address(text: str) -> tuple[str, int]:
    """HOST:PORT (an IPv6 host in brackets, [::1]:9100; port 0: any free
    one) as (host, port), or ValueError saying what is expected."""
    host, colon, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not colon or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"expected HOST:PORT (e.g. 127.0.0.1:9100, [::1]:9100), not {text!r}")
    return host, int(port)


async def start_metrics_server(registry: CollectorRegistry, host: str, port: int) -> asyncio.Server:
    """Listens on host:port; the caller closes the server."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _HEAD_TIMEOUT)
            status, content_type, body = _respond(registry, head)
            writer.write(f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
                         "Connection: close\r\n\r\n".encode() + body)
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
            pass  # a client that went away or sent no request: nothing to answer
        finally:
            writer.close()

    return await asyncio.start_server(answer, host, port, limit=_HEAD_LIMIT)


def _respond(registry: CollectorRegistry, head: bytes) -> tuple[str, str, bytes]:
    lines = head.decode("latin-1").split("\r\n")
    method, _, rest = lines[0].partition(" ")
    path = rest.partition(" ")[0].partition("?")[0]
    if method != "GET":
        return "405 Method Not Allowed", "text/plain", b"only GET /metrics\n"
    if path not in ("/metrics", "/"):
        return "404 Not Found", "text/plain", b"the metrics are at /metrics\n"
    accept = next((line.partition(":")[2].strip() for line in lines[1:] if line.lower().startswith("accept:")), "")
    encoder, content_type = choose_encoder(accept)  # OpenMetrics when the scraper asks for it
    return "200 OK", content_type, encoder(registry)
