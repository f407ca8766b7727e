"""Classify images through TorchServe: the library behind the image-batch-client command (no torch, no TorchServe).

    from image_batch_client import Client, read_keys
    client = Client(token=read_keys()["inference"])        # the server scripts/serve.sh starts
    entries = client.classify([Path("a.jpg"), Path("b.png")])
    # one entry per image, in input order: {"topk": [...]} or {"error": {"status", "message"}}
    vectors = Client(token=..., outputs=("embedding",)).classify(paths)   # {"embedding": [...]} per image

By default a batch travels as Open Inference Protocol binary requests (raw image bytes after a small
JSON header: nothing to base64-encode, nothing for TorchServe's frontend to parse), split into
several requests of at most ``max_images`` images / ``max_bytes`` bytes, sent concurrently; TorchServe
batches them into one handler call again (``batchSize``). docs/benchmarks.md has the measurements
behind these defaults. A bad image is an entry, never an exception; ClientError means the server or
the request failed (not running, wrong key, unknown model, ...), with a message for a person.

A request TorchServe refuses for now (HTTP 503: its queue is full or the model has no worker) is sent
again after a jittered, doubling wait, at most ``retries`` times; so is one whose connection was refused or
dropped after this client has had an answer from the server (a restart). Every retry is recorded in
``client.retried`` (and passed to ``on_retry``); ``retries=0`` turns retrying off. Inference requests are
idempotent, so sending one again changes nothing but the time it takes. Over gRPC nothing is retried:
TorchServe 0.12 answers a full queue there with INTERNAL, the code of any other failure.
"""

from __future__ import annotations

import base64
import json
import random
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from image_batch_client import oip

DEFAULT_URL = "http://127.0.0.1:8080"
DEFAULT_MODEL = "efficientnet_lite0"  # what scripts/serve.sh serves by default
KEY_FILE_NAME = "key_file.json"
# oip-binary: OIP with binary data; oip-json: OIP with base64 strings; json: {"images": [base64, ...]};
# multipart: fields image0..; raw: one image per request as the body; grpc: OIP binary over TorchServe's gRPC API.
TRANSPORTS = ("oip-binary", "oip-json", "json", "multipart", "raw", "grpc")
DEFAULT_TRANSPORT = "oip-binary"
OUTPUTS = ("topk", "embedding")  # what an entry may hold: the top-k classes, the image's embedding
DEFAULT_OUTPUTS = ("topk",)  # what the server answers when a request names no outputs
# Split so that no request is big: TorchServe's frontend moves one 100 MB body at ~55 MB/s but 16 bodies of
# 6.5 MB at ~300 MB/s (docs/benchmarks.md). Small photos: one request of up to 32 images is as fast as any split.
DEFAULT_MAX_IMAGES = 32  # images per request; the server's own limit is max_images_per_request (64)
DEFAULT_MAX_BYTES = 8_000_000  # bytes of images per request (a request holds at least one image)
DEFAULT_CONCURRENCY = 16  # requests in flight; TorchServe batches up to batchSize of them per handler call
# Retrying a refused request: waits of 0.5, 1, 2, 4, 8 s at most (each at least half of that, the rest random,
# so that clients refused together do not come back together): 15.5 s in all (README, "Bursts and 503").
DEFAULT_RETRIES = 5
DEFAULT_RETRY_DELAY = 0.5  # s, the longest first wait; it doubles with each retry ...
DEFAULT_RETRY_DELAY_MAX = 8.0  # ... up to this
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})


class ClientError(Exception):
    """The server or the request failed, not an image: the message says what to do."""


@dataclass(frozen=True)
class Retry:
    """One request sent again: why it was refused, the how-manieth retry of that request, the wait before it."""

    reason: str  # "HTTP 503", "connection refused" or "connection lost"
    detail: str  # TorchServe's message, or the connection error
    attempt: int  # 1 for a request's first retry
    delay_s: float


