"""Kubernetes packaging: k8s/ builds, validates, meets policy, and runs the way the kubelet runs it.

Offline tests build every Kustomize tree with `kubectl kustomize` and check it against the
Kubernetes schemas (kubernetes-validate), Pod Security "restricted", the runner's exit-code table
and settings, and for secrets. The runner's init-container mode (`wait --until-head`) is tested
as a process against real PostgreSQL. Execution tests take container specs from the built
manifests and run them with Docker as the kubelet would, against real PostgreSQL and S3.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
from kubernetes_validate import utils as kv

from runner import config
from runner.cancellation import EXIT_WITHIN
from runner.exitcodes import DESCRIPTIONS, ExitCode, non_retriable
from tests.conftest import (
    REPO,
    Database,
    assert_no_secrets,
    finish,
    run_runner,
    runner_env,
    start_runner,
    wait_for,
)
from tests.k8s_helpers import (
    K8S,
    build,
    containers,
    find,
    kubelet_run,
    kustomize_dirs,
    pod_failure_action,
    pod_specs,
    pss_restricted_violations,
    resolve_env,
    secret_findings,
    set_data,
)
from tests.s3_fixtures import ACCESS_KEY, REGION, SECRET_KEY, S3Server

# overlays/post-deploy-job renders the post-deploy Job alone, for the hook overlays to include
PARTIAL = ("overlays/post-deploy-job",)
DIRS = [d for d in kustomize_dirs() if d not in PARTIAL]
HEAD = "0005"
# Kubernetes versions the manifests must validate against: the oldest we support (Job
# podFailurePolicy and podReplacementPolicy need 1.31+; kubectl here is 1.32) and the newest
# kubernetes-validate ships schemas for.
K8S_VERSIONS = ["1.32.0", kv.latest_version()]
# between the runner's own deadline and activeDeadlineSeconds: the runner's cancel-and-roll-back
# window plus scheduling and the image pull, which the Job's clock also counts
STARTUP_MARGIN = 60


def jobs(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == "Job"]


def runner_containers(docs: list[dict[str, Any]]) -> list[tuple[str, dict, dict]]:
    """Return (where, pod spec, container) for every container running the runner image."""
    image = jobs(docs)[0]["spec"]["template"]["spec"]["containers"][0]["image"] if jobs(docs) else None
    return [(where, spec, c) for where, spec in pod_specs(docs) for c in containers(spec)
            if c["image"] == image]


def test_every_tree_is_found() -> None:
    assert {"base", "overlays/rollback", "overlays/helm-hooks", "overlays/argocd",
            "overlays/example-app", "overlays/fleet", "overlays/post-deploy",
            "overlays/fleet-post-deploy"} <= set(DIRS)
    assert set(kustomize_dirs()) == set(DIRS) | set(PARTIAL)


@pytest.mark.parametrize("directory", DIRS)
def test_builds(directory: str) -> None:
    docs = build(directory)
    kinds = {d["kind"] for d in docs}
    assert {"Job", "ConfigMap", "Secret", "ServiceAccount"} <= kinds, kinds


# -- schemas --------------------------------------------------------------------------------------
@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("directory", DIRS)
def test_validates_against_kubernetes_schemas(directory: str, version: str) -> None:
    """Strict: unknown fields fail too. A missing schema fails (the CLI would only warn)."""
    for doc in build(directory):
        try:
            kv.validate(doc, version, strict=True)
        except kv.ValidationError as exc:
            path = ".".join(str(p) for p in exc.caught.path)
            pytest.fail(f"{directory}: {doc['kind']}/{doc['metadata']['name']} is invalid for "
                        f"Kubernetes {version}: {path}: {exc.caught.message}")


@pytest.mark.parametrize("mutate", ["typo", "type", "required"])
def test_validator_rejects_a_broken_job(mutate: str) -> None:
    """The validator can fail. (The schemas carry no enums: the policy tests check those values.)"""
    job = find(build("base"), "Job")
    if mutate == "typo":
        job["spec"]["backoffLimt"] = 2
    elif mutate == "type":
        job["spec"]["activeDeadlineSeconds"] = "15 minutes"
    else:
        del job["spec"]["template"]["spec"]["containers"][0]["name"]
    with pytest.raises(kv.ValidationError):
        kv.validate(job, K8S_VERSIONS[-1], strict=True)


# -- Pod Security "restricted" and the image ------------------------------------------------------
@pytest.mark.parametrize("directory", DIRS)
def test_pod_templates_meet_pss_restricted(directory: str) -> None:
    specs = list(pod_specs(build(directory)))
    assert specs
    for where, spec in specs:
        assert pss_restricted_violations(spec) == [], f"{directory}: {where}"
        for c in containers(spec):  # beyond the profile: what the runner image is built for
            sc = c.get("securityContext") or {}
            assert sc.get("readOnlyRootFilesystem") is True, f"{where}/{c['name']}"
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
            vols = {v["name"]: v for v in spec.get("volumes", [])}
            assert "emptyDir" in vols[mounts["/tmp"]], f"{where}/{c['name']}: no emptyDir at /tmp"
            res = c.get("resources") or {}
            assert res.get("requests") and res.get("limits", {}).get("memory"), f"{where}/{c['name']}"


@pytest.mark.parametrize("bad", [
    {"hostNetwork": True}, {"volumes": [{"name": "h", "hostPath": {"path": "/"}}]},
    {"securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "Unconfined"}}},
    {"c": {"allowPrivilegeEscalation": True}}, {"c": {"capabilities": {"drop": ["NET_RAW"]}}},
    {"c": {"capabilities": {"drop": ["ALL"], "add": ["SYS_ADMIN"]}}}, {"c": {"privileged": True}},
    {"c": {"runAsNonRoot": False}}, {"c": {"runAsUser": 0}},
])
def test_pss_checker_catches_violations(bad: dict[str, Any]) -> None:
    spec = find(build("base"), "Job")["spec"]["template"]["spec"]
    assert pss_restricted_violations(spec) == []
    if "c" in bad:
        spec["containers"][0]["securityContext"].update(bad["c"])
    else:
        spec.update(bad)
    assert pss_restricted_violations(spec)


def dockerfile_user() -> tuple[int, int]:
    users = re.findall(r"^USER\s+(\S+)", (REPO / "Dockerfile").read_text(), re.MULTILINE)
    assert users, "the Dockerfile sets no USER"
    m = re.fullmatch(r"(\d+)(?::(\d+))?", users[-1])
    assert m, f"the image's USER {users[-1]} is not numeric: the kubelet cannot verify runAsNonRoot"
    return int(m.group(1)), int(m.group(2) or m.group(1))


@pytest.mark.parametrize("directory", DIRS)
def test_runner_containers_run_as_the_images_numeric_user(directory: str) -> None:
    uid, gid = dockerfile_user()
    found = runner_containers(build(directory))
    assert found
    for where, spec, c in found:
        pod_sc, sc = spec.get("securityContext") or {}, c.get("securityContext") or {}
        assert (sc.get("runAsUser", pod_sc.get("runAsUser")),
                sc.get("runAsGroup", pod_sc.get("runAsGroup"))) == (uid, gid), f"{where}/{c['name']}"


# -- the Job mirrors the runner's contract --------------------------------------------------------
@pytest.mark.parametrize("directory", DIRS)
def test_pod_failure_policy_mirrors_the_exit_code_table(directory: str) -> None:
    for job in jobs(build(directory)):
        spec = job["spec"]
        pod = spec["template"]["spec"]
        assert pod["restartPolicy"] == "Never"  # podFailurePolicy requires it
        rules = spec["podFailurePolicy"]["rules"]
        # an Indexed Job with per-index retries (the fleet) fails only the index: the others go on
        per_index = spec.get("completionMode") == "Indexed" and "backoffLimitPerIndex" in spec
        final = "FailIndex" if per_index else "FailJob"
        fail = [r for r in rules if r["action"] in ("FailJob", "FailIndex")]
        assert len(fail) == 1 and fail[0]["action"] == final
        on = fail[0]["onExitCodes"]
        assert on["operator"] == "In"
        assert on["containerName"] in {c["name"] for c in pod["containers"]}
        assert sorted(on["values"]) == sorted(non_retriable()), "podFailurePolicy drifted from " \
            "runner/exitcodes.py: FailJob/FailIndex must list exactly the non-retriable codes"
        retriable = {int(c) for c, (_, retry) in DESCRIPTIONS.items() if retry}
        assert not retriable & set(on["values"]) and int(ExitCode.OK) not in on["values"]
        assert {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]} \
            in rules
        assert 0 <= spec["backoffLimitPerIndex" if per_index else "backoffLimit"] <= 3
        container = on["containerName"]
        for code, (_, retry) in DESCRIPTIONS.items():
            if code != ExitCode.OK:
                assert pod_failure_action(job, container, int(code)) == ("Count" if retry else final)


@pytest.mark.parametrize("directory", DIRS)
def test_job_deadlines_and_termination_message_are_consistent(directory: str) -> None:
    docs = build(directory)
    for job in jobs(docs):
        spec, pod = job["spec"], job["spec"]["template"]["spec"]
        (c,) = pod["containers"]
        env = resolve_env(c, docs)
        run_deadline = config.parse_duration(env["RUN_DEADLINE"])
        assert run_deadline > 0, "the Job's runner must stop itself before the Job's deadline"
        assert run_deadline + EXIT_WITHIN + STARTUP_MARGIN <= spec["activeDeadlineSeconds"], \
            "RUN_DEADLINE leaves no room for cancel + rollback before activeDeadlineSeconds"
        # SIGTERM (deadline, deletion, drain): cancel, roll back, release, exit within EXIT_WITHIN
        assert pod["terminationGracePeriodSeconds"] >= EXIT_WITHIN + 10
        assert env["TERMINATION_MESSAGE_PATH"] == c["terminationMessagePath"] == "/dev/termination-log"
        assert c["terminationMessagePolicy"] == "FallbackToLogsOnError"
        assert spec["ttlSecondsAfterFinished"] > 0 and spec["podReplacementPolicy"] == "Failed"
        config.load({**env, "DATABASE_URL": "postgresql://u:p@h/d",
                     "ALEMBIC_CONFIG": str(REPO / "alembic.ini")}, command=c["args"][0])


def test_init_container_waits_at_least_as_long_as_the_job_may_run() -> None:
    docs = build("overlays/example-app")
    job = find(docs, "Job")
    pod = find(docs, "Deployment")["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    assert init["args"] == ["wait", "--until-head"]
    assert init["image"] == job["spec"]["template"]["spec"]["containers"][0]["image"], \
        "the init container must run the Job's image: 'head' is the head of its migrations"
    env = resolve_env(init, docs)
    settings = config.load({**env, "DATABASE_URL": "postgresql://u:p@h/d",
                            "ALEMBIC_CONFIG": str(REPO / "alembic.ini")}, command="wait")
    assert settings.head_wait_timeout >= job["spec"]["activeDeadlineSeconds"]
    assert settings.run_deadline == 0 or settings.run_deadline > settings.head_wait_timeout
    assert [c for c in pod["containers"] if c["image"] == init["image"]] == [], \
        "the app container is the application, not the runner"


# -- secrets --------------------------------------------------------------------------------------
@pytest.mark.parametrize("directory", DIRS)
def test_no_manifest_carries_a_real_secret(directory: str) -> None:
    docs = build(directory)
    assert secret_findings(docs) == []
    secret = find(docs, "Secret", "migration-runner-database")
    assert "CHANGE-ME" in secret["stringData"]["DATABASE_URL"]
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} & set(secret["stringData"]), \
        "static S3 keys win over workload identity: they must not be set by default"


@pytest.mark.parametrize("leak", [
    ("Secret", "DATABASE_URL", "postgresql://app:s3cretpw@db:5432/app"),
    ("ConfigMap", "DATABASE_URL", "postgresql://app:CHANGE-ME@db/app"),
    ("ConfigMap", "BACKUP_S3_URI", "s3://bucket/AKIAIOSFODNN7EXAMPLE"),
    ("env", "AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI"),
])
def test_secret_scan_catches_leaks(leak: tuple[str, str, str]) -> None:
    docs = build("base")
    kind, key, value = leak
    if kind == "env":
        find(docs, "Job")["spec"]["template"]["spec"]["containers"][0]["env"].append(
            {"name": key, "value": value})
    else:
        set_data(docs, kind, find(docs, kind)["metadata"]["name"], **{key: value})
    assert secret_findings(docs)


# -- hooks and overlays ---------------------------------------------------------------------------
def _needs(job: dict[str, Any]) -> set[tuple[str, str]]:
    """Return the (kind, name) objects the Job's pod needs before it can start."""
    pod = job["spec"]["template"]["spec"]
    needs = {("ServiceAccount", pod["serviceAccountName"])}
    for c in containers(pod):
        for src in c.get("envFrom", []):
            needs |= {("ConfigMap", src["configMapRef"]["name"])} if "configMapRef" in src else \
                {("Secret", src["secretRef"]["name"])}
    return needs


