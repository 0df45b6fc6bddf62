"""Compile ember's Triton kernels for a Hopper GPU (sm_90) without one: Triton's own front end, LLVM and the
ptxas it ships turn each variant into machine code, so what the interpreter accepts but the GPU compiler
rejects (loop-carried types, scalar branches, dot shapes) fails here. Run as a script (the kernels must be
imported without TRITON_INTERPRET); prints one line per variant and exits 1 on a failure."""

from __future__ import annotations

import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from ember.kernels.triton.attention import _attention_kernel, _merge_kernel  # noqa: E402
from ember.kernels.triton.rope_store import _rope_store_kernel  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)


def compile_one(fn, types: dict[str, str], consts: dict, warps: int = 4) -> None:
    sig = {n: "constexpr" if n in consts else types[n] for n in fn.arg_names}
    aligned = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if sig[n].startswith("*")}
    triton.compile(ASTSource(fn, sig, constexprs=consts, attrs=aligned), target=HOPPER, options={"num_warps": warps})


def variants():
    for dt in ("bf16", "fp16", "fp32"):
        att = dict(q_ptr=f"*{dt}", k_ptr=f"*{dt}", v_ptr=f"*{dt}", o_ptr=f"*{dt}", po_ptr="*fp32", pm_ptr="*fp32",
                   pl_ptr="*fp32", tables_ptr="*i32", cu_q_ptr="*i32", ctx_lens_ptr="*i32", alibi_ptr="*fp32",
                   scale="fp32", softcap="fp32", window="i32", num_seqs="i32", stride_qt="i32", stride_qh="i32",
                   stride_ot="i32", stride_oh="i32", stride_kh="i64", stride_tab="i32", num_heads="i32")
        base = dict(HPK=4, DH=128, DH_P=128, BLOCK_Q=4, BLOCK_M=16, BLOCK_SIZE=16, TILE_N=32, SEGMENTS=1,
                    SOFTCAP=False, WINDOW=False, ALIBI=False, PREC="ieee" if dt == "fp32" else None)
        cases = {"decode": {}, "split16": {"SEGMENTS": 16}, "prefill64": {"BLOCK_Q": 16, "BLOCK_M": 64},
                 "window-softcap-256": {"DH": 256, "DH_P": 256, "WINDOW": True, "SOFTCAP": True},
                 "mha-alibi-80": {"HPK": 1, "DH": 80, "DH_P": 128, "BLOCK_Q": 16, "ALIBI": True}}
        for name, c in cases.items():
            yield f"attention {dt} {name}", _attention_kernel, att, {**base, **c}, 4
        yield f"attention {dt} graph (int64 lengths)", _attention_kernel, {**att, "ctx_lens_ptr": "*i64"}, base, 4
        yield (f"merge {dt}", _merge_kernel, dict(o_ptr=f"*{dt}", po_ptr="*fp32", pm_ptr="*fp32", pl_ptr="*fp32",
               stride_ot="i32", stride_oh="i32", num_heads="i32"), dict(DH=128, DH_P=128, SEGMENTS=16), 4)
        rope = dict(qkv_ptr=f"*{dt}", cos_ptr="*fp32", sin_ptr="*fp32", qn_ptr="*fp32", kn_ptr="*fp32",
                    kc_ptr=f"*{dt}", vc_ptr=f"*{dt}", slots_ptr="*i64", eps="fp32", stride_t="i32", stride_cs="i32",
                    stride_kh="i64")
        rb = dict(NQ=32, NKV=8, DH=128, HALF=64, HALF_P=64, REST_P=1, DH_P=128, NORM=False, ROPE=True)
        yield f"rope {dt}", _rope_store_kernel, rope, rb, 1
        yield f"rope {dt} qk-norm partial", _rope_store_kernel, rope, {**rb, "DH": 96, "HALF": 16, "HALF_P": 16,
                                                                      "REST_P": 64, "NORM": True}, 1
        yield f"rope {dt} none (alibi)", _rope_store_kernel, rope, {**rb, "HALF": 0, "HALF_P": 1, "REST_P": 128,
                                                                    "ROPE": False}, 1


def main() -> int:
    failed = 0
    for label, fn, types, consts, warps in variants():
        try:
            compile_one(fn, types, consts, warps)
            print(f"ok {label}", flush=True)
        except Exception as e:  # noqa: BLE001 - reported, the rest still compile
            failed += 1
            print(f"FAILED {label}: {type(e).__name__}: {str(e)[:2000]}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
