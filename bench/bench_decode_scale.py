#!/usr/bin/env python3
"""Choose the JPEG decode scale by accuracy, on the trained demo model.

Big JPEGs are decoded at a reduced DCT scale (PIL ``draft``) that keeps at least ``draft_margin x
resize_size`` pixels on the short side. For each margin (and a full decode), over photos from 0.3 to 12 MP
made from scikit-image's bundled photos, this measures against timm's own eval pipeline (full decode +
``timm.data.create_transform`` of the model's config, on the same weights):
  - top-1 agreement, and the max / median shift of the reference's top-5 scores;
  - the decode + crop time of a 12 MP photo (median, one thread), and how much faster than a full decode.

    python bench/bench_decode_scale.py                # ~2 minutes on 2 cores
    python bench/bench_decode_scale.py --quick        # a smoke run: few photos, recommends nothing
"""

from __future__ import annotations

import argparse
import io
import math
import statistics
import sys
import time
from pathlib import Path

from bench_common import DEFAULT_OUT, format_table, machine_info, write_json
from make_corpus import DECODE_SCALE_SIZES, sized_set

REPO = Path(__file__).resolve().parent.parent
MARGINS = (1.0, 1.25, 1.5, 2.0, 2.5, 3.0)
TARGET_MAX_SHIFT = 0.015
TARGET_SPEEDUP = 4.0


def reference_probabilities(model, transform, photos: list[bytes]):
    import torch
    from PIL import Image, ImageOps

    with torch.inference_mode():
        batch = torch.stack([transform(ImageOps.exif_transpose(Image.open(io.BytesIO(p))).convert("RGB"))
                             for p in photos])
        return torch.softmax(model(batch), dim=1)


def served_probabilities(model, config, photos: list[bytes]):
    import numpy as np
    import torch

    from handler.engine import InferenceEngine
    from handler.preprocess import Preprocessor

    engine = InferenceEngine(config, model, torch.device("cpu"), preprocessor=Preprocessor(config))
    crops = np.stack(list(engine.preprocessor.map(photos)))
    engine.close()
    with torch.inference_mode():
        return torch.softmax(model(engine.normalize(torch.from_numpy(crops))), dim=1)


def decode_ms(photos: list[bytes], spec, repeats: int) -> float:
    from handler.imaging import decode_and_transform

    samples = []
    for _ in range(repeats):
        for photo in photos:
            started = time.perf_counter()
            decode_and_transform(photo, spec)
            samples.append(time.perf_counter() - started)
    return 1000 * statistics.median(samples)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 photos per size, 1 timing repeat (smoke run)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    import dataclasses

    import torch
    from build_mar import DEMO_ARCH, bundled_state_dict
    from timm.data import create_transform, resolve_data_config

    from handler.architectures import build_architecture, native_preprocessing
    from handler.config import HandlerConfig
    from handler.preprocess import transform_spec

    torch.set_num_threads(2)
    print(f"making the photo set (0.3 to 12 MP{', quick' if args.quick else ''}) ...", flush=True)
    photos = sized_set(per_size=3 if args.quick else 12)
    names = sorted(photos)
    payloads = [photos[name] for name in names]
    model = build_architecture(DEMO_ARCH, 1000).eval()
    model.load_state_dict(bundled_state_dict(DEMO_ARCH, model)[0])
    reference = reference_probabilities(model, create_transform(**resolve_data_config({}, model=model)), payloads)
    reference_top5 = reference.topk(5, dim=1)
    native = native_preprocessing(DEMO_ARCH, model).values
    base = HandlerConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in native.items()},
                         architecture=DEMO_ARCH, decode_threads=2, warmup=False)
    phone = [photos[name] for name in names if name.startswith("4032x3024")]
    repeats = 1 if args.quick else 3

    rows = []
    for margin in (*MARGINS, None):
        config = (dataclasses.replace(base, draft_margin=margin) if margin is not None
                  else dataclasses.replace(base, reduced_jpeg_decode=False))
        label = f"{margin:g}" if margin is not None else "full decode"
        print(f"margin {label}: classifying {len(payloads)} photos, timing {len(phone)} 12 MP decodes ...", flush=True)
        ours = served_probabilities(model, config, payloads)
        shifts = (ours.gather(1, reference_top5.indices) - reference_top5.values).abs().max(dim=1).values
        agree = (ours.argmax(dim=1) == reference.argmax(dim=1)).float()
        by_size = {f"{w}x{h}": float(agree[[i for i, n in enumerate(names) if n.startswith(f"{w}x{h}")]].mean())
                   for w, h in DECODE_SCALE_SIZES}
        rows.append({"margin": label, "draft_short_side_px": math.ceil(config.resize_size * margin) if margin else None,
                     "ms_per_12mp_photo": decode_ms(phone, transform_spec(config), repeats),
                     "top1_agreement": float(agree.mean()), "max_top5_shift": float(shifts.max()),
                     "median_top5_shift": float(shifts.median()), "p95_top5_shift": float(shifts.quantile(0.95)),
                     "photos_over_shift_target": int((shifts > TARGET_MAX_SHIFT).sum()),
                     "top1_agreement_by_size": by_size,
                     "worst_photo": names[int(shifts.argmax())]})
    full_ms = rows[-1]["ms_per_12mp_photo"]
    for row in rows:
        row["speedup_vs_full"] = full_ms / row["ms_per_12mp_photo"]
        row["meets_targets"] = (row["top1_agreement"] == 1.0 and row["max_top5_shift"] <= TARGET_MAX_SHIFT
                                and row["speedup_vs_full"] >= TARGET_SPEEDUP)

    print()
    print(format_table(rows, [("margin", "draft margin"), ("draft_short_side_px", "keeps >= px"),
                              ("ms_per_12mp_photo", "ms / 12 MP photo"), ("speedup_vs_full", "x faster than full"),
                              ("top1_agreement", "top-1 agreement"), ("max_top5_shift", "max top-5 shift"),
                              ("median_top5_shift", "median top-5 shift"), ("p95_top5_shift", "p95 shift"),
                              ("photos_over_shift_target", f"photos > {TARGET_MAX_SHIFT}"),
                              ("worst_photo", "worst photo")]))
    chosen = next((row for row in rows if row["meets_targets"]), None)
    result = {"machine": machine_info(), "photos": len(payloads), "sizes": [f"{w}x{h}" for w, h in DECODE_SCALE_SIZES],
              "model": DEMO_ARCH + " (ImageNet-trained, bundled weights)",
              "reference": "full PIL decode + timm.data.create_transform(resolve_data_config(model))",
              "targets": {"top1_agreement": 1.0, "max_top5_shift": TARGET_MAX_SHIFT, "speedup_vs_full": TARGET_SPEEDUP},
              "rows": rows, "smallest_margin_meeting_targets": chosen["margin"] if chosen else None,
              "quick": args.quick}
    path = write_json(args.out / "bench_decode_scale.json", result)
    if args.quick:
        print(f"\nSMOKE RUN (--quick, {len(payloads)} photos): these numbers choose nothing. Results: {path}")
    elif chosen:
        print(f"\nsmallest margin meeting every target: {chosen['margin']} (results: {path})")
    else:
        print(f"\nno margin meets every target (results: {path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
