#!/usr/bin/env python3
"""The serving ceiling: how fast TorchServe's frontend moves a batch of photos, per format, next to the
time our handler itself needs for that batch.

A do-nothing archive (its handler reads no image: it counts the images of each request and answers
placeholder entries in the request's own format) is served by a private TorchServe (own ports, token
auth on, the frontend settings of model-config.yaml: batchSize, maxBatchDelay, one worker). A batch of
N photos is sent in each format, as one request or split into R concurrent requests (TorchServe
batches them again), through the client package (image_batch_client):

  raw         one image per request as the body (only as N requests)
  multipart   fields image0..                       json        {"images": [base64, ...]}
  oip-json    Open Inference Protocol, base64 in JSON   oip-binary  OIP binary data extension
  grpc        TorchServe's gRPC Predictions API carrying an OIP binary body
  client      image_batch_client.Client's defaults: what the image-batch-client command does

Rounds run every case once in turn (machine noise hits all alike); the table gives the median time per
batch. The handler's own time per batch is measured in this process: our engine with the model and
settings packed in our archive (built by scripts/build_mar.py), same images, no HTTP.

    python bench/bench_transport.py               # 32 photos per set, 1/4/8/32 requests, 7 rounds
    python bench/bench_transport.py --quick       # smoke run: 8 photos, 2 rounds; recommends nothing
"""

from __future__ import annotations

import argparse
import math
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from bench_common import (
    DEFAULT_OUT,
    REPO,
    SET_TITLES,
    format_table,
    load_set,
    machine_info,
    new_figure,
    percentile,
    save_figure,
    write_json,
)
from tqdm import tqdm

from image_batch_client.client import Client, ClientError
from tests.harness.ts_server import TorchServe

NOOP = "noop"
FORMATS = ("raw", "multipart", "json", "oip-json", "oip-binary", "grpc")
CLIENT = "client"
NOOP_HANDLER = '''\
"""Answers every request without reading an image: the transport benchmark's do-nothing model."""

import json
import math

from image_batch_client import oip

ENTRY = {"topk": [{"label": "noop", "index": 0, "score": 1.0}]}
OPTIONS = {"topk", "outputs"}  # multipart fields that are not images


def handle(data, context):
    if data is None:
        return None
    return [_answer(row, index, context) for index, row in enumerate(data)]


def _answer(row, index, context):
    body = row.get("body")
    if isinstance(body, (bytes, bytearray)) and body[:1] == b"{":
        length = next((value for key, value in context.get_all_request_header(index).items()
                       if key.lower() == oip.HEADER_LENGTH.lower()), None)
        header, _ = oip.split_body(body, length, max_depth=32)  # the images are not looked at
        body = json.loads(bytes(header))
    if isinstance(body, dict) and "inputs" in body:
        count = sum(math.prod(tensor["shape"]) for tensor in body["inputs"])
        binary_output = body.get("parameters", {}).get("binary_data_output", False)
        binary = {out["name"] for out in body.get("outputs", [{"name": "predictions"}])
                  if out.get("parameters", {}).get("binary_data", binary_output)}
        tensor = oip.Tensor("predictions", oip.BYTES, (count,), [json.dumps(ENTRY).encode()] * count)
        answer, length = oip.encode_response("noop", body.get("id"), [tensor], binary)
        if length is not None:
            context.set_response_header(index, oip.HEADER_LENGTH, str(length))
            context.set_response_content_type(index, oip.BINARY_CONTENT_TYPE)
            return answer
        context.set_response_content_type(index, oip.JSON_CONTENT_TYPE)
        return answer.decode()
    count = len(body["images"]) if isinstance(body, dict) else 1 if "body" in row else len(set(row) - OPTIONS)
    context.set_response_content_type(index, oip.JSON_CONTENT_TYPE)
    return json.dumps([ENTRY] * count)
'''


