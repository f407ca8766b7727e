"""Offline checks of the deployment manifests in deploy/: no cluster, no network.

- The Kubernetes objects are checked against the official JSON schemas that kubernetes-validate bundles,
  in strict mode, so unknown fields (typos) are errors.
- The KServe InferenceService is a CRD without a bundled schema. It is checked against ISVC_SCHEMA below.
- Cross-checks catch mistakes that each schema accepts but a cluster would not survive: a Service
  selecting no pods, a probe without the token, a config that opens the management API, and so on.

Every check is shown to be live: each schema validator must reject a broken copy, and each cross-check
must report the mistake that its paired mutation introduces.
"""

from __future__ import annotations

import copy
import re
import socket
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
K8S_DIR = REPO / "deploy" / "k8s"
KSERVE_FILE = REPO / "deploy" / "kserve" / "inferenceservice.yaml"

# Fixed Kubernetes versions whose schemas kubernetes-validate 1.37.0 bundles (it has 1.25 to 1.37):
# the oldest minor these manifests target, and the newest one the package knows.
K8S_VERSIONS = ("1.31.0", "1.37.0")

K8S_FILES = {
    "configmap": ("configmap.yaml", "ConfigMap"),
    "deployment": ("deployment.yaml", "Deployment"),
    "service": ("service.yaml", "Service"),
    "hpa": ("hpa.yaml", "HorizontalPodAutoscaler"),
}

Manifests = dict[str, Any]


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail loudly if anything here, or a validator, tries to reach the network (e.g. to fetch a schema)."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted during offline manifest tests: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def load_single(path: Path) -> dict[str, Any]:
    documents = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    assert len(documents) == 1, f"{path.name} should hold exactly one object, found {len(documents)}"
    return documents[0]


def load_manifests() -> Manifests:
    manifests: Manifests = {key: load_single(K8S_DIR / name) for key, (name, _) in K8S_FILES.items()}
    manifests["isvc"] = load_single(KSERVE_FILE)
    manifests["repo_config"] = (REPO / "config.properties").read_text()
    manifests["requirements"] = (REPO / "requirements.txt").read_text()
    return manifests


@pytest.fixture(scope="module")
def pristine() -> Manifests:
    return load_manifests()


@pytest.fixture
def manifests(pristine: Manifests) -> Manifests:
    return copy.deepcopy(pristine)


# --------------------------------------------------------------------------------------------------
# Helpers shared by the checks
# --------------------------------------------------------------------------------------------------


def parse_properties(text: str) -> dict[str, str]:
    """The key=value lines of a Java properties file; refuses lines it cannot read and duplicate keys."""
    properties: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line[0] in "#!":
            continue
        key, separator, value = line.partition("=")
        if not separator:
            raise ValueError(f"line {number} is not key=value: {raw!r}")
        key = key.strip()
        if key in properties:
            raise ValueError(f"line {number} sets {key} a second time")
        properties[key] = value.strip()
    return properties


def pod_spec(m: Manifests) -> dict[str, Any]:
    return m["deployment"]["spec"]["template"]["spec"]


def container(m: Manifests) -> dict[str, Any]:
    containers = pod_spec(m)["containers"]
    assert len(containers) == 1, "the checks below expect one container (TorchServe)"
    return containers[0]


def pod_config(m: Manifests) -> dict[str, str]:
    return parse_properties(m["configmap"]["data"]["config.properties"])


def container_ports(m: Manifests) -> dict[str, int]:
    return {port.get("name", str(port["containerPort"])): port["containerPort"] for port in container(m)["ports"]}


def bind(address: str) -> tuple[str | None, int | None]:
    parts = urllib.parse.urlsplit(address)
    return parts.hostname, parts.port


def ts_config_path(m: Manifests) -> str | None:
    args = list(container(m).get("command", [])) + list(container(m).get("args", []))
    for index, arg in enumerate(args):
        if arg == "--ts-config" and index + 1 < len(args):
            return args[index + 1]
        if arg.startswith("--ts-config="):
            return arg.split("=", 1)[1]
    return None