@pytest.mark.parametrize("directory,hook_key,phase,order_key,policy_key,policy", [
    ("overlays/helm-hooks", "helm.sh/hook", "pre-install,pre-upgrade", "helm.sh/hook-weight",
     "helm.sh/hook-delete-policy", "before-hook-creation"),
    ("overlays/argocd", "argocd.argoproj.io/hook", "PreSync", "argocd.argoproj.io/sync-wave",
     "argocd.argoproj.io/hook-delete-policy", "BeforeHookCreation"),
])
def test_hooks_create_dependencies_first(directory: str, hook_key: str, phase: str, order_key: str,
                                         policy_key: str, policy: str) -> None:
    docs = build(directory)
    job = find(docs, "Job", "migration-runner")
    ann = job["metadata"]["annotations"]
    assert (ann[hook_key], ann[policy_key]) == (phase, policy)
    for kind, name in _needs(job):
        dep = find(docs, kind, name)["metadata"].get("annotations", {})
        assert dep.get(hook_key) == phase, f"{kind}/{name} is not a {phase} hook: the Job starts first"
        assert int(dep[order_key]) < int(ann[order_key]), f"{kind}/{name} is not ordered first"
        assert dep.get(policy_key) == policy


@pytest.mark.parametrize("directory,hook_key,phase,policy_key,policy", [
    ("overlays/helm-hooks", "helm.sh/hook", "post-install,post-upgrade", "helm.sh/hook-delete-policy",
     "before-hook-creation"),
    ("overlays/argocd", "argocd.argoproj.io/hook", "PostSync", "argocd.argoproj.io/hook-delete-policy",
     "BeforeHookCreation"),
])
def test_post_deploy_hook_runs_after_the_rollout(directory: str, hook_key: str, phase: str,
                                                 policy_key: str, policy: str) -> None:
    """The post-deploy Job is a post-upgrade / PostSync hook; what it needs was created by the
    pre-deploy hooks and is still there (only deleted before the next hook creation)."""
    docs = build(directory)
    pre, post = find(docs, "Job", "migration-runner"), find(docs, "Job", "migration-runner-post-deploy")
    ann = post["metadata"]["annotations"]
    assert (ann[hook_key], ann[policy_key]) == (phase, policy)
    assert _needs(post) == _needs(pre)
    for kind, name in _needs(post):
        dep = find(docs, kind, name)["metadata"]["annotations"]
        assert dep[policy_key] == policy, f"{kind}/{name} would be gone before the post-deploy hook"


