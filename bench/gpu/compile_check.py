"""Compile every LongServe Triton kernel for a GPU target without a GPU (Triton -> PTX -> cubin via ptxas).

The interpreter cannot catch GPU-only failures (``tl.dot`` shapes, type mismatches across loop-carried
values, register or shared-memory limits at compile time); this does, on any machine with the Triton wheel.
Run it as ``PYTHONSAFEPATH=1 python bench/gpu/compile_check.py`` with ``TRITON_INTERPRET`` unset; it prints one
JSON line per kernel variant and exits non-zero if any variant fails.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)   # the jit decorator must build real JITFunctions


def _signature(fn, pointers: dict, constexprs: dict) -> tuple[dict, dict]:
    """Type every argument: named pointers, constexprs as given, floats for *scale, ints otherwise."""
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = "*" + pointers[name]
        elif name.endswith("scale"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig, constexprs


def _variants(dtype: str):
    """(label, kernel, pointer types, constexprs, num_warps, num_stages) for Qwen shapes (D = 128)."""
    from longserve.kernels import merge, paged_attention, sparse_index, vertical_slash

    vs = vertical_slash._vs_attn_fwd_kernel
    vs_ptrs = {"Q": dtype, "K": dtype, "V": dtype, "Out": dtype, "LSE": "fp32", "BLOCK_COUNT": "i32",
               "BLOCK_OFFSET": "i32", "COLUMN_COUNT": "i32", "COLUMN_INDEX": "i32", "BLOCK_TABLE": "i32",
               "PAIRS": "i32"}
    ieee = dtype == "fp32"
    out = []
    for causal in (True, False):
        for dense, bm, warps, stages in ((False, 64, 4, 2), (True, 128, 8, 3), (True, 64, 4, 3)):
            for paged, count in ((False, False), (True, not dense)):      # engine: paged, sparse counted
                cx = {"HEAD_DIM": 128, "BLOCK_D": 128, "BLOCK_M": bm, "BLOCK_N": 64, "CAUSAL": causal,
                      "DENSE": dense, "IEEE": ieee, "PAGED": paged, "PAGE": 16, "COUNT": count}
                label = f"vs_attn dense={dense} causal={causal} bm={bm} paged={paged} count={count} {dtype}"
                out.append((label, vs, vs_ptrs, cx, warps, stages))
    pg = paged_attention._paged_decode_kernel
    pg_ptrs = {"Q": dtype, "K_CACHE": dtype, "V_CACHE": dtype, "BLOCK_TABLES": "i32", "KEY_START": "i32",
               "KEY_END": "i32", "QK_SCALE": "fp32", "O_PART": "fp32", "LSE_PART": "fp32"}
    for block_h in (16,):
        cx = {"HEAD_DIM": 128, "BLOCK_D": 128, "BLOCK_H": block_h, "BLOCK_N": 64, "PAGE": 16, "IEEE": ieee}
        out.append((f"paged_decode group<=16 {dtype}", pg, pg_ptrs, cx, 4, 2))
    mg = merge._lse_merge_kernel
    out.append((f"lse_merge {dtype}", mg, {"O_PARTS": dtype, "LSE_PARTS": "fp32", "O_OUT": "fp32",
                                             "LSE_OUT": "fp32"},
                {"HEAD_DIM": 128, "BLOCK_D": 128, "BLOCK_R": 16}, 4, 2))
    ix = sparse_index._vs_index_kernel
    ix_ptrs = {n: "i32" for n in ("VERT", "VCOUNT", "SLASH", "SCOUNT", "BLOCK_COUNT", "BLOCK_OFFSET",
                                  "COLUMN_COUNT", "COLUMN_INDEX")}
    for causal in (True, False):
        out.append((f"vs_index causal={causal}", ix, ix_ptrs,
                    {"CAUSAL": causal, "BLOCK_M": 64, "BLOCK_N": 64}, 1, 1))
    return out


def compile_all(dtypes=("bf16", "fp16", "fp32"), arch: int = 90, only: str = "") -> list[dict]:
    """Compile each variant to cubin for ``sm_<arch>`` (labels containing ``only``); one result dict each."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", arch, 32)
    results, seen = [], set()
    for dtype in dtypes:
        for label, fn, ptrs, cx, warps, stages in _variants(dtype):
            if label in seen or only not in label:
                continue
            seen.add(label)
            t0 = time.perf_counter()
            sig, consts = _signature(fn, ptrs, cx)
            try:
                compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=target,
                                          options={"num_warps": warps, "num_stages": stages})
                meta = compiled.metadata
                results.append({"kernel": label, "ok": True, "shared_bytes": int(getattr(meta, "shared", 0)),
                                "seconds": round(time.perf_counter() - t0, 2)})
            except Exception as exc:  # report every failure, keep compiling the rest
                results.append({"kernel": label, "ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000],
                                "seconds": round(time.perf_counter() - t0, 2)})
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (90 = Hopper)")
    parser.add_argument("--dtypes", default="bf16,fp16,fp32")
    parser.add_argument("--only", default="", help="compile only variants whose label contains this text")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("compile_check needs TRITON_INTERPRET unset", file=sys.stderr)
        return 2
    results = compile_all(tuple(args.dtypes.split(",")), args.arch, args.only)
    for r in results:
        print(json.dumps(r))
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