def probe_text(probe: dict[str, Any] | None) -> str:
    if not probe:
        return ""
    if "exec" in probe:
        return "\n".join(probe["exec"]["command"])
    return repr(probe)


def set_config_line(m: Manifests, key: str, value: str | None) -> None:
    """Replace (or with None, delete) a key=value line of the pod config.properties; append if absent."""
    lines = m["configmap"]["data"]["config.properties"].splitlines()
    kept = [line for line in lines if line.split("=", 1)[0].strip() != key]
    if value is not None:
        kept.append(f"{key}={value}")
    m["configmap"]["data"]["config.properties"] = "\n".join(kept) + "\n"


# --------------------------------------------------------------------------------------------------
# 1. Kubernetes objects against the official schemas (strict: unknown fields are errors)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("key", sorted(K8S_FILES))
def test_kubernetes_object_matches_official_schema(pristine: Manifests, key: str, version: str) -> None:
    document = pristine[key]
    assert document["kind"] == K8S_FILES[key][1]
    validated = kubernetes_validate.validate(document, version, strict=True)
    # validate() falls back to an older bundled schema when the exact version is missing: make sure it did not.
    assert validated == kubernetes_validate.utils.major_minor(version)


def _typo_in_container(m: Manifests) -> None:
    container(m)["readynessProbe"] = container(m).pop("readinessProbe")


def _port_as_text(m: Manifests) -> None:
    m["service"]["spec"]["ports"][0]["port"] = "8080/tcp"


def _british_hpa_field(m: Manifests) -> None:
    target = m["hpa"]["spec"]["metrics"][0]["resource"]["target"]
    target["averageUtilisation"] = target.pop("averageUtilization")


def _hpa_metric_without_type(m: Manifests) -> None:
    del m["hpa"]["spec"]["metrics"][1]["type"]


def _configmap_value_not_text(m: Manifests) -> None:
    m["configmap"]["data"]["config.properties"] = 8080


def _probe_without_handler(m: Manifests) -> None:
    container(m)["livenessProbe"]["httpGet"]["port"] = ["metrics"]


SCHEMA_BREAKAGES: dict[str, tuple[str, Callable[[Manifests], None]]] = {
    "misspelt readinessProbe": ("deployment", _typo_in_container),
    "probe port as a list": ("deployment", _probe_without_handler),
    "service port as text": ("service", _port_as_text),
    "British spelling in HPA target": ("hpa", _british_hpa_field),
    "HPA metric without type": ("hpa", _hpa_metric_without_type),
    "ConfigMap value that is not a string": ("configmap", _configmap_value_not_text),
}


@pytest.mark.parametrize("name", sorted(SCHEMA_BREAKAGES))
def test_kubernetes_validator_rejects_broken_copy(manifests: Manifests, name: str) -> None:
    key, breakage = SCHEMA_BREAKAGES[name]
    breakage(manifests)
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(manifests[key], K8S_VERSIONS[0], strict=True)


def test_strict_mode_is_what_catches_unknown_fields(manifests: Manifests) -> None:
    """Proves strict=True matters: the lenient schemas accept the misspelt field, the strict ones do not."""
    _typo_in_container(manifests)
    kubernetes_validate.validate(manifests["deployment"], K8S_VERSIONS[0], strict=False)
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(manifests["deployment"], K8S_VERSIONS[0], strict=True)


# --------------------------------------------------------------------------------------------------
# 2. The KServe InferenceService against a small schema of the fields we rely on
# --------------------------------------------------------------------------------------------------

QUANTITIES = {
    "type": "object",
    "required": ["cpu", "memory"],
    "additionalProperties": {"type": ["string", "integer", "number"]},
}

