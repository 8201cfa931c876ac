"""kopf glue: one idempotent reconcile (parse -> plan -> render -> diff -> apply -> status).

It runs on create, on spec updates and on resume, and from a timer that repairs drift of owned
objects and refreshes status from the children (kopf reacts to the resource's own changes, not
to its children's). Status goes through `patch.status`, never handler return values; progress
lives in `longserve.io/` annotations. Errors carry intent: PermanentError after SpecValid/Sized
are written as False, TemporaryError while the model downloads. `build_registry` registers the
handlers on a fresh registry, so tests can run the real operator with a short timer.

No deletion handler: owner references clean up. kopf (1.45) does put a finalizer on every resource
with a timer, so it can stop the timer before the object goes; it is named `longserve.io/timer`
and released at once on deletion by the leading replica. Replicas elect a leader by kopf peering
(main.py), so a dead operator pod is replaced by a standby within the peering lifetime and a
deletion waits at most that long; only with no replica running at all does it wait (remove the
finalizer by hand then). RBAC grants `update` on `longcontextmodels/finalizers`, which clusters
with OwnerReferencesPermissionEnforcement require to set `blockOwnerDeletion` on the children.
"""
from __future__ import annotations

import copy
import datetime
import logging
from typing import Any

import kopf
from prometheus_client import Counter, Histogram

from longserve.operator import capacity as capacity_mod
from longserve.operator import k8s_apply, rollout
from longserve.operator import status as status_mod
from longserve.operator.diff import diff
from longserve.operator.render import (
    CONFIG_HASH_ANNOTATION,
    DEFAULT_IMAGE,
    HASH_LABEL,
    desired,
    download_job_name,
    engine_pod_labels,
)
from longserve.operator.render_lws import LWS_API_VERSION, LWS_KIND, ROLE_LABEL
from longserve.operator.types import GROUP, PLURAL, VERSION, SpecError

RECONCILES = Counter("longserve_operator_reconcile", "Reconcile runs by result", ["result"])
PLANS = Counter("longserve_operator_plans", "Sizing outcomes", ["outcome"])
DOWNLOAD_SECONDS = Histogram("longserve_operator_model_download_seconds", "Model download Job duration",
                             buckets=(60, 300, 600, 1200, 1800, 3600, 7200, 14400))
DEFAULT_TIMER_SECONDS = 30.0
WORKLOAD_KINDS = ("Deployment", "LeaderWorkerSet")
HELD_WHILE_DOWNLOADING = ("Deployment", "LeaderWorkerSet", "ConfigMap")


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def _parse_time(value: str | None) -> datetime.datetime | None:
    try:
        return datetime.datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None
    except ValueError:
        return None


def _job_state(job: dict | None) -> str:
    st = (job or {}).get("status") or {}
    if st.get("succeeded"):
        return "DownloadComplete"
    for cond in st.get("conditions") or []:
        if cond.get("type") == "Failed" and cond.get("status") == "True":
            return "DownloadFailed"
    return "Downloading"


def _cache_key(body: dict) -> dict:
    model = (body.get("spec") or {}).get("model") or {}
    return {"uri": model.get("uri"), "revision": model.get("revision") or "main"}


