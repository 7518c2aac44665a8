"""Kubernetes helpers for the tests: build the Kustomize trees, check policy, play the kubelet.

No cluster can run here. What a cluster would do with the manifests is reproduced from the
built YAML: the API server's schema check (kubernetes-validate, offline), the Pod Security
"restricted" admission rules, and the kubelet's way of turning a container spec into a running
process (env and envFrom resolution, $(VAR) expansion, user, read-only root, capabilities,
emptyDir, termination-message file), executed with Docker.
"""

from __future__ import annotations

import base64
import copy
import functools
import os
import re
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "k8s"
POD_KINDS = {"Pod": ("spec",), "Job": ("spec", "template", "spec"),
             "Deployment": ("spec", "template", "spec"), "StatefulSet": ("spec", "template", "spec"),
             "DaemonSet": ("spec", "template", "spec"), "CronJob": ("spec", "jobTemplate", "spec",
                                                                    "template", "spec")}


def kustomize_dirs() -> list[str]:
    """Return every directory under k8s/ with a kustomization, relative to k8s/."""
    return sorted(str(p.parent.relative_to(K8S)) for p in K8S.rglob("kustomization.yaml"))


def require_kubectl() -> str:
    """Return kubectl's path; skip without it (fail under CI=true, where it must be present)."""
    path = shutil.which("kubectl")
    if path:
        return path
    if os.environ.get("CI") == "true":
        pytest.fail("CI=true requires kubectl (with kustomize) to build k8s/", pytrace=False)
    pytest.skip("kubectl is not installed: the k8s/ manifests cannot be built here")


def build(directory: str | Path) -> list[dict[str, Any]]:
    """Return the documents `kubectl kustomize DIR` renders (a fresh copy each call).

    DIR is relative to k8s/ (built once per session) or an absolute path (an edited copy,
    built every time).
    """
    if Path(directory).is_absolute():
        return _kustomize(Path(directory))
    return copy.deepcopy(_build_repo_tree(str(directory)))


@functools.cache
def _build_repo_tree(directory: str) -> list[dict[str, Any]]:
    return _kustomize(K8S / directory)


