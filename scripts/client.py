#!/usr/bin/env python3
"""A short Python client: classify images through TorchServe's inference API.

    python scripts/client.py photo1.jpg photo2.png ...          # one multipart request, entries in order
    python scripts/client.py --one-per-request big1.jpg big2.jpg   # concurrent raw requests: faster for
                                                                   # large photos (TorchServe batches them)
"""

from __future__ import annotations

import argparse
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests


def read_keys(key_file: Path = Path("key_file.json")) -> dict[str, str]:
    """TorchServe's token file: {"inference": key, "management": key, "API": key}."""
    raw = json.loads(Path(key_file).read_text())
    return {name: raw[name]["key"] for name in ("inference", "management", "API") if name in raw}


def classify(paths: list[Path], url: str = "http://127.0.0.1:8080", model: str = "resnet50",
             token: str | None = None, timeout: float = 300) -> list[dict]:
    """Send all images in one multipart request; field names must be distinct (image0, image1, ...)."""
    token = token or read_keys()["inference"]
    files = {f"image{i}": (path.name, path.read_bytes()) for i, path in enumerate(paths)}
    response = requests.post(f"{url}/predictions/{model}", files=files,
                             headers={"Authorization": f"Bearer {token}"}, timeout=timeout)
    body = response.json()
    if not response.ok:
        raise RuntimeError(f"HTTP {response.status_code}: {body}")
    return body if isinstance(body, list) else [body]


def classify_one_per_request(paths: list[Path], url: str = "http://127.0.0.1:8080", model: str = "resnet50",
                             token: str | None = None, timeout: float = 300, concurrency: int = 32) -> list[dict]:
    """One raw-body request per image, sent concurrently; TorchServe batches them into one handler call.

    For large photos this beats one multipart request: TorchServe's frontend parses a big multipart body slowly.
    A failed image comes back as its {"error": ...} entry, like in a multipart answer.
    """
    token = token or read_keys()["inference"]
    headers = {"Authorization": f"Bearer {token}"}

    def send(path: Path) -> dict:
        response = requests.put(f"{url}/predictions/{model}", data=path.read_bytes(), headers=headers, timeout=timeout)
        body = response.json()
        return body[0] if isinstance(body, list) else body

    with ThreadPoolExecutor(max_workers=max(1, min(concurrency, len(paths)))) as pool:
        return list(pool.map(send, paths))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="+", type=Path)
    parser.add_argument("--url", default="http://127.0.0.1:8080")
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--key-file", type=Path, default=Path("key_file.json"))
    parser.add_argument("--one-per-request", action="store_true",
                        help="send each image as its own concurrent request (faster for large photos)")
    args = parser.parse_args()
    token = read_keys(args.key_file)["inference"]
    send = classify_one_per_request if args.one_per_request else classify
    entries = send(args.images, args.url, args.model, token)
    for path, entry in zip(args.images, entries, strict=True):
        if "error" in entry:
            print(f"{path}: error {entry['error']['status']}: {entry['error']['message']}")
        else:
            best = entry["topk"][0]
            print(f"{path}: {best['label']} ({best['score']:.3f})")


if __name__ == "__main__":
    main()