def reconcile(body: kopf.Body, meta: kopf.Meta, status: kopf.Status, patch: kopf.Patch, memo: kopf.Memo,
              logger: kopf.Logger, *, from_timer: bool = False) -> None:
    """Make the children match the spec and write status; see the module docstring."""
    api: k8s_apply.Api = memo.api
    # kopf's views read through to the object kopf keeps (and diffs against): render from a private copy
    body = copy.deepcopy(dict(body))
    name, namespace, uid = meta["name"], meta["namespace"], meta["uid"]
    generation = meta.get("generation") or 0
    status = copy.deepcopy(dict(status or {}))
    cached = status.get("cache") == {**_cache_key(body), "complete": True}
    try:
        d = desired(body, image=memo.image, model_cached=cached, monitoring=memo.monitoring)
    except SpecError as exc:
        phase, conds = status_mod.invalid_status(exc)
        _write(patch, {"phase": phase, "conditions": conds}, status, generation)
        RECONCILES.labels("invalid").inc()
        if not from_timer:
            kopf.warn(body, reason="SpecInvalid", message=f"{exc.reason}: {exc.message}")
            raise kopf.PermanentError(f"{exc.reason}: {exc.message}") from None
        return
    lcm, plan = d.resource, d.plan
    if not from_timer and (status.get("plan") or {}).get("specHash") != d.spec_hash:
        PLANS.labels("feasible" if plan.feasible else "infeasible").inc()
        if plan.feasible:
            kopf.info(body, reason="Sized", message=plan.explanation)
        else:
            kopf.warn(body, reason="SizingInfeasible", message=plan.explanation)
    if not plan.feasible:       # keep whatever runs; nothing new is deployed
        new = status_mod.build_status(d, namespace=namespace, deployment=None, cache_state=None)
        _write(patch, new, status, generation)
        RECONCILES.labels("infeasible").inc()
        if not from_timer:
            raise kopf.PermanentError(f"Infeasible: {plan.explanation}")
        return

    live = api.list_children(namespace, name, uid)
    objects = d.objects
    cache_state = None
    if lcm.downloads and lcm.mode != "DryRun":
        job_name = download_job_name(lcm)
        job = next((o for o in live if o["kind"] == "Job" and o["metadata"]["name"] == job_name), None)
        cache_state = "DownloadComplete" if cached else _job_state(job)
        if cache_state == "DownloadComplete" and not cached:
            _downloaded(job, body, patch)
            d = desired(body, image=memo.image, model_cached=True, monitoring=memo.monitoring)
            objects = d.objects
        elif cache_state != "DownloadComplete":
            # the workload waits for this revision's files: its Deployment and engine config (which
            # names the weights path) stay as they are, so running pods keep the previous revision
            objects = [o for o in objects if o["kind"] not in HELD_WHILE_DOWNLOADING]
            live = [o for o in live if o["kind"] not in HELD_WHILE_DOWNLOADING]
    objects = _installed_kinds_only(objects, memo, body, from_timer)
    objects, lws_missing = _without_missing_leader_worker_set(objects, api, body, from_timer)
    # an old engine ConfigMap stays while pods of the previous template may still mount it
    actions = rollout.hold_old_configs(diff(objects, live), live,
                                       rollout.workloads_rolled_out(objects, live, WORKLOAD_KINDS))
    for conflict in api.apply(actions):
        kopf.warn(body, reason="FieldConflict", message=f"took back fields another manager changed: {conflict}"[:1000])
    if actions and not from_timer:
        kopf.info(body, reason="Applied", message="; ".join(map(str, actions))[:1000])
    elif actions:
        logger.info("drift repaired: %s", "; ".join(map(str, actions)))
    workload = status_mod.layout(d)["workload"]          # a Deployment, or a LeaderWorkerSet (multi-node)
    kind_version = {"Deployment": "apps/v1", LWS_KIND: LWS_API_VERSION}[workload["kind"]]
    deployment = api.get(kind_version, workload["kind"], namespace, workload["name"]) if any(
        o["kind"] == workload["kind"] for o in objects) else None
    verified = _capacity(d, api, namespace, status, patch, memo, logger) if deployment else None
    new = status_mod.build_status(d, namespace=namespace, deployment=deployment, cache_state=cache_state,
                                  capacity=verified, workload_api_missing=lws_missing)
    _download_events(body, actions, status, new)
    _write(patch, new, status, generation)
    RECONCILES.labels("drift" if from_timer and actions else "ok").inc()
    if cache_state == "Downloading" and not from_timer:
        raise kopf.TemporaryError("waiting for the model download Job", delay=30)


