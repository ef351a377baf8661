"""The model runner: the only owner of the model, the paged latent cache, the CUDA graphs and the
sampler. A step is three calls: `prepare_inputs` turns the scheduled batch into flat host lists
(tokens, positions, slot mapping, block tables, which rows need logits), `forward` runs the model
(replaying a captured CUDA graph for a decode-only batch, and the piecewise graphs of
engine/piecewise.py around eager prefill attention for a step that holds prefills) and returns the logits of
those rows, and `sample` turns them into tokens and logprobs. A step whose prompt chunks are few
tokens runs them as rows of the decode graph, each token a query over its own causal context in
absorbed form (absorbs_prefill).

On rank 0 a step is `launch` (those three calls, the sampling left on the device where it needs
nothing of the host: SamplingParams.samples_on_device) and `collect` (its StepResults, once the tokens
reach the host). Between the two, the engine may `launch_next`: the next step, its decode rows' input
tokens the ones just sampled, still on the device, so that the device runs it while the host handles
the tokens before (asynchronous scheduling, llm_engine.py).

Each layer's cache is one tensor [num_blocks, block_size, kv_lora_rank + qk_rope_head_dim]
holding the normalised latent c_kv and the rotated k_pe of every cached token, nothing else; with
kv_cache_dtype "fp8" a uint8 tensor whose rows are those values in e4m3 plus the row's fp32 scale
(4 more bytes: kernels/fp8.py), about half the bytes of bf16.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from ..config import EngineConfig, ModelArgs
from ..kernels.fp8 import cache_width
from ..model import AttentionMetadata, DeepseekV2ForCausalLM
from ..parallel import SINGLE, TensorParallel
from .sampler import Sampler, TokenLogprobs, on_device
from .piecewise import PiecewiseSteps
from .scheduler import ScheduledSequence, SchedulerOutput

logger = logging.getLogger("deepseek_v2")


@dataclass
class StepResult:
    token_id: int | None = None  # the sampled token, when this step reached the sequence's end
    logprobs: TokenLogprobs | None = None
    prompt_logprobs: list[TokenLogprobs] | None = None  # for prompt positions computed this step
    prompt_logprobs_start: int = 0  # prompt index of the first entry


EMPTY = np.zeros(0, dtype=np.int64)


@dataclass
class ForwardInputs:
    """What the model's forward over one step needs, on the host: int64 arrays and lists, the same on
    every tensor-parallel rank (rank 0 makes them and sends them to the others). The T flat tokens are
    the prefill sequences' then the decode tokens."""

    input_ids: np.ndarray = field(default_factory=lambda: EMPTY)  # [T]
    positions: np.ndarray = field(default_factory=lambda: EMPTY)  # [T]
    slots: np.ndarray = field(default_factory=lambda: EMPTY)  # [T] cache slot of every token
    prefill_query_lens: list[int] = field(default_factory=list)
    prefill_key_lens: list[int] = field(default_factory=list)  # cached + new tokens
    prefill_key_slots: np.ndarray = field(default_factory=lambda: EMPTY)  # the cache slots of every prefill context
    # The rows that attend in absorbed form, one query each over its own causal context (the decode
    # tokens, and the tokens of prompt chunks run in that form: ModelRunner.absorbs_prefill):
    decode_tables: list[list[int]] = field(default_factory=list)  # the block table of each one's sequence
    decode_rows: list[int] = field(default_factory=list)  # how many consecutive rows each table serves
    decode_lens: np.ndarray = field(default_factory=lambda: EMPTY)  # [rows] context length, the row's token included
    logit_rows: list[int] = field(default_factory=list)  # flat rows whose logits are needed, in order
    decode_only: bool = True  # every row a decode token of its own sequence, no prompt logprobs

    @property
    def all_absorbed(self) -> bool:
        """No row needs the expanded prefill path: a captured whole-step graph may run the step."""
        return not self.prefill_query_lens


