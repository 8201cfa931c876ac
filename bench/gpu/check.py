"""The one prepared GPU check for LongServe's Triton kernels (docs/testing.md#gpu-check); see bench/gpu/kernels.sh.

Sections, each time-boxed, with the JSON report rewritten to ``--out``/report.json (and a line appended to
report.jsonl) after every section so a timeout still leaves data:
  1. env: GPU name, memory, capability, library versions;
  2. correctness: every Triton kernel vs its reference twin (2x rule), bf16 at 8K-128K, fp16 and fp32 smaller;
  3. timing: dense Triton vs SDPA flash and sparse vs dense at 32K, 128K, 512K (Qwen2.5-7B heads), TFLOP/s,
     paged DCA decode at 1M keys, and the ratio table (also written to ``--out``/table.md).
``--smoke`` runs every code path at tiny sizes on CPU under ``TRITON_INTERPRET=1`` (used by the test suite).
Run from the repository root: ``PYTHONSAFEPATH=1 python bench/gpu/check.py --out DIR``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

SECTION_BUDGETS_S = {"env": 20, "correctness": 170, "timing": 230}


class Report:
    """Accumulates section results and persists them after each section."""

    def __init__(self, out_dir: Path, argv: list[str]):
        self.out_dir = out_dir
        self.data = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "argv": argv, "sections": {}}
        out_dir.mkdir(parents=True, exist_ok=True)

    def save(self, name: str, section: dict) -> None:
        self.data["sections"][name] = section
        (self.out_dir / "report.json").write_text(json.dumps(self.data, indent=1, default=str))
        with open(self.out_dir / "report.jsonl", "a") as fh:
            fh.write(json.dumps({"section": name, **section}, default=str) + "\n")


def section_env(device, args) -> dict:
    import torch
    import triton

    env = {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
           "interpret": os.environ.get("TRITON_INTERPRET") == "1", "device": str(device), "smoke": args.smoke}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        free, total = torch.cuda.mem_get_info(device)
        env.update(gpu=props.name, capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                   total_gib=round(total / 2**30, 2), free_gib=round(free / 2**30, 2), cuda=torch.version.cuda)
    try:
        import transformers
        env["transformers"] = transformers.__version__
    except ImportError:
        env["transformers"] = None
    return {"ok": True, **env}


def _release_memory() -> None:
    """Return cached blocks between checks so one large (or failed, e.g. OOM) check does not starve the next."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_checks(checks, deadline: float, log) -> dict:
    """Run (label, thunk) pairs until the deadline; each failure is recorded and the rest still run."""
    results, n_ok = [], 0
    for label, thunk in checks:
        if time.monotonic() > deadline:
            results.append({"check": label, "skipped": "section time budget spent"})
            continue
        t0 = time.monotonic()
        try:
            rec = thunk()
        except Exception as exc:  # one broken check must not hide the others
            rec = {"check": label, "ok": False, "error": f"{type(exc).__name__}: {exc}"[:1000],
                   "trace": traceback.format_exc()[-1500:]}
        rec["label"] = label
        rec["seconds"] = round(time.monotonic() - t0, 2)
        _release_memory()
        n_ok += bool(rec.get("ok"))
        log(f"  {label}: {'ok' if rec.get('ok') else 'FAIL'} ({rec['seconds']} s)")
        results.append(rec)
    ran = [r for r in results if "skipped" not in r]
    return {"ok": bool(ran) and n_ok == len(ran), "passed": n_ok, "ran": len(ran),
            "skipped": len(results) - len(ran), "checks": results}


def section_correctness(device, args, deadline, log) -> dict:
    import torch

    from longserve.bench.gpu import correctness

    sizes = correctness.SMOKE if args.smoke else correctness.FULL
    dtypes = [torch.float16] if args.smoke else [torch.bfloat16, torch.float16, torch.float32]
    return run_checks(correctness.plan(sizes, device, dtypes), deadline, log)