class _Refused(Exception):
    """TorchServe refused a request for now (or stopped answering): worth sending again after a wait."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def retry_delay(attempt: int, first: float, longest: float, rng: random.Random) -> float:
    """The wait before a request's ``attempt``-th retry: half of min(longest, first × 2^(attempt-1)) for sure,
    the other half drawn at random ("equal jitter": a bounded wait that still spreads the clients out)."""
    ceiling = min(longest, first * 2 ** (attempt - 1))
    return ceiling / 2 + rng.uniform(0, ceiling / 2)


def longest_wait(retries: int, first: float, longest: float) -> float:
    """The most one request can wait in all before the client gives up on it."""
    return sum(min(longest, first * 2 ** (attempt - 1)) for attempt in range(1, retries + 1))


def find_key_file(key_file: Path | None = None) -> Path:
    """The key file to use, from any working directory: the one given, else ./key_file.json (TorchServe
    writes it where it starts), else the repository root's when this package is that repository's client/
    (an editable install: scripts/serve.sh starts TorchServe in the repository root)."""
    if key_file is not None:
        candidates = [Path(key_file)]
    else:
        candidates = [Path.cwd() / KEY_FILE_NAME, *filter(None, [checkout_key_file()])]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    looked = " or ".join(str(c) for c in dict.fromkeys(candidates))
    raise ClientError(f"no TorchServe key file at {looked}. TorchServe writes it where it starts: start the "
                      "server with scripts/serve.sh, or pass --key-file PATH")


def checkout_key_file() -> Path | None:
    """<repository>/key_file.json when this package runs from the repository's client/ folder, else None."""
    root = Path(__file__).resolve().parents[2]
    return root / KEY_FILE_NAME if (root / "scripts" / "serve.sh").is_file() else None


def read_keys(key_file: Path | None = None) -> dict[str, str]:
    """TorchServe's token file as {"inference": key, "management": key, "API": key}."""
    path = find_key_file(key_file)
    try:
        raw = json.loads(path.read_text())
        return {name: raw[name]["key"] for name in ("inference", "management", "API") if name in raw}
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ClientError(f"cannot read the keys in {path}: {error}") from None


def image_files(paths: Sequence[Path], skipped: list[Path] | None = None) -> list[Path]:
    """Files named, and image files found in the directories named (recursively, sorted; hidden files and folders
    are not searched). Files in those directories without an image suffix are left out and added to ``skipped``."""
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            visible = sorted(p for p in path.rglob("*") if p.is_file()
                             and not any(part.startswith(".") for part in p.relative_to(path).parts))
            found += [p for p in visible if p.suffix.lower() in IMAGE_SUFFIXES]
            if skipped is not None:
                skipped += [p for p in visible if p.suffix.lower() not in IMAGE_SUFFIXES]
        elif path.is_file():
            found.append(path)
        else:
            raise ClientError(f"{path}: no such file or directory")
    return found


