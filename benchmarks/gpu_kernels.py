"""gpu_check.py's kernel phases: correctness in bf16 against torch references (what the CPU interpreter
cannot check), decode attention bandwidth, int4 vs bf16 matmul, and the card's copy bandwidth."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F


def timed(fn: Callable[[], object], device: torch.device, iters: int = 20, warmup: int = 3) -> float:
    """Median seconds per call: CUDA events on a GPU, wall clock on the CPU (smoke runs: one call)."""
    if device.type != "cuda":
        iters, warmup = 1, 0
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def copy_bandwidth(device: torch.device, gib: float = 2.0) -> float:
    """Device-to-device copy, GB/s counting bytes read and written."""
    n = int(gib * (1 << 30)) // 4
    a = torch.empty(n, dtype=torch.float32, device=device)
    b = torch.empty_like(a)
    t = timed(lambda: b.copy_(a), device, iters=10)
    return 2 * a.numel() * 4 / t / 1e9


def check_kernels(device: torch.device, dtype: torch.dtype) -> dict:
    """The Triton attention and rope/store kernels in `dtype` against fp32 torch references."""
    from ember.kernels.ops import rope_store as torch_rope_store
    from ember.kernels.triton.attention import attention
    from ember.kernels.triton.rope_store import rope_store
    from ember.layers.rotary import rope_cos_sin, rope_inv_freq
    from tests.gpu.paged_ref import BS, paged_batch, reference_attention

    out: dict = {}
    cases = {  # name: (q lens, ctx lens, H, Hkv, Dh, window, softcap, segments)
        "mixed-gqa-128": ([7, 200, 1, 1, 1], [7, 245, 33, 1, 700], 32, 8, 128, None, None, 1),
        "decode-split-128": ([1] * 8, [3000, 17, 1024, 4096, 1, 64, 2000, 515], 32, 8, 128, None, None, 16),
        "gemma-window-softcap-256": ([40, 1, 1], [40, 600, 1200], 4, 1, 256, 512, 50.0, 1),
        "qwen-mha-64": ([33, 1], [33, 99], 16, 16, 64, None, None, 1),
    }
    for name, (ql, cl, h, hkv, dh, win, cap, seg) in cases.items():
        q, kc, vc, tables, cu, lens = paged_batch(ql, cl, h, hkv, dh, dtype, device)
        got = attention(q, kc, vc, tables, cu, lens, BS, dh**-0.5, window=win, softcap=cap, segments=seg,
                        max_q_len=max(ql))
        want = reference_attention(q.cpu(), kc.cpu(), vc.cpu(), tables.cpu(), ql, cl, dh**-0.5, win, cap, None)
        err = (got.float().cpu() - want).abs().max().item()
        out[name] = {"max_abs_err": err, "ok": err < 3e-2}
    # rope + q/k norm + store, against ember's plain torch path in fp32
    t, nq, nkv, dh = 9, 8, 2, 128
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(t, nq + 2 * nkv, dh, generator=g)
    cos, sin = rope_cos_sin(torch.arange(t) * 37, rope_inv_freq(dh, 1e6, None), torch.float32)
    w = torch.rand(dh, generator=g) + 0.5
    slots = torch.randperm(64, generator=g)[:t]
    ref = [qkv.clone(), torch.zeros(nkv, 64, dh), torch.zeros(nkv, 64, dh)]
    torch_rope_store(ref[0], nq, nkv, cos, sin, ref[1], ref[2], slots, w, w, 1e-6)
    mine = [qkv.to(device, dtype), torch.zeros(nkv, 64, dh, dtype=dtype, device=device),
            torch.zeros(nkv, 64, dh, dtype=dtype, device=device)]
    rope_store(mine[0], nq, nkv, cos.to(device), sin.to(device), mine[1], mine[2], slots.to(device), w.to(device),
               w.to(device), 1e-6)
    err = max((a.float().cpu() - b).abs().max().item() for a, b in zip(mine, ref, strict=True))
    out["rope-store-norm-128"] = {"max_abs_err": err, "ok": err < 5e-2}
    return out


def attention_bandwidth(device: torch.device, batch: int, ctx: int, h: int = 32, hkv: int = 8, dh: int = 128,
                        dtype: torch.dtype = torch.bfloat16) -> dict:
    """Decode attention over `batch` sequences of `ctx` keys: GB/s of K and V read (one layer)."""
    from ember.engine.runner import split_segments
    from ember.kernels.triton.attention import attention

    bs = 16
    nb = -(-ctx // bs)
    tables = torch.randperm(batch * nb, device=device).view(batch, nb).int()
    kc = torch.randn(hkv, batch * nb * bs, dh, device=device, dtype=dtype)
    vc = torch.randn_like(kc)
    q = torch.randn(batch, h, dh, device=device, dtype=dtype)
    cu = torch.arange(batch + 1, device=device, dtype=torch.int32)
    lens = torch.full((batch,), ctx, device=device, dtype=torch.int32)
    seg = split_segments(batch, hkv, ctx)
    out = torch.empty_like(q)
    sec = timed(lambda: attention(q, kc, vc, tables, cu, lens, bs, dh**-0.5, segments=seg, out=out), device)
    nbytes = 2 * batch * ctx * hkv * dh * kc.element_size()
    return {"batch": batch, "ctx": ctx, "segments": seg, "us": sec * 1e6, "GBps": nbytes / sec / 1e9}


def int4_vs_bf16(device: torch.device, n: int = 14336, k: int = 4096, rows: tuple[int, ...] = (1, 2, 4, 8, 16, 32,
                 64, 128, 256)) -> list[dict]:
    """y = x @ W.T for W [n, k]: torch's int4 kernel (group 32) and ember's int4 layer against bf16 cuBLAS."""
    from ember.quant import int4_gpu

    g = torch.Generator(device=device).manual_seed(0)
    nib = torch.randint(0, 256, (n, k // 2), generator=g, device=device, dtype=torch.int32).to(torch.uint8)
    sz = (torch.rand(k // 32, n, 2, generator=g, device=device) * 0.01).to(torch.bfloat16)
    w = int4_gpu.dequant(nib, sz, 32)  # [n, k] bf16: the same weights
    packed = int4_gpu.pack_int4(nib) if device.type == "cuda" else None
    res = []
    for m in rows:
        x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
        row: dict = {"M": m, "bf16_us": timed(lambda x=x: F.linear(x, w), device) * 1e6}
        if packed is not None:
            row["int4_kernel_us"] = timed(
                lambda x=x: torch.ops.aten._weight_int4pack_mm(x, packed, 32, sz), device) * 1e6
            row["int4_over_bf16"] = row["bf16_us"] / row["int4_kernel_us"]
        row["dequant_path_us"] = timed(lambda x=x: int4_gpu.dequant_linear(x, nib, sz, 32, 1), device, iters=5) * 1e6
        res.append(row)
    return res