def section_timing(device, args, deadline, log) -> dict:
    import torch

    from longserve.bench.gpu import timing

    if args.smoke:
        shape, lengths, dtype, tune_n, decode_len = (4, 2, 32), (64, 96), torch.float16, 64, 300
        chunk, local, budget, vs_budgets = (96, 32, 0.05, (12, 20))
    else:
        shape, lengths, dtype, tune_n, decode_len = (28, 4, 128), (32768, 131072, 524288), torch.bfloat16, \
            32768, 1_000_000
        chunk, local, budget, vs_budgets = (262144, 8192, 1.5, (1000, 6096))
    out = {"ok": True, "records": [], "errors": []}

    def attempt(label, fn):
        if time.monotonic() > deadline:
            out["errors"].append({"step": label, "skipped": "section time budget spent"})
            return None
        t0 = time.monotonic()
        try:
            res = fn()
            log(f"  {label}: done ({time.monotonic() - t0:.1f} s)")
            return res
        except Exception as exc:  # keep the other lengths
            _release_memory()
            out["ok"] = False
            out["errors"].append({"step": label, "error": f"{type(exc).__name__}: {exc}"[:1000],
                                  "trace": traceback.format_exc()[-1500:]})
            log(f"  {label}: FAIL {exc}")
            return None

    tuned = attempt(f"tune dense at {tune_n}", lambda: timing.tune_dense(tune_n, shape, dtype, device, budget))
    out["tuning"] = tuned
    cfg = (tuned or {}).get("best")
    for n in lengths:
        rec = attempt(f"length {n}", lambda n=n: timing.time_length(n, shape, dtype, device, cfg, budget_s=budget,
                                                                         budgets=vs_budgets))
        if rec:
            out["records"].append(rec)
    out["decode"] = attempt(f"paged DCA decode {decode_len}", lambda: timing.time_decode(
        decode_len, shape, dtype, device, chunk_size=chunk, local_size=local, budget_s=budget))
    out["table"] = timing.ratio_table(out["records"])
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="LongServe GPU kernel check (one prepared script)")
    parser.add_argument("--out", required=True, help="folder for report.json, report.jsonl and table.md")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on CPU under TRITON_INTERPRET=1")
    parser.add_argument("--sections", default="env,correctness,timing")
    parser.add_argument("--budget-scale", type=float, default=1.0, help="multiply every section's time budget")
    args = parser.parse_args(argv)
    sections = [s for s in args.sections.split(",") if s]
    unknown = set(sections) - set(SECTION_BUDGETS_S)
    if unknown:
        parser.error(f"unknown sections: {sorted(unknown)}")
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    if args.smoke:
        device = torch.device("cpu")
        if os.environ.get("TRITON_INTERPRET") != "1":
            print("--smoke needs TRITON_INTERPRET=1 set before Triton is imported", file=sys.stderr)
            return 2
    elif not torch.cuda.is_available():
        print("no CUDA device: run with --smoke on CPU", file=sys.stderr)
        return 2
    else:
        device = torch.device("cuda")
    report = Report(Path(args.out), sys.argv if argv is None else argv)

    def log(msg):
        print(msg, flush=True)

    all_ok = True
    for name in sections:
        log(f"[{name}]")
        deadline = time.monotonic() + SECTION_BUDGETS_S[name] * args.budget_scale
        t0 = time.monotonic()
        try:
            if name == "env":
                result = section_env(device, args)
            elif name == "correctness":
                result = section_correctness(device, args, deadline, log)
            else:
                result = section_timing(device, args, deadline, log)
        except Exception as exc:  # record the failure and continue with the next section
            result = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-2000:]}
        result["seconds"] = round(time.monotonic() - t0, 1)
        report.save(name, result)
        all_ok = all_ok and bool(result.get("ok"))
        if name == "timing" and result.get("table"):
            (Path(args.out) / "table.md").write_text(result["table"] + "\n")
            log(result["table"])
        log(f"[{name}] {'ok' if result.get('ok') else 'FAILED'} in {result['seconds']} s")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
