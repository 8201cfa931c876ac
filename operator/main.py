"""`longserve operator`: run the kopf operator that reconciles LongContextModel resources.

One replica (kopf peering has priorities, not leader election). `--namespace` matches a Role,
`--all-namespaces` a ClusterRole. Only standard-library imports at module level (server/cli.py).
"""
from __future__ import annotations

import os
import sys

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
    try:
        configuration = k8s_apply.load_configuration(args.kubeconfig)
    except (kubernetes.config.ConfigException, OSError) as exc:
        print(f"longserve operator: no cluster credentials: {exc}", file=sys.stderr)
        return 2
    kopf.configure(verbose=args.verbose, log_format=kopf.LogFormat[args.log_format.upper()])
    if args.metrics_port:
        start_http_server(args.metrics_port)
    api = k8s_apply.Api(configuration)
    liveness = f"http://0.0.0.0:{args.liveness_port}/healthz" if args.liveness_port else None
    kopf.run(registry=handlers.build_registry(args.timer_interval), standalone=True,
             clusterwide=args.all_namespaces, namespaces=args.namespace, liveness_endpoint=liveness,
             memo=handlers.make_memo(api, image=args.engine_image or DEFAULT_IMAGE))
    return 0