def build_noop_archive(store: Path) -> str:
    """model_store/noop.mar: the do-nothing handler with the wire format (image_batch_client/oip.py), and
    model-config.yaml's frontend keys."""
    store.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        stage = Path(tmp)
        (stage / "noop_handler.py").write_text(NOOP_HANDLER)
        (stage / "weights.bin").write_bytes(b"none")
        package = stage / "package" / "image_batch_client"
        package.mkdir(parents=True)
        for name in ("__init__.py", "oip.py"):
            (package / name).write_bytes((REPO / "client" / "image_batch_client" / name).read_bytes())
        settings = yaml.safe_load((REPO / "model-config.yaml").read_text()) or {}
        settings.pop("handler", None)
        (stage / "config.yaml").write_text(yaml.safe_dump(settings))
        subprocess.run([sys.executable, "-m", "model_archiver.model_packaging", "--model-name", NOOP,
                        "--version", "1.0", "--serialized-file", str(stage / "weights.bin"),
                        "--handler", str(stage / "noop_handler.py"), "--extra-files", str(stage / "package"),
                        "--config-file", str(stage / "config.yaml"), "--export-path", str(store), "--force"],
                       check=True, capture_output=True)
    return f"{NOOP}.mar"


def clients(server: TorchServe, count: int, splits: Sequence[int]) -> dict[tuple[str, int], Client]:
    """(format, requests per batch) -> a client that sends a batch of ``count`` images that way."""
    token = server.keys["inference"]
    common = {"url": server.inference_url, "model": NOOP, "token": token, "timeout": 600,
              "grpc_address": server.grpc_inference_address}
    result = {}
    for split in splits:
        per_request = math.ceil(count / split)
        for transport in FORMATS:
            if transport == "raw" and per_request != 1:
                continue
            result[(transport, split)] = Client(transport=transport, max_images=per_request, max_bytes=2**62,
                                                concurrency=split, **common)
    default = Client(**common)
    result[(CLIENT, 0)] = default
    return result


def timed(client: Client, images: list[bytes]) -> tuple[float, int]:
    """Seconds for one batch, and how many images were answered with a proper entry."""
    started = time.perf_counter()
    try:
        entries = client.classify(images)
    except ClientError as error:
        print(f"\n{client.transport}: {error}", file=sys.stderr)
        return time.perf_counter() - started, 0
    elapsed = time.perf_counter() - started
    return elapsed, sum(1 for entry in entries if "topk" in entry)


