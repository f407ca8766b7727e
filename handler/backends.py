"""The model step behind one call: normalized float images in, (features, logits) or logits out.

Backends: ``eager`` (the module itself), ``inductor`` (torch.compile with frozen, prepacked weights; one
static graph per batch bucket) and ``openvino`` (the model converted once to OpenVINO IR, cached on disk,
compiled for the CPU with a dynamic batch dimension, its thread count and inference precision set
explicitly). Which backend and precision serve is decided once, at start-up, by ``choose_model_step``:

- ``precision: auto`` is bf16 on a CPU with native bf16 (AMX or AVX512-BF16), fp16 on CUDA, fp32 elsewhere;
- every step other than eager fp32 is measured against eager fp32 on real photos (the archive's gate images):
  an exact (fp32) step must move no top-5 probability by more than ``EXACT_TOLERANCE``; a reduced-precision
  step must agree on every top-1 and move no top-5 probability by more than ``REDUCED_TOLERANCE``.
  A step that fails its gate, or cannot be built, is logged with the reason and the next candidate serves:
  start-up never fails for a backend.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from handler.config import ConfigError, HandlerConfig

logger = logging.getLogger(__name__)

EAGER, INDUCTOR, OPENVINO = "eager", "inductor", "openvino"
# What `backend: auto` tries, fastest first, per device type (docs/benchmarks.md, "Model step"). On CUDA,
# inductor is not measured yet (no GPU was lent): it is served only when asked for by name.
AUTO_ORDER = {"cpu": (OPENVINO, INDUCTOR, EAGER), "cuda": (EAGER,)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
EXACT_TOLERANCE = 1e-3  # largest top-5 probability change an fp32 backend may show against eager fp32
REDUCED_TOLERANCE = 0.05  # the same for bf16/fp16, which must also agree on every top-1
MAX_FEATURE_ERROR = 1e-2  # fp32 backends: largest relative error of the embedding features


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The CPU's feature flags (Linux); empty where they cannot be read."""
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def has_native_bf16(flags: frozenset[str]) -> bool:
    """bf16 matrix math in hardware; without it bf16 is emulated and slower than fp32 (pytorch#86550)."""
    return bool(flags & NATIVE_BF16_FLAGS)


def resolve_precision(requested: str, device: torch.device, flags: frozenset[str]) -> str:
    if requested == "fp16" and device.type != "cuda":
        raise ConfigError("precision fp16 needs a CUDA device; on the CPU use auto, fp32 or bf16")
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "fp16"
    return "bf16" if has_native_bf16(flags) else "fp32"


@dataclass
class ModelStep:
    """One way to run the model. ``forward`` takes float32 NCHW images on the step's device."""

    backend: str
    precision: str
    forward: Callable[[torch.Tensor], Any]
    static_shapes: bool = False  # True: one graph per input shape, so batches are padded to buckets
    graphs_built: Callable[[], int] = field(default=lambda: 0)  # compilations so far (no request may add any)
    notes: list[str] = field(default_factory=list)

    def __call__(self, images: torch.Tensor) -> Any:
        return self.forward(images)

    @property
    def exact(self) -> bool:
        return self.precision == "fp32"

    def describe(self) -> str:
        return f"{self.backend} {self.precision}"


def eager_step(model: Callable[[torch.Tensor], Any], precision: str, channels_last: bool = True) -> ModelStep:
    """The model as it is (any callable; a module gets its own copy in a reduced precision)."""
    module = model
    if isinstance(model, torch.nn.Module):
        module = model if precision == "fp32" else copy.deepcopy(model).to(DTYPES[precision])
        if channels_last:
            module = module.to(memory_format=torch.channels_last)
    dtype = DTYPES[precision]

    def forward(images: torch.Tensor) -> Any:
        return module(images.to(dtype))

    return ModelStep(EAGER, precision, forward)


