"""Classify images with the model TorchServe serves: one answer per image, in input order.

    image-batch-client photo.jpg more_photos/              # a readable line per image
    image-batch-client --jsonl more_photos/ > answers.jsonl   # one JSON object per image, nothing else
    image-batch-client --model NAME --url http://HOST:8080 --key-file PATH photo.jpg
    image-batch-client --outputs embedding --jsonl photos/ > vectors.jsonl   # image embeddings
    (python -m image_batch_client ... is the same command)

Works from any directory: the key file is --key-file, else ./key_file.json, else the repository root's when the
client is installed from a checkout's client/ folder (where scripts/serve.sh starts TorchServe). Files in the
directories named that have no image suffix are skipped, and listed on stderr. By default images travel as Open
Inference Protocol binary requests of up to 32 images and 8 MB, sent concurrently (the fastest measured way; the
repository's docs/benchmarks.md).
A request TorchServe refuses for now (503: its queue is full, or the model has no worker) is sent again
after a jittered, doubling wait, 5 times at most (--retries N; --no-retry turns it off); each retry is a
line on stderr and the summary counts them.
Exit status: 0 when every image got its answer (a bad image's answer is its error line), 1 when the
server or a request failed (not running, wrong key, unknown model, still refused after the retries),
2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from image_batch_client.client import (
    DEFAULT_CONCURRENCY,
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_IMAGES,
    DEFAULT_MODEL,
    DEFAULT_RETRIES,
    DEFAULT_TRANSPORT,
    DEFAULT_URL,
    IMAGE_SUFFIXES,
    OUTPUTS,
    TRANSPORTS,
    Client,
    ClientError,
    Retry,
    image_files,
    read_keys,
)


class Progress:
    """A one-line progress bar on a terminal's stderr; silent when stderr is not a terminal."""

    def __init__(self, total: int, stream: TextIO = sys.stderr, width: int = 30) -> None:
        self.total, self.done, self.stream, self.width = total, 0, stream, width
        self.started = time.monotonic()
        self.enabled = stream.isatty()
        self._lock = threading.Lock()  # requests finish, and are retried, on the client's threads

    def __call__(self, count: int) -> None:
        with self._lock:
            self.done += count
            self._draw()

    def note(self, message: str) -> None:
        """A line of its own on stderr, above the bar."""
        with self._lock:
            self.stream.write(("\r\033[K" if self.enabled else "") + message + "\n")
            self._draw()

    def _draw(self) -> None:
        if self.enabled:
            filled = self.width * self.done // max(1, self.total)
            elapsed = time.monotonic() - self.started
            self.stream.write(f"\r[{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total} images "
                              f"{elapsed:.1f} s")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.done:
            self.stream.write("\n")


def retry_line(retry: Retry, retries: int) -> str:
    return f"retry {retry.attempt} of {retries} in {retry.delay_s:.1f} s: {retry.reason} ({retry.detail})"


def retry_summary(retried: Sequence[Retry]) -> str:
    """", 7 retries (HTTP 503: 7)" for the summary line; nothing when no request was retried."""
    if not retried:
        return ""
    reasons = ", ".join(f"{reason}: {count}" for reason, count in Counter(r.reason for r in retried).items())
    return f", {len(retried)} retr{'y' if len(retried) == 1 else 'ies'} ({reasons})"


def skipped_line(skipped: Sequence[Path], shown: int = 5) -> str:
    """Files found in the folders given but not sent, because their names do not end in an image suffix."""
    names = ", ".join(str(path) for path in skipped[:shown]) + (f", ... ({len(skipped) - shown} more)"
                                                                 if len(skipped) > shown else "")
    suffixes = " ".join(sorted(IMAGE_SUFFIXES))
    return (f"skipped {len(skipped)} file{'s' if len(skipped) != 1 else ''} without an image suffix ({suffixes}): "
            f"{names}; name a file on the command line to send it anyway")