class Client:
    """Send images to one model; ``classify`` returns one entry per image, in input order."""

    def __init__(self, url: str = DEFAULT_URL, model: str = DEFAULT_MODEL, token: str | None = None,
                 transport: str = DEFAULT_TRANSPORT, max_images: int = DEFAULT_MAX_IMAGES,
                 max_bytes: int = DEFAULT_MAX_BYTES, concurrency: int = DEFAULT_CONCURRENCY,
                 topk: int | None = None, timeout: float = 300, grpc_address: str | None = None,
                 outputs: Sequence[str] = DEFAULT_OUTPUTS, retries: int = DEFAULT_RETRIES,
                 retry_delay: float = DEFAULT_RETRY_DELAY, retry_delay_max: float = DEFAULT_RETRY_DELAY_MAX,
                 on_retry: Callable[[Retry], None] | None = None) -> None:
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}; got {transport!r}")
        if min(max_images, max_bytes, concurrency) < 1:
            raise ValueError("max_images, max_bytes and concurrency must be at least 1")
        if not outputs or not set(outputs) <= set(OUTPUTS):
            raise ValueError(f"outputs must name one or more of {', '.join(OUTPUTS)}; got {list(outputs)}")
        if (topk is not None or set(outputs) != set(DEFAULT_OUTPUTS)) and transport == "raw":
            raise ValueError("options (topk, outputs) cannot travel with a raw body; choose another transport")
        if retries < 0 or not 0 < retry_delay <= retry_delay_max:
            raise ValueError("retries must be 0 (off) or more, and 0 < retry_delay <= retry_delay_max; got "
                             f"{retries}, {retry_delay}, {retry_delay_max}")
        self.url = url.rstrip("/")
        self.model = model
        self.transport = transport
        self.max_images = 1 if transport == "raw" else max_images
        self.max_bytes = max_bytes
        self.concurrency = concurrency
        self.topk = topk
        self.outputs = tuple(outputs)
        self.timeout = timeout
        self.retries, self.retry_delay, self.retry_delay_max = retries, retry_delay, retry_delay_max
        self.on_retry = on_retry
        self.retried: list[Retry] = []  # every retry of every request, in the order they were decided
        self._retry_lock = threading.Lock()
        self._rng = random.Random()
        self._answered = False  # once the server has answered, a refused connection means it restarts
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._local = threading.local()
        self._grpc = None
        if transport == "grpc":
            try:
                from image_batch_client.grpc_transport import DEFAULT_ADDRESS, GrpcPredictions
            except ImportError as missing:
                raise ClientError(f"the grpc transport needs grpcio and protobuf ({missing}): pip install grpcio "
                                  "protobuf (the client's grpc extra), or use the default transport") from None
            self.grpc_address = grpc_address or DEFAULT_ADDRESS
            self._grpc = GrpcPredictions(self.grpc_address, token)

    def classify(self, images: Sequence[bytes | Path], progress: Callable[[int], None] | None = None) -> list[dict]:
        """One entry per image, in order. ``images`` are bytes or paths; ``progress(n)`` hears of n more done."""
        chunks = self.plan([_size(image) for image in images])

        def send(bounds: tuple[int, int]) -> list[dict]:
            payloads = [_read(image) for image in images[bounds[0]: bounds[1]]]
            entries = self._send(payloads)
            if progress is not None:
                progress(len(payloads))
            return entries

        if len(chunks) <= 1:
            return send(chunks[0]) if chunks else []
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(chunks))) as pool:
            return [entry for entries in pool.map(send, chunks) for entry in entries]

    def plan(self, sizes: Sequence[int]) -> list[tuple[int, int]]:
        """Consecutive (start, end) slices of at most max_images images and max_bytes bytes (one image at least)."""
        chunks, start, total = [], 0, 0
        for index, size in enumerate(sizes):
            if index > start and (index - start >= self.max_images or total + size > self.max_bytes):
                chunks.append((start, index))
                start, total = index, 0
            total += size
        if sizes:
            chunks.append((start, len(sizes)))
        return chunks

    @property
    def max_retry_wait_s(self) -> float:
        """The most one request waits between its attempts before the client gives up on it."""
        return longest_wait(self.retries, self.retry_delay, self.retry_delay_max)

    def close(self) -> None:
        if self._grpc is not None:
            self._grpc.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ----------------------------------------------------------------------------------- transports

    def _send(self, payloads: list[bytes]) -> list[dict]:
        """One request's entries, sent again while TorchServe refuses it for now, within the retry bound."""
        started = time.monotonic()
        for attempt in range(1, self.retries + 2):
            try:
                return self._send_once(payloads)
            except _Refused as refusal:
                if attempt > self.retries:
                    raise ClientError(self._gave_up(refusal, attempt, time.monotonic() - started)) from None
                with self._retry_lock:
                    retry = Retry(refusal.reason, refusal.detail, attempt,
                                  retry_delay(attempt, self.retry_delay, self.retry_delay_max, self._rng))
                    self.retried.append(retry)
                if self.on_retry is not None:
                    self.on_retry(retry)
                time.sleep(retry.delay_s)
        raise AssertionError("unreachable")

    def _gave_up(self, refusal: _Refused, attempts: int, elapsed: float) -> str:
        if refusal.reason.startswith("connection"):
            what = (f"TorchServe at {self.url} stopped answering ({refusal.detail}) while this client ran. Is it "
                    "restarting or stopped? Start it with scripts/serve.sh")
        else:
            what = (f"TorchServe refused the request ({refusal.reason}: {refusal.detail}). The model's queue is full "
                    "or it has no worker: send fewer requests at once (--concurrency), check its workers, or try "
                    "again later (README, \"Bursts and 503\"; \"Prediction failed\" means the handler raised: "
                    "see the server's logs/model_log.log)")
        if self.retries == 0:
            return f"{what}; retrying is off (--retries 0)"
        return f"{what}; gave up after {attempts} attempts in {elapsed:.1f} s ({self.retries} retries)"

    def _send_once(self, payloads: list[bytes]) -> list[dict]:
        if self.transport == "grpc":
            return self._send_grpc(payloads)
        url = f"{self.url}/predictions/{self.model}"
        headers = dict(self._headers)
        if self.transport in ("oip-binary", "oip-json"):
            url = f"{self.url}/v2/models/{self.model}/infer"
            body, length = self._oip_body(payloads, binary=self.transport == "oip-binary")
            headers["Content-Type"] = oip.BINARY_CONTENT_TYPE if length is not None else oip.JSON_CONTENT_TYPE
            if length is not None:
                headers[oip.HEADER_LENGTH] = str(length)
            response = self._post(url, data=body, headers=headers)
        elif self.transport == "json":
            body: dict[str, Any] = {"images": [base64.b64encode(p).decode() for p in payloads]}
            if self.outputs != DEFAULT_OUTPUTS:
                body["outputs"] = list(self.outputs)
            if self.topk is not None:
                body["topk"] = self.topk
            response = self._post(url, json=body, headers=headers)
        elif self.transport == "multipart":
            files: dict[str, Any] = {f"image{i}": (f"image{i}", p, "application/octet-stream")
                                     for i, p in enumerate(payloads)}
            if self.outputs != DEFAULT_OUTPUTS:
                files["outputs"] = (None, ",".join(self.outputs))
            if self.topk is not None:
                files["topk"] = (None, str(self.topk))
            response = self._post(url, files=files, headers=headers)
        else:  # raw: one image, the body itself (options cannot travel with a raw body)
            headers["Content-Type"] = "application/octet-stream"
            response = self._post(url, data=payloads[0], headers=headers)
        return self._entries(response.status_code, response.content, response.headers.get(oip.HEADER_LENGTH),
                             len(payloads))

    def _oip_body(self, payloads: list[bytes], binary: bool, binary_outputs: bool | None = None
                  ) -> tuple[bytes, int | None]:
        """An OIP request. ``predictions`` is always asked for: it carries each failed image's error."""
        data = payloads if binary else [base64.b64encode(p).decode() for p in payloads]
        tensor = oip.Tensor("images", oip.BYTES, (len(payloads),), data)
        parameters = {"topk": self.topk} if self.topk is not None else None
        as_binary = binary if binary_outputs is None else binary_outputs
        outputs = [oip.RequestedOutput("predictions", as_binary)]
        if "embedding" in self.outputs:
            outputs.append(oip.RequestedOutput("embeddings", as_binary))
        return oip.build_request([tensor], binary, outputs, parameters)

    def _send_grpc(self, payloads: list[bytes]) -> list[dict]:
        import grpc

        # JSON output: gRPC carries no response headers, so a binary response's header length would be lost.
        body, _ = self._oip_body(payloads, binary=True, binary_outputs=False)
        try:
            answer = self._grpc.predict(self.model, {"body": body}, timeout=self.timeout)
        except grpc.RpcError as error:
            # Not retried: TorchServe 0.12 answers a full queue over gRPC with INTERNAL, like any other failure.
            raise ClientError(_describe_grpc(error, self.grpc_address)) from None
        status = 200
        try:
            parsed = json.loads(answer)
            if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
                status = int(parsed["error"].get("status", 500))  # the HTTP status does not travel over gRPC
        except (ValueError, TypeError):
            pass
        return self._entries(status, answer, None, len(payloads))

    def _post(self, url: str, **kwargs: Any) -> requests.Response:
        if not hasattr(self._local, "session"):
            self._local.session = requests.Session()
        try:
            response = self._local.session.post(url, timeout=self.timeout, **kwargs)
        except requests.ConnectTimeout:
            raise ClientError(f"TorchServe at {self.url} did not accept a connection within {self.timeout:.0f} s"
                              ) from None
        except requests.ConnectionError as error:
            if self._answered:  # it answered before: a server that restarts, or a connection it dropped
                reason = "connection refused" if _reason(error) == "connection refused" else "connection lost"
                raise _Refused(reason, _reason(error)) from None
            raise ClientError(f"cannot reach TorchServe at {self.url} ({_reason(error)}). Is it running? "
                              "Start it with scripts/serve.sh") from None
        except requests.Timeout:
            raise ClientError(f"TorchServe at {self.url} did not answer within {self.timeout:.0f} s") from None
        self._answered = True
        if response.status_code == 503:
            raise _Refused("HTTP 503", _torchserve_message(response.content))
        return response

    def _entries(self, status: int, body: bytes, header_length: str | None, count: int) -> list[dict]:
        """The per-image entries of one answer; ClientError unless they are there, one per image."""
        try:
            answer: Any = _decode(body, header_length)
        except (ValueError, oip.OipError) as error:
            raise ClientError(f"TorchServe answered HTTP {status} with a body this client cannot read: {error}") \
                from None
        if status != 200:
            if count == 1 and _is_entry_error(answer):
                return [answer]  # a one-image request takes its image's status: that is the image's entry
            raise ClientError(_describe_http(status, answer, self.model))
        entries = answer.get("predictions") if isinstance(answer, dict) else answer
        if not isinstance(entries, list) or len(entries) != count or not all(isinstance(e, dict) for e in entries):
            raise ClientError(f"TorchServe answered {_preview(answer)} for {count} images; expected one entry each")
        if "topk" not in self.outputs:  # an OIP answer's predictions carry top-k beside the errors
            entries = [{k: v for k, v in entry.items() if k != "topk"} for entry in entries]
        return entries


