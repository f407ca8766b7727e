"""Offline checks of the deployment manifests in deploy/: no cluster, no network.

- The Kubernetes objects are checked against the official JSON schemas that kubernetes-validate bundles,
  in strict mode, so unknown fields (typos) are errors.
- The KServe InferenceService is a CRD without a bundled schema: its own fields are checked against ISVC_SCHEMA
  below, and its pod fields (containers, volumes, security context) against the official Pod schema.
- The pod's TorchServe config is the one the image carries (deploy/image/config.properties).
- Cross-checks catch mistakes that each schema accepts but a cluster would not survive: a Service
  selecting no pods, a probe without the token, a gateway that points at the wrong port, a memory budget that
  does not add up, and so on.

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
IMAGE_DIR = REPO / "deploy" / "image"

# Fixed Kubernetes versions whose schemas kubernetes-validate 1.37.0 bundles (it has 1.25 to 1.37):
# the oldest minor these manifests target, and the newest one the package knows.
K8S_VERSIONS = ("1.31.0", "1.37.0")

K8S_FILES = {
    "deployment": ("deployment.yaml", "Deployment"),
    "service": ("service.yaml", "Service"),
    "networkpolicy": ("networkpolicy.yaml", "NetworkPolicy"),
    "hpa": ("autoscaling/hpa.yaml", "HorizontalPodAutoscaler"),
    "adapter": ("autoscaling/prometheus-adapter-rules.yaml", "ConfigMap"),
}
TORCHSERVE, GATEWAY = "torchserve", "gateway"
KSERVE_TORCHSERVE = "kserve-container"  # the container KServe gives the storageUri to

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
    manifests["kustomization"] = load_single(K8S_DIR / "kustomization.yaml")
    manifests["isvc"] = load_single(KSERVE_FILE)
    manifests["repo_config"] = (REPO / "config.properties").read_text()
    manifests["image_config"] = (IMAGE_DIR / "config.properties").read_text()
    manifests["dockerfile"] = (IMAGE_DIR / "Dockerfile").read_text()
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


def named(containers: list[dict[str, Any]], name: str) -> dict[str, Any]:
    found = [c for c in containers if c["name"] == name]
    assert len(found) == 1, f"expected one container named {name}, found {[c['name'] for c in containers]}"
    return found[0]


def container(m: Manifests, name: str = TORCHSERVE) -> dict[str, Any]:
    return named(pod_spec(m)["containers"], name)


def pod_config(m: Manifests) -> dict[str, str]:
    """The TorchServe config of every pod: the one the image carries."""
    return parse_properties(m["image_config"])


def pod_ports(m: Manifests) -> dict[str, tuple[str, int]]:
    """Port name -> (container, port) over all containers of the Deployment's pod."""
    return {port.get("name", str(port["containerPort"])): (c["name"], port["containerPort"])
            for c in pod_spec(m)["containers"] for port in c.get("ports", [])}


def bind(address: str) -> tuple[str | None, int | None]:
    parts = urllib.parse.urlsplit(address if "//" in address else f"//{address}")
    return parts.hostname, parts.port


def flags(words: list[str]) -> dict[str, str]:
    """--flag value pairs of a command line (a flag without a value maps to "")."""
    found: dict[str, str] = {}
    for index, word in enumerate(words):
        if word.startswith("--"):
            following = words[index + 1] if index + 1 < len(words) else ""
            found[word] = "" if following.startswith("--") else following
    return found


def command_line(c: dict[str, Any]) -> list[str]:
    return [*c.get("command", []), *c.get("args", [])]


def probe_text(probe: dict[str, Any] | None) -> str:
    if not probe:
        return ""
    if "exec" in probe:
        return "\n".join(probe["exec"]["command"])
    return repr(probe)


def set_config_line(m: Manifests, key: str, value: str | None) -> None:
    """Replace (or with None, delete) a key=value line of the image's config.properties; append if absent."""
    lines = m["image_config"].splitlines()
    kept = [line for line in lines if line.split("=", 1)[0].strip() != key]
    if value is not None:
        kept.append(f"{key}={value}")
    m["image_config"] = "\n".join(kept) + "\n"


def set_flag(c: dict[str, Any], flag: str, value: str) -> None:
    args = c["args"]
    args[args.index(flag) + 1] = value


def quantity_bytes(text: str) -> int:
    """A Kubernetes memory quantity (8Gi, 256Mi, 1G, 5000) or a JVM size (1g, 512m) in bytes."""
    units = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "ki": 2**10, "mi": 2**20, "gi": 2**30}
    match = re.fullmatch(r"(\d+)([A-Za-z]*)", str(text).strip())
    assert match, f"not a quantity: {text!r}"
    number, unit = int(match.group(1)), match.group(2).lower()
    if unit in ("k", "m", "g") and text[-1].islower():  # JVM sizes are binary: -Xmx1g is 1 GiB
        return number * {"k": 2**10, "m": 2**20, "g": 2**30}[unit]
    return number * units[unit]


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line.strip() else "")
            for line in joined.splitlines() if line.strip()]


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


