"""`longserve operator`: run the kopf operator that reconciles LongContextModel resources.

Highly available by kopf peering: every replica keeps alive an entry in a peering object
(ClusterKopfPeering cluster-wide, KopfPeering per watched namespace) and replicas with a lower
priority pause. The priority is the negated start time in milliseconds, so the oldest live replica
leads and a new one (a rollout's surge pod, a restarted one) stands by instead of taking over; when
the leader exits it removes its entry and the next oldest resumes at once, and when it dies its
entry expires after `--peering-lifetime` seconds. `--standalone` runs without peering (one replica
only). `--namespace` matches a Role, `--all-namespaces` a ClusterRole. Only standard-library imports
at module level (server/cli.py).
"""
from __future__ import annotations

import os
import socket
import sys
import time

HELP = "run the Kubernetes operator for LongContextModel resources"


def add_arguments(p) -> None:
    scope = p.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", action="append", default=[],
                       help="watch this namespace (repeatable; needs a Role there)")
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="watch every namespace (ClusterRole)")
    p.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster service account, then ~/.kube/config)")
    p.add_argument("--engine-image", default=os.environ.get("LONGSERVE_ENGINE_IMAGE"),
                   help="image for runtime native (default: $LONGSERVE_ENGINE_IMAGE or the release image)")
    p.add_argument("--liveness-port", type=int, default=8080, help="serve /healthz on this port (0: off)")
    p.add_argument("--metrics-port", type=int, default=9090, help="serve Prometheus /metrics on this port (0: off)")
    p.add_argument("--timer-interval", type=float, default=30.0,
                   help="seconds between drift repairs and status refreshes per resource")
    p.add_argument("--peering", default=os.environ.get("LONGSERVE_PEERING", "longserve"),
                   help="name of the kopf peering object shared by the replicas (default: longserve)")
    p.add_argument("--peering-lifetime", type=int, default=30,
                   help="seconds after which a silent replica counts as dead and a standby takes over")
    p.add_argument("--standalone", action="store_true",
                   help="no peering (a single replica; two standalone replicas would both reconcile)")
    p.add_argument("--log-format", choices=["plain", "full", "json"], default="full")
    p.add_argument("-v", "--verbose", action="store_true")


def run(args) -> int:
    import kopf
    import kubernetes
    from prometheus_client import start_http_server

    from longserve.operator import handlers, k8s_apply
    from longserve.operator.render import DEFAULT_IMAGE

    if not args.namespace and not args.all_namespaces:
        print("longserve operator: choose --namespace NAME (Role) or --all-namespaces (ClusterRole)", file=sys.stderr)
        return 2
    if args.timer_interval <= 0:
        print("longserve operator: --timer-interval must be positive", file=sys.stderr)
        return 2
    if args.peering_lifetime < 2:
        print("longserve operator: --peering-lifetime must be at least 2 seconds", file=sys.stderr)
        return 2
    try:
        configuration = k8s_apply.load_configuration(args.kubeconfig)
    except (kubernetes.config.ConfigException, OSError) as exc:
        print(f"longserve operator: no cluster credentials: {exc}", file=sys.stderr)
        return 2
    kopf.configure(verbose=args.verbose, log_format=kopf.LogFormat[args.log_format.upper()])
    if args.metrics_port:
        start_http_server(args.metrics_port)
    api = k8s_apply.Api(configuration)
    # who wrote what, in the API server's request logs and managedFields timestamps
    api.client.user_agent = f"longserve-operator ({socket.gethostname()}, pid {os.getpid()})"
    liveness = f"http://0.0.0.0:{args.liveness_port}/healthz" if args.liveness_port else None
    memo = handlers.make_memo(api, image=args.engine_image or DEFAULT_IMAGE)
    if not args.standalone:
        problem = ensure_peering(api, args.peering, None if args.all_namespaces else args.namespace)
        if problem:
            print(f"longserve operator: {problem}", file=sys.stderr)
            return 2
        memo.peering_lifetime = args.peering_lifetime
    kopf.run(registry=handlers.build_registry(args.timer_interval), standalone=args.standalone,
             peering_name=None if args.standalone else args.peering, priority=seniority_priority(),
             clusterwide=args.all_namespaces, namespaces=args.namespace, liveness_endpoint=liveness, memo=memo)
    return 0


def ensure_peering(api, name: str, namespaces: list[str] | None) -> str | None:
    """Create the peering object(s) if missing (the chart creates them too); an error message when
    the kopf.dev peering CRDs are not installed. kopf waits forever for a missing peering object."""
    targets = [("/apis/kopf.dev/v1/clusterkopfpeerings", "ClusterKopfPeering", None)] if namespaces is None else \
        [(f"/apis/kopf.dev/v1/namespaces/{ns}/kopfpeerings", "KopfPeering", ns) for ns in namespaces]
    for path, kind, namespace in targets:
        meta = {"name": name, **({"namespace": namespace} if namespace else {})}
        code, data = api.request("POST", path, {"apiVersion": "kopf.dev/v1", "kind": kind, "metadata": meta})
        if code == 404:
            return (f"the {kind} kind (kopf.dev/v1) is not installed: apply the chart's CRDs "
                    "(charts/longserve/crds) or run one replica with --standalone")
        if code not in (200, 201, 409):
            return f"cannot create {kind} {name}: HTTP {code}: {(data or {}).get('message', '')}"
    return None


def seniority_priority(now: float | None = None) -> int:
    """Peering priority that makes the oldest replica the leader: minus the start time in ms."""
    return -int((time.time() if now is None else now) * 1000)