def inductor_step(model: torch.nn.Module, precision: str, cache_dir: Path, channels_last: bool = True) -> ModelStep:
    """torch.compile with freezing (weights folded and prepacked); static shapes, each compiled at warm-up.

    Its compiled code is cached in ``cache_dir``/inductor (TORCHINDUCTOR_CACHE_DIR), so a restarted worker
    loads instead of compiling. Needs a C++ compiler on the CPU; compile errors surface at the first call.
    """
    import torch._dynamo.utils

    if all(parameter.device.type == "cpu" for parameter in model.parameters()):
        require_cpp_compiler()
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir / "inductor"))
    module = model if precision == "fp32" else copy.deepcopy(model).to(DTYPES[precision])
    if channels_last:
        module = module.to(memory_format=torch.channels_last)
    compiled = torch.compile(module, dynamic=False, options={"freezing": True})
    dtype = DTYPES[precision]
    counters = torch._dynamo.utils.counters["stats"]
    start = counters["unique_graphs"]

    def forward(images: torch.Tensor) -> Any:
        return compiled(images.to(dtype))

    return ModelStep(INDUCTOR, precision, forward, static_shapes=True,
                     graphs_built=lambda: counters["unique_graphs"] - start)


def require_cpp_compiler() -> None:
    """Fail now, naming what was searched, rather than after tracing the model at warm-up (~17 s for the demo):
    inductor compiles C++ for the CPU."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
    except ImportError:  # another torch layout: the first compile will say it instead
        return
    get_cpp_compiler()


def openvino_step(model: torch.nn.Module, precision: str, crop_size: int, threads: int, cache_dir: Path,
                  model_key: str) -> ModelStep:
    """The model as OpenVINO IR (converted once per weights and versions, then read from ``cache_dir``),
    compiled for the CPU with a dynamic batch dimension: no padding and no per-size compilation.

    OpenVINO's own default is bf16 on CPUs with AMX: the precision is always set here, and the precision
    it then reports is the one served (a CPU without native bf16 runs f32 whatever is asked).
    """
    import openvino

    folder = cache_dir / "openvino"
    folder.mkdir(parents=True, exist_ok=True)
    version = openvino.__version__.split("-")[0].replace(".", "_")
    ir_path = folder / f"{model_key}-openvino{version}.xml"
    core = openvino.Core()
    notes = []
    if ir_path.exists():
        ov_model = core.read_model(str(ir_path))
        notes.append(f"IR read from {ir_path}")
    else:
        example = torch.zeros((1, 3, crop_size, crop_size))
        ov_model = openvino.convert_model(model.float().cpu(), example_input=example)
        staged = ir_path.with_name(f"{ir_path.stem}-{os.getpid()}.xml")
        openvino.save_model(ov_model, str(staged), compress_to_fp16=False)
        staged.with_suffix(".bin").replace(ir_path.with_suffix(".bin"))
        staged.replace(ir_path)  # the .xml last: a reader never sees an .xml without its .bin
        notes.append(f"converted and saved to {ir_path}")
    ov_model.reshape({ov_model.inputs[0].get_any_name(): [-1, 3, crop_size, crop_size]})
    compiled = core.compile_model(ov_model, "CPU", {
        "INFERENCE_PRECISION_HINT": {"fp32": "f32", "bf16": "bf16"}[precision],
        "INFERENCE_NUM_THREADS": threads,
        "PERFORMANCE_HINT": "LATENCY",
        "CACHE_DIR": str(folder / "compiled"),
    })
    served = {"f32": "fp32", "bf16": "bf16"}.get(str(compiled.get_property("INFERENCE_PRECISION_HINT")), "fp32")
    if served != precision:
        notes.append(f"OpenVINO runs {served} on this CPU although {precision} was asked")
    request = compiled.create_infer_request()
    outputs = len(compiled.outputs)

    def forward(images: torch.Tensor) -> Any:
        request.infer([images.float().contiguous().numpy()])
        # The request reuses its output buffers on the next call: copy them out.
        tensors = tuple(torch.from_numpy(request.get_output_tensor(i).data.copy()) for i in range(outputs))
        return tensors if outputs > 1 else tensors[0]

    return ModelStep(OPENVINO, served, forward, graphs_built=lambda: 1, notes=notes)


@dataclass(frozen=True)
class Agreement:
    """A step's answers against eager fp32 on the gate images."""

    images: int
    top1: float  # fraction of images whose top-1 class is the reference's
    max_top5_shift: float  # largest change of a probability among either side's top-5 classes
    max_feature_error: float | None  # largest |features - reference| / max|reference|; None without features

    def passes(self, exact: bool) -> bool:
        if exact:
            return self.max_top5_shift <= EXACT_TOLERANCE and (
                self.max_feature_error is None or self.max_feature_error <= MAX_FEATURE_ERROR)
        return self.top1 == 1.0 and self.max_top5_shift <= REDUCED_TOLERANCE

    def describe(self) -> str:
        return (f"top-1 agreement {self.top1:.0%} on {self.images} photos, max top-5 shift "
                f"{self.max_top5_shift:.2g}")