def assert_only_name_label_and_phase_differ(pre: dict[str, Any], post: dict[str, Any]) -> None:
    """The post-deploy Job is its pre-deploy Job (an overlay of it) but for the name, the
    component label and the phase: same hardening, podFailurePolicy and deadlines."""
    for job in (pre, post):
        job["metadata"].pop("name")
        job["metadata"]["labels"].pop("app.kubernetes.io/component")
        job["spec"]["template"]["metadata"]["labels"].pop("app.kubernetes.io/component")
    args = [job["spec"]["template"]["spec"]["containers"][0].pop("args") for job in (pre, post)]
    assert args == [["upgrade", "--phase", "pre-deploy"], ["upgrade", "--phase", "post-deploy"]]
    assert pre == post


def test_post_deploy_job_is_the_pre_deploy_job_in_the_other_phase() -> None:
    """overlays/post-deploy-job renders the post-deploy Job alone, for the hook overlays."""
    post = find(build("overlays/post-deploy"), "Job")
    assert find(build("overlays/post-deploy-job"), "Job") == post
    assert [d["kind"] for d in build("overlays/post-deploy-job")] == ["Job"]
    assert_only_name_label_and_phase_differ(find(build("base"), "Job"), post)


def test_fleet_post_deploy_job_is_the_fleet_job_in_the_other_phase() -> None:
    """Same shards and targets too (an overlay of the fleet's Job)."""
    pre = find(build("overlays/fleet"), "Job")
    post = find(build("overlays/fleet-post-deploy"), "Job")
    assert (pre["metadata"]["name"], post["metadata"]["name"]) == \
        ("migration-runner-fleet", "migration-runner-fleet-post-deploy")
    assert_only_name_label_and_phase_differ(pre, post)