ISVC_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "serving.kserve.io/v1beta1"},
        "kind": {"const": "InferenceService"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "properties": {
                # KServe builds host names from it: a DNS-1035 label.
                "name": {"type": "string", "pattern": "^[a-z]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
            },
        },
        "spec": {
            "type": "object",
            "required": ["predictor"],
            "properties": {
                "predictor": {
                    "type": "object",
                    "required": ["model"],
                    "properties": {
                        "minReplicas": {"type": "integer", "minimum": 0},
                        "maxReplicas": {"type": "integer", "minimum": 1},
                        "model": {
                            "type": "object",
                            "required": ["modelFormat", "protocolVersion", "storageUri", "resources"],
                            # Unknown keys are typos here (storageURI, protocol, ...).
                            "additionalProperties": False,
                            "properties": {
                                "modelFormat": {
                                    "type": "object",
                                    "required": ["name"],
                                    "additionalProperties": False,
                                    "properties": {"name": {"const": "pytorch"}, "version": {"type": "string"}},
                                },
                                "protocolVersion": {"enum": ["v1", "v2"]},
                                "storageUri": {
                                    "type": "string",
                                    "pattern": "^(pvc|gs|s3|https?|hdfs|webhdfs|oci)://[^/]+/.+",
                                },
                                "runtime": {"type": "string"},
                                "image": {"type": "string"},
                                "args": {"type": "array", "items": {"type": "string"}},
                                "env": {"type": "array", "items": {"type": "object", "required": ["name"]}},
                                "resources": {
                                    "type": "object",
                                    "required": ["requests", "limits"],
                                    "additionalProperties": False,
                                    "properties": {"requests": QUANTITIES, "limits": QUANTITIES},
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}


def isvc_validator() -> jsonschema.protocols.Validator:
    jsonschema.Draft202012Validator.check_schema(ISVC_SCHEMA)
    return jsonschema.Draft202012Validator(ISVC_SCHEMA, format_checker=jsonschema.FormatChecker())


def test_inferenceservice_matches_schema(pristine: Manifests) -> None:
    errors = [error.message for error in isvc_validator().iter_errors(pristine["isvc"])]
    assert errors == []


def _isvc_model(m: Manifests) -> dict[str, Any]:
    return m["isvc"]["spec"]["predictor"]["model"]


ISVC_BREAKAGES: dict[str, Callable[[Manifests], None]] = {
    "old API version": lambda m: m["isvc"].update(apiVersion="serving.kubeflow.org/v1alpha2"),
    "wrong kind": lambda m: m["isvc"].update(kind="InferenceServices"),
    "name with capitals": lambda m: m["isvc"]["metadata"].update(name="ResNet50"),
    "model format misspelt": lambda m: _isvc_model(m)["modelFormat"].update(name="pytorc"),
    "no storageUri": lambda m: _isvc_model(m).pop("storageUri"),
    "storageUri without a path": lambda m: _isvc_model(m).update(storageUri="pvc://model-store"),
    "storageURI typo": lambda m: _isvc_model(m).update(storageURI=_isvc_model(m).pop("storageUri")),
    "unknown protocol": lambda m: _isvc_model(m).update(protocolVersion="v3"),
    "no resources": lambda m: _isvc_model(m).pop("resources"),
    "no memory limit": lambda m: _isvc_model(m)["resources"]["limits"].pop("memory"),
}


@pytest.mark.parametrize("name", sorted(ISVC_BREAKAGES))
def test_inferenceservice_schema_rejects_broken_copy(manifests: Manifests, name: str) -> None:
    ISVC_BREAKAGES[name](manifests)
    assert list(isvc_validator().iter_errors(manifests["isvc"])), f"{name} was not rejected"


# --------------------------------------------------------------------------------------------------
# 3. Cross-checks between the objects (each returns a list of problems; [] means fine)
# --------------------------------------------------------------------------------------------------


def check_selectors(m: Manifests) -> list[str]:
    pod_labels = m["deployment"]["spec"]["template"]["metadata"].get("labels", {})
    problems = []
    match_labels = m["deployment"]["spec"]["selector"].get("matchLabels", {})
    if not match_labels or any(pod_labels.get(k) != v for k, v in match_labels.items()):
        problems.append(f"Deployment selector {match_labels} does not match its pod labels {pod_labels}")
    selector = m["service"]["spec"].get("selector", {})
    if not selector or any(pod_labels.get(k) != v for k, v in selector.items()):
        problems.append(f"Service selector {selector} selects no Deployment pod (labels {pod_labels})")
    return problems


def check_service_ports(m: Manifests) -> list[str]:
    ports = container_ports(m)
    problems = []
    for port in m["service"]["spec"]["ports"]:
        target = port.get("targetPort", port["port"])
        if isinstance(target, str) and target not in ports:
            problems.append(f"Service port {port['port']} targets {target!r}, not a container port name")
        if isinstance(target, int) and target not in ports.values():
            problems.append(f"Service port {port['port']} targets {target}, not a container port")
    exposed = {port["port"] for port in m["service"]["spec"]["ports"]}
    if {8080, 8082} - exposed:
        problems.append(f"the Service must expose 8080 (inference) and 8082 (metrics); it has {sorted(exposed)}")
    if 8081 in exposed or 8081 in ports.values() or "management" in ports:
        problems.append("the management API (8081) must not be exposed by the Service or declared by the pod")
    if m["service"]["spec"].get("type", "ClusterIP") != "ClusterIP":
        problems.append("the Service must be ClusterIP (publish it through an authenticating gateway)")
    return problems


def check_hpa_target(m: Manifests) -> list[str]:
    ref = m["hpa"]["spec"]["scaleTargetRef"]
    problems = []
    deployment = ("apps/v1", "Deployment", m["deployment"]["metadata"]["name"])
    if (ref.get("apiVersion"), ref["kind"], ref["name"]) != deployment:
        problems.append(f"HPA scaleTargetRef {ref} does not name the Deployment")
    spec = m["hpa"]["spec"]
    if not 1 <= spec.get("minReplicas", 1) <= spec["maxReplicas"]:
        problems.append("HPA needs 1 <= minReplicas <= maxReplicas")
    kinds = [(metric["type"], metric.get("resource", {}).get("name")) for metric in spec["metrics"]]
    if ("Resource", "cpu") not in kinds or "Pods" not in {kind for kind, _ in kinds}:
        problems.append(f"HPA must scale on CPU and on a Pods metric; it has {kinds}")
    # CPU utilisation is a percentage of the CPU request: without one the HPA cannot compute it.
    if not container(m).get("resources", {}).get("requests", {}).get("cpu"):
        problems.append("the container has no CPU request, so the HPA's CPU utilisation is undefined")
    return problems


def check_resources(m: Manifests) -> list[str]:
    resources = container(m).get("resources", {})
    problems = [
        f"container resources.{kind}.{name} is missing"
        for kind in ("requests", "limits")
        for name in ("cpu", "memory")
        if not resources.get(kind, {}).get(name)
    ]
    return problems


LOOPBACK = ("127.0.0.1", "localhost")


def check_pod_config(m: Manifests) -> list[str]:
    config = pod_config(m)
    repo = parse_properties(m["repo_config"])
    ports = container_ports(m)
    problems = []
    for key, port_name in (("inference_address", "http"), ("metrics_address", "metrics")):
        host, port = bind(config.get(key, ""))
        if host != "0.0.0.0":
            problems.append(f"{key} must bind 0.0.0.0 in the pod; it is {config.get(key)!r}")
        if port != ports.get(port_name):
            problems.append(f"{key} port {port} is not the container port {port_name!r} ({ports.get(port_name)})")
    host, _ = bind(config.get("management_address", ""))
    if host not in LOOPBACK:
        problems.append(f"management_address must stay on loopback; it is {config.get('management_address')!r}")
    # TorchServe 0.12 binds gRPC to 127.0.0.1 unless told otherwise; the Service exposes no gRPC port.
    for key in ("grpc_inference_address", "grpc_management_address"):
        if config.get(key, "127.0.0.1") not in LOOPBACK:
            problems.append(f"{key} must stay on loopback; it is {config.get(key)!r}")
    expected = {
        "disable_token_authorization": "false",
        "enable_model_api": "false",
        "metrics_mode": "prometheus",
    }
    for key, value in expected.items():
        if config.get(key, "").lower() != value:
            problems.append(f"{key} must be {value}; it is {config.get(key)!r}")
    if config.get("enable_envvars_config", "false").lower() == "true":
        problems.append("enable_envvars_config=true lets TS_* variables override the security settings")
    if "service_envelope" in config:
        problems.append("service_envelope must not be set: our handler parses KServe bodies itself")
    for key in ("max_request_size", "max_response_size"):
        if int(config.get(key, "0")) < int(repo[key]):
            problems.append(f"{key}={config.get(key)} is below the repo's {repo[key]}")
    try:
        expiry = float(config.get("token_expiration_min", "60"))
    except ValueError:
        expiry = 0.0
    if expiry < 24 * 60:
        problems.append(f"token_expiration_min={config.get('token_expiration_min')}: keys (and readiness) die early")
    if not config.get("load_models", "").endswith(".mar"):
        problems.append("load_models must name the archive to serve (scripts/serve.sh passes it as --models)")
    # Everything else must match the repo's config.properties.
    differs_by_design = {"inference_address", "management_address", "metrics_address", "model_store",
                         "max_request_size", "max_response_size", "token_expiration_min", "load_models"}
    for key in sorted((set(repo) | set(config)) - differs_by_design):
        if repo.get(key) != config.get(key):
            problems.append(f"{key} is {config.get(key)!r} in the pod but {repo.get(key)!r} in config.properties")
    return problems


def check_config_mount(m: Manifests) -> list[str]:
    problems = []
    config_path = ts_config_path(m)
    mounts = {mount["name"]: mount for mount in container(m).get("volumeMounts", [])}
    volumes = {volume["name"]: volume for volume in pod_spec(m).get("volumes", [])}
    config_volumes = [name for name, volume in volumes.items()
                      if volume.get("configMap", {}).get("name") == m["configmap"]["metadata"]["name"]]
    if not config_volumes:
        problems.append("no volume mounts the ConfigMap")
    elif config_volumes[0] not in mounts:
        problems.append("the ConfigMap volume is not mounted into the container")
    else:
        mount = mounts[config_volumes[0]]
        filename = mount.get("subPath") or "config.properties"
        mounted_at = mount["mountPath"] if mount.get("subPath") else f"{mount['mountPath'].rstrip('/')}/{filename}"
        if config_path != mounted_at:
            problems.append(f"--ts-config is {config_path!r} but the ConfigMap's file is at {mounted_at!r}")
    if "config.properties" not in m["configmap"].get("data", {}):
        problems.append("the ConfigMap has no config.properties key")
    model_store = pod_config(m).get("model_store")
    if model_store not in {mount["mountPath"] for mount in mounts.values()}:
        problems.append(f"model_store={model_store} is not a volume mount")
    return problems


def check_start_command(m: Manifests) -> list[str]:
    c = container(m)
    words = list(c.get("command", [])) + list(c.get("args", []))
    problems = []
    if not c.get("command") or c["command"][0] != "torchserve":
        # The official image's entrypoint script starts TorchServe with --disable-token-auth.
        problems.append("start torchserve explicitly (command), not through the image's entrypoint")
    for flag in ("--disable-token-auth", "--dt", "--enable-model-api"):
        if flag in words:
            problems.append(f"{flag} overrides config.properties and must not be on the command line")
    if "--foreground" not in words:
        problems.append("without --foreground the container exits as soon as TorchServe has started")
    match = re.search(r"^torchserve==(\S+)", m["requirements"], flags=re.MULTILINE)
    image = c["image"]
    if not match or not re.fullmatch(rf"pytorch/torchserve:{re.escape(match.group(1))}-(cpu|gpu)", image):
        problems.append(f"image {image} is not the official TorchServe image of requirements.txt's version")
    return problems


def check_readiness_probe(m: Manifests) -> list[str]:
    c = container(m)
    probe = c.get("readinessProbe")
    text = probe_text(probe)
    problems = []
    if not probe or "exec" not in probe:
        problems.append("readiness must be an exec probe (it has to read the generated key)")
    for needle in ("Authorization", "Bearer", "/ping", ":8080", '["inference"]'):
        if needle not in text:
            problems.append(f"the readiness probe does not contain {needle!r}")
    key_files = re.findall(r"(/\S*?)/key_file\.json", text)
    if key_files != [c.get("workingDir", "").rstrip("/")]:
        problems.append(f"the probe reads key_file.json from {key_files}, not the working directory "
                        f"{c.get('workingDir')!r} where TorchServe writes it")
    if not c.get("livenessProbe"):
        problems.append("no liveness probe")
    return problems


def check_prometheus_annotations(m: Manifests) -> list[str]:
    annotations = m["deployment"]["spec"]["template"]["metadata"].get("annotations", {})
    problems = []
    if annotations.get("prometheus.io/scrape") != "true":
        problems.append("pod annotation prometheus.io/scrape must be \"true\"")
    _, metrics_port = bind(pod_config(m).get("metrics_address", ""))
    scraped = annotations.get("prometheus.io/port")
    if scraped != str(metrics_port):
        problems.append(f"prometheus.io/port {scraped} is not the metrics port {metrics_port}")
    if annotations.get("prometheus.io/path", "/metrics") != "/metrics":
        problems.append("TorchServe serves Prometheus text at /metrics")
    return problems


def check_kserve(m: Manifests) -> list[str]:
    isvc = m["isvc"]
    model = isvc["spec"]["predictor"]["model"]
    problems = []
    if "serviceEnvelope" in isvc["metadata"].get("labels", {}):
        problems.append("do not set the serviceEnvelope label: the TorchServe envelope breaks request batching")
    if any(var.get("name") == "TS_SERVICE_ENVELOPE" for var in model.get("env", [])):
        problems.append("do not set TS_SERVICE_ENVELOPE: the TorchServe envelope breaks request batching")
    claims = [volume["persistentVolumeClaim"]["claimName"] for volume in pod_spec(m).get("volumes", [])
              if "persistentVolumeClaim" in volume]
    uri = urllib.parse.urlsplit(model.get("storageUri", ""))
    if uri.scheme == "pvc" and uri.hostname not in claims:
        problems.append(f"storageUri names claim {uri.hostname!r}, the Deployment uses {claims}")
    return problems


def _set_service_selector(m: Manifests) -> None:
    m["service"]["spec"]["selector"] = {"app": "resnet50"}


def _target_missing_port(m: Manifests) -> None:
    m["service"]["spec"]["ports"][1]["targetPort"] = "prometheus"


def _expose_management(m: Manifests) -> None:
    m["service"]["spec"]["ports"].append({"name": "management", "port": 8081, "targetPort": 8081})


def _hpa_wrong_target(m: Manifests) -> None:
    m["hpa"]["spec"]["scaleTargetRef"]["name"] = "resnet50"


def _drop_cpu_request(m: Manifests) -> None:
    container(m)["resources"]["requests"].pop("cpu")


def _open_management(m: Manifests) -> None:
    set_config_line(m, "management_address", "http://0.0.0.0:8081")


def _open_grpc_management(m: Manifests) -> None:
    set_config_line(m, "grpc_management_address", "0.0.0.0")


def _loopback_inference(m: Manifests) -> None:
    set_config_line(m, "inference_address", "http://127.0.0.1:8080")


def _small_request_limit(m: Manifests) -> None:
    set_config_line(m, "max_request_size", "6553500")


def _token_auth_off(m: Manifests) -> None:
    set_config_line(m, "disable_token_authorization", "true")


def _model_api_on(m: Manifests) -> None:
    set_config_line(m, "enable_model_api", "true")


def _metrics_log_mode(m: Manifests) -> None:
    set_config_line(m, "metrics_mode", "log")


def _default_expiry(m: Manifests) -> None:
    set_config_line(m, "token_expiration_min", None)


def _no_model_loaded(m: Manifests) -> None:
    set_config_line(m, "load_models", None)


def _envvars_on(m: Manifests) -> None:
    set_config_line(m, "enable_envvars_config", "true")


def _drift_from_repo(m: Manifests) -> None:
    set_config_line(m, "install_py_dep_per_model", "true")


def _config_mounted_elsewhere(m: Manifests) -> None:
    container(m)["args"][-1] = "/home/model-server/config.properties"


def _image_entrypoint(m: Manifests) -> None:
    c = container(m)
    c.pop("command")
    c["args"] = ["serve"]


def _disable_token_flag(m: Manifests) -> None:
    container(m)["args"].append("--disable-token-auth")


def _image_version_drift(m: Manifests) -> None:
    container(m)["image"] = "pytorch/torchserve:0.11.1-cpu"


def _probe_without_token(m: Manifests) -> None:
    container(m)["readinessProbe"] = {"httpGet": {"path": "/ping", "port": "http"}}


def _probe_reads_wrong_key_file(m: Manifests) -> None:
    command = container(m)["readinessProbe"]["exec"]["command"]
    command[-1] = command[-1].replace("/home/model-server/key_file.json", "/tmp/key_file.json")


def _no_scrape(m: Manifests) -> None:
    m["deployment"]["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] = "8080"


def _kserve_envelope(m: Manifests) -> None:
    m["isvc"]["metadata"].setdefault("labels", {})["serviceEnvelope"] = "kserve"


def _kserve_other_claim(m: Manifests) -> None:
    m["isvc"]["spec"]["predictor"]["model"]["storageUri"] = "pvc://models/resnet50"


CROSS_CHECKS: dict[str, tuple[Callable[[Manifests], list[str]], Callable[[Manifests], None]]] = {
    "service selector matches pods": (check_selectors, _set_service_selector),
    "service targetPorts exist": (check_service_ports, _target_missing_port),
    "management port not exposed": (check_service_ports, _expose_management),
    "HPA targets the Deployment": (check_hpa_target, _hpa_wrong_target),
    "HPA CPU needs a CPU request": (check_hpa_target, _drop_cpu_request),
    "container has requests and limits": (check_resources, _drop_cpu_request),
    "management bound to loopback": (check_pod_config, _open_management),
    "gRPC management bound to loopback": (check_pod_config, _open_grpc_management),
    "inference bound to 0.0.0.0": (check_pod_config, _loopback_inference),
    "max_request_size not below repo": (check_pod_config, _small_request_limit),
    "token authorization on": (check_pod_config, _token_auth_off),
    "model API off": (check_pod_config, _model_api_on),
    "metrics in Prometheus format": (check_pod_config, _metrics_log_mode),
    "keys outlive an hour": (check_pod_config, _default_expiry),
    "the pod loads the model": (check_pod_config, _no_model_loaded),
    "no env-var overrides": (check_pod_config, _envvars_on),
    "pod config follows repo config": (check_pod_config, _drift_from_repo),
    "ConfigMap mounted where --ts-config reads": (check_config_mount, _config_mounted_elsewhere),
    "explicit torchserve command": (check_start_command, _image_entrypoint),
    "no --disable-token-auth": (check_start_command, _disable_token_flag),
    "image matches requirements.txt": (check_start_command, _image_version_drift),
    "readiness sends the token": (check_readiness_probe, _probe_without_token),
    "readiness reads the right key file": (check_readiness_probe, _probe_reads_wrong_key_file),
    "prometheus annotations": (check_prometheus_annotations, _no_scrape),
    "KServe without envelope": (check_kserve, _kserve_envelope),
    "KServe reads the same claim": (check_kserve, _kserve_other_claim),
}


@pytest.mark.parametrize("name", sorted(CROSS_CHECKS))
def test_cross_check_passes(pristine: Manifests, name: str) -> None:
    check, _ = CROSS_CHECKS[name]
    assert check(pristine) == []


@pytest.mark.parametrize("name", sorted(CROSS_CHECKS))
def test_cross_check_catches_its_mistake(manifests: Manifests, name: str) -> None:
    check, mistake = CROSS_CHECKS[name]
    mistake(manifests)
    assert check(manifests), f"{check.__name__} missed: {name}"


def test_properties_parser_refuses_garbage() -> None:
    assert parse_properties("# c\n\na = b\nc=d=e\n") == {"a": "b", "c": "d=e"}
    with pytest.raises(ValueError):
        parse_properties("inference_address http://0.0.0.0:8080\n")
    with pytest.raises(ValueError):
        parse_properties("a=1\na=2\n")
