"""The model runner: the only owner of the model, the paged latent cache and the sampler. It turns
a scheduled batch into flat tensors (tokens, positions, slot mapping, block tables, sequence
lengths), runs one forward step, computes logits only for the rows that need them, and samples.

Each layer's cache is one tensor [num_blocks, block_size, kv_lora_rank + qk_rope_head_dim]
holding the normalised latent c_kv and the rotated k_pe of every cached token, nothing else.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..config import EngineConfig
from ..model import AttentionMetadata, DeepseekV2ForCausalLM
from ..sampling import SampleRequest, Sampler
from .scheduler import SchedulerOutput

logger = logging.getLogger("deepseek_v2")


@dataclass
class TokenLogprobs:
    """Log-probabilities at one position: the chosen (or actual prompt) token first, then the top-N."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]

    def as_dict(self) -> dict[int, float]:
        d = {self.token_id: self.logprob}
        for t, lp in self.top:
            d.setdefault(t, lp)
        return d


@dataclass
class StepResult:
    token_id: int | None = None  # the sampled token, when this step reached the sequence's end
    logprobs: TokenLogprobs | None = None
    prompt_logprobs: list[TokenLogprobs] | None = None  # for prompt positions computed this step
    prompt_logprobs_start: int = 0  # prompt index of the first entry


def cache_bytes_per_token(model: DeepseekV2ForCausalLM, dtype: torch.dtype) -> int:
    a = model.args
    return a.num_hidden_layers * a.kv_cache_dim * torch.tensor([], dtype=dtype).element_size()


