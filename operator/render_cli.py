"""`longserve render -f resource.yaml [-o yaml|json]`: the objects the operator would create, offline.

The same parse -> size -> render path as the operator. Owner references need the resource's uid,
so they appear only when the file has `metadata.uid` (e.g. `kubectl get lcm NAME -o yaml`).
"""
from __future__ import annotations

import json
import os
import sys

HELP = "print the Kubernetes objects the operator would create for a LongContextModel (offline)"


def add_arguments(p) -> None:
    p.add_argument("-f", "--filename", required=True, help="LongContextModel YAML or JSON file ('-' for stdin)")
    p.add_argument("-o", "--output", choices=["yaml", "json"], default="yaml")
    p.add_argument("--image", default=os.environ.get("LONGSERVE_ENGINE_IMAGE"),
                   help="engine image for runtime native (default: $LONGSERVE_ENGINE_IMAGE or the release image)")
    p.add_argument("--model-cached", action="store_true",
                   help="render as after the download Job finished (no Job)")
    p.add_argument("--no-monitoring", action="store_true",
                   help="render as in a cluster without the Prometheus Operator CRDs")
    p.add_argument("--plan", action="store_true", help="also print the plan (status.plan) as a leading comment")


def load_documents(text: str) -> list[dict]:
    import yaml
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise ValueError(f"not valid YAML: {exc}") from None
    resources = [d for d in docs if isinstance(d, dict) and d.get("kind") == "LongContextModel"]
    if not resources:
        raise ValueError("no LongContextModel in the input")
    return resources


def render_documents(resources: list[dict], *, image: str | None, model_cached: bool = False,
                     monitoring: bool = True) -> tuple[list[dict], list]:
    from longserve.operator.render import DEFAULT_IMAGE, desired
    objects, outcomes = [], []
    for body in resources:
        d = desired(body, image=image or DEFAULT_IMAGE, model_cached=model_cached, monitoring=monitoring)
        objects += d.objects
        outcomes.append(d)
    return objects, outcomes


def dump_yaml(objects: list[dict]) -> str:
    """Multi-document YAML, sorted keys; multi-line strings (scripts, JSON) as literal blocks."""
    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    def text(dumper, value):
        style = "|" if "\n" in value else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    Dumper.add_representer(str, text)
    return "".join("---\n" + yaml.dump(o, Dumper=Dumper, sort_keys=True, width=120) for o in objects)


def run(args) -> int:
    from longserve.operator.status import public_plan
    from longserve.operator.types import SpecError

    try:
        if args.filename == "-":
            text = sys.stdin.read()
        else:
            with open(args.filename, encoding="utf-8") as fh:
                text = fh.read()
        resources = load_documents(text)
        objects, outcomes = render_documents(resources, image=args.image, model_cached=args.model_cached,
                                             monitoring=not args.no_monitoring)
    except SpecError as exc:
        print(f"longserve render: invalid spec ({exc.reason}): {exc.message}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:
        print(f"longserve render: {exc}", file=sys.stderr)
        return 2
    if args.plan:
        for d in outcomes:
            plan_text = json.dumps(public_plan(d), indent=2, sort_keys=True)
            print("\n".join(f"# {line}" for line in plan_text.splitlines()))
    if args.output == "json":
        print(json.dumps({"apiVersion": "v1", "kind": "List", "items": objects}, indent=2, sort_keys=True))
    else:
        print(dump_yaml(objects), end="")
    rc = 0
    for d in outcomes:
        if not d.plan.feasible:
            print(f"longserve render: {d.resource.name}: infeasible, nothing to deploy: {d.plan.explanation}",
                  file=sys.stderr)
            rc = 1
        elif d.resource.mode == "DryRun":
            print(f"longserve render: {d.resource.name}: DryRun, nothing to deploy", file=sys.stderr)
    return rc