@pytest.mark.parametrize("directory,name,phase", [
    ("base", "migration-runner", "pre-deploy"),
    ("overlays/post-deploy", "migration-runner-post-deploy", "post-deploy"),
    ("overlays/fleet", "migration-runner-fleet", "pre-deploy"),
    ("overlays/fleet-post-deploy", "migration-runner-fleet-post-deploy", "post-deploy"),
])
def test_jobs_run_their_deploy_phase(directory: str, name: str, phase: str) -> None:
    from runner.cli import build_parser

    docs = build(directory)
    (c,) = find(docs, "Job", name)["spec"]["template"]["spec"]["containers"]
    args = build_parser().parse_args(c["args"])
    env = {**resolve_env(c, docs), "DATABASE_URL": "postgresql://u:p@h/d",
           "ALEMBIC_CONFIG": str(REPO / "alembic.ini")}
    settings = config.load(env, {k: v for k, v in vars(args).items() if k.isupper()},
                           need_database=False, command=args.command)
    assert settings.deploy_phase == phase


def _copy_tree(tmp_path: Path) -> Path:
    shutil.copytree(K8S, tmp_path / "k8s")
    return tmp_path / "k8s"


def test_workload_identity_annotation_survives_every_overlay(tmp_path: Path) -> None:
    tree = _copy_tree(tmp_path)
    sa = tree / "base/serviceaccount.yaml"
    text = sa.read_text()
    assert "#   eks.amazonaws.com/role-arn:" in text, "the documented IRSA slot is gone"
    sa.write_text(text.replace("#   eks.amazonaws.com/role-arn:", "  eks.amazonaws.com/role-arn:"))
    for directory in DIRS:
        account = find(build(tree / directory), "ServiceAccount")
        assert account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith(
            "arn:aws:iam::"), directory
        assert account["automountServiceAccountToken"] is False