def isvc_pod(m: Manifests) -> dict[str, Any]:
    """The InferenceService predictor's pod fields as a Pod, so the official Pod schema can check them."""
    predictor = {key: value for key, value in m["isvc"]["spec"]["predictor"].items()
                 if key not in ("minReplicas", "maxReplicas")}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": m["isvc"]["metadata"]["name"]}, "spec": predictor}


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_inferenceservice_pod_fields_match_official_pod_schema(pristine: Manifests, version: str) -> None:
    assert kubernetes_validate.validate(isvc_pod(pristine), version, strict=True)


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
    m["adapter"]["data"]["config.yaml"] = 8080


def _probe_without_handler(m: Manifests) -> None:
    container(m)["livenessProbe"]["httpGet"]["port"] = ["metrics"]


def _policy_port_as_list(m: Manifests) -> None:
    m["networkpolicy"]["spec"]["ingress"][0]["ports"][0]["port"] = ["http"]


def _gateway_args_not_text(m: Manifests) -> None:
    container(m, GATEWAY)["args"][-1] = 256000000


SCHEMA_BREAKAGES: dict[str, tuple[str, Callable[[Manifests], None]]] = {
    "misspelt readinessProbe": ("deployment", _typo_in_container),
    "probe port as a list": ("deployment", _probe_without_handler),
    "gateway argument that is a number, not text": ("deployment", _gateway_args_not_text),
    "service port as text": ("service", _port_as_text),
    "NetworkPolicy port as a list": ("networkpolicy", _policy_port_as_list),
    "British spelling in HPA target": ("hpa", _british_hpa_field),
    "HPA metric without type": ("hpa", _hpa_metric_without_type),
    "ConfigMap value that is not a string": ("adapter", _configmap_value_not_text),
}


@pytest.mark.parametrize("name", sorted(SCHEMA_BREAKAGES))
def test_kubernetes_validator_rejects_broken_copy(manifests: Manifests, name: str) -> None:
    key, breakage = SCHEMA_BREAKAGES[name]
    breakage(manifests)
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(manifests[key], K8S_VERSIONS[0], strict=True)


def test_pod_schema_rejects_a_broken_inferenceservice_container(manifests: Manifests) -> None:
    named(manifests["isvc"]["spec"]["predictor"]["containers"], GATEWAY)["volumeMount"] = []
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(isvc_pod(manifests), K8S_VERSIONS[0], strict=True)


def test_strict_mode_is_what_catches_unknown_fields(manifests: Manifests) -> None:
    """Proves strict=True matters: the lenient schemas accept the misspelt field, the strict ones do not."""
    _typo_in_container(manifests)
    kubernetes_validate.validate(manifests["deployment"], K8S_VERSIONS[0], strict=False)
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(manifests["deployment"], K8S_VERSIONS[0], strict=True)