def _capacity(d, api: k8s_apply.Api, namespace: str, current: dict, patch: kopf.Patch, memo: kopf.Memo,
              logger: kopf.Logger) -> dict | None:
    """CapacityVerified from what a ready pod of the current template reports (capacity.py).

    Probed when the engine config changed since the last measurement, or after the interval
    (memo.capacity_interval); the measurement is kept in status.observed between probes."""
    lcm = d.resource
    config = next((o for o in d.objects if o["kind"] == "ConfigMap"), None)
    if config is None:
        return None
    config_hash = config["metadata"]["labels"][HASH_LABEL]
    observed = dict(current.get("observed") or {})
    checked = _parse_time(observed.get("checkedAt"))
    age = (datetime.datetime.now(datetime.timezone.utc) - checked).total_seconds() if checked else None
    interval = memo.get("capacity_interval") or capacity_mod.DEFAULT_INTERVAL_SECONDS
    if observed.get("configHash") != config_hash or age is None or age >= interval:
        labels = engine_pod_labels(lcm)
        if d.plan.multi_node:             # a group's leader serves HTTP; its workers serve nothing
            labels[ROLE_LABEL] = "leader"
        pod = api.ready_pod(namespace, labels, {CONFIG_HASH_ANNOTATION: config_hash})
        if pod is not None:
            name, ip = pod["metadata"]["name"], pod["status"]["podIP"]
            try:
                cap = capacity_mod.probe(f"http://{ip}:{lcm.http_port}")
            except capacity_mod.ProbeError as exc:
                logger.warning("capacity probe of %s failed: %s", name, exc)
            else:
                observed = {"kvCapacityTokens": cap.kv_capacity_tokens, "maxModelLen": cap.max_model_len,
                            "pod": name, "source": cap.source, "configHash": config_hash, "checkedAt": _now()}
                patch.status["observed"] = observed
    if observed.get("configHash") != config_hash:
        return None
    ok, reason, message = capacity_mod.verdict(observed, d.plan.max_model_len)
    return status_mod.condition("CapacityVerified", ok, reason, message)


def _without_missing_leader_worker_set(objects: list[dict], api, body: dict, from_timer: bool) -> tuple[list, bool]:
    """A replica spanning nodes needs the LeaderWorkerSet API: without it nothing can run the plan,
    so the rest is applied, the status says why no workload exists, and an event names the fix.
    Checked on each reconcile of such a plan, so installing the controller later is picked up."""
    if not any(o["kind"] == LWS_KIND for o in objects) or api.has_api(LWS_API_VERSION):
        return objects, False
    if not from_timer:
        kopf.warn(body, reason="LeaderWorkerSetUnavailable",
                  message=f"the plan spans nodes, but the {LWS_API_VERSION} API is not installed; install the "
                          "LeaderWorkerSet controller (https://lws.sigs.k8s.io) or give accelerator.gpusPerNode "
                          "room for one pod")
    return [o for o in objects if o["kind"] != LWS_KIND], True


def _installed_kinds_only(objects: list[dict], memo: kopf.Memo, body: dict, from_timer: bool) -> list[dict]:
    """A ScaledObject needs KEDA's CRD: without it, say so and leave the replicas to spec.replicas."""
    if memo.get("keda") is not False or not any(o["kind"] == "ScaledObject" for o in objects):
        return objects
    if not from_timer:
        kopf.warn(body, reason="AutoscalerUnavailable",
                  message="spec.autoscaling.provider keda, but the keda.sh/v1alpha1 API is not installed; "
                          "install KEDA (then restart the operator) or use provider hpa")
    return [o for o in objects if o["kind"] != "ScaledObject"]


def _download_events(body: dict, actions: list, current: dict, new: dict) -> None:
    """DownloadStarted when the Job is created, DownloadFailed once when the Job fails."""
    if any(a.verb == "create" and a.kind == "Job" for a in actions):
        kopf.info(body, reason="DownloadStarted", message=f"{_cache_key(body)['uri']} into the cache PVC")

    def cached_reason(st: dict) -> str | None:
        return next((c.get("reason") for c in st.get("conditions") or [] if c.get("type") == "ModelCached"), None)
    if cached_reason(new) == "DownloadFailed" != cached_reason(current):
        kopf.warn(body, reason="DownloadFailed", message="the model download Job failed; see its pod logs")


def _downloaded(job: dict | None, body: dict, patch: kopf.Patch) -> None:
    patch.status["cache"] = {**_cache_key(body), "complete": True}
    st = (job or {}).get("status") or {}
    start, end = _parse_time(st.get("startTime")), _parse_time(st.get("completionTime"))
    if start and end:
        DOWNLOAD_SECONDS.observe((end - start).total_seconds())
    kopf.info(body, reason="DownloadCompleted", message=f"{_cache_key(body)['uri']} cached")