def set_rollback(tree: Path, target: str, confirm: str) -> Path:
    """Make the documented edit (as `kustomize edit set configmap` does) in a copy of k8s/."""
    kust = tree / "overlays/rollback/kustomization.yaml"
    text = kust.read_text()
    text, n1 = re.subn(r"(?m)^(\s+- DOWNGRADE_TO=).*$", rf"\g<1>{target}", text)
    text, n2 = re.subn(r"(?m)^(\s+- DOWNGRADE_CONFIRM=).*$", rf"\g<1>{confirm}", text)
    assert (n1, n2) == (1, 1), "the rollback overlay's DOWNGRADE_TO/DOWNGRADE_CONFIRM lines moved"
    kust.write_text(text)
    return tree / "overlays/rollback"


def test_rollback_overlay_is_a_separate_confirmed_downgrade(tmp_path: Path) -> None:
    docs = build("overlays/rollback")
    (job,) = jobs(docs)
    assert job["metadata"]["name"] != find(build("base"), "Job")["metadata"]["name"]
    c = job["spec"]["template"]["spec"]["containers"][0]
    assert c["args"] == ["downgrade", "--to", "$(DOWNGRADE_TO)", "--confirm", "$(DOWNGRADE_CONFIRM)"]
    unconfirmed = resolve_env(c, docs)
    assert unconfirmed["DOWNGRADE_CONFIRM"] != unconfirmed["DOWNGRADE_TO"], "confirmed by default"
    edited = build(set_rollback(_copy_tree(tmp_path), "0003", "0003"))
    c = jobs(edited)[0]["spec"]["template"]["spec"]["containers"][0]
    run = kubelet_run(jobs(edited)[0]["spec"]["template"]["spec"], c["name"], edited, tmp_path)
    assert run.args == ["downgrade", "--to", "0003", "--confirm", "0003"]


# -- the init-container mode, as a process against real PostgreSQL ---------------------------------
def _events(err: str, name: str) -> list[str]:
    return [line for line in err.splitlines() if name in line]


def test_wait_until_head_blocks_until_the_job_ran(database: Database, tmp_path: Path) -> None:
    msg = tmp_path / "termination-log"
    env = runner_env(database.url, HEAD_POLL_INTERVAL="0.3s", TERMINATION_MESSAGE_PATH=str(msg))
    waiter = start_runner(["wait", "--until-head"], env)
    try:
        time.sleep(2.0)
        assert waiter.poll() is None, "returned while the database was behind head"
        advisory = database.sql("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'")
        assert advisory == "0", "the init-container mode must never take the migration lock"
        assert database.tables() == set(), "the init-container mode must never migrate"
        assert run_runner(["upgrade"], runner_env(database.url)).code == 0  # the Job
        r = finish(waiter, timeout=30)
    finally:
        waiter.kill()
    assert r.code == 0, r.err
    waits = _events(r.err, "head.wait")
    assert len(waits) >= 2 and "database at base, image head 0005: 5 revision(s) pending" in waits[0]
    assert len(_events(r.err, "head.reached")) == 1
    summary = json.loads(msg.read_text())
    assert (summary["outcome"], summary["current"], summary["head"], summary["exit_code"]) == \
        ("at head", HEAD, HEAD, 0)


def test_wait_until_head_times_out_with_exit_10_and_changes_nothing(database: Database) -> None:
    env = runner_env(database.url, HEAD_WAIT_TIMEOUT="1.5s", HEAD_POLL_INTERVAL="0.5s",
                     LOG_FORMAT="json")
    assert run_runner(["upgrade", "--to", "0002"], env).code == 0
    t0 = time.monotonic()
    r = run_runner(["wait", "--until-head"], env)
    took = time.monotonic() - t0
    assert r.code == ExitCode.PENDING == 10, r.err
    assert took < 15
    polls = [json.loads(line) for line in _events(r.err, '"head.wait"')]
    assert len(polls) >= 2
    assert {(p["current"], p["head"], p["pending"]) for p in polls} == {("0002", HEAD, 3)}
    assert "HEAD_WAIT_TIMEOUT" in r.err and database.version() == "0002"


def test_wait_until_head_obeys_run_deadline_with_exit_9(database: Database) -> None:
    env = runner_env(database.url, HEAD_WAIT_TIMEOUT="60s", RUN_DEADLINE="1.5s")
    t0 = time.monotonic()
    r = run_runner(["wait", "--until-head"], env)
    assert r.code == ExitCode.RUN_DEADLINE and time.monotonic() - t0 < 10, r.err