def _decode(body: bytes, header_length: str | None) -> Any:
    """A JSON answer, or an Open Inference Protocol answer as a list of entries: its ``predictions``, with
    each good image's row of the ``embeddings`` output (when asked for) as the entry's "embedding"."""
    if header_length is not None:
        outputs = oip.split_response(body, header_length)
    else:
        answer = json.loads(body)
        if not (isinstance(answer, dict) and "outputs" in answer):
            return answer
        outputs = oip.split_response(body, None)
    if "predictions" not in outputs:
        raise oip.OipError("the response has no \"predictions\" output")
    entries = [json.loads(element) for element in outputs["predictions"].data]
    if "embeddings" in outputs:
        tensor = outputs["embeddings"]
        width = tensor.shape[1] if len(tensor.shape) == 2 else 0
        for row, entry in enumerate(entries):
            if "error" not in entry:
                entry["embedding"] = list(tensor.data[row * width: (row + 1) * width])
    return entries


def _is_entry_error(answer: Any) -> bool:
    error = answer.get("error") if isinstance(answer, dict) else None
    return isinstance(error, dict) and isinstance(error.get("status"), int) and isinstance(error.get("message"), str)


def _describe_http(status: int, answer: Any, model: str) -> str:
    """A person's message for a failed request; TorchServe's own errors are {"code", "type", "message"}."""
    kind = answer.get("type", "") if isinstance(answer, dict) else ""
    message = answer.get("message") if isinstance(answer, dict) else None
    if _is_entry_error(answer):
        message = answer["error"]["message"]
    detail = f"HTTP {status}{' ' + kind if kind else ''}: {message or _preview(answer)}"
    if kind == "InvalidKeyException" or status == 401:
        return (f"TorchServe refused the inference key ({detail}). Keys expire (token_expiration_min, 60 min by "
                "default): use the current key_file.json, or restart the server with scripts/serve.sh")
    if status == 404:
        return f"TorchServe does not serve a model named {model!r} ({detail}); choose one with --model"
    if status == 413:
        return f"the request is too large for the server ({detail}); send fewer or smaller images per request"
    return f"TorchServe could not answer the request ({detail})"