MANAGED_STATUS = ("phase", "conditions", "plan", "layout", "replicas", "readyReplicas", "selector", "endpoints",
                  "observedGeneration")


def merge_patch(old, new):
    """A JSON merge patch turning `old` into `new` (None deletes); {} when nothing changed."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return new
    out = {k: None for k in old if k not in new}
    for key, value in new.items():
        if key not in old:
            out[key] = value
        elif old[key] != value:
            out[key] = merge_patch(old[key], value)
    return out


def _write(patch: kopf.Patch, new: dict, current: dict, generation: int) -> None:
    """Patch only what changed in the operator's status fields (the timer runs often)."""
    new["conditions"] = status_mod.merge_conditions(current.get("conditions"), new["conditions"], _now(), generation)
    new["observedGeneration"] = generation
    old = {k: current[k] for k in MANAGED_STATUS if k in current}
    for key, value in merge_patch(old, new).items():
        patch.status[key] = value


def build_registry(timer_interval: float = DEFAULT_TIMER_SECONDS) -> kopf.OperatorRegistry:
    """A registry with the operator's handlers (a fresh one per operator run)."""
    registry = kopf.OperatorRegistry()
    resource = (GROUP, VERSION, PLURAL)

    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
            prefix=GROUP, key="last-handled-configuration")
        settings.persistence.finalizer = f"{GROUP}/timer"
        settings.posting.reporting_component = "longserve-operator"
        settings.scanning.disabled = True
        if memo.get("peering_lifetime"):              # leader election among replicas (main.py)
            settings.peering.lifetime = memo.peering_lifetime
            settings.peering.mandatory = True
        if memo.get("monitoring") is None:
            memo.monitoring = memo.api.has_api("monitoring.coreos.com/v1")
        if memo.get("keda") is None:
            memo.keda = memo.api.has_api("keda.sh/v1alpha1")
        logger.info("engine image %s; Prometheus Operator kinds %s", memo.image,
                    "present" if memo.monitoring else "absent (no ServiceMonitor/PrometheusRule)")

    @kopf.on.login(registry=registry)
    def login(memo: kopf.Memo, **_: Any) -> kopf.ConnectionInfo:
        return connection_info(memo.api.configuration)

    @kopf.on.create(*resource, registry=registry)
    @kopf.on.update(*resource, field="spec", registry=registry)
    @kopf.on.resume(*resource, registry=registry)
    def on_change(body: kopf.Body, meta: kopf.Meta, status: kopf.Status, patch: kopf.Patch, memo: kopf.Memo,
                  logger: kopf.Logger, **_: Any) -> None:
        reconcile(body, meta, status, patch, memo, logger)

    @kopf.timer(*resource, interval=timer_interval, idle=timer_interval, registry=registry)
    def on_timer(body: kopf.Body, meta: kopf.Meta, status: kopf.Status, patch: kopf.Patch, memo: kopf.Memo,
                 logger: kopf.Logger, **_: Any) -> None:
        reconcile(body, meta, status, patch, memo, logger, from_timer=True)

    return registry


def connection_info(configuration) -> kopf.ConnectionInfo:
    """kopf's credentials from the same client configuration k8s_apply uses."""
    header = configuration.get_api_key_with_prefix("BearerToken") or \
        configuration.get_api_key_with_prefix("authorization")
    parts = header.split(" ", 1) if header else []
    scheme, token = (None, None) if not parts else (None, parts[0]) if len(parts) == 1 else (parts[0], parts[1])
    return kopf.ConnectionInfo(
        server=configuration.host, ca_path=configuration.ssl_ca_cert, insecure=not configuration.verify_ssl,
        username=configuration.username or None, password=configuration.password or None,
        scheme=scheme, token=token, certificate_path=configuration.cert_file,
        private_key_path=configuration.key_file, default_namespace=None)


def make_memo(api: k8s_apply.Api, image: str = DEFAULT_IMAGE, monitoring: bool | None = None,
              keda: bool | None = None, capacity_interval: float | None = None) -> kopf.Memo:
    return kopf.Memo(api=api, image=image, monitoring=monitoring, keda=keda, capacity_interval=capacity_interval)


logging.getLogger("kubernetes.client.rest").setLevel(logging.WARNING)
