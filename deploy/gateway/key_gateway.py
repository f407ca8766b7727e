"""The authenticating sidecar that lets clients reach any replica with one credential.

TorchServe 0.12 draws random token keys at every start and cannot be given fixed ones, so each pod has its own
inference key. This proxy runs beside TorchServe in every pod: it accepts a shared client token (from a
Kubernetes Secret, one or more tokens, one a line, so a new one can be added before an old one is removed),
swaps it for the pod's own inference key, read from TorchServe's key_file.json on a volume both containers
share, and streams the request to TorchServe on the pod's loopback. Token authorization stays on in TorchServe.

It is also the pod's admission control for memory. TorchServe's frontend buffers every body whole (Netty direct
memory, then a heap copy per queued request, then one direct buffer per batch sent to the worker) and its worker
holds a whole batch of bodies; nothing in TorchServe bounds how many bodies arrive at once, and a batch whose
buffer cannot be allocated is never sent: it hangs until responseTimeout and its worker is killed. So the gateway
refuses a body over --max-body-bytes (413) and admits bodies only while the bytes in flight stay under
--inflight-bytes (else 507 with Retry-After), and the pod's memory is sized for that many bytes
(docs/deploy.md, "Memory budget").

Bodies are streamed both ways, never held: the proxy's own memory does not grow with the request size. Each
client connection carries one request (``Connection: close``), which leaves no room for request smuggling
between clients.

Standard library only: it runs with the image's Python, beside TorchServe.
    python key_gateway.py --listen 0.0.0.0:8080 --upstream 127.0.0.1:8085 \
        --key-file /home/model-server/run/key_file.json --tokens-file /etc/gateway/tokens \
        --max-body-bytes 100000000 --inflight-bytes 256000000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import json
import logging
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LOG = logging.getLogger("key_gateway")
CHUNK = 256 * 1024
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "proxy-authorization", "te", "trailer", "upgrade"}


class GatewayError(Exception):
    """An answer the gateway gives itself: an HTTP status and a message that says what to do."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message


@dataclass
class Secrets:
    """The client tokens and the pod's inference key, re-read when their files change (rotation needs no restart)."""

    key_file: Path
    tokens_file: Path
    _cache: dict[Path, tuple[int, Any]] = field(default_factory=dict)

    def _read(self, path: Path, parse: Callable[[str], Any]) -> Any:
        try:
            mtime = path.stat().st_mtime_ns
        except FileNotFoundError:
            return None
        cached = self._cache.get(path)
        if cached is None or cached[0] != mtime:
            cached = (mtime, parse(path.read_text()))
            self._cache[path] = cached
        return cached[1]

    def client_tokens(self) -> list[bytes]:
        tokens = self._read(self.tokens_file, lambda text: [line.strip().encode() for line in text.splitlines()
                                                            if line.strip() and not line.startswith("#")])
        if not tokens:
            raise GatewayError(503, "Service Unavailable",
                               f"the gateway has no client tokens in {self.tokens_file}: mount the Secret there")
        return tokens

    def inference_key(self) -> str:
        try:
            keys = self._read(self.key_file, json.loads)
        except (ValueError, OSError):
            keys = None  # TorchServe is writing it right now
        if not isinstance(keys, dict) or "inference" not in keys:
            raise GatewayError(503, "Service Unavailable",
                               "TorchServe in this pod has not started yet (no key file); retry in a few seconds")
        return keys["inference"]["key"]


def authorized(header_value: str | None, tokens: list[bytes]) -> bool:
    if not header_value:
        return False
    scheme, _, credential = header_value.strip().partition(" ")
    if scheme.lower() != "bearer" or not credential.strip():
        return False
    offered = credential.strip().encode()
    # Compare with every token, always: the time taken does not tell which one (or how much of one) matched.
    matches = [hmac.compare_digest(offered, token) for token in tokens]
    return any(matches)


def parse_head(head: bytes) -> tuple[str, list[tuple[str, str]]]:
    """The start line and the header fields of an HTTP/1.x head (without its final blank line)."""
    lines = head.decode("latin-1").split("\r\n")
    start, fields = lines[0], []
    for line in lines[1:]:
        name, separator, value = line.partition(":")
        if not separator or not name or name != name.strip():
            raise GatewayError(400, "Bad Request", f"malformed header line {line[:80]!r}")
        fields.append((name, value.strip()))
    if len(start.split(" ")) != 3 or not start.split(" ")[2].startswith("HTTP/1."):
        raise GatewayError(400, "Bad Request", f"not an HTTP/1.x request line: {start[:80]!r}")
    return start, fields