@dataclass
class StepInputs:
    """One step on rank 0: the forward's inputs and where the logits go. items are the scheduled
    sequences, prefills first, then decodes, then the decodes whose input is on the device (a step
    launched ahead); item k is sched.scheduled[order[k]]."""

    items: list[ScheduledSequence]
    order: list[int]
    forward: ForwardInputs = field(default_factory=ForwardInputs)
    sample_rows: dict[int, int] = field(default_factory=dict)  # item -> its row among the logits
    prompt_rows: dict[int, tuple[int, list[int]]] = field(default_factory=dict)  # item -> (first row, positions)

    @property
    def scheduled(self) -> list[ScheduledSequence]:
        """The items in the scheduler's order (collect's results come in it)."""
        out = [None] * len(self.items)
        for k, i in enumerate(self.order):
            out[i] = self.items[k]
        return out


@dataclass
class LaunchedStep:
    """A step queued on the device; `ModelRunner.collect` gives its StepResults. Either sampled on the
    host already (results), or sampled on the device (tokens: one per item that samples, in step.items
    order) with a copy to the host under way (host_tokens, done when `ready` is)."""

    step: StepInputs
    results: list[StepResult] | None = None
    tokens: torch.Tensor | None = None
    host_tokens: torch.Tensor | None = None
    ready: torch.cuda.Event | None = None


# A step whose prompt chunks are short may run them in absorbed form, as rows of the decode graph
# (each token a query over its own causal context: ModelRunner.absorbs_prefill), so that the whole
# step is one CUDA graph replay instead of the piecewise graphs around eager prefill attention. Measured on an
# H200 at the V2-Lite shape beside 256 decodes at 1K context (scripts/profile_mixed_step.py; the
# absorbed figures taken after the torch profiler had run, which slows launches: docs/benchmarks.md):
# a 48-token prompt 18.9 ms against 21.5 piecewise, a 200-token one 1.3 ms slower than piecewise (the
# graph's rows all pay the LM head and the padding to the next graph size; the piecewise step's eager
# attention costs ~3 ms whatever its size), so at most this many prompt tokens a step:
ABSORBED_PREFILL_MAX_TOKENS = 64
# The absorbed form reads each token's whole context from the cache and attends over the latent (512 +
# 64 dims per head against the expanded form's 192): a chunk after a long cached prefix (a chat's next
# turn) pays while its reads, q * (cached + (q + 1) / 2) latent rows, times the heads, stay under this
# (64 tokens after ~8K cached at 16 heads, after ~1K at 128).
ABSORBED_PREFILL_ROW_HEADS = 2**23
# Decode graphs are captured up to this many rows beyond max_num_seqs, for such prompt chunks beside a
# full batch of decodes (at most the ladder's top, GRAPH_BATCH_SIZES).
PROMPT_ROWS_IN_GRAPHS = 512


def engine_max_model_len(config: EngineConfig, args: ModelArgs) -> int:
    """The context length the engine serves: the configured one, at most the model's."""
    return min(config.max_model_len or args.max_position_embeddings, args.max_position_embeddings)


def cache_bytes_per_token(model: DeepseekV2ForCausalLM, dtype: torch.dtype) -> int:
    """Latent cache bytes per token over all layers, for a cache of `dtype` (torch.uint8: FP8)."""
    a = model.args
    value_bytes = torch.tensor([], dtype=dtype).element_size()
    return a.num_hidden_layers * cache_width(a.kv_cache_dim, dtype == torch.uint8) * value_bytes


