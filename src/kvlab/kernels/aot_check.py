"""Compile kvlab's Triton kernels for a GPU architecture without a GPU (ahead of time, to a cubin).

The CPU interpreter checks what the kernels compute, not whether they compile: this checks the
other half. ``python -m kvlab.kernels.aot_check [ARCH ...]`` (default ``90``, Hopper; ``80`` is
Ampere) lowers every kernel, in the configurations the dispatcher launches, through Triton's CUDA
backend and ``ptxas`` (shipped with the triton wheel) and prints one line per kernel. It must run
without ``TRITON_INTERPRET=1`` (the interpreter patches ``triton.language`` process-wide).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

POINTER_TYPES = {
    "kpos_ptr": "*i64", "qpos_ptr": "*i64", "offs_ptr": "*i64", "table_ptr": "*i32", "lens_ptr": "*i32",
    "count_ptr": "*i32", "lse_ptr": "*fp32", "part_ptr": "*fp32", "freq_ptr": "*fp32",
}
SELECT_POINTERS = {"len_ptr": "*i64", "k_ptr": "*i32", "score_ptr": "*fp32", "done_ptr": "*i32", "seq_ptr": "*i32"}
FLOAT_ARGS = {"scale_log2", "rope_scale"}


def _signature(fn: Any, dtype: str, constexprs: dict[str, Any], overrides: dict[str, str]) -> dict[str, str]:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in overrides:
            sig[name] = overrides[name]
        elif name in POINTER_TYPES:
            sig[name] = POINTER_TYPES[name]
        elif name.endswith("_ptr"):
            sig[name] = "*" + dtype
        else:
            sig[name] = "fp32" if name in FLOAT_ARGS else "i32"
    return sig


def configurations() -> list[tuple[str, Any, str, dict[str, Any], dict[str, str]]]:
    """``(label, kernel, dtype, constexprs, signature overrides)`` for every launch the dispatcher makes."""
    from kvlab.kernels import block_scoring, lowrank_attention, paged_attention

    out = []
    for dtype in ("bf16", "fp16", "fp32"):
        for use_pos in (False, True):
            c = dict(LOG2_BS=4, BLOCK_M=16, BLOCK_N=paged_attention.TUNING["BLOCK_N"], BLOCK_D=128, USE_POS=use_pos,
                     HAS_WINDOW=use_pos, HAS_OFFSETS=True, WRITE_LSE=True, DOT_FP32=False, IEEE=dtype == "fp32")
            out.append((f"paged decode attention {dtype} positions={use_pos}",
                        paged_attention._paged_decode_split_kernel, dtype, c, {}))
        out.append((f"block scores {dtype} centroid", block_scoring._block_score_kernel, dtype,
                    dict(QUEST=False, BLOCK_B=block_scoring.BLOCK_B, BLOCK_D=128), {"out_ptr": "*fp32"}))
        out.append((f"block scores {dtype} quest", block_scoring._block_score_kernel, dtype,
                    dict(QUEST=True, BLOCK_B=block_scoring.BLOCK_B, BLOCK_D=128), {"out_ptr": "*fp32"}))
        for quest in (False, True):  # 128K tokens in blocks of 16: 8192 blocks per row, up to 1024 read
            out.append((f"block select (fused scores + top-k) {dtype} {'quest' if quest else 'centroid'}",
                        block_scoring._block_select_kernel, dtype,
                        dict(BS=16, UNIT=16, R=1, QUEST=quest, TILE=block_scoring.SELECT_TILE, BLOCK_D=128, COLS=8192,
                             WIDTH=1024), SELECT_POINTERS))
        c = dict(LOG2_BS=4, BLOCK_M=16, BLOCK_N=lowrank_attention.BLOCK_N, BLOCK_H=64, BLOCK_D=128, BLOCK_RK=32,
                 BLOCK_RV=32, K_MODE=lowrank_attention.K_LOWRANK_ROPE, HAS_OFFSETS=True, WRITE_LSE=True,
                 DOT_FP32=False, IEEE=dtype == "fp32")
        out.append((f"low-rank attention {dtype} pre-RoPE K", lowrank_attention._lowrank_split_kernel, dtype, c, {}))
        out.append((f"merge splits -> {dtype}", paged_attention._merge_splits_kernel, dtype,
                    dict(BLOCK_M=16, BLOCK_D=128), {}))
    return out


def compile_all(arch: int = 90, dtypes: tuple[str, ...] = ("bf16", "fp16", "fp32"), log: Any = print) -> int:
    """Compile every configuration for ``sm_<arch>``; returns the number of failures."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kvlab.kernels.paged_attention import TUNING, _paged_decode_split_kernel

    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("run without TRITON_INTERPRET=1")
    target = GPUTarget("cuda", arch, 32)
    failures = 0
    for label, fn, dtype, constexprs, overrides in configurations():
        if dtype not in dtypes:
            continue
        start = time.perf_counter()
        try:
            options = {"num_warps": 4}
            if fn is _paged_decode_split_kernel:  # launched with the tuned configuration
                options = {"num_warps": TUNING["num_warps"], "num_stages": TUNING["num_stages"]}
            if "COLS" in constexprs:  # block_select: as block_scoring.block_select launches it
                options = {"num_warps": max(4, min(16, constexprs["COLS"] // 512))}
            kernel = triton.compile(ASTSource(fn, _signature(fn, dtype, constexprs, overrides), constexprs),
                                    target=target, options=options)
            log(f"ok   sm_{arch} {label}: {len(kernel.asm['cubin'])} bytes of cubin, "
                f"{kernel.metadata.shared} B shared memory ({time.perf_counter() - start:.1f} s)")
        except Exception as exc:  # noqa: BLE001 -- report every kernel
            failures += 1
            log(f"FAIL sm_{arch} {label}: {type(exc).__name__}: {str(exc).strip().splitlines()[-1:]}")
    return failures


def main(argv: list[str]) -> int:
    dtypes = tuple(a for a in argv if not a.isdigit()) or ("bf16", "fp16", "fp32")
    archs = [int(a) for a in argv if a.isdigit()] or [90]
    return int(sum(compile_all(arch, dtypes) for arch in archs) > 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