def _kustomize(path: Path) -> list[dict[str, Any]]:
    kubectl = require_kubectl()
    proc = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"kubectl kustomize {path} failed:\n{proc.stderr}"
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def pod_specs(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield (kind/name, pod spec) for every workload that creates pods."""
    for doc in docs:
        path = POD_KINDS.get(doc["kind"])
        if path:
            spec = doc
            for key in path:
                spec = spec[key]
            yield f"{doc['kind']}/{doc['metadata']['name']}", spec


def containers(spec: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [*spec.get("initContainers", []), *spec.get("containers", []),
            *spec.get("ephemeralContainers", [])]


# -- Pod Security Standards "restricted" (kubernetes.io/docs/concepts/security/pod-security-standards)
_BASELINE_CAPS = {"AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD",
                  "NET_BIND_SERVICE", "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT"}
_RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
                       "persistentVolumeClaim", "projected", "secret"}
_SAFE_SYSCTLS = {"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range",
                 "net.ipv4.ip_unprivileged_port_start", "net.ipv4.tcp_syncookies",
                 "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
                 "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout",
                 "net.ipv4.tcp_keepalive_intvl", "net.ipv4.tcp_keepalive_probes"}
_SELINUX_TYPES = {None, "", "container_t", "container_init_t", "container_kvm_t",
                  "container_engine_t"}


def pss_restricted_violations(spec: Mapping[str, Any]) -> list[str]:
    """Return every way a pod spec breaks the "restricted" profile (baseline included)."""
    bad: list[str] = []
    pod_sc = spec.get("securityContext") or {}
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(key):
            bad.append(f"{key} is true")
    for vol in spec.get("volumes", []):
        kind = next(k for k in vol if k != "name")
        if kind not in _RESTRICTED_VOLUMES:
            bad.append(f"volume {vol['name']} is of type {kind}")
    for sysctl in pod_sc.get("sysctls", []):
        if sysctl["name"] not in _SAFE_SYSCTLS:
            bad.append(f"sysctl {sysctl['name']} is not in the safe set")
    bad += _selinux_apparmor("pod", pod_sc)
    pod_seccomp = (pod_sc.get("seccompProfile") or {}).get("type")
    if pod_seccomp == "Unconfined":
        bad.append("pod seccompProfile is Unconfined")
    if (pod_sc.get("windowsOptions") or {}).get("hostProcess"):
        bad.append("pod windowsOptions.hostProcess is true")
    if pod_sc.get("runAsUser") == 0:
        bad.append("pod runAsUser is 0")
    for c in containers(spec):
        name, sc = c["name"], c.get("securityContext") or {}
        if sc.get("privileged"):
            bad.append(f"{name}: privileged")
        if (sc.get("windowsOptions") or {}).get("hostProcess"):
            bad.append(f"{name}: windowsOptions.hostProcess is true")
        if any(p.get("hostPort") for p in c.get("ports", [])):
            bad.append(f"{name}: hostPort set")
        if sc.get("procMount", "Default") != "Default":
            bad.append(f"{name}: procMount is {sc['procMount']}")
        bad += _selinux_apparmor(name, sc)
        caps = sc.get("capabilities") or {}
        if "ALL" not in caps.get("drop", []):
            bad.append(f"{name}: capabilities.drop does not include ALL")
        extra = set(caps.get("add", [])) - {"NET_BIND_SERVICE"}
        if extra:
            bad.append(f"{name}: adds capabilities {sorted(extra)}"
                       + (" (not even baseline)" if extra - _BASELINE_CAPS else ""))
        if sc.get("allowPrivilegeEscalation") is not False:
            bad.append(f"{name}: allowPrivilegeEscalation is not false")
        non_root = sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot"))
        if non_root is not True:
            bad.append(f"{name}: runAsNonRoot is not true (pod or container)")
        if sc.get("runAsUser") == 0:
            bad.append(f"{name}: runAsUser is 0")
        seccomp = (sc.get("seccompProfile") or {}).get("type", pod_seccomp)
        if seccomp not in ("RuntimeDefault", "Localhost"):
            bad.append(f"{name}: seccompProfile is {seccomp!r}, not RuntimeDefault or Localhost")
    return bad


def _selinux_apparmor(where: str, sc: Mapping[str, Any]) -> list[str]:
    bad = []
    se = sc.get("seLinuxOptions") or {}
    if se.get("type") not in _SELINUX_TYPES or se.get("user") or se.get("role"):
        bad.append(f"{where}: seLinuxOptions not allowed")
    if (sc.get("appArmorProfile") or {}).get("type") == "Unconfined":
        bad.append(f"{where}: appArmorProfile is Unconfined")
    return bad


# -- secrets --------------------------------------------------------------------------------------
PLACEHOLDER = "CHANGE-ME"
_SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|PRIVATE|DATABASE_URL|CREDENTIAL",
                          re.IGNORECASE)
_SECRET_VALUE = [
    (re.compile(r"://[^/\s:@]+:(?P<pw>[^@\s]*)@"), "a URL with a password"),
    (re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"), "an AWS access key id"),
    (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"), "a private key"),
    (re.compile(r"\b(?:ghp|gho|glpat|xox[abp])[-_][A-Za-z0-9-_]{10,}"), "an API token"),
]


def secret_findings(docs: list[dict[str, Any]]) -> list[str]:
    """Return every place a manifest carries what looks like a real secret value."""
    bad: list[str] = []
    for doc in docs:
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] == "Secret":
            values = dict(doc.get("stringData") or {})
            values.update({k: base64.b64decode(v).decode(errors="replace")
                           for k, v in (doc.get("data") or {}).items()})
            for key, value in values.items():
                if value and PLACEHOLDER not in value:
                    bad.append(f"{where}: {key} is not a {PLACEHOLDER} placeholder")
        if doc["kind"] == "ConfigMap":
            bad += [f"{where}: {k} looks secret and belongs in a Secret"
                    for k in (doc.get("data") or {}) if _SECRET_NAME.search(k)]
        for _, spec in pod_specs([doc]):
            for c in containers(spec):
                bad += [f"{where}/{c['name']}: env {e['name']} has a literal value; use valueFrom"
                        for e in c.get("env", []) if _SECRET_NAME.search(e["name"]) and "value" in e]
        for text in _strings(doc):
            for pattern, what in _SECRET_VALUE:
                m = pattern.search(text)
                if m and m.groupdict().get("pw", "x") not in ("", PLACEHOLDER):
                    bad.append(f"{where}: {what}: {text[:40]}...")
    return bad


def _strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for k, v in node.items():
            yield str(k)
            yield from _strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v)


# -- the kubelet, played with Docker --------------------------------------------------------------
def expand(text: str, env: Mapping[str, str]) -> str:
    """Expand $(VAR) as the kubelet does: defined names only, `$$` escapes, the rest verbatim."""
    out, i = [], 0
    while i < len(text):
        if text.startswith("$$", i):
            out.append("$")
            i += 2
        elif text.startswith("$(", i) and ")" in text[i:]:
            end = text.index(")", i)
            name = text[i + 2:end]
            out.append(env[name] if name in env else text[i:end + 1])
            i = end + 1
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def _data(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, str] | None:
    for d in docs:
        if d["kind"] == kind and d["metadata"]["name"] == name:
            values = dict(d.get("data") or {})
            if kind == "Secret":
                values = {k: base64.b64decode(v).decode() for k, v in values.items()}
                values.update(d.get("stringData") or {})
            return values
    return None


def resolve_env(container: Mapping[str, Any], docs: list[dict[str, Any]]) -> dict[str, str]:
    """Return the container's environment: envFrom first, then env in order, $(VAR) expanded."""
    env: dict[str, str] = {}
    for src in container.get("envFrom", []):
        kind, ref = ("ConfigMap", src["configMapRef"]) if "configMapRef" in src else \
            ("Secret", src["secretRef"])
        data = _data(docs, kind, ref["name"])
        assert data is not None or ref.get("optional"), f"{kind} {ref['name']} is not in the manifests"
        env.update({src.get("prefix", "") + k: v for k, v in (data or {}).items()})
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = expand(item["value"], env)
            continue
        source = item["valueFrom"]
        if "fieldRef" in source:  # the downward API
            env[item["name"]] = _pod_field(container, docs, source["fieldRef"]["fieldPath"])
            continue
        kind, ref = ("ConfigMap", source["configMapKeyRef"]) if "configMapKeyRef" in source else \
            ("Secret", source["secretKeyRef"])
        data = _data(docs, kind, ref["name"]) or {}
        if ref["key"] in data:
            env[item["name"]] = data[ref["key"]]
        else:
            assert ref.get("optional"), f"{kind} {ref['name']} has no key {ref['key']}"
    return env


def _pod_field(container: Mapping[str, Any], docs: list[dict[str, Any]], path: str) -> str:
    """A pod field as the Job controller and the kubelet fill it: a Job's pods are named
    <job>-<5 characters> and labelled batch.kubernetes.io/job-name=<job>."""
    owner = next(d for d in docs for _, spec in pod_specs([d])
                 if any(c is container for c in containers(spec)))
    name = owner["metadata"]["name"]
    labels = dict((owner.get("spec", {}).get("template", {}).get("metadata") or {}).get("labels") or {})
    if owner["kind"] == "Job":
        labels["batch.kubernetes.io/job-name"] = name
    fields = {"metadata.name": f"{name}-x7k2p", "metadata.namespace": "default",
              **{f"metadata.labels['{k}']": v for k, v in labels.items()}}
    assert path in fields or path.startswith("metadata.labels["), f"fieldRef {path} is not emulated"
    return fields.get(path, "")  # a label the pod lacks reads as ""


def set_data(docs: list[dict[str, Any]], kind: str, name: str, **values: str) -> None:
    """Substitute the operator's real values into a built ConfigMap or Secret (in place)."""
    for d in docs:
        if d["kind"] == kind and d["metadata"]["name"] == name:
            d.setdefault("stringData" if kind == "Secret" else "data", {}).update(values)
            return
    raise AssertionError(f"no {kind} {name} in the manifests")


def _size(quantity: str) -> str:
    """Turn a Kubernetes memory quantity (512Mi) into Docker's notation (512m)."""
    m = re.fullmatch(r"(\d+)(Ki|Mi|Gi)?", str(quantity))
    assert m, quantity
    return m.group(1) + {"Ki": "k", "Mi": "m", "Gi": "g", None: "b"}[m.group(2)]


def _cpus(quantity: str) -> str:
    q = str(quantity)
    return str(int(q[:-1]) / 1000) if q.endswith("m") else q


@dataclass
class KubeletRun:
    """A container spec turned into `docker run` options, the way the kubelet would run it."""

    args: list[str]
    env: dict[str, str]
    options: dict[str, Any] = field(default_factory=dict)
    termination_log: Path | None = None
    grace: int = 30

    def termination_message(self) -> str:
        assert self.termination_log is not None
        return self.termination_log.read_text()


def kubelet_run(spec: Mapping[str, Any], container_name: str, docs: list[dict[str, Any]],
                workdir: Path) -> KubeletRun:
    """Translate one container of a pod spec into docker_harness.run_container arguments."""
    workdir.mkdir(parents=True, exist_ok=True)
    c = next(c for c in containers(spec) if c["name"] == container_name)
    env = resolve_env(c, docs)
    pod_sc, sc = spec.get("securityContext") or {}, c.get("securityContext") or {}
    uid = sc.get("runAsUser", pod_sc.get("runAsUser"))
    gid = sc.get("runAsGroup", pod_sc.get("runAsGroup"))
    assert uid is not None, "no numeric runAsUser: the kubelet could not verify runAsNonRoot"
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    tmpfs, binds = [], []
    for mount in c.get("volumeMounts", []):
        vol = volumes[mount["name"]]
        if "configMap" in vol:  # the kubelet projects each key as a file, read-only
            files = _config_map_files(vol["configMap"], docs, workdir / f"volume-{mount['name']}")
            binds.append(f"{files}:{mount['mountPath']}:ro")
            continue
        assert "emptyDir" in vol, f"only emptyDir and configMap volumes are emulated, not {vol}"
        size = (vol["emptyDir"] or {}).get("sizeLimit")
        tmpfs.append(f"{mount['mountPath']}:rw,exec,nosuid,nodev,mode=1777"
                     + (f",size={_size(size)}" if size else ""))
    log_path = None
    if c.get("terminationMessagePath", "/dev/termination-log"):
        # the kubelet creates the file per container and bind-mounts it at terminationMessagePath
        log_path = workdir / f"termination-{container_name}"
        log_path.write_text("")
        log_path.chmod(0o666)
        binds.append(f"{log_path}:{c.get('terminationMessagePath', '/dev/termination-log')}")
    limits = (c.get("resources") or {}).get("limits") or {}
    extra = []
    if "memory" in limits:
        extra += ["--memory", _size(limits["memory"])]
    if "cpu" in limits:
        extra += ["--cpus", _cpus(limits["cpu"])]
    options: dict[str, Any] = dict(
        user=f"{uid}:{gid}" if gid is not None else str(uid),
        read_only=bool(sc.get("readOnlyRootFilesystem")),
        tmpfs=tmpfs, volumes=binds,
        cap_drop_all="ALL" in ((sc.get("capabilities") or {}).get("drop") or []),
        no_new_privileges=sc.get("allowPrivilegeEscalation") is False,
        workdir=c.get("workingDir"), extra=extra,
    )
    args = [expand(a, env) for a in c.get("args", [])]
    if c.get("command"):  # command replaces the image's ENTRYPOINT, args its CMD
        options["entrypoint"] = [expand(a, env) for a in c["command"]]
    return KubeletRun(args, env, options, log_path, int(spec.get("terminationGracePeriodSeconds", 30)))


def _config_map_files(source: Mapping[str, Any], docs: list[dict[str, Any]], directory: Path) -> Path:
    """Write a configMap volume's files (every key, or the listed items) into directory."""
    data = _data(docs, "ConfigMap", source["name"])
    assert data is not None or source.get("optional"), f"ConfigMap {source['name']} is not in the manifests"
    directory.mkdir(parents=True, exist_ok=True)
    for item in source.get("items") or [{"key": k, "path": k} for k in data or {}]:
        path = directory / item["path"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text((data or {})[item["key"]])
        path.chmod(0o644)
    directory.chmod(0o755)
    return directory


def pod_failure_action(job: Mapping[str, Any], container: str, exit_code: int) -> str:
    """Return what the Job controller does with a pod whose container exited so.

    The first matching podFailurePolicy rule wins; no match counts towards backoffLimit.
    """
    for rule in job["spec"].get("podFailurePolicy", {}).get("rules", []):
        on = rule.get("onExitCodes")
        if not on or on.get("containerName", container) != container or exit_code == 0:
            continue
        if (exit_code in on["values"]) == (on["operator"] == "In"):
            return rule["action"]
    return "Count"