# --------------------------------------------------------------------------------------------------
# 2. The KServe InferenceService's own fields against a small schema
# --------------------------------------------------------------------------------------------------

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
                "annotations": {
                    "type": "object",
                    "additionalProperties": {"type": "string"},
                    "properties": {"serving.kserve.io/deploymentMode": {"enum": ["RawDeployment", "Serverless",
                                                                                 "Standard", "Knative"]}},
                },
            },
        },
        "spec": {
            "type": "object",
            "required": ["predictor"],
            "additionalProperties": False,
            "properties": {
                "predictor": {
                    "type": "object",
                    # A custom predictor: containers, not a model format served by one of KServe's runtimes.
                    "required": ["containers"],
                    "not": {"required": ["model"]},
                    "properties": {
                        "minReplicas": {"type": "integer", "minimum": 0},
                        "maxReplicas": {"type": "integer", "minimum": 1},
                        "containers": {"type": "array", "minItems": 1,
                                       "contains": {"properties": {"name": {"const": KSERVE_TORCHSERVE}}}},
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


def _isvc_predictor(m: Manifests) -> dict[str, Any]:
    return m["isvc"]["spec"]["predictor"]


ISVC_BREAKAGES: dict[str, Callable[[Manifests], None]] = {
    "old API version": lambda m: m["isvc"].update(apiVersion="serving.kubeflow.org/v1alpha2"),
    "wrong kind": lambda m: m["isvc"].update(kind="InferenceServices"),
    "name with capitals": lambda m: m["isvc"]["metadata"].update(name="EfficientNet"),
    "KServe's TorchServe runtime": lambda m: _isvc_predictor(m).update(model={"modelFormat": {"name": "pytorch"}}),
    "no containers": lambda m: _isvc_predictor(m).pop("containers"),
    "no kserve-container": lambda m: _isvc_predictor(m)["containers"][0].update(name="torchserve"),
    "transformer typo beside the predictor": lambda m: m["isvc"]["spec"].update(tranformer={}),
    "unknown deployment mode": lambda m: m["isvc"]["metadata"]["annotations"].update(
        {"serving.kserve.io/deploymentMode": "Raw"}),
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
    selectors = {
        "Deployment selector": m["deployment"]["spec"]["selector"].get("matchLabels", {}),
        "Service selector": m["service"]["spec"].get("selector", {}),
        "NetworkPolicy podSelector": m["networkpolicy"]["spec"]["podSelector"].get("matchLabels", {}),
    }
    for what, selector in selectors.items():
        if not selector or any(pod_labels.get(key) != value for key, value in selector.items()):
            problems.append(f"{what} {selector} selects no Deployment pod (labels {pod_labels})")
    return problems


def check_service_ports(m: Manifests) -> list[str]:
    ports = pod_ports(m)
    problems = []
    targets = {}
    for port in m["service"]["spec"]["ports"]:
        target = port.get("targetPort", port["port"])
        owner = ports.get(target) if isinstance(target, str) else next(
            (entry for entry in ports.values() if entry[1] == target), None)
        if owner is None:
            problems.append(f"Service port {port['port']} targets {target!r}, not a container port")
        targets[port["port"]] = owner
    if (targets.get(8080) or ("", 0))[0] != GATEWAY:
        problems.append(f"Service port 8080 must lead to the gateway container; it leads to {targets.get(8080)}")
    if (targets.get(8082) or ("", 0))[0] != TORCHSERVE:
        problems.append(f"Service port 8082 must lead to TorchServe's metrics; it leads to {targets.get(8082)}")
    _, inference_port = bind(pod_config(m).get("inference_address", ""))
    for private in (8081, inference_port):
        if private in targets or any(entry[1] == private for entry in ports.values()):
            problems.append(f"TorchServe's own port {private} must not be exposed by the Service or declared")
    if m["service"]["spec"].get("type", "ClusterIP") != "ClusterIP":
        problems.append("the Service must be ClusterIP (publish it through an Ingress that terminates TLS)")
    return problems


def check_network_policy(m: Manifests) -> list[str]:
    spec = m["networkpolicy"]["spec"]
    problems = []
    if "Ingress" not in spec.get("policyTypes", []):
        problems.append("the NetworkPolicy must govern Ingress")
    for rule in spec.get("ingress", []):
        allowed = [port.get("port") for port in rule.get("ports", [])]
        if not allowed:
            problems.append(f"ingress rule {rule} allows every port")
        for port in allowed:
            if port not in ("http", "metrics"):
                problems.append(f"ingress rule allows port {port!r}: only the gateway (http) and metrics")
            if port == "metrics" and not rule.get("from"):
                problems.append("metrics (no token) must be limited to the scrapers' namespace")
    if not any("http" in [port.get("port") for port in rule.get("ports", [])] for rule in spec.get("ingress", [])):
        problems.append("no ingress rule lets clients reach the gateway (http)")
    return problems


def check_kustomization(m: Manifests) -> list[str]:
    resources = m["kustomization"].get("resources", [])
    problems = [f"kustomization lists {name}, which does not exist" for name in resources
                if not (K8S_DIR / name).exists()]
    for key in ("deployment", "service", "networkpolicy"):
        if K8S_FILES[key][0] not in resources:
            problems.append(f"the default apply set lacks {K8S_FILES[key][0]}")
    if any(name.startswith("autoscaling") for name in resources):
        problems.append("autoscaling needs prometheus-adapter: keep it out of the default apply set")
    return problems


def adapter_metric_names(m: Manifests) -> set[str]:
    rules = yaml.safe_load(m["adapter"]["data"]["config.yaml"])["rules"]
    return {rule["name"]["as"] for rule in rules}


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
    for metric in spec["metrics"]:
        if metric["type"] == "Pods" and metric["pods"]["metric"]["name"] not in adapter_metric_names(m):
            problems.append(f"no prometheus-adapter rule serves {metric['pods']['metric']['name']}")
    # CPU utilisation is a percentage of the pod's CPU requests: every container needs one.
    for c in pod_spec(m)["containers"]:
        if not c.get("resources", {}).get("requests", {}).get("cpu"):
            problems.append(f"container {c['name']} has no CPU request, so the HPA's CPU utilisation is undefined")
    return problems


def check_resources(m: Manifests) -> list[str]:
    return [f"container {c['name']} resources.{kind}.{name} is missing"
            for c in pod_spec(m)["containers"] for kind in ("requests", "limits") for name in ("cpu", "memory")
            if not c.get("resources", {}).get(kind, {}).get(name)]


LOOPBACK = ("127.0.0.1", "localhost")
# Keys where the image's config differs from the repo's by design (see deploy/image/config.properties).
DIFFERS_BY_DESIGN = {"inference_address", "management_address", "metrics_address", "model_store", "max_request_size",
                     "max_response_size", "token_expiration_min", "load_models", "vmargs"}


def check_pod_config(m: Manifests) -> list[str]:
    config = pod_config(m)
    repo = parse_properties(m["repo_config"])
    ports = pod_ports(m)
    problems = []
    host, _ = bind(config.get("inference_address", ""))
    if host not in LOOPBACK:
        problems.append(f"inference_address must stay on loopback (only the gateway reaches it); it is "
                        f"{config.get('inference_address')!r}")
    host, port = bind(config.get("metrics_address", ""))
    if host != "0.0.0.0" or ports.get("metrics") != (TORCHSERVE, port):
        problems.append(f"metrics_address must bind 0.0.0.0 on the metrics container port; it is "
                        f"{config.get('metrics_address')!r}")
    host, _ = bind(config.get("management_address", ""))
    if host not in LOOPBACK:
        problems.append(f"management_address must stay on loopback; it is {config.get('management_address')!r}")
    # TorchServe 0.12 binds gRPC to 127.0.0.1 unless told otherwise; the Service exposes no gRPC port.
    for key in ("grpc_inference_address", "grpc_management_address"):
        if config.get(key, "127.0.0.1") not in LOOPBACK:
            problems.append(f"{key} must stay on loopback; it is {config.get(key)!r}")
    expected = {"disable_token_authorization": "false", "enable_model_api": "false", "metrics_mode": "prometheus"}
    for key, value in expected.items():
        if config.get(key, "").lower() != value:
            problems.append(f"{key} must be {value}; it is {config.get(key)!r}")
    if config.get("enable_envvars_config", "false").lower() == "true":
        problems.append("enable_envvars_config=true lets TS_* variables override the security settings")
    if "service_envelope" in config:
        problems.append("service_envelope must not be set: our handler parses KServe bodies itself")
    try:
        expiry = float(config.get("token_expiration_min", "60"))
    except ValueError:
        expiry = 0.0
    if expiry < 24 * 60:
        problems.append(f"token_expiration_min={config.get('token_expiration_min')}: keys (and readiness) die early")
    if not config.get("load_models", "").endswith(".mar"):
        problems.append("load_models must name the archive to serve (scripts/serve.sh passes it as --models)")
    model_mounts = [mount["mountPath"] for mount in container(m).get("volumeMounts", [])
                    if mount["name"] == "model-store"]
    if not model_mounts or not config.get("model_store", "").startswith(model_mounts[0].rstrip("/") + "/"):
        problems.append(f"model_store={config.get('model_store')} is not inside the model-store mount {model_mounts}")
    for key in sorted((set(repo) | set(config)) - DIFFERS_BY_DESIGN):
        if repo.get(key) != config.get(key):
            problems.append(f"{key} is {config.get(key)!r} in the image but {repo.get(key)!r} in config.properties")
    return problems


def check_gateway_wiring(m: Manifests) -> list[str]:
    """The gateway talks to this pod's TorchServe, reads the key where TorchServe writes it, and enforces the same
    body limit as TorchServe."""
    gateway, torchserve = container(m, GATEWAY), container(m)
    args = flags(command_line(gateway))
    config = pod_config(m)
    problems = []
    if bind(args.get("--upstream", "")) != bind(config.get("inference_address", "")):
        problems.append(f"gateway --upstream {args.get('--upstream')} is not TorchServe's inference_address "
                        f"{config.get('inference_address')}")
    key_file = f"{torchserve.get('workingDir', '').rstrip('/')}/key_file.json"
    if args.get("--key-file") != key_file:
        problems.append(f"gateway --key-file {args.get('--key-file')} is not {key_file}, where TorchServe writes it")
    key_dir = key_file.rsplit("/", 1)[0]
    shared = [{mount["name"] for mount in c.get("volumeMounts", []) if mount["mountPath"] == key_dir}
              for c in (gateway, torchserve)]
    if not shared[0] & shared[1]:
        problems.append(f"{key_dir} is not one volume mounted in both containers")
    secrets = {volume["name"] for volume in pod_spec(m).get("volumes", []) if "secret" in volume}
    tokens_dir = args.get("--tokens-file", "").rsplit("/", 1)[0]
    if not any(mount["mountPath"] == tokens_dir and mount["name"] in secrets for mount in gateway["volumeMounts"]):
        problems.append(f"the gateway's --tokens-file {args.get('--tokens-file')} is not in a mounted Secret")
    if args.get("--max-body-bytes") != config.get("max_request_size"):
        problems.append(f"gateway --max-body-bytes {args.get('--max-body-bytes')} differs from TorchServe's "
                        f"max_request_size {config.get('max_request_size')}")
    return problems


# The memory budget (docs/deploy.md, "Memory budget"). F = the gateway's --inflight-bytes: the body bytes that may
# be in the pod at once. The frontend buffers each admitted body in direct memory while it arrives, keeps a heap
# copy while it is queued, and encodes each batch into one direct buffer that may double while it grows.
JVM_NON_HEAP = 256 * 2**20  # metaspace, code cache, thread stacks, GC structures: 70-110 MB measured
WORKER_IDLE = 2 * 2**30  # the demo worker measured 1.36 GB idle (torch, timm, openvino imported, model warm)
WORKER_PER_BODY_BYTE = 4  # bytes in the worker per body byte: raw + JSON text + parsed strings + base64-decoded


def memory_budget(m: Manifests) -> dict[str, int]:
    vmargs = pod_config(m).get("vmargs", "")
    heap = re.search(r"-Xmx(\d+[kmgKMG]?)", vmargs)
    direct = re.search(r"-XX:MaxDirectMemorySize=(\d+[kmgKMG]?)", vmargs)
    inflight = int(flags(command_line(container(m, GATEWAY))).get("--inflight-bytes", "0"))
    return {
        "heap": quantity_bytes(heap.group(1)) if heap else 0,
        "direct": quantity_bytes(direct.group(1)) if direct else 0,
        "inflight": inflight,
        "limit": quantity_bytes(container(m)["resources"]["limits"]["memory"]),
    }


def check_memory_budget(m: Manifests) -> list[str]:
    budget = memory_budget(m)
    problems = []
    if not budget["heap"] or not budget["direct"]:
        problems.append("vmargs must set -Xmx and -XX:MaxDirectMemorySize, or the JVM sizes itself from the pod")
        return problems
    if budget["heap"] < budget["inflight"] + 256 * 2**20:
        problems.append("-Xmx must hold every admitted body (a heap copy each) plus 256 MiB")
    if budget["direct"] < 3 * budget["inflight"]:
        problems.append("MaxDirectMemorySize must hold the admitted bodies arriving plus a batch buffer twice their "
                        "size; a batch that cannot be encoded hangs until responseTimeout and its worker is killed")
    needed = budget["heap"] + budget["direct"] + JVM_NON_HEAP + WORKER_IDLE + WORKER_PER_BODY_BYTE * budget["inflight"]
    if needed > budget["limit"]:
        problems.append(f"the TorchServe container needs up to {needed / 2**30:.2f} GiB; its limit is "
                        f"{budget['limit'] / 2**30:.2f} GiB")
    return problems


def dockerfile_copy_target(m: Manifests, source: str) -> str | None:
    for instruction, arguments in dockerfile_instructions(m["dockerfile"]):
        words = arguments.split()
        if instruction == "COPY" and source in words[:-1]:
            return words[-1]
    return None


def check_start_command(m: Manifests) -> list[str]:
    problems = []
    config_in_image = dockerfile_copy_target(m, "deploy/image/config.properties")
    for c in (container(m), named(m["isvc"]["spec"]["predictor"]["containers"], KSERVE_TORCHSERVE)):
        words = command_line(c)
        if not c.get("command") or c["command"][0] != "torchserve":
            problems.append(f"{c['name']}: start torchserve explicitly (command), not through an entrypoint script")
        for flag in ("--disable-token-auth", "--dt", "--enable-model-api"):
            if flag in words:
                problems.append(f"{c['name']}: {flag} overrides config.properties and must not be on the command line")
        if "--foreground" not in words:
            problems.append(f"{c['name']}: without --foreground the container exits as soon as TorchServe started")
        if flags(words).get("--ts-config") != config_in_image:
            problems.append(f"{c['name']}: --ts-config {flags(words).get('--ts-config')} is not the config the "
                            f"image carries ({config_in_image})")
    gateway_script = dockerfile_copy_target(m, "deploy/gateway/key_gateway.py")
    if command_line(container(m, GATEWAY))[:2] != ["python", gateway_script]:
        problems.append(f"the gateway must run the script the image carries ({gateway_script})")
    images = {c["image"] for c in pod_spec(m)["containers"]} | {
        c["image"] for c in m["isvc"]["spec"]["predictor"]["containers"]}
    if len(images) != 1:
        problems.append(f"every container runs the one serving image; found {sorted(images)}")
    if any(image.startswith("pytorch/torchserve") for image in images):
        problems.append("the official TorchServe image lacks timm and openvino and runs Python 3.9: use ours")
    return problems


def check_non_root(m: Manifests) -> list[str]:
    users = [arguments.strip() for instruction, arguments in dockerfile_instructions(m["dockerfile"])
             if instruction == "USER"]
    problems = []
    if not users or not users[-1].isdigit() or int(users[-1]) == 0:
        problems.append(f"the image's USER must be a non-root number (Kubernetes checks numbers); it is {users}")
    for where, security in (("Deployment", pod_spec(m).get("securityContext", {})),
                            ("InferenceService", m["isvc"]["spec"]["predictor"].get("securityContext", {}))):
        if security.get("runAsNonRoot") is not True or str(security.get("runAsUser")) != (users or [""])[-1]:
            problems.append(f"{where} must set runAsNonRoot and runAsUser {users[-1] if users else '?'}")
    for c in pod_spec(m)["containers"]:
        context = c.get("securityContext", {})
        if context.get("allowPrivilegeEscalation") is not False or context.get("capabilities", {}).get("drop") != [
                "ALL"]:
            problems.append(f"container {c['name']} must drop all capabilities and forbid privilege escalation")
    return problems


def check_readiness_probe(m: Manifests) -> list[str]:
    c = container(m)
    probe = c.get("readinessProbe")
    text = probe_text(probe)
    problems = []
    if not probe or "exec" not in probe:
        problems.append("readiness must be an exec probe (it has to read the generated key)")
    _, port = bind(pod_config(m).get("inference_address", ""))
    for needle in ("Authorization", "Bearer", "/ping", f"127.0.0.1:{port}/", '["inference"]'):
        if needle not in text:
            problems.append(f"the readiness probe does not contain {needle!r}")
    key_files = re.findall(r"(/\S*?)/key_file\.json", text)
    if key_files != [c.get("workingDir", "").rstrip("/")]:
        problems.append(f"the probe reads key_file.json from {key_files}, not the working directory "
                        f"{c.get('workingDir')!r} where TorchServe writes it")
    for each in pod_spec(m)["containers"]:
        if not each.get("livenessProbe") or not each.get("readinessProbe"):
            problems.append(f"container {each['name']} needs a liveness and a readiness probe")
    return problems


def check_prometheus_annotations(m: Manifests) -> list[str]:
    annotations = m["deployment"]["spec"]["template"]["metadata"].get("annotations", {})
    problems = []
    if annotations.get("prometheus.io/scrape") != "true":
        problems.append("pod annotation prometheus.io/scrape must be \"true\"")
    _, metrics_port = bind(pod_config(m).get("metrics_address", ""))
    for where, scraped in (("Deployment", annotations.get("prometheus.io/port")),
                           ("InferenceService", m["isvc"]["metadata"]["annotations"].get("prometheus.kserve.io/port"))):
        if scraped != str(metrics_port):
            problems.append(f"{where} scrapes port {scraped}, not the metrics port {metrics_port}")
    if annotations.get("prometheus.io/path", "/metrics") != "/metrics":
        problems.append("TorchServe serves Prometheus text at /metrics")
    return problems


def check_kserve(m: Manifests) -> list[str]:
    isvc = m["isvc"]
    predictor = isvc["spec"]["predictor"]
    problems = []
    if "serviceEnvelope" in isvc["metadata"].get("labels", {}):
        problems.append("do not set the serviceEnvelope label: the TorchServe envelope breaks request batching")
    torchserve = named(predictor["containers"], KSERVE_TORCHSERVE)
    env = {var["name"]: var.get("value") for var in torchserve.get("env", [])}
    if "TS_SERVICE_ENVELOPE" in env:
        problems.append("do not set TS_SERVICE_ENVELOPE: the TorchServe envelope breaks request batching")
    claims = [volume["persistentVolumeClaim"]["claimName"] for volume in pod_spec(m).get("volumes", [])
              if "persistentVolumeClaim" in volume]
    sub_paths = [mount.get("subPath") for mount in container(m)["volumeMounts"] if mount["name"] == "model-store"]
    uri = urllib.parse.urlsplit(env.get("STORAGE_URI", ""))
    if uri.scheme != "pvc" or uri.hostname not in claims or uri.path.strip("/") not in sub_paths:
        problems.append(f"STORAGE_URI {env.get('STORAGE_URI')} is not the Deployment's claim {claims} "
                        f"and directory {sub_paths}")
    if command_line(named(predictor["containers"], GATEWAY)) != command_line(container(m, GATEWAY)):
        problems.append("the KServe gateway must run as the Deployment's (same limits, same wiring)")
    if torchserve.get("workingDir") != container(m).get("workingDir"):
        problems.append("kserve-container must work where the gateway reads key_file.json")
    for name in (KSERVE_TORCHSERVE, GATEWAY):
        kserve_limits = named(predictor["containers"], name)["resources"]
        deployment_limits = container(m, TORCHSERVE if name == KSERVE_TORCHSERVE else GATEWAY)["resources"]
        if kserve_limits != deployment_limits:
            problems.append(f"{name}'s resources differ from the Deployment's: the memory budget is checked there")
    ports = [port["containerPort"] for c in predictor["containers"] for port in c.get("ports", [])]
    if ports != [8080] or not named(predictor["containers"], GATEWAY).get("ports"):
        problems.append(f"only the gateway may declare a port (8080, where KServe sends traffic); found {ports}")
    return problems


def _set_service_selector(m: Manifests) -> None:
    m["service"]["spec"]["selector"] = {"app": "resnet50"}


def _policy_selects_nothing(m: Manifests) -> None:
    m["networkpolicy"]["spec"]["podSelector"]["matchLabels"] = {"app": "resnet50"}


def _target_missing_port(m: Manifests) -> None:
    m["service"]["spec"]["ports"][1]["targetPort"] = "prometheus"


def _service_skips_gateway(m: Manifests) -> None:
    container(m)["ports"].append({"name": "direct", "containerPort": 8085})
    m["service"]["spec"]["ports"][0]["targetPort"] = "direct"


def _expose_management(m: Manifests) -> None:
    m["service"]["spec"]["ports"].append({"name": "management", "port": 8081, "targetPort": 8081})


def _policy_allows_everything(m: Manifests) -> None:
    m["networkpolicy"]["spec"]["ingress"].append({})


def _policy_opens_metrics(m: Manifests) -> None:
    m["networkpolicy"]["spec"]["ingress"][1].pop("from")


def _hpa_in_default_set(m: Manifests) -> None:
    m["kustomization"]["resources"].append("autoscaling/hpa.yaml")


def _hpa_wrong_target(m: Manifests) -> None:
    m["hpa"]["spec"]["scaleTargetRef"]["name"] = "resnet50"


def _adapter_rule_renamed(m: Manifests) -> None:
    m["adapter"]["data"]["config.yaml"] = m["adapter"]["data"]["config.yaml"].replace(
        '"images_processed_per_second"', '"images_per_second"')


def _drop_gateway_cpu_request(m: Manifests) -> None:
    container(m, GATEWAY)["resources"]["requests"].pop("cpu")


def _open_inference(m: Manifests) -> None:
    set_config_line(m, "inference_address", "http://0.0.0.0:8085")


def _open_management(m: Manifests) -> None:
    set_config_line(m, "management_address", "http://0.0.0.0:8081")


def _open_grpc_management(m: Manifests) -> None:
    set_config_line(m, "grpc_management_address", "0.0.0.0")


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


def _model_store_elsewhere(m: Manifests) -> None:
    set_config_line(m, "model_store", "/home/model-server/model-store")


def _envvars_on(m: Manifests) -> None:
    set_config_line(m, "enable_envvars_config", "true")


def _drift_from_repo(m: Manifests) -> None:
    set_config_line(m, "install_py_dep_per_model", "true")


def _gateway_wrong_upstream(m: Manifests) -> None:
    set_flag(container(m, GATEWAY), "--upstream", "127.0.0.1:8080")


def _gateway_reads_other_key_file(m: Manifests) -> None:
    set_flag(container(m, GATEWAY), "--key-file", "/tmp/key_file.json")


def _gateway_without_shared_volume(m: Manifests) -> None:
    container(m, GATEWAY)["volumeMounts"] = [mount for mount in container(m, GATEWAY)["volumeMounts"]
                                             if mount["name"] != "run"]


def _gateway_larger_bodies(m: Manifests) -> None:
    set_flag(container(m, GATEWAY), "--max-body-bytes", "460000000")


def _more_in_flight(m: Manifests) -> None:
    set_flag(container(m, GATEWAY), "--inflight-bytes", "2000000000")


def _bigger_heap(m: Manifests) -> None:
    set_config_line(m, "vmargs", "-Xmx6g -XX:MaxDirectMemorySize=1g")


def _small_direct_memory(m: Manifests) -> None:
    set_config_line(m, "vmargs", "-Xmx1g -XX:MaxDirectMemorySize=512m")


def _no_vmargs(m: Manifests) -> None:
    set_config_line(m, "vmargs", None)


def _image_entrypoint(m: Manifests) -> None:
    c = container(m)
    c.pop("command")
    c["args"] = ["serve"]


def _disable_token_flag(m: Manifests) -> None:
    container(m)["args"].append("--disable-token-auth")


def _config_read_elsewhere(m: Manifests) -> None:
    set_flag(container(m), "--ts-config", "/home/model-server/config/config.properties")


def _official_image(m: Manifests) -> None:
    for c in pod_spec(m)["containers"]:
        c["image"] = "pytorch/torchserve:0.12.0-cpu"


def _root_user(m: Manifests) -> None:
    pod_spec(m)["securityContext"]["runAsUser"] = 0


def _gateway_keeps_capabilities(m: Manifests) -> None:
    container(m, GATEWAY)["securityContext"].pop("capabilities")


def _probe_without_token(m: Manifests) -> None:
    container(m)["readinessProbe"] = {"httpGet": {"path": "/ping", "port": "metrics"}}


def _probe_reads_wrong_key_file(m: Manifests) -> None:
    command = container(m)["readinessProbe"]["exec"]["command"]
    command[-1] = command[-1].replace("/home/model-server/run/key_file.json", "/tmp/key_file.json")


def _probe_pings_the_gateway(m: Manifests) -> None:
    command = container(m)["readinessProbe"]["exec"]["command"]
    command[-1] = command[-1].replace("127.0.0.1:8085/", "127.0.0.1:8080/")


def _no_scrape(m: Manifests) -> None:
    m["deployment"]["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] = "8080"


def _kserve_envelope(m: Manifests) -> None:
    m["isvc"]["metadata"].setdefault("labels", {})["serviceEnvelope"] = "kserve"


def _kserve_other_claim(m: Manifests) -> None:
    named(m["isvc"]["spec"]["predictor"]["containers"], KSERVE_TORCHSERVE)["env"][0]["value"] = "pvc://models/resnet50"


def _kserve_gateway_differs(m: Manifests) -> None:
    set_flag(named(m["isvc"]["spec"]["predictor"]["containers"], GATEWAY), "--inflight-bytes", "900000000")


def _kserve_torchserve_declares_port(m: Manifests) -> None:
    named(m["isvc"]["spec"]["predictor"]["containers"], KSERVE_TORCHSERVE)["ports"] = [{"containerPort": 8082}]


CROSS_CHECKS: dict[str, tuple[Callable[[Manifests], list[str]], Callable[[Manifests], None]]] = {
    "service selector matches pods": (check_selectors, _set_service_selector),
    "network policy selects the pods": (check_selectors, _policy_selects_nothing),
    "service targetPorts exist": (check_service_ports, _target_missing_port),
    "service leads to the gateway": (check_service_ports, _service_skips_gateway),
    "management port not exposed": (check_service_ports, _expose_management),
    "network policy allows only the gateway and metrics": (check_network_policy, _policy_allows_everything),
    "metrics only from the scrapers": (check_network_policy, _policy_opens_metrics),
    "autoscaling out of the default apply set": (check_kustomization, _hpa_in_default_set),
    "HPA targets the Deployment": (check_hpa_target, _hpa_wrong_target),
    "HPA metric served by the adapter rule": (check_hpa_target, _adapter_rule_renamed),
    "HPA CPU needs every CPU request": (check_hpa_target, _drop_gateway_cpu_request),
    "containers have requests and limits": (check_resources, _drop_gateway_cpu_request),
    "inference bound to loopback": (check_pod_config, _open_inference),
    "management bound to loopback": (check_pod_config, _open_management),
    "gRPC management bound to loopback": (check_pod_config, _open_grpc_management),
    "token authorization on": (check_pod_config, _token_auth_off),
    "model API off": (check_pod_config, _model_api_on),
    "metrics in Prometheus format": (check_pod_config, _metrics_log_mode),
    "keys outlive an hour": (check_pod_config, _default_expiry),
    "the pod loads the model": (check_pod_config, _no_model_loaded),
    "model store on the volume": (check_pod_config, _model_store_elsewhere),
    "no env-var overrides": (check_pod_config, _envvars_on),
    "image config follows repo config": (check_pod_config, _drift_from_repo),
    "gateway forwards to TorchServe": (check_gateway_wiring, _gateway_wrong_upstream),
    "gateway reads TorchServe's key file": (check_gateway_wiring, _gateway_reads_other_key_file),
    "key file on a shared volume": (check_gateway_wiring, _gateway_without_shared_volume),
    "gateway body limit is TorchServe's": (check_gateway_wiring, _gateway_larger_bodies),
    "memory: bytes in flight fit the pod": (check_memory_budget, _more_in_flight),
    "memory: heap fits the pod": (check_memory_budget, _bigger_heap),
    "memory: direct memory holds a batch": (check_memory_budget, _small_direct_memory),
    "memory: JVM sized explicitly": (check_memory_budget, _no_vmargs),
    "explicit torchserve command": (check_start_command, _image_entrypoint),
    "no --disable-token-auth": (check_start_command, _disable_token_flag),
    "the config the image carries": (check_start_command, _config_read_elsewhere),
    "our image, not the official one": (check_start_command, _official_image),
    "non-root numeric user": (check_non_root, _root_user),
    "capabilities dropped": (check_non_root, _gateway_keeps_capabilities),
    "readiness sends the token": (check_readiness_probe, _probe_without_token),
    "readiness reads the right key file": (check_readiness_probe, _probe_reads_wrong_key_file),
    "readiness asks TorchServe itself": (check_readiness_probe, _probe_pings_the_gateway),
    "prometheus annotations": (check_prometheus_annotations, _no_scrape),
    "KServe without envelope": (check_kserve, _kserve_envelope),
    "KServe reads the same claim": (check_kserve, _kserve_other_claim),
    "KServe gateway as the Deployment's": (check_kserve, _kserve_gateway_differs),
    "KServe traffic to the gateway": (check_kserve, _kserve_torchserve_declares_port),
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


def test_memory_budget_of_the_pod(pristine: Manifests) -> None:
    """The numbers docs/deploy.md states: 1 GiB heap, 1 GiB direct, 256 MB in flight, an 8 GiB container."""
    assert memory_budget(pristine) == {"heap": 2**30, "direct": 2**30, "inflight": 256_000_000, "limit": 8 * 2**30}


def test_quantities_parse_as_kubernetes_and_the_jvm_mean_them() -> None:
    assert [quantity_bytes(text) for text in ("8Gi", "256Mi", "1G", "5000", "1g", "512m")] == [
        8 * 2**30, 256 * 2**20, 10**9, 5000, 2**30, 512 * 2**20]


def test_properties_parser_refuses_garbage() -> None:
    assert parse_properties("# c\n\na = b\nc=d=e\n") == {"a": "b", "c": "d=e"}
    with pytest.raises(ValueError):
        parse_properties("inference_address http://0.0.0.0:8080\n")
    with pytest.raises(ValueError):
        parse_properties("a=1\na=2\n")