def test_wait_until_head_returns_at_once_at_head(database: Database) -> None:
    env = runner_env(database.url, HEAD_POLL_INTERVAL="30s")
    assert run_runner(["upgrade"], env).code == 0
    t0 = time.monotonic()
    r = run_runner(["wait", "--until-head"], env)
    assert r.code == 0 and time.monotonic() - t0 < 10, r.err
    assert _events(r.err, "head.reached") and not _events(r.err, "head.wait")


def test_wait_until_head_lets_an_older_image_start_on_a_newer_database(database: Database) -> None:
    """A revision the image does not know was written by a newer release: don't block old pods."""
    database.sql("CREATE TABLE alembic_version (version_num varchar(32) PRIMARY KEY); "
                 "INSERT INTO alembic_version VALUES ('9f1e2d3c4b5a')")
    r = run_runner(["wait", "--until-head"], runner_env(database.url, HEAD_WAIT_TIMEOUT="5s"))
    assert r.code == 0, r.err
    assert "9f1e2d3c4b5a" in _events(r.err, "head.ahead")[0]


def test_wait_until_head_stops_at_sigterm(database: Database) -> None:
    waiter = start_runner(["wait", "--until-head"], runner_env(database.url, HEAD_POLL_INTERVAL="30s"))
    try:
        time.sleep(1.5)
        waiter.terminate()
        r = finish(waiter, timeout=15)
    finally:
        waiter.kill()
    assert r.code == ExitCode.SIGTERM, r.err


def test_downgrade_confirmation_must_repeat_the_target(database: Database) -> None:
    env = runner_env(database.url)
    assert run_runner(["upgrade"], env).code == 0
    for confirm in ("", "0004", "$(DOWNGRADE_CONFIRM)"):
        r = run_runner(["downgrade", "--to", "0003", "--confirm", confirm], env)
        assert r.code == ExitCode.CONFIG, r.err
        assert "not confirmed" in r.err and database.version() == HEAD
    assert run_runner(["downgrade", "--to", "0003", "--confirm", "0003"], env).code == 0
    assert database.version() == "0003"


# -- execution: the built manifests' containers, run with Docker as the kubelet would ------------
@pytest.fixture
def k8s_db(database: Database) -> Database:
    """The test image carries Debian's pg_dump 15, which rightly refuses newer servers (the Job
    backs up before migrating): the execution tests run on PostgreSQL 15 (pg("15") marks)."""
    assert database.cluster.major == "15"
    return database


def operator_values(docs: list[dict[str, Any]], db: Database, s3: S3Server, bucket: str) -> None:
    """Put what an operator would into the ConfigMap and Secret: the test database and S3."""
    set_data(docs, "Secret", "migration-runner-database", DATABASE_URL=db.url,
             AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY)
    set_data(docs, "ConfigMap", "migration-runner", BACKUP_S3_URI=f"s3://{bucket}/k8s",
             AWS_ENDPOINT_URL_S3=s3.endpoint, AWS_REGION=REGION, AWS_EC2_METADATA_DISABLED="true")


def run_as_kubelet(image: str, docs: list[dict[str, Any]], spec: dict[str, Any], name: str,
                   tmp_path: Path, timeout: float = 180) -> tuple[Any, dict[str, Any]]:
    from tests.docker_harness import run_container

    kr = kubelet_run(spec, name, docs, tmp_path)
    r = run_container(image, kr.args, kr.env, timeout=timeout, **kr.options)
    assert_no_secrets(r.out, r.err)
    message = kr.termination_message()
    assert message, f"no termination message was written:\n{r.err}"
    return r, json.loads(message)


@pytest.mark.pg("15")  # k8s_db: the test image pg_dump is 15
def test_job_runs_as_the_kubelet_would(runner_image: str, k8s_db: Database, s3_server: S3Server,
                                       bucket: str, tmp_path: Path) -> None:
    docs = build("base")
    operator_values(docs, k8s_db, s3_server, bucket)
    pod = find(docs, "Job")["spec"]["template"]["spec"]
    r, summary = run_as_kubelet(runner_image, docs, pod, "migrate", tmp_path)
    assert r.code == 0, r.err
    assert k8s_db.version() == HEAD
    assert {"public.customers", "public.orders"} <= k8s_db.tables()
    assert (summary["command"], summary["exit_code"], summary["outcome"], summary["to"]) == \
        ("upgrade", 0, "migrated", HEAD)
    assert summary["pending"] == ["0001", "0002", "0003", "0004", "0005"]
    assert summary["backup"].startswith(f"k8s/{k8s_db.name}/")
    assert s3_server.keys(bucket) == [summary["backup"], summary["backup"] + ".manifest.json"]
    assert all(json.loads(line)["event"] for line in r.err.splitlines()), "LOG_FORMAT=json"
    # a second Job (the next deploy, nothing to do) exits 0 without a lock or backup
    r, summary = run_as_kubelet(runner_image, docs, pod, "migrate", tmp_path)
    assert (r.code, summary["outcome"]) == (0, "nothing to do"), r.err
    # after the rollout, the post-deploy Job: the sample has no post-deploy revision, nothing to do
    post = build("overlays/post-deploy")
    operator_values(post, k8s_db, s3_server, bucket)
    r, summary = run_as_kubelet(runner_image, post, find(post, "Job")["spec"]["template"]["spec"],
                                "migrate", tmp_path / "post-deploy")
    assert (r.code, summary["phase"], summary["outcome"]) == (0, "post-deploy", "nothing to do"), r.err


