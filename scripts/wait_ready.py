#!/usr/bin/env python3
"""Wait until TorchServe answers for a model, then print a ready-to-paste curl with the token."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ts_client import DEFAULT_MODEL, ClientError, read_keys


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", default="http://127.0.0.1:8080")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--key-file", type=Path, help="default: ./key_file.json, else the repo root's")
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--sample", type=Path, help="an image to send once the model is up")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()

    deadline = time.monotonic() + args.timeout
    last_problem = "no answer yet"
    while time.monotonic() < deadline:
        try:
            keys = read_keys(args.key_file)
            headers = {"Authorization": f"Bearer {keys['inference']}"}
            if args.sample:
                response = requests.post(f"{args.url}/predictions/{args.model}", headers=headers,
                                         files={"image": args.sample.read_bytes()}, timeout=60)
            else:
                response = requests.get(f"{args.url}/ping", headers=headers, timeout=5)
            if response.ok:
                break
            last_problem = f"HTTP {response.status_code}: {response.text[:200]}"
        except (OSError, KeyError, ValueError, ClientError) as problem:
            last_problem = str(problem)
        time.sleep(1)
    else:
        print(f"TorchServe did not answer within {args.timeout:.0f} s ({last_problem}); see logs/", file=sys.stderr)
        return 1

    if not args.quiet:
        print(f"TorchServe is serving {args.model}. Try:\n")
        sample = args.sample or "photo.jpg"
        print(f"  curl -H 'Authorization: Bearer {keys['inference']}' \\\n"
              f"       {args.url}/predictions/{args.model} -T {sample}\n")
        print(f"Management key (scaling): {keys['management']}")
        print("Stop with: scripts/serve.sh stop")
    return 0


if __name__ == "__main__":
    sys.exit(main())