class ModelRunner:
    def __init__(self, model: DeepseekV2ForCausalLM, config: EngineConfig, max_model_len: int):
        self.device = model.device
        kernels = config.kernels
        if kernels == "auto":
            kernels = "triton" if self.device.type == "cuda" else "reference"
        if kernels == "reference" and self.device.type == "cuda" and not config.enforce_eager:
            raise ValueError("kernels='reference' cannot run in CUDA graphs (it reads expert counts on the "
                             "host): also set enforce_eager")
        self.model = model.eval().fuse_for_inference().use_kernels(kernels)
        self.config = config
        self.dtype = model.dtype
        self.block_size = config.block_size
        self.max_model_len = max_model_len
        self.num_blocks = self._size_cache()
        a = model.args
        # One block more than the block manager hands out: a scratch block that the padding rows
        # of a CUDA-graph batch write into.
        self.scratch_block = self.num_blocks
        self.kv_caches = [torch.zeros(self.num_blocks + 1, self.block_size, a.kv_cache_dim, dtype=self.dtype,
                                      device=self.device) for _ in range(a.num_hidden_layers)]
        self.max_blocks_per_seq = -(-max_model_len // self.block_size)
        generator = torch.Generator(device=self.device)
        generator.manual_seed(config.seed)
        self.sampler = Sampler(generator)
        self.generators: dict[int, torch.Generator] = {}  # per seeded sequence
        self.eos_token_ids: list[int] = []  # set by the engine from the tokenizer
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        if self.device.type == "cuda" and not config.enforce_eager:
            self._capture_decode_graphs()

    # ---- cache sizing -----------------------------------------------------------------------------
    def _size_cache(self) -> int:
        per_block = cache_bytes_per_token(self.model, self.dtype) * self.block_size
        if self.config.num_kv_blocks is not None:
            return self.config.num_kv_blocks
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._profile_peak_memory()
            free, total = torch.cuda.mem_get_info()
            used_by_others = total - free - torch.cuda.memory_reserved()
            budget = (total * self.config.gpu_memory_utilization - used_by_others
                      - torch.cuda.max_memory_allocated())
        else:
            budget = self.config.cpu_kv_cache_bytes
        num_blocks = int(budget // per_block) - 1  # one block is the scratch block

        if num_blocks <= 0:
            raise RuntimeError(f"no memory left for the latent cache (budget {budget / 2**30:.2f} GiB); "
                               "raise gpu_memory_utilization or the CPU cache budget, or set num_kv_blocks")
        return num_blocks

    @torch.inference_mode()
    def _profile_peak_memory(self) -> None:
        """Run one prefill of max_num_batched_tokens tokens to measure the activation peak."""
        n = min(self.config.max_num_batched_tokens, self.max_model_len)
        cache = [torch.zeros(self.block_size * -(-n // self.block_size), 1, self.model.args.kv_cache_dim,
                             dtype=self.dtype, device=self.device).view(-1, self.block_size,
                                                                       self.model.args.kv_cache_dim)
                 for _ in range(self.model.args.num_hidden_layers)]
        ids = torch.zeros(n, dtype=torch.long, device=self.device)
        pos = torch.arange(n, device=self.device)
        attn = AttentionMetadata(slot_mapping=pos, prefill_query_lens=[n], prefill_context_lens=[0],
                                 prefill_block_tables=None, decode_block_tables=None, decode_seq_lens=None)
        hidden = self.model.forward_step(ids, pos, attn, cache)
        self.model.compute_logits(hidden[-min(n, self.config.max_num_seqs):])
        del cache, hidden
        torch.cuda.synchronize()

    # ---- one step ---------------------------------------------------------------------------------
    def _block_table_tensor(self, tables: list[list[int]]) -> torch.Tensor:
        width = max((len(t) for t in tables), default=1) or 1
        rows = [t + [0] * (width - len(t)) for t in tables]
        return torch.tensor(rows, dtype=torch.int32, device=self.device)

    @torch.inference_mode()
    def run(self, sched: SchedulerOutput) -> list[StepResult]:
        """Run one step; returns one StepResult per scheduled sequence, in sched.scheduled order."""
        order = sorted(range(len(sched.scheduled)), key=lambda i: sched.scheduled[i].num_new_tokens == 1)
        items = [sched.scheduled[i] for i in order]  # prefills first, then decodes
        bs = self.block_size
        input_ids, positions, slots = [], [], []
        prefill_q, prefill_ctx, prefill_tables, decode_tables, decode_lens = [], [], [], [], []
        logit_rows: list[int] = []  # rows of the flat batch whose logits we need
        sample_rows, prompt_rows = {}, {}  # item index -> row / (first row, positions)
        offset = 0
        for k, item in enumerate(items):
            seq, n = item.seq, item.num_new_tokens
            start = seq.num_computed_tokens
            table = seq.block_table
            if n == 1:
                input_ids.append(seq.token_at(start))
                positions.append(start)
                slots.append(table[start // bs] * bs + start % bs)
            else:
                input_ids += seq.tokens_slice(start, start + n)
                positions += range(start, start + n)
                slots += [table[p // bs] * bs + p % bs for p in range(start, start + n)]
            if n > 1:
                prefill_q.append(n)
                prefill_ctx.append(start)
                prefill_tables.append(seq.block_table)
            else:
                decode_tables.append(seq.block_table)
                decode_lens.append(start + 1)
            params = seq.sampling_params
            if params.prompt_logprobs is not None and start < seq.num_prompt_tokens - 1:
                last = min(start + n, seq.num_prompt_tokens - 1)  # logits at p score token p + 1
                prompt_rows[k] = (len(logit_rows), list(range(start, last)))
                logit_rows += range(offset, offset + last - start)
            if item.samples:
                sample_rows[k] = len(logit_rows)
                logit_rows.append(offset + n - 1)
            offset += n

        dev = self.device
        if not prefill_q and not prompt_rows and self.graphs and len(items) <= max(self.graphs):
            logits = self._replay_decode_graph(input_ids, positions, slots, decode_tables, decode_lens)
            results = [StepResult() for _ in items]
            self._sample(items, logits, {k: k for k in sample_rows}, results)  # row k is item k
            return self._unorder(order, results)
        attn = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            prefill_query_lens=prefill_q, prefill_context_lens=prefill_ctx,
            prefill_block_tables=self._block_table_tensor(prefill_tables) if prefill_tables else None,
            decode_block_tables=self._block_table_tensor(decode_tables) if decode_tables else None,
            decode_seq_lens=torch.tensor(decode_lens, dtype=torch.int32, device=dev) if decode_lens else None,
            max_decode_seq_len=max(decode_lens, default=0))
        hidden = self.model.forward_step(torch.tensor(input_ids, dtype=torch.long, device=dev),
                                         torch.tensor(positions, dtype=torch.long, device=dev),
                                         attn, self.kv_caches)
        results = [StepResult() for _ in items]
        if logit_rows:
            logits = self.model.compute_logits(hidden[torch.tensor(logit_rows, device=dev)])
            self._sample(items, logits, sample_rows, results)
            self._prompt_logprobs(items, logits, prompt_rows, results)
        return self._unorder(order, results)

    @staticmethod
    def _unorder(order: list[int], results: list[StepResult]) -> list[StepResult]:
        unordered = [None] * len(results)
        for k, i in enumerate(order):
            unordered[i] = results[k]
        return unordered

    def _sample(self, items, logits, sample_rows, results) -> None:
        if not sample_rows:
            return
        ks = list(sample_rows)
        if all(items[k].seq.sampling_params.plain_greedy for k in ks):  # the common fast path
            tokens = logits[[sample_rows[k] for k in ks]].argmax(dim=-1).tolist()
            for k, t in zip(ks, tokens):
                results[k].token_id = t
            return
        requests = []
        for k in ks:
            seq = items[k].seq
            p = seq.sampling_params
            gen = None
            if p.seed is not None and not p.greedy:
                gen = self.generators.get(seq.seq_id)
                if gen is None:
                    gen = self.generators[seq.seq_id] = torch.Generator(device=self.device)
                    gen.manual_seed(p.seed)
            blocked = []
            if len(seq.output_token_ids) < p.min_tokens:  # stop tokens may not end it yet
                blocked = list(p.stop_token_ids) + ([] if p.ignore_eos else self.eos_token_ids)
            requests.append(SampleRequest(p, seq.prompt_token_ids, seq.output_token_ids, gen, blocked))
        out = self.sampler(logits[[sample_rows[k] for k in ks]], requests)
        tokens = out.token_ids.tolist()
        chosen = out.logprobs.tolist() if out.logprobs is not None else None
        top_ids = out.top_ids.tolist() if out.top_ids is not None else None
        top_lps = out.top_logprobs.tolist() if out.top_logprobs is not None else None
        for j, k in enumerate(ks):
            results[k].token_id = tokens[j]
            n = items[k].seq.sampling_params.logprobs
            if n is not None:
                top = list(zip(top_ids[j][:n], top_lps[j][:n])) if n and top_ids else []
                results[k].logprobs = TokenLogprobs(tokens[j], chosen[j], top)

    def _prompt_logprobs(self, items, logits, prompt_rows, results) -> None:
        for k, (first, positions) in prompt_rows.items():
            seq = items[k].seq
            n = seq.sampling_params.prompt_logprobs
            lp = logits[first:first + len(positions)].log_softmax(dim=-1)
            targets = torch.tensor([seq.token_at(p + 1) for p in positions], device=lp.device)
            chosen = lp.gather(1, targets[:, None])[:, 0].tolist()
            top_v, top_i = lp.topk(n, dim=-1) if n else (None, None)
            entries = []
            for j, p in enumerate(positions):
                top = list(zip(top_i[j].tolist(), top_v[j].tolist())) if n else []
                entries.append(TokenLogprobs(seq.token_at(p + 1), chosen[j], top))
            results[k].prompt_logprobs = entries
            results[k].prompt_logprobs_start = positions[0] + 1

    # ---- CUDA graphs for decode steps --------------------------------------------------------------
    GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)

    def _decode_metadata(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(slot_mapping=self.g_slots[:bs], prefill_query_lens=[], prefill_context_lens=[],
                                 prefill_block_tables=None, decode_block_tables=self.g_tables[:bs],
                                 decode_seq_lens=self.g_lens[:bs], max_decode_seq_len=self.max_model_len)

    @torch.inference_mode()
    def _capture_decode_graphs(self) -> None:
        """Capture one decode step (forward and LM head) per batch size of a ladder. The graphs read
        static input buffers; rows past the real batch are padding that writes to the scratch block."""
        sizes = [b for b in self.GRAPH_BATCH_SIZES if b <= self.config.max_num_seqs] or [1]
        max_bs, dev = max(sizes), self.device
        self.g_ids = torch.zeros(max_bs, dtype=torch.long, device=dev)
        self.g_pos = torch.zeros(max_bs, dtype=torch.long, device=dev)
        self.g_slots = torch.full((max_bs,), self.scratch_block * self.block_size, dtype=torch.long, device=dev)
        self.g_tables = torch.full((max_bs, self.max_blocks_per_seq), self.scratch_block, dtype=torch.int32,
                                   device=dev)
        self.g_lens = torch.ones(max_bs, dtype=torch.int32, device=dev)
        self.h_rows = torch.zeros(4, max_bs, dtype=torch.long, pin_memory=True)  # host staging
        self.h_table = torch.zeros(max_bs, self.max_blocks_per_seq, dtype=torch.int32, pin_memory=True)
        pool = None
        for bs in sorted(sizes, reverse=True):
            attn = self._decode_metadata(bs)
            for _ in range(2):  # warm up: Triton compiles and tunes outside the capture
                self.model.compute_logits(self.model.forward_step(self.g_ids[:bs], self.g_pos[:bs], attn,
                                                                  self.kv_caches))
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = self.model.compute_logits(self.model.forward_step(self.g_ids[:bs], self.g_pos[:bs],
                                                                           attn, self.kv_caches))
            pool = graph.pool()
            self.graphs[bs] = (graph, logits)
        torch.cuda.synchronize()
        logger.info("captured CUDA graphs for decode batch sizes %s", sorted(sizes))

    def _replay_decode_graph(self, input_ids, positions, slots, tables, lens) -> torch.Tensor:
        """Fill the static buffers (padding rows point at the scratch block) and replay; returns the
        logits of the real rows."""
        n = len(input_ids)
        bs = min(b for b in self.graphs if b >= n)
        rows = self.h_rows.numpy()
        rows[:, :bs] = ((0,), (0,), (self.scratch_block * self.block_size,), (1,))
        rows[0, :n], rows[1, :n], rows[2, :n], rows[3, :n] = input_ids, positions, slots, lens
        table = self.h_table.numpy()
        table[:bs] = self.scratch_block
        for i, t in enumerate(tables):
            table[i, :len(t)] = t
        for static, k in ((self.g_ids, 0), (self.g_pos, 1), (self.g_slots, 2)):
            static[:bs].copy_(self.h_rows[k, :bs], non_blocking=True)
        self.g_lens[:bs].copy_(self.h_rows[3, :bs], non_blocking=True)
        self.g_tables[:bs].copy_(self.h_table[:bs], non_blocking=True)
        graph, logits = self.graphs[bs]
        graph.replay()
        return logits[:n]

    def release(self, seq_id: int) -> None:
        """Forget per-sequence state (its seeded generator) once the sequence is done."""
        self.generators.pop(seq_id, None)