@pytest.mark.pg("15")  # k8s_db: the test image pg_dump is 15
def test_rollback_job_runs_as_the_kubelet_would(runner_image: str, k8s_db: Database,
                                                s3_server: S3Server, bucket: str,
                                                tmp_path: Path) -> None:
    assert run_runner(["upgrade"], runner_env(k8s_db.url)).code == 0
    tree = _copy_tree(tmp_path)
    # the revision is set but not confirmed: the Job refuses, non-retriable, nothing changes
    docs = build(set_rollback(tree, "0003", ""))
    operator_values(docs, k8s_db, s3_server, bucket)
    pod = jobs(docs)[0]["spec"]["template"]["spec"]
    r, summary = run_as_kubelet(runner_image, docs, pod, "migrate", tmp_path)
    assert r.code == ExitCode.CONFIG, r.err
    assert pod_failure_action(jobs(docs)[0], "migrate", r.code) == "FailJob"  # no retry
    assert summary["exit_code"] == 2 and "not confirmed" in summary["error"]
    assert k8s_db.version() == HEAD and s3_server.keys(bucket) == []
    # confirmed: backed up, then rolled back to 0003
    docs = build(set_rollback(tree, "0003", "0003"))
    operator_values(docs, k8s_db, s3_server, bucket)
    r, summary = run_as_kubelet(runner_image, docs, jobs(docs)[0]["spec"]["template"]["spec"],
                                "migrate", tmp_path)
    assert r.code == 0, r.err
    assert k8s_db.version() == "0003"
    assert (summary["command"], summary["outcome"], summary["from"], summary["to"]) == \
        ("downgrade", "downgraded", HEAD, "0003")
    assert summary["backup"] in s3_server.keys(bucket)


@pytest.mark.pg("15")  # k8s_db: the test image pg_dump is 15
def test_init_container_blocks_until_the_job_ran(runner_image: str, k8s_db: Database,
                                                 s3_server: S3Server, bucket: str,
                                                 tmp_path: Path) -> None:
    from tests.docker_harness import docker, start_container

    docs = build("overlays/example-app")
    operator_values(docs, k8s_db, s3_server, bucket)
    app = find(docs, "Deployment")["spec"]["template"]["spec"]
    init = kubelet_run(app, "wait-for-schema", docs, tmp_path / "init")  # type: ignore[arg-type]
    poll = config.parse_duration(init.env["HEAD_POLL_INTERVAL"])
    waiter = start_container(runner_image, init.args, init.env, **init.options)
    try:
        def polled_twice() -> bool:
            assert waiter.proc.poll() is None, waiter.wait(10).err
            return len(_events(docker("logs", waiter.name, check=False).stderr, '"head.wait"')) >= 2

        wait_for(polled_twice, timeout=60, every=0.5, what="the init container never reported its polls")
        assert waiter.running(), "the init container finished while the database was behind"
        assert k8s_db.tables() == set()
        job_pod = find(docs, "Job")["spec"]["template"]["spec"]
        r, _ = run_as_kubelet(runner_image, docs, job_pod, "migrate", tmp_path)
        assert r.code == 0, r.err
        t0 = time.monotonic()
        result = waiter.wait(timeout=poll + 30)
        took = time.monotonic() - t0
    finally:
        waiter.stop(grace=2)
    assert_no_secrets(result.out, result.err)
    assert result.code == 0, result.err
    assert took <= poll + 15, f"the init container took {took:.1f}s to notice the Job's migration"
    summary = json.loads(init.termination_message())
    assert (summary["command"], summary["outcome"], summary["current"], summary["exit_code"]) == \
        ("wait", "at head", HEAD, 0)