def readable(path: Path, entry: dict) -> str:
    if "error" in entry:
        return f"{path}: error {entry['error'].get('status')}: {entry['error'].get('message')}"
    if "topk" not in entry:
        vector = entry["embedding"]
        return f"{path}: embedding of {len(vector)} values [{', '.join(f'{v:.4f}' for v in vector[:4])}, ...]"
    best, *others = entry["topk"]
    runners_up = ", ".join(f"{item['label']} {item['score']:.3f}" for item in others[:2])
    return f"{path}: {best['label']} ({best['score']:.3f})" + (f"   [then {runners_up}]" if runners_up else "")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="image-batch-client", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="+", type=Path, help="image files or directories (searched recursively)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"model name (default {DEFAULT_MODEL})")
    parser.add_argument("--url", default=DEFAULT_URL, help=f"TorchServe inference URL (default {DEFAULT_URL})")
    parser.add_argument("--key-file", type=Path,
                        help="TorchServe's key_file.json (default: ./key_file.json, else the checkout's)")
    parser.add_argument("--jsonl", action="store_true",
                        help='print one JSON object per image, {"file": ..., plus its entry}, and nothing else')
    parser.add_argument("--topk", type=int, help="classes per image (default: the server's, 5)")
    parser.add_argument("--outputs", default="topk", help="what to ask for per image: topk, embedding, or "
                                                          "topk,embedding (default topk)")
    parser.add_argument("--transport", choices=TRANSPORTS, default=DEFAULT_TRANSPORT,
                        help=f"how images travel (default {DEFAULT_TRANSPORT})")
    parser.add_argument("--one-per-request", dest="transport", action="store_const", const="raw",
                        help="same as --transport raw: each image its own request")
    parser.add_argument("--max-images", type=int, default=DEFAULT_MAX_IMAGES, help="images per request at most")
    parser.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES, help="image bytes per request at most")
    parser.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY, help="requests in flight")
    parser.add_argument("--grpc-address", default="127.0.0.1:7070", help="for --transport grpc")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per request")
    parser.add_argument("--retries", type=int, default=DEFAULT_RETRIES,
                        help=f"times a request refused with 503 (or whose server restarts) is sent again, after "
                             f"waits of about 0.5, 1, 2, 4, 8 s (default {DEFAULT_RETRIES}; 0 turns retrying off)")
    parser.add_argument("--no-retry", dest="retries", action="store_const", const=0, help="same as --retries 0")
    args = parser.parse_args(argv)
    missing = [str(path) for path in args.images if not path.exists()]
    if missing:
        parser.error(f"no such file or directory: {', '.join(missing)}")
    if min(args.max_images, args.max_bytes, args.concurrency) < 1 or (args.topk is not None and args.topk < 1):
        parser.error("--max-images, --max-bytes, --concurrency and --topk must be at least 1")
    if args.retries < 0:
        parser.error("--retries must be 0 (no retrying) or more")
    args.outputs = tuple(name.strip() for name in args.outputs.split(","))
    if not set(args.outputs) <= set(OUTPUTS):
        parser.error(f"--outputs takes {', '.join(OUTPUTS)} (comma-separated); got {','.join(args.outputs)}")
    if (args.topk is not None or args.outputs != ("topk",)) and args.transport == "raw":
        parser.error("--topk and --outputs cannot travel with raw bodies (--one-per-request); choose another "
                     "--transport")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    try:
        skipped: list[Path] = []
        files = image_files(args.images, skipped)
        if skipped:
            print(skipped_line(skipped), file=sys.stderr)
        if not files:
            print(f"no image files in {', '.join(map(str, args.images))}", file=sys.stderr)
            return 2
        keys = read_keys(args.key_file)
        if "inference" not in keys:
            raise ClientError("the key file has no inference key")
        progress = Progress(len(files))
        with Client(args.url, args.model, keys["inference"], args.transport, args.max_images, args.max_bytes,
                    args.concurrency, args.topk, args.timeout, args.grpc_address, args.outputs, args.retries,
                    on_retry=lambda retry: progress.note(retry_line(retry, args.retries))) as client:
            try:
                entries = client.classify(files, progress=progress)
            finally:
                progress.close()
    except ClientError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    for path, entry in zip(files, entries, strict=True):
        print(json.dumps({"file": str(path), **entry}) if args.jsonl else readable(path, entry))
    failed = sum("error" in entry for entry in entries)
    images = f"{len(files)} image{'s' if len(files) != 1 else ''}"
    print(f"{images}: {len(files) - failed} answered, {failed} with an error ({time.monotonic() - started:.1f} s)"
          f"{retry_summary(client.retried)}", file=sys.stderr)
    return 0