def header(fields: list[tuple[str, str]], name: str) -> str | None:
    values = [value for key, value in fields if key.lower() == name]
    if len(values) > 1:
        raise GatewayError(400, "Bad Request", f"send the {name} header once")
    return values[0] if values else None


def render_head(start: str, fields: list[tuple[str, str]]) -> bytes:
    return (start + "\r\n" + "".join(f"{name}: {value}\r\n" for name, value in fields) + "\r\n").encode("latin-1")


def error_response(error: GatewayError) -> bytes:
    body = json.dumps({"code": error.status, "type": error.reason, "message": error.message}).encode()
    fields = [("Content-Type", "application/json"), ("Content-Length", str(len(body))), ("Connection", "close")]
    if error.status == 401:
        fields.append(("WWW-Authenticate", 'Bearer realm="inference"'))
    if error.status in (503, 507):
        fields.append(("Retry-After", "1"))
    return render_head(f"HTTP/1.1 {error.status} {error.reason}", fields) + body


async def read_head(reader: asyncio.StreamReader, limit: int, buffer: bytes = b"") -> tuple[bytes, bytes] | None:
    """(head, bytes read past it) or None when the peer closed before sending anything; ``buffer`` holds bytes
    already read from the stream."""
    while b"\r\n\r\n" not in buffer:
        if len(buffer) > limit:
            raise GatewayError(431, "Request Header Fields Too Large", f"keep the request head under {limit} bytes")
        chunk = await reader.read(CHUNK)
        if not chunk:
            if buffer:
                raise GatewayError(400, "Bad Request", "the connection closed in the middle of the request head")
            return None
        buffer += chunk
    head, _, rest = buffer.partition(b"\r\n\r\n")
    if len(head) > limit:
        raise GatewayError(431, "Request Header Fields Too Large", f"keep the request head under {limit} bytes")
    return head, rest


async def discard_upload(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, seconds: float = 5.0) -> None:
    """Read and drop what the client still sends after it was refused: closing a socket with unread bytes resets
    the connection, and many clients then report the reset instead of the answer they were sent."""
    if writer.can_write_eof():
        writer.write_eof()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            while await reader.read(CHUNK):
                pass


async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while chunk := await reader.read(CHUNK):
        writer.write(chunk)
        await writer.drain()


@dataclass
class Admission:
    """Bytes of request bodies in flight through this pod, and the most it may hold."""

    max_body_bytes: int
    inflight_limit: int
    inflight: int = 0

    def admit(self, fields: list[tuple[str, str]]) -> int:
        """Reserve the body's size (a chunked body of unknown size reserves the maximum); raise when it may not."""
        length = header(fields, "content-length")
        chunked = "chunked" in (header(fields, "transfer-encoding") or "").lower()
        if length is not None and chunked:
            raise GatewayError(400, "Bad Request", "send Content-Length or Transfer-Encoding: chunked, not both")
        if length is not None and not length.isdigit():
            raise GatewayError(400, "Bad Request", f"Content-Length must be a number of bytes, not {length[:40]!r}")
        size = self.max_body_bytes if chunked else int(length or 0)
        if size > self.max_body_bytes:
            raise GatewayError(413, "Request Entity Too Large",
                               f"the body is {size} bytes; the limit is {self.max_body_bytes}: "
                               "send the images in several requests")
        if self.inflight + size > self.inflight_limit:
            raise GatewayError(507, "Insufficient Storage",
                               f"this replica holds {self.inflight} bytes of requests already; retry in a moment "
                               "(or send smaller requests)")
        self.inflight += size
        return size

    def release(self, size: int) -> None:
        self.inflight -= size