# -- the fleet overlay: an Indexed Job, each pod taking its shard of the targets ------------------
def test_fleet_overlay_is_an_indexed_job_over_a_mounted_target_list(tmp_path: Path) -> None:
    from runner.fleet import shard, targets

    docs = build("overlays/fleet")
    (job,) = jobs(docs)
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    env = resolve_env(c, docs)
    assert job["metadata"]["name"] == "migration-runner-fleet"
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == int(env["JOB_COMPLETIONS"]), \
        "JOB_COMPLETIONS must equal completions: every pod computes its shard from it"
    assert "JOB_COMPLETION_INDEX" not in env, "Kubernetes sets it in each pod"
    assert "backoffLimit" not in spec and spec["backoffLimitPerIndex"] >= 1, \
        "a Job-wide backoffLimit lets one failing shard use up every shard's retries"
    assert 1 <= spec["maxFailedIndexes"] < spec["completions"]
    # TARGETS_FILE is a key of the mounted ConfigMap, and the example list is valid as it stands
    path = Path(env["TARGETS_FILE"])
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == str(path.parent))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    listing = tmp_path / "targets.txt"
    listing.write_text(find(docs, "ConfigMap", volume["configMap"]["name"])["data"][path.name])
    names = [t.name for t in targets.from_file(listing, env["DATABASE_URL_TEMPLATE"])]
    assert len(names) >= 2
    shards = [shard.mine(names, names, i, spec["completions"]) for i in range(spec["completions"])]
    assert sorted(n for part in shards for n in part) == sorted(names)
    settings = config.load({**env, "ALEMBIC_CONFIG": str(REPO / "alembic.ini"), "JOB_COMPLETION_INDEX": "0"},
                           need_database=False, command="upgrade")
    assert shard.position(settings) == (0, spec["completions"]) and settings.fleet_parallel >= 1


def _spread_names(stem: str, count: int) -> list[str]:
    """count database names starting with stem, of which each of two indexes gets some."""
    from runner.fleet import shard

    names, i = [f"{stem}_{n}" for n in range(count)], count
    while len({shard.owner(n, 2) for n in names}) < 2:
        names[-1], i = f"{stem}_{i}", i + 1
    return names


@pytest.mark.pg("15")  # k8s_db: the test image pg_dump is 15
def test_fleet_job_runs_two_indexes_as_the_kubelet_would(runner_image: str, k8s_db: Database,
                                                          s3_server: S3Server, bucket: str,
                                                          tmp_path: Path) -> None:
    from runner.fleet import shard
    from tests.docker_harness import start_container

    cluster = k8s_db.cluster
    fleet = [Database(cluster, name) for name in _spread_names(k8s_db.name, 4)]
    for db in fleet:
        cluster.psql(f"CREATE DATABASE {db.name}")
    try:
        docs = build("overlays/fleet")
        operator_values(docs, k8s_db, s3_server, bucket)
        (job,) = jobs(docs)
        pod = job["spec"]["template"]["spec"]
        # two indexes, edited as the overlay says: completions, parallelism, JOB_COMPLETIONS
        job["spec"]["completions"] = job["spec"]["parallelism"] = 2
        next(e for e in pod["containers"][0]["env"] if e["name"] == "JOB_COMPLETIONS")["value"] = "2"
        set_data(docs, "Secret", "migration-runner-database", DATABASE_URL_TEMPLATE=cluster.url("{name}"))
        volume = next(v for v in pod["volumes"] if "configMap" in v)
        set_data(docs, "ConfigMap", volume["configMap"]["name"],
                 **{"targets.txt": "# tenants\n" + "\n".join(db.name for db in fleet) + "\n"})
        pods = []
        for index in (0, 1):  # both at once, as the Job controller starts them
            kr = kubelet_run(pod, "migrate", docs, tmp_path / f"index-{index}")
            kr.env["JOB_COMPLETION_INDEX"] = str(index)  # what the Job controller sets per pod
            pods.append((kr, start_container(runner_image, kr.args, kr.env, **kr.options)))
        names = [db.name for db in fleet]
        for index, (kr, container) in enumerate(pods):
            r = container.wait(timeout=180)
            assert_no_secrets(r.out, r.err)
            assert r.code == 0, r.err
            summary = json.loads(kr.termination_message())
            mine = shard.mine(names, names, index, 2)
            assert summary["shard"] == {"index": index, "completions": 2, "fleet": 4}
            assert (summary["targets"], summary["outcomes"]) == (len(mine), {"migrated": len(mine)})
            reported = {json.loads(line)["target"] for line in r.err.splitlines() if '"fleet.target"' in line}
            assert reported == set(mine), "each pod migrates exactly its shard"
        keys = s3_server.keys(bucket)
        for db in fleet:
            assert db.version() == HEAD and {"public.customers", "billing.invoices"} <= db.tables()
            assert any(k.startswith(f"k8s/{db.name}/") for k in keys), "a backup under its own prefix"
    finally:
        for db in fleet:
            cluster.psql(f"DROP DATABASE IF EXISTS {db.name} WITH (FORCE)", check=False)
