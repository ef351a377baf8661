"""Steps that hold prefills, run as CUDA graphs cut at attention ("piecewise" graphs, as vLLM runs
them): everything of a layer but its prefill attention (projections, norms, RoPE, the cache write, the
decode tokens' absorbed attention, o_proj, the MoE) runs in one graph per token count for any mix of
prefill chunks and decode tokens; the prefill sequences' attention, whose shapes change with every
step (query and context lengths), runs eagerly between the graphs.

Why: run eagerly, a step is bound by the host, which launches some 25 kernels per layer from Python:
an eager 256-sequence decode step takes 28-41 ms on an H200 where its whole-step graph takes 13 ms,
and under real traffic nearly every step holds a prefill (docs/benchmarks.md). The decode-only steps
keep their whole-step graphs (model_runner.py); this covers the others up to MAX_TOKENS tokens.

The decode tokens attend inside the graphs: the last `max_decode_rows` rows of a graph (all of them
in a smaller one) run the absorbed decode attention over static block tables and context lengths, as
the whole-step decode graphs do; a row of that window that is not a decode token (a prompt token, or
padding) attends over one token of the scratch block, and the eager prefill attention overwrites its
output. With the decode attention eager too, the host took 18.9 ms to queue a step of 256 decodes
and a 200-token prompt on an H200, 12.9 of them in attention calls, against 15.6 ms of device work;
with it in the graphs, 9.4 ms, 4.7 in attention calls (docs/benchmarks.md).

The pieces read and write static buffers sized for the largest token count: ids, positions and
cache slots in; the decode rows' block tables and lengths; the query and the residual stream between
pieces; the attention output that the graphs and the eager call write and the next piece reads; the
final hidden states out. A step of T tokens runs the graphs of the smallest captured count n >= T
with its rows last, at n - T .. n - 1 (so that its decode tokens, which come last, fall in the window);
rows 0 .. n - T - 1 are padding whose cache writes go to the scratch block and whose outputs nobody
reads. Without capture (`capture=False`, on a CPU) the same pieces run eagerly over the same buffers:
that is how CPU tests check the cutting, the buffers and the padding against the one-go forward.
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
    def __init__(self, model: DeepseekV2ForCausalLM, kv_caches: list[torch.Tensor], block_size: int,
                 scratch_block: int, max_tokens: int, max_decode_rows: int, max_seq_len: int, capture: bool):
        """kv_caches: the runner's, one per layer, of block_size-token blocks; scratch_block: a block
        nobody reads (padding rows write there); max_tokens: the largest step to cover (the runner's
        token budget); max_decode_rows: the most decode tokens a step holds (max_num_seqs), whose
        attention runs in the graphs; max_seq_len: the longest context."""
        self.model, self.kv_caches, self.scratch_block = model, kv_caches, scratch_block
        self.scratch_slot, self.max_seq_len = scratch_block * block_size, max_seq_len
        self.counts = [n for n in TOKEN_COUNTS if n < max_tokens] + [min(max_tokens, MAX_TOKENS)]
        self.counts = sorted(set(self.counts))
        a, dev, dtype = model.args, model.device, model.dtype
        n, heads = self.counts[-1], model.model.layers[0].self_attn.num_heads
        self.window = min(max_decode_rows, n)  # the decode rows' attention in graphs: the last rows
        self.ids = torch.zeros(n, dtype=torch.long, device=dev)
        self.positions = torch.zeros(n, dtype=torch.long, device=dev)
        self.slots = torch.full((n,), self.scratch_slot, dtype=torch.long, device=dev)
        max_blocks = -(-max_seq_len // block_size)
        self.tables = torch.full((self.window, max_blocks), scratch_block, dtype=torch.int32, device=dev)
        self.lens = torch.ones(self.window, dtype=torch.int32, device=dev)
        self.q = torch.zeros(n, heads, a.qk_head_dim, dtype=dtype, device=dev)
        self.residual = torch.zeros(n, a.hidden_size, dtype=dtype, device=dev)
        self.cos = torch.zeros(n, a.qk_rope_head_dim // 2, dtype=torch.float32, device=dev)
        self.sin = torch.zeros_like(self.cos)
        self.attn_out = torch.zeros(n, heads, a.v_head_dim, dtype=dtype, device=dev)
        self.hidden = torch.zeros(n, a.hidden_size, dtype=dtype, device=dev)
        pinned = dev.type == "cuda"
        # host staging (ids, positions, slots, lens; the tables), two sets used in turns: a step's copies
        # from one may still be queued on the device when the next step, launched ahead, fills the other
        self.staging = [torch.zeros(4, n, dtype=torch.long, pin_memory=pinned) for _ in range(2)]
        self.table_staging = [torch.zeros(self.window, max_blocks, dtype=torch.int32, pin_memory=pinned)
                              for _ in range(2)]
        self.turn = 0
        self.graphs: dict[int, list[torch.cuda.CUDAGraph]] = {}
        if capture:
            self._capture()

    @property
    def max_tokens(self) -> int:
        return self.counts[-1]

    def _pieces(self, n: int) -> list[Callable[[], None]]:
        """The step's num_layers + 1 pieces over the buffers' first n rows: piece 0 up to layer 0's
        decode attention, piece i from layer i - 1's attention output to layer i's decode attention,
        the last to the final hidden states."""
        m, caches = self.model.model, self.kv_caches
        ids, pos, slots, q, residual = self.ids[:n], self.positions[:n], self.slots[:n], self.q[:n], self.residual[:n]
        cos, sin, out = self.cos[:n], self.sin[:n], self.attn_out[:n]
        w = min(self.window, n)
        tables, lens, dn = self.tables[-w:], self.lens[-w:], self.model.args.qk_nope_head_dim

        def decode_attention(i):  # the window's rows, absorbed, as the decode graphs run them
            qw = q[n - w:]
            out[n - w:].copy_(m.layers[i].self_attn.absorbed_attention(qw[..., :dn], qw[..., dn:], caches[i], tables,
                                                                       lens, self.max_seq_len))

        def first():
            q_, r_, c_, s_ = m.step_first(ids, pos, caches[0], slots)
            for static, new in ((q, q_), (residual, r_), (cos, c_), (sin, s_)):
                static.copy_(new)
            decode_attention(0)

        def between(i):
            def piece():
                q_, r_ = m.step_between(i, out, residual, cos, sin, caches[i + 1], slots)
                q.copy_(q_)
                residual.copy_(r_)
                decode_attention(i + 1)
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

    def takes_decodes(self, num_tokens: int, num_decode_rows: int) -> bool:
        """Whether a step of num_tokens tokens runs its num_decode_rows decode rows' attention in the
        graphs (they fit its window); else they attend eagerly, with the prefills."""
        return num_decode_rows <= min(self.window, min(c for c in self.counts if c >= num_tokens))

    @torch.inference_mode()
    def run(self, input_ids: np.ndarray, positions: np.ndarray, slots: np.ndarray, attn: AttentionMetadata,
            decode_tables: list[list[int]], decode_rows: list[int], decode_lens: np.ndarray,
            device_ids: torch.Tensor | None = None) -> torch.Tensor:
        """One step of T <= max_tokens tokens (host arrays; attn: the step's metadata, whose
        slot_mapping and decode fields are not read: the pieces take the slots and the decode rows'
        tables (decode_tables, each for decode_rows[i] consecutive rows) and lengths given here;
        device_ids: the input tokens of the last rows, on the device, in place of theirs in input_ids).
        Returns hidden [T, D], a view of the static buffer valid until the next step."""
        T, D = len(input_ids), len(decode_lens)
        n = min(c for c in self.counts if c >= T)
        w, start = min(self.window, n), n - T  # the step's rows are the last T
        host, host_table = self.staging[self.turn], self.table_staging[self.turn]
        self.turn ^= 1
        staging, table = host.numpy(), host_table.numpy()
        staging[:, :n] = ((0,), (0,), (self.scratch_slot,), (1,))
        staging[0, start:n], staging[1, start:n], staging[2, start:n] = input_ids, positions, slots
        decodes_in_graphs = self.takes_decodes(T, D)
        if decodes_in_graphs:  # the window's last D rows are the decode tokens
            staging[3, n - D:n] = decode_lens
            table[-w:] = self.scratch_block
            row = len(table) - D
            for t, r in zip(decode_tables, decode_rows):
                table[row:row + r, :len(t)] = t
                row += r
            self.tables[-w:].copy_(host_table[-w:], non_blocking=True)
        for k, static in enumerate((self.ids, self.positions, self.slots)):
            static[:n].copy_(host[k, :n], non_blocking=True)
        if device_ids is not None:
            self.ids[n - len(device_ids):n].copy_(device_ids)
        self.lens[-w:].copy_(host[3, n - w:n], non_blocking=True)
        # the rows that attend eagerly: the prefill tokens, or every row when the decode tokens do not
        # fit the window (then attn holds their tables)
        P = attn.num_prefill_tokens
        eager_rows = slice(start, start + P) if decodes_in_graphs else slice(start, n)
        layers = self.model.model.layers
        run = [g.replay for g in self.graphs[n]] if n in self.graphs else self._pieces(n)
        run[0]()
        for i, layer in enumerate(layers):
            if decodes_in_graphs and P:
                self.attn_out[eager_rows].copy_(layer.self_attn.prefill_attention(self.q[eager_rows], attn,
                                                                                   self.kv_caches[i]))
            elif not decodes_in_graphs:
                self.attn_out[eager_rows].copy_(layer.self_attn.paged_attention(self.q[eager_rows], attn,
                                                                                self.kv_caches[i]))
            run[i + 1]()
        return self.hidden[start:n]