def split_output(output: Any) -> tuple[torch.Tensor | None, torch.Tensor]:
    return output if isinstance(output, tuple) else (None, output)


def compare(reference: Any, candidate: Any) -> Agreement:
    ref_features, ref_logits = split_output(reference)
    features, logits = split_output(candidate)
    ref_probs = torch.softmax(ref_logits.float(), dim=1)
    probs = torch.softmax(logits.float(), dim=1)
    top1 = (ref_probs.argmax(1) == probs.argmax(1)).float().mean().item()
    k = min(5, ref_probs.shape[1])
    classes = torch.cat([ref_probs.topk(k, dim=1).indices, probs.topk(k, dim=1).indices], dim=1)
    shift = (ref_probs.gather(1, classes) - probs.gather(1, classes)).abs().max().item()
    feature_error = None
    if ref_features is not None and features is not None:
        scale = ref_features.float().abs().max().clamp_min(1e-12)
        feature_error = ((features.float() - ref_features.float()).abs().max() / scale).item()
    return Agreement(len(ref_probs), top1, shift, feature_error)


def run_in_chunks(step: Callable[[torch.Tensor], Any], images: torch.Tensor, chunk: int) -> Any:
    """Outputs for ``images`` computed ``chunk`` at a time, the last chunk padded to full size (a static-shape
    step then builds only the graph of that one size, which is a serving bucket)."""
    pieces = []
    for start in range(0, len(images), chunk):
        part = images[start: start + chunk]
        count = len(part)
        if count < chunk:
            part = torch.cat([part, part.new_zeros((chunk - count, *part.shape[1:]))])
        features, logits = split_output(step(part))
        pieces.append((None if features is None else features[:count].float(), logits[:count].float()))
    logits = torch.cat([p[1] for p in pieces])
    if pieces[0][0] is None:
        return logits
    return torch.cat([p[0] for p in pieces]), logits


@dataclass
class StepChoice:
    """What serves, and why: logged at start-up, printed by build_mar.py and recorded in its build info."""

    backend: str
    precision: str
    requested_backend: str
    requested_precision: str
    agreement: Agreement | None
    rejected: list[str]
    cpu: str
    native_bf16: bool

    def to_json(self) -> dict[str, Any]:
        values = asdict(self)
        values["agreement"] = None if self.agreement is None else asdict(self.agreement)
        return values

    def describe(self) -> str:
        checked = self.agreement.describe() if self.agreement else "the reference itself, not checked"
        text = (f"model step: {self.backend} {self.precision} (asked: backend {self.requested_backend}, precision "
                f"{self.requested_precision}); {checked}; CPU {self.cpu}, native bf16: "
                f"{'yes' if self.native_bf16 else 'no'}")
        if self.rejected:
            text += "; not served: " + "; ".join(self.rejected)
        return text


StepBuilder = Callable[[str], ModelStep]


