"""`longserve plan`: the VRAM sizing plan, offline (no cluster, no torch)."""
from __future__ import annotations

import json
import sys

from longserve.operator.sizing_rules import OBJECTIVES
from longserve.server.config import RUNTIMES

HELP = "size tensor parallelism and prefill chunk for a model on a GPU (offline)"


def add_arguments(p) -> None:
    p.add_argument("--model", required=True,
                   help="Qwen/Qwen2.5-7B-Instruct-1M, Qwen/Qwen2.5-14B-Instruct-1M, or a config.json / checkpoint dir")
    p.add_argument("--gpu", help="catalog GPU such as H200-141GB, A100-80GB, H100-80GB, L4-24GB "
                                 "(or an nvidia.com/gpu.product value)")
    p.add_argument("--memory-per-gpu-gib", type=float, help="usable memory per GPU; overrides the catalog")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--nodes", type=int, default=1,
                   help="nodes one replica may span; TP crosses nodes only when no TP within a node fits")
    p.add_argument("--max-model-len", type=int, help="default: the model's maximum")
    p.add_argument("--max-num-seqs", type=int, default=1)
    p.add_argument("--objective", default="MinGPUs", choices=OBJECTIVES)
    p.add_argument("--runtime", default="native", choices=RUNTIMES)
    p.add_argument("--tensor-parallel-size", type=int, help="validate this TP instead of choosing one")
    p.add_argument("--chunk", type=int, help="validate this prefill chunk instead of choosing one")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.90)
    p.add_argument("--safety-margin-percent", type=float, default=10.0)
    p.add_argument("-o", "--output", default="table", choices=["table", "json", "yaml"])


def _table(d: dict) -> str:
    gb = lambda b: f"{b / 1e9:.1f} GB"  # noqa: E731
    rows = [("feasible", d["feasible"]), ("model", d["model"]), ("gpu", d["gpu"]), ("runtime", d["runtime"]),
            ("tensor parallel size", d["tensorParallelSize"]),
            ("layout", f"{d['podsPerReplica']} pod(s) per replica x {d['gpusPerPod']} GPU(s) per pod"
             if d["feasible"] else f"up to {d['nodes']} node(s)"),
            ("prefill chunk tokens", d["prefillChunkTokens"]),
            ("max model len", f"{d['maxModelLen']:,}"), ("max num seqs", d["maxNumSeqs"]),
            ("KV capacity tokens", f"{d['kvCapacityTokens']:,}"),
            ("gpu memory utilization", d["gpuMemoryUtilization"]),
            ("KV bytes per token", f"{d['kvBytesPerToken']:,}"), ("weights", gb(d["weightBytes"]))]
    for key, value in d["perGpuBytes"].items():
        rows.append((f"per GPU {key}", gb(value)))
    if d["feasible"]:
        rows.append(("total over GPUs", gb(d["totalBytes"])))
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    lines += ["", d["explanation"]]
    if d["alternatives"]:
        lines += ["", "alternatives:"]
        for a in d["alternatives"]:
            fits = "fits" if a["fitsRequestedLength"] else "does not fit"
            lines.append(f"  TP {a['tensorParallelSize']}: {fits} the requested length; "
                         f"longest that fits {a['maxModelLen']:,} tokens"
                         + ("" if a["withinNodes"] else f" (needs {a['nodesNeeded']} nodes)"))
    return "\n".join(lines)


def run(args) -> int:
    from longserve.operator.catalog import GiB, lookup_gpu
    from longserve.operator.models import resolve_model
    from longserve.operator.planner import SizingRequest, plan

    try:
        model = resolve_model(args.model)
        if args.gpu is None and args.memory_per_gpu_gib is None:
            raise ValueError("name a --gpu (or give --memory-per-gpu-gib)")
        gpu = lookup_gpu(args.gpu) if args.gpu else None
    except ValueError as exc:
        print(f"longserve plan: {exc}", file=sys.stderr)
        return 2
    manual = args.tensor_parallel_size is not None or args.chunk is not None
    request = SizingRequest(
        max_model_len=args.max_model_len or model.facts.max_position_embeddings,
        max_num_seqs=args.max_num_seqs, objective=args.objective,
        mode="Manual" if args.tensor_parallel_size is not None else "Auto",
        tensor_parallel_size=args.tensor_parallel_size,
        prefill_chunk_tokens=args.chunk if manual else None,
        gpu_memory_utilization=args.gpu_memory_utilization,
        safety_margin_percent=args.safety_margin_percent, gpus_per_node=args.gpus_per_node,
        nodes=args.nodes, runtime=args.runtime,
        memory_per_gpu_bytes=int(args.memory_per_gpu_gib * GiB) if args.memory_per_gpu_gib else None)
    if args.chunk is not None and args.tensor_parallel_size is None:
        print("longserve plan: --chunk needs --tensor-parallel-size (manual sizing)", file=sys.stderr)
        return 2
    result = plan(model, gpu, request)
    data = result.to_dict()
    if args.output == "json":
        print(json.dumps(data, indent=2, sort_keys=True))
    elif args.output == "yaml":
        try:
            import yaml
        except ImportError:
            print("longserve plan: -o yaml needs PyYAML (pip install 'longserve[operator]'); "
                  "use -o json", file=sys.stderr)
            return 2
        print(yaml.safe_dump(data, sort_keys=True), end="")
    else:
        print(_table(data))
    if not result.feasible:
        first_sentence = result.explanation.split(". Alternatives")[0]
        print(f"longserve plan: {result.reason}: {first_sentence}", file=sys.stderr)
        return 1
    return 0