def measure(server: TorchServe, args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for set_name in args.sets:
        images = load_set(set_name, args.images)
        megabytes = sum(map(len, images)) / 1e6
        cases = clients(server, len(images), args.splits)
        samples: dict[tuple[str, int], list[float]] = {case: [] for case in cases}
        answered = dict.fromkeys(cases, 0)
        with tqdm(total=len(cases) * (args.rounds + 1), desc=f"{set_name} ({megabytes:.0f} MB per batch)",
                  unit="batch", dynamic_ncols=True) as progress:
            for round_index in range(args.rounds + 1):  # round 0 warms every case up and is not counted
                for case, client in cases.items():
                    progress.set_postfix_str(f"{case[0]} x{case[1] or 'default'}")
                    seconds, ok = timed(client, images)
                    if round_index:
                        samples[case].append(seconds)
                        answered[case] += ok
                    progress.update(1)
        for (transport, split), times in samples.items():
            client = cases[(transport, split)]
            requests = len(client.plan([len(image) for image in images]))
            median = statistics.median(times)
            rows.append({
                "set": set_name, "format": transport, "requests": requests, "images": len(images),
                "megabytes": megabytes, "rounds": len(times), "median_ms": 1e3 * median,
                "p25_ms": 1e3 * percentile(times, 25), "p75_ms": 1e3 * percentile(times, 75),
                "mb_per_s": megabytes / median, "images_per_s": len(images) / median,
                "answered": answered[(transport, split)], "expected": len(images) * len(times),
            })
            client.close()
    return rows


def handler_times(store: Path, set_names: Sequence[str], count: int, repeats: int) -> list[dict[str, Any]]:
    """Our engine's time per batch in this process (the model and settings of our archive), no HTTP."""
    from bench_serve import OURS, engine_breakdown, load_served_model

    mar = store / f"{OURS}.mar"
    if not mar.exists():
        subprocess.run([sys.executable, str(REPO / "scripts" / "build_mar.py"), "--export-path", str(store)],
                       check=True, capture_output=True)
    config, engine = load_served_model(mar)
    try:
        rows = engine_breakdown(engine, config, set_names, [count], repeats)
    finally:
        engine.close()
    return [{"set": row["set"], "images": row["images"], "handler_ms": 1e3 * row["wall_s"],
             "decode_wait_ms": 1e3 * row["decode_wait_s"], "model_ms": 1e3 * row["model_s"],
             "device": str(engine.device), "model_step": engine.step.describe(),
             "source": "measured in-process (bench_serve)"}
            for row in rows]


def summarize(rows: Sequence[dict[str, Any]], handler: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per set: the fastest way, and the ratios the issue asks for."""
    summary = []
    for set_name in dict.fromkeys(row["set"] for row in rows):
        by_case = {(r["format"], r["requests"]): r for r in rows if r["set"] == set_name}
        one = {fmt: by_case.get((fmt, 1)) for fmt in FORMATS}
        client = next(r for r in by_case.values() if r["format"] == CLIENT)
        fastest = min(by_case.values(), key=lambda r: r["median_ms"])
        entry: dict[str, Any] = {
            "set": set_name, "fastest": f"{fastest['format']} x{fastest['requests']}",
            "fastest_ms": fastest["median_ms"], "client_ms": client["median_ms"],
            "client_requests": client["requests"],
        }
        if one["multipart"]:
            entry["multipart_ms"] = one["multipart"]["median_ms"]
            entry["client_over_multipart"] = client["median_ms"] / one["multipart"]["median_ms"]
        if one["oip-binary"] and one["oip-json"]:
            entry["oip_binary_over_json"] = one["oip-binary"]["median_ms"] / one["oip-json"]["median_ms"]
        own = next((h for h in handler if h["set"] == set_name), None)
        if own:
            entry["handler_ms"] = own["handler_ms"]
            entry["limit"] = "handler" if own["handler_ms"] > client["median_ms"] else "transport"
        summary.append(entry)
    return summary


def plot(rows: Sequence[dict[str, Any]], handler: Sequence[dict[str, Any]], path: Path) -> Path:
    """Per set, horizontal bars: ms per batch for every format and split, labelled; the handler's time too."""
    set_names = list(dict.fromkeys(row["set"] for row in rows))
    cases = sorted({(r["format"], r["requests"]) for r in rows if r["format"] != CLIENT},
                   key=lambda c: (FORMATS.index(c[0]), c[1]))
    height = 1.2 + 0.32 * (len(cases) + 1)
    figure, axes = new_figure(len(set_names), 1, width=7.5, height=height)
    colors = dict(zip((*FORMATS, CLIENT), ("tab:gray", "tab:blue", "tab:orange", "tab:olive", "tab:green",
                                            "tab:purple", "black"), strict=True))
    for axis, set_name in zip(axes[0], set_names, strict=True):
        by_case = {(r["format"], r["requests"]): r for r in rows if r["set"] == set_name}
        client = next(r for r in by_case.values() if r["format"] == CLIENT)
        shown = [(f"{fmt}, {n} request{'s' if n > 1 else ''}", by_case[(fmt, n)], fmt) for fmt, n in cases
                 if (fmt, n) in by_case]
        plural = "s" if client["requests"] > 1 else ""
        shown.append((f"client default ({client['requests']} request{plural})", client, CLIENT))
        values = [row["median_ms"] for _, row, _ in shown]
        positions = range(len(shown))
        bars = axis.barh(list(positions), values, color=[colors[fmt] for _, _, fmt in shown])
        axis.bar_label(bars, labels=[f"{v:,.0f} ms" if v >= 10 else f"{v:.1f} ms" for v in values], padding=3,
                       fontsize=8)
        axis.set_yticks(list(positions), [label for label, _, _ in shown], fontsize=8)
        axis.invert_yaxis()
        right = max(values) * 1.3
        own = next((h for h in handler if h["set"] == set_name), None)
        title = f"{SET_TITLES.get(set_name, set_name)}: {client['images']} photos, {client['megabytes']:.1f} MB"
        if own and own["handler_ms"] <= right:
            axis.axvline(own["handler_ms"], color="red", linestyle="--",
                         label=f"handler alone: {own['handler_ms']:,.0f} ms per batch")
            axis.legend(fontsize=8, loc="lower right")
        elif own:
            title += f"\nhandler alone: {own['handler_ms']:,.0f} ms per batch (off this scale: it limits)"
        axis.set_xlim(0, right)
        axis.set_xlabel("ms per batch through TorchServe, do-nothing handler (median; lower is better)")
        axis.set_title(title, fontsize=9)
        axis.grid(axis="x", alpha=0.3)
    return save_figure(figure, path)


def report(rows: Sequence[dict[str, Any]], handler: Sequence[dict[str, Any]], summary: Sequence[dict[str, Any]],
           quick: bool) -> str:
    parts = [format_table(rows, [("set", "set"), ("format", "format"), ("requests", "requests"),
                                 ("megabytes", "MB"), ("median_ms", "median ms"), ("p25_ms", "p25 ms"),
                                 ("p75_ms", "p75 ms"), ("mb_per_s", "MB/s"), ("images_per_s", "images/s"),
                                 ("answered", "answered"), ("expected", "of")])]
    if handler:
        parts.append(format_table(handler, [("set", "set"), ("images", "images"), ("handler_ms", "handler ms"),
                                            ("decode_wait_ms", "waiting for decode ms"), ("model_ms", "model ms"),
                                            ("device", "device")]))
    parts.append(format_table(summary, [("set", "set"), ("fastest", "fastest"), ("fastest_ms", "ms"),
                                        ("client_ms", "client default ms"), ("multipart_ms", "one multipart ms"),
                                        ("client_over_multipart", "client/multipart"),
                                        ("oip_binary_over_json", "OIP binary/JSON"), ("handler_ms", "handler ms"),
                                        ("limit", "limits")]))
    if quick:
        parts.append("SMOKE RUN (--quick): few photos and rounds; these numbers are not measurements and "
                     "recommend nothing. Run without --quick for the table in docs/benchmarks.md.")
    else:
        lines = [f"{s['set']}: fastest {s['fastest']} ({s['fastest_ms']:.0f} ms per batch); the client's default "
                 f"takes {s.get('client_over_multipart', float('nan')):.2f}x one multipart request; OIP binary "
                 f"takes {s.get('oip_binary_over_json', float('nan')):.2f}x OIP JSON; "
                 f"{'the handler' if s.get('limit') == 'handler' else 'the transport'} limits" for s in summary]
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", nargs="+", choices=["imagenet", "phone"], default=["imagenet", "phone"])
    parser.add_argument("--images", type=int, default=32, help="photos per batch")
    parser.add_argument("--splits", nargs="+", type=int, default=[1, 4, 8, 32],
                        help="requests a batch is split into, sent concurrently (N: one image each)")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds (after one warm-up round)")
    parser.add_argument("--handler-repeats", type=int, help="timed engine calls per set (default 3; 0: skip)")
    parser.add_argument("--model-store", type=Path, help="archives here (default OUT/model_store)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for the JSON and PNG")
    parser.add_argument("--quick", action="store_true", help="smoke run: 8 photos, splits 1 and 8, 2 rounds")
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.splits, args.rounds = 8, [1, 8], 2
    if args.handler_repeats is None:
        args.handler_repeats = 1 if args.quick else 3
    if args.images < 1 or args.rounds < 1 or min(args.splits) < 1:
        parser.error("images, rounds and splits must be at least 1")
    args.splits = sorted({min(split, args.images) for split in args.splits})
    args.model_store = args.model_store or args.out / "model_store"
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    machine = machine_info()
    if args.quick:
        print("SMOKE RUN (--quick): checks that every format works; recommends nothing", file=sys.stderr)
    print("building the do-nothing archive, then starting TorchServe ...", file=sys.stderr)
    archive = build_noop_archive(args.model_store)
    with TorchServe(args.model_store, [archive]) as server:
        rows = measure(server, args)
    handler: list[dict[str, Any]] = []
    if args.handler_repeats:
        print("timing our handler's engine in this process (builds our archive once) ...", file=sys.stderr)
        handler = handler_times(args.model_store, args.sets, args.images, args.handler_repeats)
    summary = summarize(rows, handler)
    result = {"benchmark": "transport", "quick": args.quick, "machine": machine,
              "settings": {key: value for key, value in vars(args).items()}, "results": rows,
              "handler": handler, "summary": summary,
              "notes": ["time per batch: from the first byte sent to the last entry read, client included",
                        "the do-nothing handler reads no image; client and server share this machine's cores"]}
    json_path = write_json(args.out / "bench_transport.json", result)
    png_path = plot(rows, handler, args.out / "bench_transport.png")
    print(report(rows, handler, summary, args.quick))
    print(f"\nwrote {json_path} and {png_path}")


if __name__ == "__main__":
    main()