class ModelRunner:
    def __init__(self, model: DeepseekV2ForCausalLM, config: EngineConfig, max_model_len: int,
                 tp: TensorParallel = SINGLE, control=None, graphs: bool = True):
        """tp and control: this rank's place in a tensor-parallel engine and rank 0's channel to the
        others (engine/workers.py); graphs=False: no CUDA graphs (collectives that cannot be captured)."""
        self.tp, self.control = tp, control
        self.device = model.device
        kernels = config.kernels
        if kernels == "auto":
            kernels = "triton" if self.device.type == "cuda" else "reference"
        if kernels == "reference" and self.device.type == "cuda" and not config.enforce_eager:
            raise ValueError("kernels='reference' cannot run in CUDA graphs (it reads expert counts on the "
                             "host): also set enforce_eager")
        self.model = model.eval().fuse_for_inference().use_kernels(kernels)
        gpu_memory = torch.cuda.get_device_properties(self.device).total_memory if self.device.type == "cuda" else None
        self.config = config = config.sized_for(gpu_memory)  # the batch budgets left to default, for this device
        self.dtype = model.dtype
        self.cache_dtype = torch.uint8 if config.kv_cache_dtype == "fp8" else self.dtype  # uint8: FP8 rows
        self.block_size = config.block_size
        self.max_model_len = max_model_len
        self.num_blocks = self._size_cache()
        # One block more than the block manager hands out: a scratch block that the padding rows
        # of a CUDA-graph batch write into.
        self.scratch_block = self.num_blocks
        self.kv_caches = self._allocate_cache(self.num_blocks + 1)
        self.max_blocks_per_seq = -(-max_model_len // self.block_size)
        self.sampler = Sampler(self.device, config.seed)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.piecewise: PiecewiseSteps | None = None  # steps holding prefills, cut at attention
        # The most rows a step whose prompt chunks run absorbed may hold (absorbs_prefill): the largest
        # decode graph; 0 (never) without graphs, where the absorbed form saves no launches (tests set it).
        self.absorbed_prefill_max_rows = 0
        if self.device.type == "cuda" and not config.enforce_eager and graphs:
            self._capture_decode_graphs()
            self.absorbed_prefill_max_rows = max(self.graphs)
            self.piecewise = self.piecewise_steps(capture=True)
        if self.device.type == "cuda":
            self._warm_up_steps()
            torch.cuda.synchronize()

    def piecewise_steps(self, capture: bool) -> PiecewiseSteps:
        """The piecewise graphs for this runner's cache and limits (capture=False: the same pieces run
        eagerly, as CPU tests run them)."""
        c = self.config
        return PiecewiseSteps(self.model, self.kv_caches, self.block_size, self.scratch_block,
                              c.max_num_batched_tokens, c.max_num_seqs, self.max_model_len, capture=capture)

    # ---- cache sizing -----------------------------------------------------------------------------
    def _size_cache(self) -> int:
        per_block = cache_bytes_per_token(self.model, self.cache_dtype) * self.block_size
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
        if self.control is not None:  # the cache is replicated: every rank holds as many blocks as the smallest
            num_blocks = self.control.agree_min(num_blocks)

        if num_blocks <= 0:
            raise RuntimeError(f"no memory left for the latent cache (budget {budget / 2**30:.2f} GiB); "
                               "raise gpu_memory_utilization or the CPU cache budget, or set num_kv_blocks")
        return num_blocks

    def _allocate_cache(self, num_blocks: int) -> list[torch.Tensor]:
        """One zeroed [num_blocks, block_size, width] tensor per layer (width: kernels/fp8.cache_width)."""
        a = self.model.args
        width = cache_width(a.kv_cache_dim, self.cache_dtype == torch.uint8)
        return [torch.zeros(num_blocks, self.block_size, width, dtype=self.cache_dtype, device=self.device)
                for _ in range(a.num_hidden_layers)]

    @torch.inference_mode()
    def _profile_peak_memory(self) -> None:
        """Run one prefill step of max_num_batched_tokens tokens (prompts of at most max_model_len, as
        the scheduler may admit them) to measure the activation peak."""
        lens = self._split_prompts(self.config.max_num_batched_tokens)
        n = sum(lens)
        cache = self._allocate_cache(-(-n // self.block_size))
        ids = torch.zeros(n, dtype=torch.long, device=self.device)
        pos = torch.from_numpy(np.concatenate([np.arange(k) for k in lens])).to(self.device)
        slots = torch.arange(n, device=self.device)
        cu = torch.tensor(np.cumsum([0] + lens), dtype=torch.int32, device=self.device)
        attn = AttentionMetadata(slot_mapping=slots, prefill_query_lens=lens, prefill_key_lens=lens,
                                 prefill_key_slots=slots, prefill_cu_query=cu, prefill_cu_key=cu,
                                 decode_block_tables=None, decode_seq_lens=None)
        hidden = self.model.forward_step(ids, pos, attn, cache)
        self.model.compute_logits(hidden[-min(n, self.config.max_num_seqs):])
        del cache, hidden
        torch.cuda.synchronize()

    def _split_prompts(self, tokens: int) -> list[int]:
        """`tokens` prompt tokens as whole prompts of at most max_model_len, the last one shorter."""
        full, rest = divmod(tokens, self.max_model_len)
        return [self.max_model_len] * full + ([rest] if rest else [])

    @torch.inference_mode()
    def _warm_up_steps(self) -> None:
        """Run steps of the shapes that neither the memory profile nor the graph capture ran. Triton
        compiles a kernel anew for each pattern of its integer arguments (equal to 1, a multiple of 16,
        other), so the first step of such a shape would compile in the middle of traffic: on a fresh
        H200 five kernels did (the MoE's alignment and GEMMs at an odd token count, the decode attention
        of steps holding prefills, whose block tables' width is any), and the p99 time to first token
        at 20 requests/s was 2.3 s instead of 0.14 (docs/benchmarks.md, "Start-up")."""
        c, bs = self.config, self.block_size
        context = min(self.max_model_len, c.max_num_batched_tokens)
        # an eager step of an odd token count beside a few decodes at a long context; then, within the
        # piecewise graphs where there are any, a short prompt beside few or many decodes at one and
        # three blocks of context: their attention in one split or several (the decode kernel takes
        # the split count and the tables' width unspecialised, so only one split or several matters
        # to it now; these four were measured together with that: no compile while serving)
        steps = [(c.max_num_batched_tokens - 4, 3, context, 0)]
        steps += [(17, decodes, length, 0) for decodes in (3, max(1, c.max_num_seqs - 1) | 1)
                  for length in (min(bs, context), min(3 * bs - 1, context))]
        # a chunk after a long cached context (a long prompt's third chunk): launches chosen by the count
        # of keys compile here, not at the first long request (prefill attention reads K and V through
        # TMA from 16K keys on Hopper)
        steps.append((17, 0, 1, min(self.max_model_len - 17, 2 * c.max_num_batched_tokens)))
        for prompt_tokens, decodes, decode_len, cached in steps:
            if prompt_tokens >= 2 and cached >= 0:
                self.forward(self._dummy_step(self._split_prompts(prompt_tokens), decodes, decode_len, cached))

    def _dummy_step(self, prompt_lens: list[int], decodes: int, decode_len: int, cached: int = 0) -> ForwardInputs:
        """A step of prompts of these lengths, each after `cached` tokens already in the cache (whole
        prompts by default), and `decodes` decode tokens at context decode_len, over arbitrary cache
        slots (at start-up, before any sequence owns one); the logits of each sequence's last row."""
        capacity = self.num_blocks * self.block_size
        f = ForwardInputs(prefill_query_lens=prompt_lens, prefill_key_lens=[n + cached for n in prompt_lens],
                          decode_only=False)
        written = np.arange(sum(prompt_lens)) % capacity  # the new tokens' slots, as f.slots has them below
        context = (np.arange(cached) + sum(prompt_lens)) % capacity
        f.prefill_key_slots = np.concatenate([np.concatenate([context, new]) for new in
                                              np.split(written, np.cumsum(prompt_lens)[:-1])])
        table = (np.arange(-(-decode_len // self.block_size)) % self.num_blocks).tolist()
        f.decode_tables, f.decode_rows = [table] * decodes, [1] * decodes
        f.decode_lens = np.full(decodes, decode_len, dtype=np.int64)
        positions = [np.arange(cached, cached + n) for n in prompt_lens] + [f.decode_lens - 1]
        f.positions = np.concatenate(positions)
        f.input_ids = np.zeros(len(f.positions), dtype=np.int64)
        f.slots = np.arange(len(f.positions)) % capacity
        f.logit_rows = (np.cumsum(prompt_lens) - 1).tolist() + list(range(sum(prompt_lens), len(f.positions)))
        return f

    # ---- one step ---------------------------------------------------------------------------------
    def _block_table_tensor(self, tables: list[list[int]], rows: list[int]) -> torch.Tensor:
        """[sum(rows), width] int32: table i repeated for its rows[i] rows, zero-padded."""
        width = max((len(t) for t in tables), default=1) or 1
        array = np.zeros((len(tables), width), dtype=np.int32)
        for i, t in enumerate(tables):
            array[i, :len(t)] = t
        if len(rows) != len(array) or any(r != 1 for r in rows):
            array = np.repeat(array, rows, axis=0)
        return torch.from_numpy(array).to(self.device, non_blocking=True)

    def launch(self, sched: SchedulerOutput) -> LaunchedStep:
        """Queue one step (on rank 0): its forward, and its sampling where that needs nothing of the host."""
        step = self.prepare_inputs(sched)
        self.sampler.prepare([step.items[k].seq for k in step.sample_rows])  # overlaps with the forward
        if self.control is not None:
            self.control.send(step.forward)  # the other ranks run the same forward
        return self._sample_launched(step, self.forward(step.forward))

    def launch_next(self, prev: LaunchedStep, items: list[ScheduledSequence], token_rows: list[int]) -> LaunchedStep:
        """The step of `items` after `prev` (sampled on the device), queued before prev's tokens reach the
        host (ScheduledSequence.ahead: the positions prev computes). The inputs of the items that
        reads_device_token are prev's tokens token_rows, in their order among the items, read on the
        device. The caller has made room for the positions in the block tables."""
        step = self.prepare_inputs(SchedulerOutput(items))
        self.sampler.prepare([step.items[k].seq for k in step.sample_rows])
        ids = None
        if token_rows:
            same = token_rows == list(range(len(prev.tokens)))
            ids = prev.tokens if same else prev.tokens[on_device(token_rows, self.device)]
        return self._sample_launched(step, self.forward(step.forward, device_ids=ids))

    def collect(self, launched: LaunchedStep) -> list[StepResult]:
        """Wait for a launched step; one StepResult per scheduled sequence, in the scheduler's order."""
        if launched.results is not None:
            return launched.results
        if launched.ready is not None:
            launched.ready.synchronize()
        results = [StepResult() for _ in launched.step.items]
        for k, token in zip(launched.step.sample_rows, launched.host_tokens.tolist()):
            results[k].token_id = token
        unordered = [None] * len(results)
        for k, i in enumerate(launched.step.order):
            unordered[i] = results[k]
        return unordered

    def _sample_launched(self, step: StepInputs, logits: torch.Tensor | None) -> LaunchedStep:
        """Sample on the device, the tokens copied to the host without waiting, when some item samples,
        none wants prompt logprobs and every one that samples needs nothing of the host; else sample
        now, as `sample` does."""
        seqs = [step.items[k].seq for k in step.sample_rows]  # the logits' rows, in order
        if not seqs or step.prompt_rows or not all(s.sampling_params.samples_on_device for s in seqs):
            return LaunchedStep(step, results=self.sample(step, logits))
        tokens = self.sampler.pick(logits, seqs)  # no mask nor penalty to apply
        if self.device.type != "cuda":
            return LaunchedStep(step, tokens=tokens, host_tokens=tokens)
        host = tokens.to("cpu", non_blocking=True)  # into pinned memory; read after `ready`
        ready = torch.cuda.Event()
        ready.record()
        return LaunchedStep(step, tokens=tokens, host_tokens=host, ready=ready)

    def serve(self) -> None:
        """The loop of a tensor-parallel rank other than 0: run each step rank 0 sends, until it says stop."""
        while (inputs := self.control.receive()) is not None:
            self.forward(inputs)

    def absorbs_prefill(self, items: list[ScheduledSequence]) -> bool:
        """Whether this step runs its prompt chunks in absorbed form, as decode rows (see
        ABSORBED_PREFILL_MAX_TOKENS): it has some, few tokens in all, it fits the largest decode graph,
        and their reads of the cache are small."""
        if len(items) > self.absorbed_prefill_max_rows:  # (also: no graphs, where the bound is 0)
            return False
        chunks = [(item.seq.num_computed_tokens, item.num_new_tokens) for item in items if item.num_new_tokens > 1]
        if (not chunks or sum(q for _, q in chunks) > ABSORBED_PREFILL_MAX_TOKENS
                or sum(item.num_new_tokens for item in items) > self.absorbed_prefill_max_rows):
            return False
        heads = self.model.model.layers[0].self_attn.num_heads
        return heads * sum(q * (start + (q + 1) / 2) for start, q in chunks) <= ABSORBED_PREFILL_ROW_HEADS

    def prepare_inputs(self, sched: SchedulerOutput) -> StepInputs:
        """The step's flat inputs, on the host: array code per prefill sequence, a few list appends per
        decode token."""
        scheduled = sched.scheduled
        order = sorted(range(len(scheduled)),
                       key=lambda i: (scheduled[i].num_new_tokens == 1, scheduled[i].reads_device_token))
        step = StepInputs([scheduled[i] for i in order], order)  # prefills, decodes, decodes reading the device
        f, bs = step.forward, self.block_size
        # (prefills come first: a decode-only step, the common one, is told by its first item)
        absorbed = bool(step.items) and step.items[0].num_new_tokens > 1 and self.absorbs_prefill(step.items)
        prefill_ids, key_slots, decode_ids, decode_pos, decode_slots = [], [], [], [], []
        offset = 0
        for k, item in enumerate(step.items):
            seq, n = item.seq, item.num_new_tokens
            start = seq.num_computed_tokens + item.ahead
            table = seq.block_table
            if n == 1:
                decode_ids.append(0 if item.reads_device_token else seq.token_at(start))  # 0: read on the device
                decode_pos.append(start)
                decode_slots.append(table[start // bs] * bs + start % bs)
                f.decode_tables.append(table)
                f.decode_rows.append(1)
            elif absorbed:  # n decode rows at positions start .. start + n - 1
                positions = np.arange(start, start + n)
                decode_ids.extend(seq.tokens_slice(start, start + n))
                decode_pos.extend(positions.tolist())
                decode_slots.extend((np.asarray(table)[positions // bs] * bs + positions % bs).tolist())
                f.decode_tables.append(table)
                f.decode_rows.append(n)
            else:
                context = np.arange(start + n)  # the whole context: cached prefix, then the new tokens
                key_slots.append(np.asarray(table)[context // bs] * bs + context % bs)
                prefill_ids.append(seq.tokens_slice(start, start + n))
                f.prefill_query_lens.append(n)
                f.prefill_key_lens.append(start + n)
            if seq.sampling_params.prompt_logprobs is not None and start < seq.num_prompt_tokens - 1:
                last = min(start + n, seq.num_prompt_tokens - 1)  # logits at p score token p + 1
                step.prompt_rows[k] = (len(f.logit_rows), list(range(start, last)))
                f.logit_rows += range(offset, offset + last - start)
            if item.samples:
                step.sample_rows[k] = len(f.logit_rows)
                f.logit_rows.append(offset + n - 1)
            offset += n
        decode_ids, decode_pos, decode_slots = (np.asarray(x, dtype=np.int64) for x in (decode_ids, decode_pos,
                                                                                       decode_slots))
        f.decode_lens = decode_pos + 1
        if key_slots:
            new = [slots[-q:] for slots, q in zip(key_slots, f.prefill_query_lens)]  # the new tokens' slots
            f.prefill_key_slots = np.concatenate(key_slots)
            f.input_ids = np.concatenate([np.asarray(ids, dtype=np.int64) for ids in prefill_ids] + [decode_ids])
            f.positions = np.concatenate([np.arange(k - q, k) for q, k in zip(f.prefill_query_lens, f.prefill_key_lens)]
                                         + [decode_pos])
            f.slots = np.concatenate(new + [decode_slots])
        else:
            f.input_ids, f.positions, f.slots = decode_ids, decode_pos, decode_slots
        f.decode_only = len(decode_ids) == len(step.items) and not step.prompt_rows  # one row per item, each a decode
        return step

    @torch.inference_mode()
    def forward(self, f: ForwardInputs, device_ids: torch.Tensor | None = None) -> torch.Tensor | None:
        """The model over the step's tokens; returns the logits [len(f.logit_rows), V] (None when no
        row needs them). A decode-only batch replays the captured graph of its size. device_ids: the
        input tokens of the last rows, already on the device (the decodes of a step launched ahead), in
        place of theirs in f.input_ids."""
        dev = self.device

        def device_array(x, dtype=torch.long):
            return on_device(x, dev, dtype)

        if f.all_absorbed and self.graphs and len(f.input_ids) <= max(self.graphs):
            logits = self._replay_decode_graph(f, device_ids)
            if not f.logit_rows:
                return None
            if len(f.logit_rows) == len(logits) and f.logit_rows[-1] == len(logits) - 1:
                return logits  # every row (the rows are increasing)
            return logits[device_array(f.logit_rows)]

        prefills = bool(f.prefill_query_lens)
        pieces = self.piecewise if self.piecewise is not None and len(f.input_ids) <= self.piecewise.max_tokens else None
        # the piecewise graphs take the slots, and the decode rows that fit their window, from the host
        eager_decodes = bool(len(f.decode_lens)) and (pieces is None or not pieces.takes_decodes(len(f.input_ids),
                                                                                          len(f.decode_lens)))
        attn = AttentionMetadata(
            slot_mapping=None if pieces else device_array(f.slots),
            prefill_query_lens=f.prefill_query_lens, prefill_key_lens=f.prefill_key_lens,
            prefill_key_slots=device_array(f.prefill_key_slots) if prefills else None,
            prefill_cu_query=device_array(np.cumsum([0] + f.prefill_query_lens), torch.int32) if prefills else None,
            prefill_cu_key=device_array(np.cumsum([0] + f.prefill_key_lens), torch.int32) if prefills else None,
            decode_block_tables=self._block_table_tensor(f.decode_tables, f.decode_rows) if eager_decodes else None,
            decode_seq_lens=device_array(f.decode_lens, torch.int32) if eager_decodes else None,
            max_decode_seq_len=int(f.decode_lens.max(initial=0)))
        if pieces:
            hidden = pieces.run(f.input_ids, f.positions, f.slots, attn, f.decode_tables, f.decode_rows, f.decode_lens,
                                device_ids)
        else:
            ids = device_array(f.input_ids)
            if device_ids is not None:
                ids[len(ids) - len(device_ids):] = device_ids
            hidden = self.model.forward_step(ids, device_array(f.positions), attn, self.kv_caches)
        if not f.logit_rows:
            return None
        return self.model.compute_logits(hidden[device_array(f.logit_rows)])

    def sample(self, step: StepInputs, logits: torch.Tensor | None) -> list[StepResult]:
        """Tokens for the rows that sample and prompt logprobs for the rows that want them, as
        StepResults in the scheduler's order."""
        results = [StepResult() for _ in step.items]
        if step.sample_rows:
            ks = list(step.sample_rows)
            rows = [step.sample_rows[k] for k in ks]
            picked = logits if rows == list(range(logits.shape[0])) else logits[rows]  # no copy if all sample
            sampled = self.sampler(picked, [step.items[k].seq for k in ks])
            for k, token in zip(ks, sampled):
                results[k].token_id, results[k].logprobs = token.token_id, token.logprobs
        for k, (first, positions) in step.prompt_rows.items():
            results[k].prompt_logprobs = self.sampler.prompt_logprobs(
                logits[first:first + len(positions)], step.items[k].seq, positions)
            results[k].prompt_logprobs_start = positions[0] + 1
        unordered = [None] * len(results)
        for k, i in enumerate(step.order):
            unordered[i] = results[k]
        return unordered

    # ---- CUDA graphs for decode steps --------------------------------------------------------------
    GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512, 640, 768,
                         896, 1024)

    def _decode_metadata(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(slot_mapping=self.g_slots[:bs], prefill_query_lens=[], prefill_key_lens=[],
                                 prefill_key_slots=None, prefill_cu_query=None, prefill_cu_key=None,
                                 decode_block_tables=self.g_tables[:bs],
                                 decode_seq_lens=self.g_lens[:bs], max_decode_seq_len=self.max_model_len)

    @torch.inference_mode()
    def _capture_decode_graphs(self) -> None:
        """Capture one decode step (forward and LM head) per batch size of a ladder, up to max_num_seqs
        plus room for short prompt chunks (PROMPT_ROWS_IN_GRAPHS). The graphs read static input buffers;
        rows past the real batch are padding that writes to the scratch block."""
        c = self.config
        rows = min(c.max_num_seqs + PROMPT_ROWS_IN_GRAPHS, max(c.max_num_batched_tokens, c.max_num_seqs))
        sizes = [b for b in self.GRAPH_BATCH_SIZES if b <= rows] or [1]
        max_bs, dev = max(sizes), self.device
        self.g_ids = torch.zeros(max_bs, dtype=torch.long, device=dev)
        self.g_pos = torch.zeros(max_bs, dtype=torch.long, device=dev)
        self.g_slots = torch.full((max_bs,), self.scratch_block * self.block_size, dtype=torch.long, device=dev)
        self.g_tables = torch.full((max_bs, self.max_blocks_per_seq), self.scratch_block, dtype=torch.int32,
                                   device=dev)
        self.g_lens = torch.ones(max_bs, dtype=torch.int32, device=dev)
        # host staging, two sets used in turn: a step's copies from one may still be queued on the
        # device when the next step (launched ahead) fills the other
        self.h_rows = [torch.zeros(4, max_bs, dtype=torch.long, pin_memory=True) for _ in range(2)]
        self.h_table = [torch.zeros(max_bs, self.max_blocks_per_seq, dtype=torch.int32, pin_memory=True)
                        for _ in range(2)]
        self.h_turn = 0
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

    def _replay_decode_graph(self, f: ForwardInputs, device_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Fill the static buffers (padding rows point at the scratch block) and replay; returns the
        logits of the real rows. device_ids: the input tokens of the last rows, on the device."""
        n = len(f.input_ids)
        bs = min(b for b in self.graphs if b >= n)
        h_rows, h_table = self.h_rows[self.h_turn], self.h_table[self.h_turn]
        self.h_turn ^= 1
        rows = h_rows.numpy()
        rows[:, :bs] = ((0,), (0,), (self.scratch_block * self.block_size,), (1,))
        rows[0, :n], rows[1, :n], rows[2, :n], rows[3, :n] = f.input_ids, f.positions, f.slots, f.decode_lens
        table = h_table.numpy()
        table[:bs] = self.scratch_block
        row = 0
        for t, r in zip(f.decode_tables, f.decode_rows):
            table[row:row + r, :len(t)] = t
            row += r
        for static, k in ((self.g_ids, 0), (self.g_pos, 1), (self.g_slots, 2)):
            static[:bs].copy_(h_rows[k, :bs], non_blocking=True)
        self.g_lens[:bs].copy_(h_rows[3, :bs], non_blocking=True)
        self.g_tables[:bs].copy_(h_table[:bs], non_blocking=True)
        if device_ids is not None:
            self.g_ids[n - len(device_ids):n].copy_(device_ids)
        graph, logits = self.graphs[bs]
        graph.replay()
        return logits[:n]

    def release(self, seq_id: int) -> None:
        """Forget per-sequence state (its seeded generator) once the sequence is done."""
        self.sampler.release(seq_id)
