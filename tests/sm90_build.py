"""Compile every Triton kernel variant the wrappers launch at the V2 / V2-Lite shapes for sm_90
(H100/H200) with the ptxas bundled in Triton's wheel: no GPU needed. The wrappers run on empty CPU
tensors with each kernel replaced by a recorder, so only the launches are collected.

    python tests/sm90_build.py decode|fused [--report]    (prints one JSON line, or with --report a markdown
        table: registers, programs an SM, pipeline buffers, the main loop's instruction mix; without
        TRITON_INTERPRET)
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import torch
import triton
from triton._C.libtriton import native_specialize_impl
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import CUDABackend
from triton.compiler import ASTSource

from deepseek_v2.kernels import (absorb, activation, fp8_linear, launch, mla_decode, mla_merge, mla_prepare, moe,
                                 moe_align, norm, prefill_triton, router)
from deepseek_v2.kernels.fp8 import FP8, quantized_buffers, scale_shape

OPTIONS = ("num_warps", "num_stages", "enable_fp_fusion", "enable_reflect_ftz", "launch_pdl")
GPU_CONSTANTS = {"UPCAST_DOT": False, "LIBDEVICE": True}  # what the wrappers pass on a GPU, not on CPU


def record(targets) -> list:
    launches = []
    for module, name in targets:
        class Recorder:  # takes the place of kernel[grid](...): records the launch, runs nothing
            def __getitem__(self, grid, kernel=getattr(module, name)):
                return lambda *args, **kwargs: launches.append((kernel, args, kwargs))
        setattr(module, name, Recorder())
    return launches


def launch_decode_kernels() -> None:
    i32, bf16 = torch.int32, torch.bfloat16
    for H, N, dtype in [(16, 1, bf16), (16, 256, bf16), (128, 8, bf16), (16, 2, torch.float32)]:
        for cache in (torch.empty(64, 64, 576, dtype=dtype), torch.empty(64, 64, 580, dtype=torch.uint8)):  # FP8
            for fp16_dots in (False, True) if cache.dtype == torch.uint8 and dtype == bf16 else (False,):
                mla_decode.mla_decode(torch.empty(N, H, 512, dtype=dtype), torch.empty(N, H, 64, dtype=dtype),
                                      cache, torch.zeros(N, 64, dtype=i32), torch.ones(N, dtype=i32), 0.1,
                                      fp16_dots=fp16_dots)
    for N in (1, 256):  # the whole tiles through tensor descriptors (mla_decode.TMA), an FP8 cache's values too
        for cache in (torch.empty(64, 64, 576, dtype=bf16), torch.empty(64, 64, 580, dtype=torch.uint8)):
            mla_decode.mla_decode(torch.empty(N, 16, 512, dtype=bf16), torch.empty(N, 16, 64, dtype=bf16), cache,
                                  torch.zeros(N, 64, dtype=i32), torch.ones(N, dtype=i32), 0.1, tma=True)
    for buffers in (2, 3):  # more tiles in flight (mla_decode.TILE_BUFFERS), through TMA and with pointers
        mla_decode.TILE_BUFFERS = buffers
        for N in (1, 256):
            for cache in (torch.empty(64, 64, 576, dtype=bf16), torch.empty(64, 64, 580, dtype=torch.uint8)):
                mla_decode.mla_decode(torch.empty(N, 16, 512, dtype=bf16), torch.empty(N, 16, 64, dtype=bf16), cache,
                                      torch.zeros(N, 64, dtype=i32), torch.ones(N, dtype=i32), 0.1, tma=N > 1)
    mla_decode.TILE_BUFFERS = 1
    mla_decode.PROJECT_IN_MERGE_MAX_SEQS = 8  # built here past its default of one sequence
    cache = torch.empty(64, 64, 576, dtype=bf16)
    for H in (16, 128):  # W_UV's product in the merge's launch
        mla_decode.mla_decode(torch.empty(1, H, 512, dtype=bf16), torch.empty(1, H, 64, dtype=bf16), cache,
                              torch.zeros(1, 64, dtype=i32), torch.ones(1, dtype=i32), 0.1,
                              w_uv=torch.empty(H, 128, 512, dtype=bf16))
    # V2-Lite's 64 experts, and one rank's 20 of V2's 160 under 8-way expert parallelism
    for E, D, I, K in [(64, 2048, 1408, 6), (20, 5120, 1536, 6)]:
        w13, w2 = torch.empty(E, 2 * I, D, dtype=bf16), torch.empty(E, D, I, dtype=bf16)  # never touched
        fp8 = (w13.to(FP8), w2.to(FP8), torch.empty(E, 2 * -(-I // 128), D // 128), torch.empty(E, D // 128, -(-I // 128)))
        moe.COMBINE_IN_GEMM_MAX_TOKENS = 16  # built here though off by default
        for T in (1, 16, 256, 4096):  # one of each launch tier, and the picks summed in the down GEMM (1, 16)
            x, weights, ids = torch.empty(T, D, dtype=bf16), torch.ones(T, K), torch.zeros(T, K, dtype=torch.long)
            moe.fused_moe(x, w13, w2, weights, ids)
            moe.fused_moe(x, fp8[0], fp8[1], weights, ids, fp8[2], fp8[3])
        swap_default = moe.SWAP_AB_MAX_BLOCK_M
        moe.SWAP_AB_MAX_BLOCK_M = 0  # the thin tiers again, unswapped (mma.sync)
        for T in (16, 256):
            x, weights, ids = torch.empty(T, D, dtype=bf16), torch.ones(T, K), torch.zeros(T, K, dtype=torch.long)
            moe.fused_moe(x, w13, w2, weights, ids)
            moe.fused_moe(x, fp8[0], fp8[1], weights, ids, fp8[2], fp8[3])
        moe.SWAP_AB_MAX_BLOCK_M = swap_default
        quantize_inter, moe.QUANTIZE_INTER_MAX_TOKENS = moe.QUANTIZE_INTER_MAX_TOKENS, 16  # off by default
        for T in (1, 16):  # the gate/up GEMM storing the intermediate quantized (128-wide column blocks)
            x, weights, ids = torch.empty(T, D, dtype=bf16), torch.ones(T, K), torch.zeros(T, K, dtype=torch.long)
            moe.fused_moe(x, fp8[0], fp8[1], weights, ids, fp8[2], fp8[3])
        moe.QUANTIZE_INTER_MAX_TOKENS = quantize_inter
        moe.TMA = True  # the weights' tiles through tensor descriptors (off by default)
        monkey = moe.hopper_class
        moe.hopper_class = lambda device: True
        for T in (1, 256, 4096):
            x, weights, ids = torch.empty(T, D, dtype=bf16), torch.ones(T, K), torch.zeros(T, K, dtype=torch.long)
            moe.fused_moe(x, w13, w2, weights, ids)
            moe.fused_moe(x, fp8[0], fp8[1], weights, ids, fp8[2], fp8[3])
        moe.TMA, moe.hopper_class = False, monkey
    # the FP8 linear layers at V2-Lite's and V2's shapes (q_proj / q_b_proj, o_proj, shared experts), one
    # part that starts inside a block, each launch tier (one row and 256 rows: K in pieces, summed by a second launch)
    for N, K, offset in [(3072, 2048, (0, 0)), (2048, 2048, (0, 0)), (24576, 1536, (0, 0)), (5120, 2048, (0, 64)),
                         (1536, 5120, (64, 0))]:
        w, s = torch.empty(N, K, dtype=FP8), torch.empty(scale_shape(N, K, offset))
        for M in (1, 64, 256, 4096):
            fp8_linear.linear(torch.empty(M, K, dtype=bf16), w, None, s, offset)
        fp8_linear.linear(torch.empty(1, K, dtype=bf16), w, None, s, offset,  # a GPU's default at one row
                          config=fp8_linear.default_config(1, N, -(-(K + offset[1]) // 128), 132))
    sum_default = fp8_linear.SUM_PIECES_IN_GEMM
    w, s = torch.empty(3072, 2048, dtype=FP8), torch.empty(scale_shape(3072, 2048))
    for summed_in_gemm in (True, False):  # the pieces summed by the GEMM's last piece of a tile, or by sum_pieces
        fp8_linear.SUM_PIECES_IN_GEMM = summed_in_gemm
        for M in (1, 256):
            fp8_linear.linear(torch.empty(M, 2048, dtype=bf16), w, None, s,
                              config=fp8_linear.default_config(M, 3072, 16, 132))
    fp8_linear.SUM_PIECES_IN_GEMM = sum_default
    # V2-Lite's FP8 q_proj with the bf16 kv_a_proj_with_mqa's rows in its launch (plain_rows), at one row
    fp8_linear.linear(torch.empty(1, 2048, dtype=bf16), w, None, s, plain_rows=torch.empty(576, 2048, dtype=bf16),
                      config=fp8_linear.default_config(1, 3072 + 576, 16, 132))
    # ... and at 256 rows, x quantized first (PLAIN_ROWS_IN_LAUNCH_MAX_M)
    plain_default, fp8_linear.PLAIN_ROWS_IN_LAUNCH_MAX_M = fp8_linear.PLAIN_ROWS_IN_LAUNCH_MAX_M, 512
    fp8_linear.linear(torch.empty(256, 2048, dtype=bf16), w, None, s, plain_rows=torch.empty(576, 2048, dtype=bf16))
    fp8_linear.PLAIN_ROWS_IN_LAUNCH_MAX_M = plain_default
    swap_default, fp8_linear.SWAP_AB_MAX_M = fp8_linear.SWAP_AB_MAX_M, 0  # one row unswapped (mma.sync), too
    fp8_linear.linear(torch.empty(1, 2048, dtype=bf16), w, None, s, config=fp8_linear.default_config(1, 3072, 16, 132))
    fp8_linear.SWAP_AB_MAX_M = swap_default
    # the weights asked of L2 before the wait (launch.PREFETCH_WEIGHTS): that launch, o_proj inside a block,
    # W_UV's product in the merge at one sequence
    prefetch_default, launch.PREFETCH_WEIGHTS = launch.PREFETCH_WEIGHTS, True
    fp8_linear.linear(torch.empty(1, 2048, dtype=bf16), w, None, s, plain_rows=torch.empty(576, 2048, dtype=bf16),
                      config=fp8_linear.default_config(1, 3072 + 576, 16, 132))
    w_o, s_o = torch.empty(5120, 2048, dtype=FP8), torch.empty(scale_shape(5120, 2048, (0, 64)))
    fp8_linear.linear(torch.empty(1, 2048, dtype=bf16), w_o, None, s_o, (0, 64),
                      config=fp8_linear.default_config(1, 5120, 17, 132))
    mla_decode.mla_decode(torch.empty(1, 16, 512, dtype=bf16), torch.empty(1, 16, 64, dtype=bf16),
                          torch.empty(64, 64, 576, dtype=bf16), torch.zeros(1, 64, dtype=torch.int32),
                          torch.ones(1, dtype=torch.int32), 0.1, max_seq_len=4096,
                          w_uv=torch.empty(16, 256, 512, dtype=bf16)[:, 128:])
    cache_default, mla_decode.PREFETCH_CACHE = mla_decode.PREFETCH_CACHE, True  # and the split kernel's cache rows
    for cache in (torch.empty(64, 64, 576, dtype=bf16), torch.empty(64, 64, 580, dtype=torch.uint8)):  # FP8
        mla_decode.mla_decode(torch.empty(1, 16, 512, dtype=bf16), torch.empty(1, 16, 64, dtype=bf16), cache,
                              torch.zeros(1, 64, dtype=torch.int32), torch.ones(1, dtype=torch.int32), 0.1,
                              max_seq_len=4096, w_uv=torch.empty(16, 256, 512, dtype=bf16)[:, 128:])
    mla_decode.PREFETCH_CACHE = cache_default
    shared_default, moe.PREFETCH_SHARED = moe.PREFETCH_SHARED, True  # and one token's shared FP8 experts' tiles
    for E, D, I in ((66, 2048, 1408), (162, 5120, 1536)):  # V2-Lite's and V2's stacks, two shared experts last
        fp8 = (torch.empty(E, 2 * I, D, dtype=FP8), torch.empty(E, D, I, dtype=FP8),
               torch.empty(E, 2 * -(-I // 128), D // 128), torch.empty(E, D // 128, -(-I // 128)))
        x, weights, ids = torch.empty(1, D, dtype=bf16), torch.ones(1, 8), torch.zeros(1, 8, dtype=torch.long)
        moe.fused_moe(x, *fp8[:2], weights, ids, *fp8[2:], num_shared=2)
    moe.PREFETCH_SHARED = shared_default
    launch.PREFETCH_WEIGHTS = prefetch_default
    # prefill attention at V2's head dims (q/k 192 = 128 + 64, v 128) and the demo model's (96 = 64 + 32, v 64)
    cu = torch.tensor([0, 64], dtype=torch.int32)
    for d, dv in ((192, 128), (96, 64)):
        q, v = torch.empty(64, 16, d, dtype=bf16), torch.empty(64, 16, dv, dtype=bf16)
        prefill_triton.prefill_attention(q[:16], q[:16], v[:16], cu // 4, cu // 4, [16], [16], 0.1)  # PDL's few rows
        prefill_triton.prefill_attention(q, q, v, cu, cu, [64], [64], 0.1)
        prefill_triton.prefill_attention(q, q, v, cu, cu, [64], [64], 0.1,  # K and V through tensor descriptors
                                         config=dict(prefill_triton.default_config(d), TMA=True))


def launch_fused_kernels() -> None:
    bf16 = torch.bfloat16
    for T in (1, 256, 16384):
        for D in (2048, 5120):
            x = torch.empty(T, D, dtype=bf16)
            norm.rms_norm(x, torch.empty(D, dtype=bf16), 1e-6)
            norm.rms_norm(x, torch.empty(D, dtype=bf16), 1e-6, residual=x)
            if T == 256:  # the input norm quantizing its output for the FP8 query projection
                norm.rms_norm(x, torch.empty(D, dtype=bf16), 1e-6, residual=x,
                              x_fp8=quantized_buffers(T, D, x.device, pad_rows=128))
        for H in (16, 128):
            q = torch.empty(T, H, 192, dtype=bf16)
            for cache in (torch.empty(64, 64, 576, dtype=bf16), torch.empty(64, 64, 580, dtype=torch.uint8)):  # FP8
                mla_prepare.mla_prepare(q[..., 128:], torch.empty(T, 576, dtype=bf16), torch.empty(T, 32),
                                        torch.empty(T, 32), torch.empty(512, dtype=bf16), 1e-6, cache,
                                        torch.zeros(T, dtype=torch.long))
        activation.silu_and_mul(torch.empty(T, 2 * 1408, dtype=bf16))
        if T == 256:  # the shared experts' activation quantized at their down projection's zero-column width
            activation.silu_and_mul(torch.empty(T, 2 * 2816, dtype=bf16),
                                    x_fp8=quantized_buffers(T, 3072, torch.device("cpu"), pad_rows=128))
        # V2-Lite's greedy router, V2's group-limited one: one launch at one token (a program a token) and at 256
        # (blocks of tokens), cuBLAS and topk_softmax at 16384
        router.GROUPED_IN_KERNEL = True  # built here whatever its setting
        router.ROUTE_BLOCKS_MAX_TOKENS = 512
        for E, D, groups in ((64, 2048, None), (160, 5120, (8, 3))):
            router.route(torch.empty(T, D, dtype=bf16), torch.empty(E, D), 6, renormalize=True, num_shared=2,
                         groups=groups)
    prefetch_default, launch.PREFETCH_WEIGHTS = launch.PREFETCH_WEIGHTS, True  # the weights asked of L2 first
    router.route(torch.empty(1, 2048, dtype=bf16), torch.empty(64, 2048), 6, renormalize=True, num_shared=2)
    absorb.absorb_query(torch.empty(1, 16, 192, dtype=bf16)[..., :128], torch.empty(16, 256, 512, dtype=bf16)[:, :128])
    launch.PREFETCH_WEIGHTS = prefetch_default
    absorb.ABSORB_MAX_SEQS = 16  # built here past its default of one sequence
    for H in (16, 128):  # W_UK's product at one and 16 sequences, w_uk a view of kv_b_proj's rows
        w_uk = torch.empty(H, 256, 512, dtype=bf16)[:, :128]
        for N in (1, 16):
            absorb.absorb_query(torch.empty(N, H, 192, dtype=bf16)[..., :128], w_uk)


FAMILIES = {
    "decode": ([(mla_decode, "_mla_decode_split_kernel"), (mla_merge, "_mla_decode_merge_kernel"),
                (mla_merge, "_merge_project_kernel"),
                (moe_align, "_moe_align_kernel"), (moe, "_moe_gemm_kernel"), (moe, "_combine_kernel"),
                (fp8_linear, "_fp8_linear_kernel"),
                (fp8_linear, "_quantize_kernel"), (fp8_linear, "_sum_pieces_kernel"),
                (prefill_triton, "_prefill_attention_kernel")],
               launch_decode_kernels),
    "fused": ([(norm, "_rms_norm_kernel"), (mla_prepare, "_mla_prepare_kernel"),
               (activation, "_silu_and_mul_kernel"), (router, "_topk_softmax_kernel"), (router, "_route_kernel"),
              (absorb, "_absorb_query_kernel")],
              launch_fused_kernels),
}


def waits_first(ptx: str) -> bool:
    """The kernel's PTX waits for the kernel before it (griddepcontrol.wait) ahead of its first global
    memory access: a load, a store, an atomic, an asynchronous or a tensor copy."""
    wait = ptx.find("griddepcontrol.wait")
    accesses = [m.start() for m in re.finditer(r"\b(ld\.global|st\.global|atom\.|red\.|cp\.async)", ptx)]
    return wait >= 0 and (not accesses or wait < min(accesses))


# the SASS instruction classes main_loop counts (a class: the opcodes it starts with)
LOOP_CLASSES = {"mma": ("HMMA", "HGMMA", "QGMMA"), "shared loads": ("LDS", "LDSM"), "byte shared loads": ("LDS.U8", "LDS.S8"),
                "global loads": ("LDG", "LDGSTS", "UTMALDG"), "conversions": ("F2F", "I2F", "F2I"),
                "spill traffic": ("STL", "LDL"), "shuffles": ("SHFL",), "barriers": ("BAR",),
                "fp32 math": ("FFMA", "FMUL", "FADD")}


def main_loop(sass: str) -> dict:
    """The instruction mix of a kernel's innermost loop that multiplies (the smallest span a backward
    branch closes with an MMA in it): instructions a thread an iteration, in LOOP_CLASSES; {} if none."""
    code = [(int(m.group(1), 16), m.group(2)) for m in
            re.finditer(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)", sass)]
    branches = [(int(m.group(2), 16), int(m.group(1), 16)) for m in
                re.finditer(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?BRA[^\n]*?0x([0-9a-f]+)", sass)]
    loops = []
    for start, end in branches:
        if start < end:
            body = [op for address, op in code if start <= address <= end]
            if any(op.startswith(LOOP_CLASSES["mma"]) for op in body):
                loops.append(body)
    if not loops:
        return {}
    body = min(loops, key=len)
    mix = {"instructions": len(body)}
    for name, prefixes in LOOP_CLASSES.items():
        mix[name] = sum(op.startswith(prefixes) for op in body)
    return mix


def resident_programs(registers: int, shared: int, warps: int) -> int:
    """Programs of one kernel an H100 / H200 SM holds at once: 64K registers (a warp's allocated in 256s),
    228 KB of shared memory (1 KB of it reserved a program), 64 warps, 32 programs."""
    per_warp = -(-registers * 32 // 256) * 256
    return min(65536 // (per_warp * warps), 228 * 1024 // (shared + 1024), 64 // warps, 32)


def build(launches) -> list[dict]:
    """Compile each distinct launch as the JIT would specialise it; report shared memory, spills and
    a few properties of the PTX."""
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    built, results = set(), []
    for kernel, args, kwargs in launches:
        kwargs = dict(kwargs)
        options = {k: kwargs.pop(k) for k in OPTIONS if k in kwargs}
        constants = {**kwargs, **{k: v for k, v in GPU_CONSTANTS.items() if k in kwargs}}
        signature, attrs = {}, {}
        for index, (name, value) in enumerate(zip(kernel.arg_names, args)):
            kind, attr = native_specialize_impl(CUDABackend, value, False, True, True)
            signature[name] = kind
            if kind == "constexpr":
                constants[name] = value
            elif attr:
                attrs[(index,)] = CUDABackend.parse_attr(attr)
        signature.update({name: "constexpr" for name in kwargs})
        key = repr((kernel.__name__, signature, sorted(constants.items()), options))
        if key in built:
            continue
        built.add(key)
        compiled = triton.compile(ASTSource(kernel, signature, constants, attrs), target=GPUTarget("cuda", 90, 32),
                                  options=options)
        path = f"/tmp/sm90_{os.getpid()}.cubin"
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", path], capture_output=True, text=True).stdout
        sass = subprocess.run([cuobjdump, "-sass", path], capture_output=True, text=True).stdout
        os.remove(path)
        stack = re.search(r"STACK:(\d+)", usage)
        registers = int(re.search(r"REG:(\d+)", usage).group(1))
        ptx = compiled.asm["ptx"]
        # the software pipeline's buffers: [depth, rows, cols] shared-memory allocations, by tile shape
        tile_buffers = {f"{rows}x{cols}": int(depth) for depth, rows, cols in
                        re.findall(r"local_alloc : \(\) -> !ttg\.memdesc<(\d+)x(\d+)x(\d+)x", compiled.asm["ttgir"])}
        results.append(dict(kernel=kernel.__name__, shared=compiled.metadata.shared,
                            spill_bytes=int(stack.group(1)) if stack else None,
                            approx_div="div.full" in ptx or "div.approx" in ptx, fma="fma." in ptx,
                            vector_loads="ld.global.v" in ptx, wgmma="wgmma.mma_async" in ptx,
                            async_copies="cp.async" in ptx, tma="cp.async.bulk.tensor" in ptx,
                            waits_for_prior_kernels=waits_first(ptx),
                            prefetches_before_waiting=0 <= ptx.find("prefetch.global.L2") < ptx.find("griddepcontrol.wait"),
                            launch_pdl=compiled.metadata.launch_pdl, num_warps=options.get("num_warps"),
                            num_stages=options.get("num_stages"), tile_buffers=tile_buffers, registers=registers,
                            resident=resident_programs(registers, compiled.metadata.shared,
                                                       options.get("num_warps", 4)),
                            main_loop=main_loop(sass),
                            config={k: str(v) for k, v in constants.items() if k.isupper()}))
    return results


def run_in_subprocess(family: str) -> list[dict]:
    """For the tests: compile in a fresh interpreter (not under TRITON_INTERPRET)."""
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), family], env=env, cwd=root,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(results: list[dict]) -> str:
    """A markdown table of the builds: resources, programs an SM, pipeline buffers and the main loop's mix."""
    lines = ["| kernel | config | warps | stages | registers | spilled | shared KB | programs an SM | buffers |"
             " main loop: instructions / MMAs / shared loads (one-byte) / conversions / fp32 math |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        config = " ".join(f"{k}={v}" for k, v in r["config"].items()
                          if k.startswith(("BLOCK", "FP8", "TMA", "SWAP", "PIECES", "FP16")) and v not in ("False", "None"))
        buffers = " ".join(f"{depth}x{tile}" for tile, depth in r["tile_buffers"].items()) or "-"
        loop = r["main_loop"]
        mix = (f"{loop['instructions']} / {loop['mma']} / {loop['shared loads']} ({loop['byte shared loads']}) / "
               f"{loop['conversions']} / {loop['fp32 math']}") if loop else "-"
        lines.append(f"| {r['kernel']} | {config} | {r['num_warps']} | {r['num_stages']} | {r['registers']} | "
                     f"{r['spill_bytes']} | {r['shared'] // 1024} | {r['resident']} | {buffers} | {mix} |")
    return "\n".join(lines)


if __name__ == "__main__":  # `--report`: a markdown table rather than the tests' JSON line
    targets, launch_all = FAMILIES[sys.argv[1]]
    launches = record(targets)
    # launched as on a Hopper-class GPU, where the launches ask for programmatic dependent launch (the
    # modules that choose TMA by the device hold their own hopper_class, and are patched where built)
    launch.hopper_class = lambda device: True
    mla_decode.num_sms = lambda device: 132  # an H100 / H200's: the split counts and warps the GPU gets
    launch_all()
    print(report(build(launches)) if "--report" in sys.argv else json.dumps(build(launches)))