def _describe_grpc(error: Any, target: str) -> str:
    import grpc

    code, details = error.code(), error.details()
    if code == grpc.StatusCode.UNAVAILABLE:
        return f"cannot reach TorchServe's gRPC API at {target} ({details}). Is it running?"
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return f"TorchServe refused the inference key over gRPC ({details})"
    return f"TorchServe's gRPC API failed: {code.name}: {details}"


def _reason(error: Exception) -> str:
    text = str(error)
    return "connection refused" if "refused" in text.lower() else text[:200]


def _torchserve_message(body: bytes) -> str:
    """The message of TorchServe's own error body ({"code", "type", "message"}), else the body's start."""
    try:
        answer = json.loads(body)
    except ValueError:
        return body[:200].decode("utf-8", "replace")
    message = answer.get("message") if isinstance(answer, dict) else None
    return message if isinstance(message, str) else _preview(answer)


def _preview(value: Any, length: int = 200) -> str:
    text = json.dumps(value) if not isinstance(value, bytes) else repr(value)
    return text if len(text) <= length else text[:length] + "..."


def _size(image: bytes | Path) -> int:
    return len(image) if isinstance(image, (bytes, bytearray)) else Path(image).stat().st_size


def _read(image: bytes | Path) -> bytes:
    return bytes(image) if isinstance(image, (bytes, bytearray)) else Path(image).read_bytes()


# ---------------------------------------------------------------------------------------- one-call helpers


def classify(paths: Sequence[bytes | Path], url: str = DEFAULT_URL, model: str = DEFAULT_MODEL,
             token: str | None = None, timeout: float = 300, transport: str = "multipart") -> list[dict]:
    """All images in ONE request of the given transport (multipart fields image0..N by default)."""
    token = token or read_keys()["inference"]
    with Client(url, model, token, transport, max_images=max(1, len(paths)), max_bytes=2**62,
                timeout=timeout) as client:
        return client.classify(paths)


def classify_one_per_request(paths: Sequence[bytes | Path], url: str = DEFAULT_URL, model: str = DEFAULT_MODEL,
                             token: str | None = None, timeout: float = 300, concurrency: int = 32) -> list[dict]:
    """One raw-body request per image, sent concurrently; TorchServe batches them into one handler call."""
    token = token or read_keys()["inference"]
    with Client(url, model, token, "raw", concurrency=concurrency, timeout=timeout) as client:
        return client.classify(paths)
