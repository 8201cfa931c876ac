"""Tensor parallelism in rendered pods: a single-node TP plan renders a Deployment with what TP needs
(shm, per-rank threads, NCCL knobs passed through), a plan spanning nodes renders a LeaderWorkerSet
that validates strictly against the LeaderWorkerSet v1 CRD schema kept in tests/operator/schemas/,
and vllm/sglang render their own multi-node launch for the same plan."""
import copy
import functools
import shlex
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from longserve.operator.render import HASH_LABEL, content_hash, desired
from longserve.operator.render_lws import LWS_API_VERSION, ROLE_LABEL
from longserve.operator.runtimes import startup_probe_seconds

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "manifests" / "examples"
LWS_CRD = Path(__file__).with_name("schemas") / "leaderworkerset.x-k8s.io_leaderworkersets.yaml"
TWO_NODES = EXAMPLES / "qwen25-14b-1m-2nodes.yaml"


def _strict(schema):
    """The CRD's structural schema, closed: an object with listed properties takes no others
    (the API server would prune them silently; a test should see them)."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if out.get("type") == "object" and "properties" in out and "additionalProperties" not in out \
                and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@functools.cache
def lws_validator():
    crd = yaml.safe_load(LWS_CRD.read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    schema = _strict(version["schema"]["openAPIV3Schema"])
    return jsonschema.Draft7Validator(schema)


def validate_lws(obj: dict) -> None:
    assert obj["apiVersion"] == LWS_API_VERSION and obj["kind"] == "LeaderWorkerSet"
    errors = sorted(lws_validator().iter_errors(obj), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors[:10])


def body(path: Path, **spec) -> dict:
    b = yaml.safe_load(path.read_text())
    b["metadata"].update(namespace="models", uid="6f1e8a52-0000-4000-8000-000000000002")
    for key, value in spec.items():
        b["spec"][key] = value
    return b


def by_kind(objects):
    out = {}
    for o in objects:
        out.setdefault(o["kind"], []).append(o)
    return out


def engine(pod_spec: dict) -> dict:
    return pod_spec["containers"][0]


def env_of(container: dict) -> dict:
    return {e["name"]: e.get("value") for e in container["env"]}


def test_the_schema_copy_rejects_what_the_api_server_would():
    good = next(o for o in desired(body(TWO_NODES)).objects if o["kind"] == "LeaderWorkerSet")
    validate_lws(good)
    for path, value in [(("spec", "startupPolicy"), "Eventually"),
                        (("spec", "leaderWorkerTemplate", "restartPolicy"), "Always"),
                        (("spec", "leaderWorkerTemplate", "sizee"), 2)]:
        bad = copy.deepcopy(good)
        node = bad
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        with pytest.raises(AssertionError):
            validate_lws(bad)
    bad = copy.deepcopy(good)
    del bad["spec"]["leaderWorkerTemplate"]["workerTemplate"]
    with pytest.raises(AssertionError):
        validate_lws(bad)


@pytest.mark.parametrize("cached", [False, True])
def test_two_node_example_renders_a_valid_leader_worker_set(cached):
    d = desired(body(TWO_NODES), model_cached=cached)
    p = d.plan
    assert p.feasible and p.tensor_parallel_size == 8 and (p.pods_per_replica, p.gpus_per_pod) == (2, 4)
    objs = by_kind(d.objects)
    assert "Deployment" not in objs and len(objs["LeaderWorkerSet"]) == 1
    lws = objs["LeaderWorkerSet"][0]
    validate_lws(lws)
    for obj in d.objects:                     # every built-in object still passes strict validation
        if obj["apiVersion"] != LWS_API_VERSION and "monitoring.coreos.com" not in obj["apiVersion"]:
            kubernetes_validate.validate(obj, "1.34.0", strict=True)
    meta = dict(lws["metadata"])
    labels = dict(meta["labels"])
    assert labels.pop(HASH_LABEL) == content_hash(lws | {"metadata": meta | {"labels": labels}})
    spec = lws["spec"]
    assert spec["replicas"] == 1 and spec["startupPolicy"] == "LeaderCreated"
    group = spec["leaderWorkerTemplate"]
    assert group["size"] == 2 and group["restartPolicy"] == "RecreateGroupOnPodRestart"
    leader, worker = group["leaderTemplate"], group["workerTemplate"]
    assert leader["metadata"]["labels"][ROLE_LABEL] == "leader"
    assert worker["metadata"]["labels"][ROLE_LABEL] == "worker"
    lead, work = engine(leader["spec"]), engine(worker["spec"])
    budget = startup_probe_seconds(d.model.weight_bytes)
    # the same command on both; ranks and the leader's address come from the LWS variables
    assert lead["command"] == work["command"]
    assert lead["command"][:4] == ["longserve", "serve", "--config", "/etc/longserve/engine_config.json"]
    assert "--api-key-file" in lead["command"] and not any(a.startswith("--dist") for a in lead["command"])
    for c in (lead, work):
        assert env_of(c)["LONGSERVE_MASTER_PORT"] == "29500"
        assert env_of(c)["LONGSERVE_DIST_INIT_TIMEOUT"] == str(budget)      # start-up waits the budget
    assert {p["name"] for p in lead["ports"]} == {"http", "grpc", "rendezvous"}
    assert lead["startupProbe"]["failureThreshold"] * lead["startupProbe"]["periodSeconds"] >= budget
    for key in ("ports", "startupProbe", "readinessProbe", "livenessProbe"):
        assert key not in work
    for pod in (leader["spec"], worker["spec"]):     # each pod: 4 GPUs, shm and threads for 4 ranks
        c = engine(pod)
        assert c["resources"]["limits"]["nvidia.com/gpu"] == "4"
        assert env_of(c)["OMP_NUM_THREADS"] == "3"              # 12 CPUs / 4 ranks
        shm = next(v for v in pod["volumes"] if v["name"] == "dshm")["emptyDir"]
        assert shm == {"medium": "Memory", "sizeLimit": "16Gi"}
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["automountServiceAccountToken"] is False
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
    # the group's headless Service (DNS behind LWS_LEADER_ADDRESS) and the client Service on leaders only
    services = {s["metadata"]["name"]: s for s in objs["Service"]}
    headless = services["qwen25-14b-1m-2n-group"]
    assert headless["metadata"]["name"] == lws["metadata"]["name"]
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"]
    assert headless["spec"]["selector"].items() <= leader["metadata"]["labels"].items()
    assert headless["spec"]["selector"].items() <= worker["metadata"]["labels"].items()
    client = services["qwen25-14b-1m-2n"]["spec"]["selector"]
    assert client.items() <= leader["metadata"]["labels"].items()
    assert not client.items() <= worker["metadata"]["labels"].items()
    # the NetworkPolicy admits the group's own pods on every port (rendezvous, NCCL)
    policy = objs["NetworkPolicy"][0]["spec"]
    assert any("ports" not in rule and rule["from"] == [{"podSelector": {"matchLabels": headless["spec"]["selector"]}}]
               for rule in policy["ingress"])
    assert d.plan.to_dict()["podsPerReplica"] == 2


@pytest.mark.parametrize("runtime", ["vllm", "sglang"])
def test_upstream_runtimes_render_their_multi_node_launch(runtime):
    b = body(TWO_NODES, runtime={"name": runtime, "image": f"example.com/{runtime}:1"})
    b["spec"].pop("auth")                                     # sglang takes no key file
    d = desired(b)
    assert d.plan.feasible and (d.plan.pods_per_replica, d.plan.gpus_per_pod) == (2, 4)
    lws = next(o for o in d.objects if o["kind"] == "LeaderWorkerSet")
    validate_lws(lws)
    group = lws["spec"]["leaderWorkerTemplate"]
    lead, work = engine(group["leaderTemplate"]["spec"]), engine(group["workerTemplate"]["spec"])
    assert "LONGSERVE_MASTER_PORT" not in env_of(lead) and "ports" not in work
    assert [p["name"] for p in lead["ports"]] == ["http", "rendezvous"]
    if runtime == "sglang":
        flags = ["--nnodes", "2", "--node-rank", "$(LWS_WORKER_INDEX)",
                 "--dist-init-addr", "$(LWS_LEADER_ADDRESS):29500"]
        for c in (lead, work):
            assert c["command"][c["command"].index("--tp") + 1] == "8"      # TP is the whole group's
            assert c["command"][-len(flags):] == flags
        return
    # vLLM: a Ray cluster (its DCA-capable V0 engine spans nodes only with the Ray executor)
    assert lead["command"][:2] == work["command"][:2] == ["sh", "-c"]
    head, serve = lead["command"][2].split(" && exec ")
    assert head == "ray start --head --port=6379 --disable-usage-stats"
    argv = shlex.split(serve)
    assert argv[:2] == ["vllm", "serve"] and argv[argv.index("--tensor-parallel-size") + 1] == "8"
    assert argv[-2:] == ["--distributed-executor-backend", "ray"]
    assert lead["ports"][1]["containerPort"] == 6379
    assert work["command"][2] == "exec ray start --address=$LWS_LEADER_ADDRESS:6379 --block --disable-usage-stats"


@pytest.mark.parametrize("name,tp", [("qwen25-7b-1m-a100x4", 4), ("qwen25-14b-1m-h100x8", 8)])
def test_single_node_tp_examples_render_a_deployment_with_what_tp_needs(name, tp):
    d = desired(body(EXAMPLES / f"{name}.yaml"))
    assert d.plan.tensor_parallel_size == tp and (d.plan.pods_per_replica, d.plan.gpus_per_pod) == (1, tp)
    objs = by_kind(d.objects)
    assert "LeaderWorkerSet" not in objs
    pod = objs["Deployment"][0]["spec"]["template"]["spec"]
    c = engine(pod)
    cfg = yaml.safe_load(objs["ConfigMap"][0]["data"]["engine_config.json"])
    assert cfg["tensor_parallel_size"] == tp and c["command"][:4] == [
        "longserve", "serve", "--config", "/etc/longserve/engine_config.json"]
    assert not any(a.startswith("--dist") for a in c["command"])    # one pod: the rendezvous is local
    assert env_of(c)["LONGSERVE_DIST_INIT_TIMEOUT"] == str(startup_probe_seconds(d.model.weight_bytes))
    assert "LONGSERVE_MASTER_PORT" not in env_of(c)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == str(tp)
    cpus = int(c["resources"]["requests"]["cpu"])
    assert cpus == 4 + 2 * tp and env_of(c)["OMP_NUM_THREADS"] == str(cpus // tp)
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")["emptyDir"]
    assert shm == {"medium": "Memory", "sizeLimit": "16Gi"} and d.shm_size == "16Gi"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
    assert "longserve.io/role" not in objs["Service"][0]["spec"]["selector"]


def test_nccl_knobs_and_threads_from_the_spec_win():
    env = [{"name": "NCCL_SOCKET_IFNAME", "value": "eth0"}, {"name": "NCCL_DEBUG", "value": "WARN"},
           {"name": "OMP_NUM_THREADS", "value": "7"}, {"name": "LONGSERVE_MASTER_PORT", "value": "29600"}]
    b = body(TWO_NODES)
    b["spec"]["runtime"] = {"env": env}
    lws = next(o for o in desired(b).objects if o["kind"] == "LeaderWorkerSet")
    validate_lws(lws)
    for role in ("leaderTemplate", "workerTemplate"):
        c = engine(lws["spec"]["leaderWorkerTemplate"][role]["spec"])
        names = [e["name"] for e in c["env"]]
        assert len(names) == len(set(names))                     # no duplicates: the user's value replaces ours
        got = env_of(c)
        assert (got["NCCL_SOCKET_IFNAME"], got["NCCL_DEBUG"], got["OMP_NUM_THREADS"],
                got["LONGSERVE_MASTER_PORT"]) == ("eth0", "WARN", "7", "29600")


def test_a_cpu_quantity_in_millicores_still_gives_one_thread_per_rank():
    b = body(EXAMPLES / "qwen25-7b-1m-a100x4.yaml")
    b["spec"]["resources"] = {"cpu": "1500m"}
    c = engine(next(o for o in desired(b).objects if o["kind"] == "Deployment")["spec"]["template"]["spec"])
    assert env_of(c)["OMP_NUM_THREADS"] == "1"


def test_replicas_are_groups_and_the_status_plan_shows_the_layout():
    b = body(TWO_NODES, replicas=3)
    d = desired(b)
    lws = next(o for o in d.objects if o["kind"] == "LeaderWorkerSet")
    assert lws["spec"]["replicas"] == 3 and lws["spec"]["leaderWorkerTemplate"]["size"] == 2
    from longserve.operator.status import public_plan
    plan = public_plan(d)
    assert (plan["tensorParallelSize"], plan["gpusPerPod"], plan["podsPerReplica"], plan["nodes"]) == (8, 4, 2, 2)


def test_install_rbac_allows_every_kind_the_operator_writes():
    """Each child kind (the LeaderWorkerSet included) can be read, created, patched and deleted."""
    from longserve.operator.k8s_apply import CHILD_KINDS, PLURALS
    install = [d for d in yaml.safe_load_all((ROOT / "manifests/install/operator.yaml").read_text()) if d]
    rules = next(d for d in install if d["kind"] == "ClusterRole")["rules"]
    for api_version, kind in CHILD_KINDS:
        group = api_version.rsplit("/", 1)[0] if "/" in api_version else ""
        verbs = set()
        for rule in rules:
            if group in rule["apiGroups"] and PLURALS[(api_version, kind)] in rule["resources"]:
                verbs |= set(rule["verbs"])
        assert {"get", "list", "create", "patch", "delete"} <= verbs, kind


def test_a_group_on_several_nodes_gets_a_shareable_cache_claim():
    two = by_kind(desired(body(TWO_NODES)).objects)["PersistentVolumeClaim"][0]
    one = by_kind(desired(body(EXAMPLES / "qwen25-14b-1m-h100x8.yaml")).objects)["PersistentVolumeClaim"][0]
    assert two["spec"]["accessModes"] == ["ReadWriteMany"] and one["spec"]["accessModes"] == ["ReadWriteOnce"]
    kubernetes_validate.validate(two, "1.34.0", strict=True)
    meta = dict(two["metadata"])
    labels = dict(meta["labels"])
    assert labels.pop(HASH_LABEL) == content_hash(two | {"metadata": meta | {"labels": labels}})


def test_the_replicas_alert_watches_the_groups_leaders():
    rule = by_kind(desired(body(TWO_NODES)).objects)["PrometheusRule"][0]
    alerts = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}
    sts = 'namespace="models",statefulset="qwen25-14b-1m-2n-group"'
    assert alerts["LongServeReplicasNotReady"]["expr"] == \
        f"kube_statefulset_status_replicas_ready{{{sts}}} < kube_statefulset_replicas{{{sts}}}"
    single = by_kind(desired(body(EXAMPLES / "qwen25-14b-1m-h100x8.yaml")).objects)["PrometheusRule"][0]
    assert "kube_deployment" in next(r["expr"] for g in single["spec"]["groups"] for r in g["rules"]
                                     if r["alert"] == "LongServeReplicasNotReady")


def test_rendered_pods_resolve_to_the_planned_topology_in_the_engine():
    """The seam, end to end on paper: each rendered pod's environment, plus the variables the
    LeaderWorkerSet injects (its own code: `<lws>-<group>.<subdomain>.<ns>`, the size annotation,
    the worker-index label), gives the engine the plan's ranks, leader and timeouts."""
    from longserve.server.parallel.topology import resolve
    d = desired(body(TWO_NODES))
    lws = by_kind(d.objects)["LeaderWorkerSet"][0]
    cfg = yaml.safe_load(by_kind(d.objects)["ConfigMap"][0]["data"]["engine_config.json"])
    group = lws["spec"]["leaderWorkerTemplate"]
    name = lws["metadata"]["name"]
    budget = startup_probe_seconds(d.model.weight_bytes)
    for index, role in enumerate(("leaderTemplate", "workerTemplate")):
        env = env_of(engine(group[role]["spec"]))
        env.update(LWS_LEADER_ADDRESS=f"{name}-0.{name}.models", LWS_GROUP_SIZE=str(group["size"]),
                   LWS_WORKER_INDEX=str(index))
        topo = resolve(cfg["tensor_parallel_size"], env=env)
        assert (topo.tp, topo.nnodes, topo.node_rank, topo.gpus_per_node) == (8, 2, index, d.plan.gpus_per_pod)
        assert (topo.master_addr, topo.master_port) == (f"{name}-0.{name}.models", 29500)
        assert topo.init_timeout_s == budget and topo.is_leader == (index == 0)
    # one pod with TP 8: a local rendezvous, the same start-up budget
    single = desired(body(EXAMPLES / "qwen25-14b-1m-h100x8.yaml"))
    pod_env = env_of(engine(by_kind(single.objects)["Deployment"][0]["spec"]["template"]["spec"]))
    topo = resolve(8, env=pod_env)
    assert (topo.nnodes, topo.gpus_per_node, topo.master_addr) == (1, 8, "127.0.0.1")
    assert topo.init_timeout_s == startup_probe_seconds(single.model.weight_bytes)