@dataclass
class Gateway:
    secrets: Secrets
    upstream_host: str
    upstream_port: int
    admission: Admission
    head_timeout: float = 30.0
    max_head_bytes: int = 64 * 1024

    async def handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        peer = client_writer.get_extra_info("peername")
        upstream_writer: asyncio.StreamWriter | None = None
        reserved = 0
        try:
            try:
                request = await asyncio.wait_for(self._accept(client_reader, peer), self.head_timeout)
            except TimeoutError as error:
                raise GatewayError(408, "Request Timeout", "send the request head sooner") from error
            if request is None:
                return
            head, early_body, reserved = request
            method = head.split(b" ", 1)[0].decode("latin-1")
            try:
                upstream_reader, upstream_writer = await asyncio.wait_for(
                    asyncio.open_connection(self.upstream_host, self.upstream_port), 10)
            except (OSError, TimeoutError) as error:
                raise GatewayError(502, "Bad Gateway", "TorchServe in this pod does not answer; retry") from error
            upstream_writer.write(head + early_body)
            await upstream_writer.drain()
            await self._relay(client_reader, client_writer, upstream_reader, upstream_writer, method)
        except GatewayError as error:
            LOG.info("%s %s: %s", peer, error.status, error.message)
            with contextlib.suppress(ConnectionError):
                client_writer.write(error_response(error))
                await client_writer.drain()
                await discard_upload(client_reader, client_writer)
        except ConnectionError:
            pass  # either side went away: nothing left to tell anyone
        finally:
            self.admission.release(reserved)
            for writer in (upstream_writer, client_writer):
                if writer is not None:
                    writer.close()
                    with contextlib.suppress(ConnectionError, TimeoutError):
                        await asyncio.wait_for(writer.wait_closed(), 5)

    async def _accept(self, reader: asyncio.StreamReader, peer: object) -> tuple[bytes, bytes, int] | None:
        received = await read_head(reader, self.max_head_bytes)
        if received is None:
            return None
        head, early_body = received
        start, fields = parse_head(head)
        if not authorized(header(fields, "authorization"), self.secrets.client_tokens()):
            raise GatewayError(401, "Unauthorized",
                               "send Authorization: Bearer <client token> (the gateway's token from its Secret, "
                               "not a TorchServe key)")
        forwarded = [(name, value) for name, value in fields
                     if name.lower() not in HOP_BY_HOP | {"authorization", "x-forwarded-for"}]
        client_address = peer[0] if isinstance(peer, tuple) else "unknown"
        forwarded += [("Authorization", f"Bearer {self.secrets.inference_key()}"),
                      ("X-Forwarded-For", client_address), ("Connection", "close")]
        return render_head(start, forwarded), early_body, self.admission.admit(fields)

    async def _relay(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter,
                     upstream_reader: asyncio.StreamReader, upstream_writer: asyncio.StreamWriter, method: str) -> None:
        """Body up and answer down at once (an early 413 or 100 Continue must reach the client mid-upload)."""
        upload = asyncio.create_task(pump(client_reader, upstream_writer))
        try:
            await self._answer(upstream_reader, client_writer, method)
        finally:
            upload.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await upload

    async def _answer(self, upstream_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter,
                      method: str) -> None:
        rest = b""
        while True:  # interim 1xx answers (100 Continue) pass unchanged; the final head gets Connection: close
            received = await read_head(upstream_reader, self.max_head_bytes, rest)
            if received is None:
                raise GatewayError(502, "Bad Gateway", "TorchServe closed the connection without an answer")
            head, rest = received
            status_line, *lines = head.decode("latin-1").split("\r\n")
            status = status_line.split(" ")[1] if " " in status_line else ""
            if not status.startswith("1"):
                break
            client_writer.write(head + b"\r\n\r\n")
        fields = [(name.strip(), value.strip()) for name, _, value in (line.partition(":") for line in lines)]
        kept = [f"{name}: {value}" for name, value in fields if name.lower() not in HOP_BY_HOP]
        client_writer.write(("\r\n".join([status_line, *kept, "Connection: close"]) + "\r\n\r\n").encode("latin-1"))
        # TorchServe keeps the connection open after its answer whatever the request asked, so the answer's end
        # is found from its own framing, not from the connection closing.
        body = Buffered(upstream_reader, rest)
        if method == "HEAD" or status in ("204", "304"):
            pass
        elif (length := header(fields, "content-length")) is not None:
            await body.copy_exactly(int(length), client_writer)
        elif "chunked" in (header(fields, "transfer-encoding") or "").lower():
            await body.copy_chunked(client_writer, self.max_head_bytes)
        else:
            await body.copy_to_end(client_writer)
        await client_writer.drain()