def step_builders(config: HandlerConfig, model: torch.nn.Module, device: torch.device,
                  model_key: str) -> dict[str, StepBuilder]:
    cache_dir = config.resolved_cache_dir
    builders: dict[str, StepBuilder] = {
        EAGER: lambda precision: eager_step(model, precision, config.channels_last),
        INDUCTOR: lambda precision: inductor_step(model, precision, cache_dir, config.channels_last),
    }
    if device.type == "cpu":
        builders[OPENVINO] = lambda precision: openvino_step(model, precision, config.crop_size,
                                                             config.intra_op_threads, cache_dir, model_key)
    return builders


def candidates(config: HandlerConfig, device: torch.device, precision: str) -> list[tuple[str, str]]:
    """(backend, precision) pairs in the order they are tried; eager fp32 always last, as the fallback."""
    if config.backend == OPENVINO and device.type != "cpu":
        raise ConfigError("backend openvino runs on the CPU only; on CUDA use auto, inductor or eager")
    backends = AUTO_ORDER[device.type] if config.backend == "auto" else (config.backend, EAGER)
    precisions = (precision, "fp32") if precision != "fp32" else ("fp32",)
    pairs = [(backend, p) for backend in dict.fromkeys(backends) for p in precisions]
    return list(dict.fromkeys([*pairs, (EAGER, "fp32")]))


def choose_model_step(
    config: HandlerConfig,
    model: torch.nn.Module,
    device: torch.device,
    gate_images: torch.Tensor | None,
    model_key: str,
    flags: frozenset[str] | None = None,
    builders: dict[str, StepBuilder] | None = None,
) -> tuple[ModelStep, StepChoice]:
    """The first candidate that builds and passes its gate. ``gate_images``: normalized float32 NCHW real
    photos on ``device`` (None: no photos to check with, so reduced precision is not served)."""
    flags = cpu_flags() if flags is None else flags
    precision = resolve_precision(config.precision, device, flags)
    builders = builders or step_builders(config, model, device, model_key)
    reference = None
    rejected: list[str] = []
    for backend, step_precision in candidates(config, device, precision):
        if backend == EAGER and step_precision == "fp32":
            step, agreement = eager_step(model, "fp32", config.channels_last), None
            break
        if backend not in builders:
            rejected.append(f"{backend}: not available on {device.type}")
            continue
        if step_precision != "fp32" and gate_images is None:
            rejected.append(f"{backend} {step_precision}: no gate photos in the archive to check it against fp32")
            continue
        try:
            step = builders[backend](step_precision)
            agreement = None
            if gate_images is not None:
                with torch.inference_mode():
                    if reference is None:
                        reference = run_in_chunks(eager_step(model, "fp32", config.channels_last), gate_images,
                                                  config.max_batch)
                    agreement = compare(reference, run_in_chunks(step, gate_images, config.max_batch))
        except Exception as error:  # a missing package, no C++ compiler, an op it cannot convert: next one
            logger.warning("backend %s (%s) failed; trying the next one", backend, step_precision, exc_info=True)
            rejected.append(f"{backend} {step_precision}: {type(error).__name__}: {_first_line(error)}")
            continue
        if agreement is not None and not agreement.passes(step.exact):
            limit = EXACT_TOLERANCE if step.exact else REDUCED_TOLERANCE
            rejected.append(f"{step.describe()}: {agreement.describe()} (allowed: "
                            f"{'' if step.exact else 'top-1 100 %, '}shift <= {limit})")
            logger.warning("model step %s refused by its accuracy gate: %s", step.describe(), agreement.describe())
            continue
        break
    for note in step.notes:
        logger.info("%s: %s", step.backend, note)
    choice = StepChoice(step.backend, step.precision, config.backend, config.precision, agreement, rejected,
                        cpu_model(), has_native_bf16(flags))
    return step, choice


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else "")[:300]


def weights_key(weights_path: Path, config: HandlerConfig) -> str:
    """Names a converted model in the cache: the weights file's digest, the architecture and the input size."""
    digest = hashlib.sha256()
    with weights_path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    digest.update(f"{config.architecture}|{config.num_classes}|{config.crop_size}|{torch.__version__}".encode())
    return digest.hexdigest()[:24]
