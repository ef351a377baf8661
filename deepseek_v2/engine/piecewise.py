"""Steps that hold prefills, run as CUDA graphs cut at attention ("piecewise" graphs, as vLLM runs
them): everything of a layer but its attention (projections, norms, RoPE, the cache write, o_proj, the
MoE) is token-parallel, so one graph per token count runs it for any mix of prefill chunks and decode
tokens; attention, whose shapes change with every step (query and context lengths, block tables),
runs eagerly between the graphs.

Why: run eagerly, a step is bound by the host, which launches some 25 kernels per layer from Python:
an eager 256-sequence decode step takes 28-41 ms on an H200 where its whole-step graph takes 13 ms,
and under real traffic nearly every step holds a prefill (docs/benchmarks.md). The decode-only steps
keep their whole-step graphs (model_runner.py); this covers the others up to MAX_TOKENS tokens.

The pieces read and write static buffers sized for the largest token count: ids, positions and
cache slots in; the query and the residual stream between pieces; the attention output that the
eager call writes and the next piece reads; the final hidden states out. A step of T tokens runs the
graphs of the smallest captured count n >= T; rows T..n are padding whose cache writes go to the
runner's scratch block and whose outputs nobody reads. Without capture (`capture=False`, on a CPU)
the same pieces run eagerly over the same buffers: that is how CPU tests check the cutting, the
buffers and the padding against the one-go forward.
"""

from __future__ import annotations

import logging
from typing import Callable

import numpy as np
import torch

from ..model import AttentionMetadata, DeepseekV2ForCausalLM

logger = logging.getLogger("deepseek_v2")

# Token counts with captured graphs. Past the largest, a step's arithmetic dwarfs its launches
# (a 4096-token prefill step takes about 60 ms on an H200 at the V2-Lite shape), and every count costs
# one graph per layer and pool memory for its activations.
TOKEN_COUNTS = (16, 32, 64, 96, 128, 192, 256, 320, 384, 448, 512, 640, 768, 896, 1024, 1280, 1536, 1792,
                2048, 2560, 3072, 3584, 4096)
MAX_TOKENS = TOKEN_COUNTS[-1]


class PiecewiseSteps:
    def __init__(self, model: DeepseekV2ForCausalLM, kv_caches: list[torch.Tensor], scratch_slot: int,
                 max_tokens: int, capture: bool):
        """kv_caches: the runner's, one per layer; scratch_slot: a cache slot nobody reads (padding rows
        write there); max_tokens: the largest step to cover (the runner's token budget)."""
        self.model, self.kv_caches, self.scratch_slot = model, kv_caches, scratch_slot
        self.counts = [n for n in TOKEN_COUNTS if n < max_tokens] + [min(max_tokens, MAX_TOKENS)]
        self.counts = sorted(set(self.counts))
        a, dev, dtype = model.args, model.device, model.dtype
        n, heads = self.counts[-1], model.model.layers[0].self_attn.num_heads
        self.ids = torch.zeros(n, dtype=torch.long, device=dev)
        self.positions = torch.zeros(n, dtype=torch.long, device=dev)
        self.slots = torch.full((n,), scratch_slot, dtype=torch.long, device=dev)
        self.q = torch.zeros(n, heads, a.qk_head_dim, dtype=dtype, device=dev)
        self.residual = torch.zeros(n, a.hidden_size, dtype=dtype, device=dev)
        self.cos = torch.zeros(n, a.qk_rope_head_dim // 2, dtype=torch.float32, device=dev)
        self.sin = torch.zeros_like(self.cos)
        self.attn_out = torch.zeros(n, heads, a.v_head_dim, dtype=dtype, device=dev)
        self.hidden = torch.zeros(n, a.hidden_size, dtype=dtype, device=dev)
        self.staging = torch.zeros(3, n, dtype=torch.long, pin_memory=dev.type == "cuda")
        self.graphs: dict[int, list[torch.cuda.CUDAGraph]] = {}
        if capture:
            self._capture()

    @property
    def max_tokens(self) -> int:
        return self.counts[-1]

    def _pieces(self, n: int) -> list[Callable[[], None]]:
        """The step's num_layers + 1 pieces over the buffers' first n rows: piece 0 up to layer 0's
        attention, piece i from layer i - 1's attention output to layer i's attention, the last to the
        final hidden states."""
        m, caches = self.model.model, self.kv_caches
        ids, pos, slots, q, residual = self.ids[:n], self.positions[:n], self.slots[:n], self.q[:n], self.residual[:n]
        cos, sin, out = self.cos[:n], self.sin[:n], self.attn_out[:n]

        def first():
            q_, r_, c_, s_ = m.step_first(ids, pos, caches[0], slots)
            for static, new in ((q, q_), (residual, r_), (cos, c_), (sin, s_)):
                static.copy_(new)

        def between(i):
            def piece():
                q_, r_ = m.step_between(i, out, residual, cos, sin, caches[i + 1], slots)
                q.copy_(q_)
                residual.copy_(r_)
            return piece

        def last():
            self.hidden[:n].copy_(m.step_last(out, residual))

        return [first] + [between(i) for i in range(len(m.layers) - 1)] + [last]

    @torch.inference_mode()
    def _capture(self) -> None:
        pool = None
        for n in sorted(self.counts, reverse=True):  # the largest first: smaller ones fit in its pool
            pieces = self._pieces(n)
            for piece in pieces:  # warm up outside the capture: Triton compiles and picks its tiles
                piece()
            torch.cuda.synchronize()
            graphs = []
            for piece in pieces:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    piece()
                pool = graph.pool()
                graphs.append(graph)
            self.graphs[n] = graphs
        torch.cuda.synchronize()
        logger.info("captured piecewise CUDA graphs (%d per step) for steps of up to %d tokens: %s",
                    len(self.model.model.layers) + 1, self.max_tokens, self.counts)

    @torch.inference_mode()
    def run(self, input_ids: np.ndarray, positions: np.ndarray, slots: np.ndarray,
            attn: AttentionMetadata) -> torch.Tensor:
        """One step of T <= max_tokens tokens (host arrays; attn: the step's metadata, whose
        slot_mapping is not read: the pieces write the slots given here). Returns hidden [T, D], a view
        of the static buffer valid until the next step."""
        T = len(input_ids)
        n = min(c for c in self.counts if c >= T)
        staging = self.staging.numpy()
        staging[:, :n] = ((0,), (0,), (self.scratch_slot,))
        staging[0, :T], staging[1, :T], staging[2, :T] = input_ids, positions, slots
        for k, static in enumerate((self.ids, self.positions, self.slots)):
            static[:n].copy_(self.staging[k, :n], non_blocking=True)
        layers = self.model.model.layers
        run = [g.replay for g in self.graphs[n]] if n in self.graphs else self._pieces(n)
        run[0]()
        for i, layer in enumerate(layers):
            self.attn_out[:T].copy_(layer.self_attn.paged_attention(self.q[:T], attn, self.kv_caches[i]))
            run[i + 1]()
        return self.hidden[:T]