@dataclass
class Buffered:
    """A stream with bytes already read from it in front: enough to copy a response body by its framing."""

    reader: asyncio.StreamReader
    pending: bytes = b""

    async def _some(self) -> bytes:
        data, self.pending = self.pending, b""
        data = data or await self.reader.read(CHUNK)
        if not data:
            raise ConnectionError("the answer ended early")
        return data

    async def copy_exactly(self, count: int, writer: asyncio.StreamWriter) -> None:
        while count > 0:
            data = await self._some()
            data, self.pending = data[:count], data[count:]
            writer.write(data)
            count -= len(data)
            await writer.drain()

    async def _line(self, limit: int) -> bytes:
        while b"\r\n" not in self.pending:
            if len(self.pending) > limit:
                raise ConnectionError("an over-long chunk header in the answer")
            self.pending += await self._some()
        line, _, self.pending = self.pending.partition(b"\r\n")
        return line + b"\r\n"

    async def copy_chunked(self, writer: asyncio.StreamWriter, limit: int) -> None:
        while True:
            size_line = await self._line(limit)
            writer.write(size_line)
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while (trailer := await self._line(limit)) != b"\r\n":
                    writer.write(trailer)
                writer.write(b"\r\n")
                return
            await self.copy_exactly(size + 2, writer)  # the chunk and its CRLF

    async def copy_to_end(self, writer: asyncio.StreamWriter) -> None:
        writer.write(self.pending)
        self.pending = b""
        await pump(self.reader, writer)


def host_port(text: str) -> tuple[str, int]:
    host, separator, port = text.rpartition(":")
    if not separator or not port.isdigit():
        raise argparse.ArgumentTypeError(f"give HOST:PORT, not {text!r}")
    return host, int(port)


async def serve(gateway: Gateway, host: str, port: int, drain_seconds: float = 25.0) -> None:
    """Serve until SIGTERM or SIGINT; then stop accepting and give the requests in flight ``drain_seconds``."""
    connections: set[asyncio.Task] = set()

    async def tracked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        connections.add(task)
        try:
            await gateway.handle(reader, writer)
        except asyncio.CancelledError:
            writer.transport.abort()  # cut off at shutdown, after the drain period
        finally:
            connections.discard(task)

    server = await asyncio.start_server(tracked, host, port, limit=CHUNK)
    LOG.info("gateway on %s:%d -> TorchServe on %s:%d", host, port, gateway.upstream_host, gateway.upstream_port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    server.close()
    if connections:
        LOG.info("stopping: %d requests in flight get up to %.0f s", len(connections), drain_seconds)
        _, unfinished = await asyncio.wait(set(connections), timeout=drain_seconds)
        for task in unfinished:
            task.cancel()
        await asyncio.gather(*unfinished, return_exceptions=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", type=host_port, default=("0.0.0.0", 8080), help="HOST:PORT for clients")
    parser.add_argument("--upstream", type=host_port, default=("127.0.0.1", 8085),
                        help="TorchServe's inference_address in this pod (loopback)")
    parser.add_argument("--key-file", type=Path, required=True, help="TorchServe's key_file.json")
    parser.add_argument("--tokens-file", type=Path, required=True, help="client tokens, one a line (a Secret)")
    parser.add_argument("--max-body-bytes", type=int, required=True,
                        help="largest body accepted (413 above it): TorchServe's max_request_size")
    parser.add_argument("--inflight-bytes", type=int, required=True,
                        help="body bytes this pod may hold at once (507 above it): the memory budget's unit")
    parser.add_argument("--head-timeout", type=float, default=30.0, help="seconds a client has to send its head")
    args = parser.parse_args(argv)
    if args.inflight_bytes < args.max_body_bytes:
        parser.error("--inflight-bytes must be at least --max-body-bytes, or the largest request never gets in")
    logging.basicConfig(level=os.environ.get("GATEWAY_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    gateway = Gateway(Secrets(args.key_file, args.tokens_file), *args.upstream,
                      Admission(args.max_body_bytes, args.inflight_bytes), head_timeout=args.head_timeout)
    asyncio.run(serve(gateway, *args.listen))


if __name__ == "__main__":
    main()
