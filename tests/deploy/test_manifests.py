"""docker-compose.yml, .env, the Dockerfile and the Kubernetes base agree with the code.

No container engine or cluster is needed: the files are parsed and compared with the
services' settings classes (env prefixes, fields, port defaults), ``sluice.topology``,
the launcher, ``config/providers.yaml`` and the embedded NATS configuration.
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import AliasChoices
from pydantic_settings import BaseSettings
from sluice.devtools.embedded import MAX_PAYLOAD_BYTES
from sluice.devtools.up.plan import SERVICE_ENV_PREFIX, SERVICE_MODULES
from sluice.settings import CommonSettings
from sluice.topology import ALL_SERVICES, DEFAULT_PORTS, QDRANT_HTTP_PORT, ServiceName

REPO = Path(__file__).resolve().parents[2]
K8S_BASE = REPO / "deploy" / "k8s" / "base"
COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "deploy" / "docker" / "Dockerfile"
ENV_REF = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


# --- what the code says -------------------------------------------------------------------


def settings_class(name: ServiceName) -> type[BaseSettings]:
    """The service's own settings class: the BaseSettings subclass of its settings module
    that declares a gRPC port."""
    module = importlib.import_module(f"{SERVICE_MODULES[name]}.settings")
    found = [
        obj
        for obj in vars(module).values()
        if isinstance(obj, type)
        and issubclass(obj, BaseSettings)
        and obj.__module__ == module.__name__
        and "grpc_port" in obj.model_fields
    ]
    assert len(found) == 1, f"{module.__name__}: expected one settings class, found {found}"
    return found[0]


def env_names(cls: type[BaseSettings]) -> set[str]:
    """Every environment variable a settings class (and its nested settings) reads."""
    prefix = str(cls.model_config.get("env_prefix") or "")
    names: set[str] = set()
    for field_name, field in cls.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseSettings):
            names |= env_names(annotation)
            continue
        alias = field.validation_alias
        if isinstance(alias, AliasChoices):
            names |= {c.upper() for c in alias.choices if isinstance(c, str)}
        elif isinstance(alias, str):
            names.add(alias.upper())
        else:
            names.add(f"{prefix}{field_name}".upper())
    return names


def field_default(cls: type[BaseSettings], field_name: str) -> Any:
    return cls.model_fields[field_name].get_default(call_default_factory=True)


@cache
def providers_config() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((REPO / "config" / "providers.yaml").read_text())
    return data


@cache
def valid_env_names() -> frozenset[str]:
    """SLUICE_* variables something reads: the settings classes, and the references in
    config/providers.yaml (``${SLUICE_LLAMA_URL:-...}``)."""
    names = env_names(CommonSettings)
    for service in ALL_SERVICES:
        names |= env_names(settings_class(service))
    raw = (REPO / "config" / "providers.yaml").read_text()
    names |= {m.group(1) for m in ENV_REF.finditer(raw)}
    return frozenset(names)


def provider_key_envs() -> set[str]:
    return {
        p["api_key_env"]
        for p in providers_config()["providers"].values()
        if isinstance(p, dict) and p.get("api_key_env")
    }


def check_env_names(where: str, names: set[str]) -> None:
    unknown = {n for n in names if n.startswith("SLUICE_") and n not in valid_env_names()}
    assert not unknown, f"{where}: {sorted(unknown)} are not read by any settings class"
    # Unprefixed names a settings class reads by alias (QDRANT_URL) are settings too.
    others = {
        n for n in names if not n.startswith(("SLUICE_", "OTEL_")) and n not in valid_env_names()
    }
    assert others <= provider_key_envs(), (
        f"{where}: {sorted(others - provider_key_envs())} are neither settings nor a "
        "provider's api_key_env"
    )


def expected_port_env(name: ServiceName) -> dict[str, int]:
    """The port variables of a service and the values they must have."""
    prefix = SERVICE_ENV_PREFIX[name]
    ports = DEFAULT_PORTS[name]
    expected = {f"{prefix}GRPC_PORT": ports.grpc}
    if ports.http is not None:
        expected[f"{prefix}PORT"] = ports.http
    else:
        expected[f"{prefix}METRICS_PORT"] = ports.metrics
    return expected


def common_settings_in(
    env: Mapping[str, str | None], monkeypatch: pytest.MonkeyPatch
) -> CommonSettings:
    """``CommonSettings`` as a process with exactly this environment's SLUICE_* reads them."""
    for name in list(os.environ):
        if name.startswith("SLUICE_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        if name.startswith("SLUICE_") and value is not None:
            monkeypatch.setenv(name, value)
    return CommonSettings()


# --- settings against topology and launcher -------------------------------------------------


@pytest.mark.parametrize("name", ALL_SERVICES, ids=str)
def test_settings_prefix_and_ports_match_topology(name: ServiceName) -> None:
    cls = settings_class(name)
    assert cls.model_config.get("env_prefix") == SERVICE_ENV_PREFIX[name]
    ports = DEFAULT_PORTS[name]
    assert field_default(cls, "grpc_port") == ports.grpc
    if ports.http is not None:
        assert field_default(cls, "port") == ports.http
    else:
        assert field_default(cls, "metrics_port") == ports.metrics
    for var in expected_port_env(name):
        assert var in env_names(cls)


def test_listeners_are_on_loopback_locally_and_on_every_interface_elsewhere(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert common_settings_in({}, monkeypatch).listen_host == "127.0.0.1"
    deployed = common_settings_in({"SLUICE_ENVIRONMENT": "production"}, monkeypatch)
    assert deployed.listen_host == "0.0.0.0"
    chosen = {"SLUICE_ENVIRONMENT": "production", "SLUICE_LISTEN_HOST": "::1"}
    assert common_settings_in(chosen, monkeypatch).listen_host == "::1"


def test_default_ports_are_distinct() -> None:
    seen: dict[int, str] = {}
    for name, ports in DEFAULT_PORTS.items():
        for kind, port in (("grpc", ports.grpc), ("metrics", ports.metrics), ("http", ports.http)):
            if port is None or (kind == "metrics" and port == ports.http):
                continue
            assert port not in seen, f"{name} {kind} port {port} is also {seen[port]}"
            seen[port] = f"{name} {kind}"


# --- docker compose --------------------------------------------------------------------------


def dotenv() -> dict[str, str]:
    values: dict[str, str] = {}
    for raw in (REPO / ".env").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f".env: not KEY=VALUE: {line!r}"
        values[key.strip()] = value.strip()
    return values


def substitute(value: Any, env: dict[str, str]) -> Any:
    """docker compose's ${VAR} and ${VAR:-default}; an unset VAR without default fails."""
    if isinstance(value, str):

        def one(match: re.Match[str]) -> str:
            var, default = match.group(1), match.group(2)
            if var in env:
                return env[var]
            assert default is not None, f"${{{var}}} is used but not defined in .env"
            return default

        return ENV_REF.sub(one, value)
    if isinstance(value, list):
        return [substitute(v, env) for v in value]
    if isinstance(value, dict):
        return {k: substitute(v, env) for k, v in value.items()}
    return value


@cache
def compose() -> dict[str, Any]:
    raw = yaml.safe_load(COMPOSE.read_text())
    resolved: dict[str, Any] = substitute(raw, dotenv())
    return resolved


def compose_env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    assert isinstance(env, dict), "use the mapping form of environment"
    return {k: str(v) for k, v in env.items()}


def published_container_ports(service: dict[str, Any]) -> set[int]:
    return {int(str(p).rsplit(":", 1)[-1]) for p in service.get("ports", [])}


def test_dotenv_ports_match_topology() -> None:
    env = dotenv()
    pairs = {
        "GATEWAY_PORT": DEFAULT_PORTS[ServiceName.GATEWAY].http,
        "GATEWAY_GRPC_PORT": DEFAULT_PORTS[ServiceName.GATEWAY].grpc,
        "LIMITER_GRPC_PORT": DEFAULT_PORTS[ServiceName.LIMITER].grpc,
        "LIMITER_METRICS_PORT": DEFAULT_PORTS[ServiceName.LIMITER].metrics,
        "CACHE_GRPC_PORT": DEFAULT_PORTS[ServiceName.CACHE].grpc,
        "CACHE_METRICS_PORT": DEFAULT_PORTS[ServiceName.CACHE].metrics,
        "WORKER_GRPC_PORT": DEFAULT_PORTS[ServiceName.INFERENCE_WORKER].grpc,
        "WORKER_METRICS_PORT": DEFAULT_PORTS[ServiceName.INFERENCE_WORKER].metrics,
        "COST_GRPC_PORT": DEFAULT_PORTS[ServiceName.COST_TRACKER].grpc,
        "COST_METRICS_PORT": DEFAULT_PORTS[ServiceName.COST_TRACKER].metrics,
        "QDRANT_PORT": QDRANT_HTTP_PORT,
    }
    for var, port in pairs.items():
        assert env[var] == str(port), f".env {var}={env[var]}, topology says {port}"


def test_compose_has_every_service_and_the_infrastructure() -> None:
    services = compose()["services"]
    assert set(services) >= {str(n) for n in ALL_SERVICES} | {"nats", "llama", "qdrant"}


def cache_qdrant_env() -> set[str]:
    """The names under which the cache's settings read the Qdrant server's URL and key."""
    settings = settings_class(ServiceName.CACHE)
    names = set()
    for field in ("qdrant_url", "qdrant_api_key"):
        alias = settings.model_fields[field].validation_alias
        assert isinstance(alias, AliasChoices)
        names |= {str(c) for c in alias.choices}
    return names


def test_the_cache_reads_qdrant_url_and_key_by_their_usual_names() -> None:
    assert {"QDRANT_URL", "QDRANT_API_KEY"} <= cache_qdrant_env()
    assert "QDRANT_URL" in valid_env_names()


def test_compose_cache_uses_the_qdrant_container() -> None:
    services = compose()["services"]
    env = compose_env(services[str(ServiceName.CACHE)])
    match = re.fullmatch(r"http://([\w-]+):(\d+)", env["QDRANT_URL"])
    assert match, env["QDRANT_URL"]
    assert match.group(1) in services and int(match.group(2)) == QDRANT_HTTP_PORT
    qdrant = services[match.group(1)]
    assert qdrant["image"] == dotenv()["QDRANT_IMAGE"]
    assert str(QDRANT_HTTP_PORT) in {str(p) for p in published_container_ports(qdrant)}
    assert any(str(v).endswith(":/qdrant/storage") for v in qdrant["volumes"])
    volume = str(qdrant["volumes"][0]).split(":", 1)[0]
    assert volume in compose()["volumes"], "Qdrant storage must be a named volume"
    assert match.group(1) in services[str(ServiceName.CACHE)]["depends_on"]


@pytest.mark.parametrize("name", ALL_SERVICES, ids=str)
def test_compose_service_agrees_with_settings(name: ServiceName) -> None:
    services = compose()["services"]
    svc = services[str(name)]
    assert svc["command"] == ["python", "-m", SERVICE_MODULES[name]]
    env = compose_env(svc)
    check_env_names(f"docker-compose {name}", set(env))
    for var, port in expected_port_env(name).items():
        assert env.get(var) == str(port), f"{name}: {var}={env.get(var)}, expected {port}"
    # NATS is another container of this file.
    nats = re.fullmatch(r"nats://([\w-]+):(\d+)", env["SLUICE_NATS_URL"])
    assert nats and nats.group(1) in services and nats.group(2) == "4222"
    if name is ServiceName.GATEWAY:
        assert env.get("SLUICE_GATEWAY_HOST") == "0.0.0.0", "a container must listen on all"
        assert str(DEFAULT_PORTS[name].http) in {str(p) for p in published_container_ports(svc)}
    grace = float(
        env.get("SLUICE_SHUTDOWN_GRACE_SECONDS")
        or field_default(CommonSettings, "shutdown_grace_seconds")
    )
    assert float(str(svc["stop_grace_period"]).rstrip("s")) > grace


@pytest.mark.parametrize("name", ALL_SERVICES, ids=str)
def test_compose_services_listen_where_published_ports_reach(
    name: ServiceName, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Published ports and healthchecks reach a container from outside its loopback."""
    env = compose_env(compose()["services"][str(name)])
    assert common_settings_in(env, monkeypatch).listen_host == "0.0.0.0"


def test_compose_worker_reaches_the_model_container() -> None:
    services = compose()["services"]
    env = compose_env(services[str(ServiceName.INFERENCE_WORKER)])
    match = re.fullmatch(r"http://([\w-]+):(\d+)/v1", env["SLUICE_LLAMA_URL"])
    assert match, env["SLUICE_LLAMA_URL"]
    llama = services[match.group(1)]
    command = llama["command"]
    assert command[command.index("--port") + 1] == match.group(2)
    assert "/app/serve_model.py" in command


def test_compose_nats_runs_jetstream_on_a_volume() -> None:
    nats = compose()["services"]["nats"]
    assert "-js" in nats["command"]
    store = nats_conf_store_dir()
    assert any(str(v).endswith(f":{store}") for v in nats["volumes"])
    for volume in nats["volumes"]:
        source = str(volume).split(":", 1)[0]
        if source.startswith("./"):
            assert (REPO / source).is_file(), f"{source} does not exist"


def test_compose_builds_the_shared_image() -> None:
    for name in ALL_SERVICES:
        build = compose()["services"][str(name)]["build"]
        assert (REPO / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE


# --- Dockerfile --------------------------------------------------------------------------


def test_dockerfile_runs_as_non_root_and_copies_what_exists() -> None:
    text = DOCKERFILE.read_text()
    stages = re.findall(r"^FROM\s+(\S+)", text, re.MULTILINE)
    assert stages and all(s == "python:3.11-slim" for s in stages), stages
    users = re.findall(r"^USER\s+(\S+)", text, re.MULTILINE)
    assert users, "the image must not run as root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "a numeric non-root uid lets runAsNonRoot verify it"
    for sources in re.findall(r"^COPY\s+(?!--from)(.+)$", text, re.MULTILINE):
        for source in sources.split()[:-1]:
            assert (REPO / source).exists(), f"Dockerfile copies {source}, which is missing"
    pod_uids = {
        pod["securityContext"]["runAsUser"]
        for doc in k8s_docs()
        if (pod := pod_spec(doc)) is not None and pod_image(pod) == "sluice"
    }
    assert pod_uids == {int(uid)}


# --- Kubernetes --------------------------------------------------------------------------


@cache
def kustomization() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((K8S_BASE / "kustomization.yaml").read_text())
    return data


@cache
def k8s_docs() -> tuple[dict[str, Any], ...]:
    docs: list[dict[str, Any]] = []
    for resource in kustomization()["resources"]:
        path = K8S_BASE / resource
        assert path.is_file(), f"kustomization lists {resource}, which is missing"
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return tuple(docs)


def k8s(kind: str, name: str) -> dict[str, Any]:
    found = [d for d in k8s_docs() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def pod_spec(doc: dict[str, Any]) -> dict[str, Any] | None:
    if doc["kind"] in {"Deployment", "StatefulSet"}:
        spec: dict[str, Any] = doc["spec"]["template"]["spec"]
        return spec
    return None


def pod_image(pod: dict[str, Any]) -> str:
    return str(pod["containers"][0]["image"])


@cache
def common_configmap() -> dict[str, str]:
    data: dict[str, str] = k8s("ConfigMap", "sluice-common")["data"]
    return data


def container_env(container: dict[str, Any]) -> dict[str, str | None]:
    """Literal values, None for values from secrets; configMap refs expanded."""
    env: dict[str, str | None] = {}
    for ref in container.get("envFrom", []):
        cm = ref["configMapRef"]["name"]
        env.update(k8s("ConfigMap", cm)["data"])
    for item in container.get("env", []):
        env[item["name"]] = item.get("value")
    return env


def nats_conf_store_dir() -> str:
    match = re.search(r"store_dir:\s*(\S+)", (K8S_BASE / "nats.conf").read_text())
    assert match
    return match.group(1)


def test_kustomization_files_exist() -> None:
    for generator in kustomization().get("configMapGenerator", []):
        for file in generator.get("files", []):
            assert (K8S_BASE / file.split("=")[-1]).is_file()
    assert k8s_docs()


@pytest.mark.parametrize("name", ALL_SERVICES, ids=str)
def test_k8s_deployment_agrees_with_settings(name: ServiceName) -> None:
    deployment = k8s("Deployment", str(name))
    pod = deployment["spec"]["template"]["spec"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (container,) = pod["containers"]
    assert container["command"] == ["python", "-m", SERVICE_MODULES[name]]
    env = container_env(container)
    check_env_names(f"k8s {name}", set(env))
    for var, port in expected_port_env(name).items():
        assert env.get(var) == str(port), f"{name}: {var}={env.get(var)}, expected {port}"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    defaults = DEFAULT_PORTS[name]
    assert ports["grpc"] == defaults.grpc
    if defaults.http is not None:
        assert ports["http"] == defaults.http
        assert env.get("SLUICE_GATEWAY_HOST") == "0.0.0.0"
    else:
        assert ports["metrics"] == defaults.metrics
    annotations = deployment["spec"]["template"]["metadata"].get("annotations", {})
    assert annotations.get("prometheus.io/port") == str(defaults.metrics)

    # The Service selects these pods and targets ports the container declares.
    service = k8s("Service", str(name))
    assert service["spec"]["selector"].items() <= labels.items()
    for port in service["spec"]["ports"]:
        assert port["targetPort"] in ports, f"{name} Service targets {port['targetPort']}"
        assert port["port"] == ports[port["targetPort"]]


@pytest.mark.parametrize("name", ALL_SERVICES, ids=str)
def test_k8s_services_listen_where_probes_reach(
    name: ServiceName, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kubelet's gRPC probes and Prometheus connect to the pod's address."""
    (container,) = k8s("Deployment", str(name))["spec"]["template"]["spec"]["containers"]
    assert common_settings_in(container_env(container), monkeypatch).listen_host == "0.0.0.0"


@pytest.mark.parametrize("name", ALL_SERVICES, ids=str)
def test_k8s_probes(name: ServiceName) -> None:
    (container,) = k8s("Deployment", str(name))["spec"]["template"]["spec"]["containers"]
    defaults = DEFAULT_PORTS[name]
    if name is ServiceName.GATEWAY:
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        for probe in ("livenessProbe", "readinessProbe"):
            assert container[probe]["httpGet"]["port"] in {"http", defaults.http}
        source = "\n".join(p.read_text() for p in (REPO / "services" / "gateway").rglob("*.py"))
        assert '"/healthz"' in source and '"/readyz"' in source
    else:
        # Native kubelet gRPC probes need the port as a number.
        assert container["readinessProbe"]["grpc"]["port"] == defaults.grpc
        assert container["startupProbe"]["grpc"]["port"] == defaults.grpc
        assert "livenessProbe" in container


def test_k8s_pods_are_hardened_and_sized() -> None:
    pods = [(d["metadata"]["name"], pod_spec(d)) for d in k8s_docs()]
    checked = 0
    for name, pod in pods:
        if pod is None:
            continue
        checked += 1
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        mounts_needed = pod_image(pod) == "sluice"
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for container in pod["containers"]:
            sc = container["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, name
            assert sc["allowPrivilegeEscalation"] is False, name
            assert "ALL" in sc["capabilities"]["drop"], name
            resources = container["resources"]
            for part in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources[part]), f"{name} {part}"
            if mounts_needed:
                # Writable places on a read-only root: the state dir and /tmp.
                mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
                assert "/tmp" in mounts, name
                state = container_env(container).get("SLUICE_STATE_DIR")
                if state is not None:
                    assert state in mounts, f"{name}: no volume at {state}"
                for volume_name in mounts.values():
                    assert volume_name in volumes, f"{name}: no volume {volume_name}"
    assert checked >= len(ALL_SERVICES) + 2


def test_k8s_grace_periods_exceed_the_shutdown_grace() -> None:
    grace = float(common_configmap()["SLUICE_SHUTDOWN_GRACE_SECONDS"])
    for name in ALL_SERVICES:
        pod = k8s("Deployment", str(name))["spec"]["template"]["spec"]
        pre_stop = 0.0
        (container,) = pod["containers"]
        command = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command")
        if command and command[0] == "sleep":
            pre_stop = float(command[1])
        assert pod["terminationGracePeriodSeconds"] > grace + pre_stop, name


def test_k8s_common_config_points_at_the_nats_service() -> None:
    env = common_configmap()
    check_env_names("k8s sluice-common", set(env))
    match = re.fullmatch(r"nats://([\w-]+):(\d+)", env["SLUICE_NATS_URL"])
    assert match
    service = k8s("Service", match.group(1))
    assert int(match.group(2)) in {p["port"] for p in service["spec"]["ports"]}


def test_k8s_nats_statefulset_has_jetstream_storage() -> None:
    nats = k8s("StatefulSet", "nats")
    (container,) = nats["spec"]["template"]["spec"]["containers"]
    assert "-js" in container["args"]
    claims = {c["metadata"]["name"] for c in nats["spec"]["volumeClaimTemplates"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts[nats_conf_store_dir()] in claims
    conf = (K8S_BASE / "nats.conf").read_text()
    payload = re.search(r"max_payload:\s*(\d+)", conf)
    assert payload and int(payload.group(1)) == MAX_PAYLOAD_BYTES


def test_k8s_cache_reaches_the_qdrant_statefulset() -> None:
    (container,) = k8s("Deployment", str(ServiceName.CACHE))["spec"]["template"]["spec"][
        "containers"
    ]
    url = container_env(container).get("QDRANT_URL") or ""
    match = re.fullmatch(r"http://([\w-]+):(\d+)", url)
    assert match, url
    service = k8s("Service", match.group(1))
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert int(match.group(2)) == QDRANT_HTTP_PORT == ports["http"]["port"]
    qdrant = k8s("StatefulSet", match.group(1))
    labels = qdrant["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    (server,) = qdrant["spec"]["template"]["spec"]["containers"]
    declared = {p["name"]: p["containerPort"] for p in server["ports"]}
    assert declared[ports["http"]["targetPort"]] == QDRANT_HTTP_PORT
    # The image of the compose file, in its unprivileged (uid 1000) build.
    assert server["image"] == dotenv()["QDRANT_IMAGE"] + "-unprivileged"
    claims = {c["metadata"]["name"] for c in qdrant["spec"]["volumeClaimTemplates"]}
    mounts = {m["mountPath"]: m["name"] for m in server["volumeMounts"]}
    assert mounts["/qdrant/storage"] in claims
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert server[probe]["httpGet"]["port"] in {"http", QDRANT_HTTP_PORT}


def test_k8s_worker_reaches_the_model_service() -> None:
    (container,) = k8s("Deployment", str(ServiceName.INFERENCE_WORKER))["spec"]["template"]["spec"][
        "containers"
    ]
    url = container_env(container)["SLUICE_LLAMA_URL"]
    match = re.fullmatch(r"http://([\w-]+):(\d+)/v1", url or "")
    assert match, url
    service = k8s("Service", match.group(1))
    assert int(match.group(2)) in {p["port"] for p in service["spec"]["ports"]}
    (llama,) = k8s("Deployment", match.group(1))["spec"]["template"]["spec"]["containers"]
    assert llama["command"][llama["command"].index("--port") + 1] == match.group(2)


def test_k8s_ingress_streams_unbuffered_past_the_request_deadline() -> None:
    ingress = k8s("Ingress", "gateway")
    notes = ingress["metadata"]["annotations"]
    assert notes["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"
    gateway = settings_class(ServiceName.GATEWAY)
    deadline = float(field_default(gateway, "request_timeout_seconds"))
    for key in ("proxy-read-timeout", "proxy-send-timeout"):
        assert float(notes[f"nginx.ingress.kubernetes.io/{key}"]) > deadline
    body = str(notes["nginx.ingress.kubernetes.io/proxy-body-size"])
    units = {"k": 1024, "m": 1024**2, "g": 1024**3}
    limit = int(body[:-1]) * units[body[-1].lower()] if body[-1].isalpha() else int(body)
    assert limit >= int(field_default(gateway, "max_body_bytes"))
    (rule,) = ingress["spec"]["rules"]
    backend = rule["http"]["paths"][0]["backend"]["service"]
    assert backend["name"] == "gateway"
    service_ports = {p["name"] for p in k8s("Service", "gateway")["spec"]["ports"]}
    assert backend["port"]["name"] in service_ports


# --- the service token ------------------------------------------------------------------------

TOKEN_ENV = "SLUICE_SERVICE_TOKEN"


def test_the_service_token_is_a_common_setting() -> None:
    assert TOKEN_ENV in env_names(CommonSettings)


@pytest.mark.parametrize("name", ALL_SERVICES, ids=str)
def test_k8s_service_gets_the_service_token_from_the_secret(name: ServiceName) -> None:
    """Outside a local environment a service without the token refuses to start, so every
    Deployment takes it from the secret the kustomization tells the operator to create."""
    assert common_configmap()["SLUICE_ENVIRONMENT"] != "local"
    (container,) = k8s("Deployment", str(name))["spec"]["template"]["spec"]["containers"]
    [item] = [e for e in container["env"] if e["name"] == TOKEN_ENV]
    ref = item["valueFrom"]["secretKeyRef"]
    assert ref.get("optional") is not True
    assert (ref["name"], ref["key"]) == ("sluice-secrets", "service-token")
    instructions = (K8S_BASE / "kustomization.yaml").read_text()
    assert "create secret generic sluice-secrets" in instructions
    assert "--from-literal=service-token=" in instructions


def test_compose_services_share_one_generated_service_token() -> None:
    """Compose runs local: an unset token is generated once into the state volume, which
    every service mounts at its state dir, so they all read the same one."""
    services = compose()["services"]
    volumes = set()
    for name in ALL_SERVICES:
        svc = services[str(name)]
        env = compose_env(svc)
        assert env["SLUICE_ENVIRONMENT"] == "local"
        assert TOKEN_ENV in env
        state = env["SLUICE_STATE_DIR"]
        volumes |= {str(v).split(":", 1)[0] for v in svc["volumes"] if str(v).endswith(state)}
    assert len(volumes) == 1 and volumes <= set(compose()["volumes"])
