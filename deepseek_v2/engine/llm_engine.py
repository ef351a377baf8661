"""The engine: requests in, streamed outputs out.

`add_request` checks a request against the engine's rules (`validate_request`, the only place they
live), then queues one sequence per sample. Each `step()` schedules a batch, has the model runner
run it (prepare inputs, forward, sample), then for every scheduled sequence advances its computed
tokens and, when a token was sampled, appends it, detokenizes incrementally, applies the stop
conditions and frees the sequence if it finished; it returns the outputs of the requests touched.

Asynchronous scheduling (`async_scheduling`): after a step whose tokens are sampled on the device,
the next step is launched before this step's tokens reach the host, as the scheduler would make it:
the sequences that sampled decode, their inputs read on the device, prompts being prefilled take
their next chunks, and waiting prompts are admitted (those whose tokens need nothing of the host);
the host does this step's bookkeeping while the device runs the next, and the next `step()` starts
from it.
What that costs: a sequence ended by a stop token or string computes one position for nothing (its
row is dropped), and requests added meanwhile join one step later.

A step that raises fails only the requests it ran: they are aborted (their blocks freed) and
`StepError` names them, so the engine serves on. Errors that leave the device or the tensor-parallel
group unusable (`is_fatal`) propagate as they are.
(About 440 lines: a request's life, from its checks through the step to its stop conditions and
streamed deltas, is one piece of bookkeeping; the model's side is model_runner.py, the processes'
workers.py.)"""

from __future__ import annotations

import atexit
import functools
import logging
import os
import time
from dataclasses import dataclass, replace

import torch

from ..config import DEFAULT_MODEL, EngineConfig
from ..model import DeepseekV2ForCausalLM
from ..outputs import CompletionOutput, RequestMetrics, RequestOutput
from ..sampling_params import SamplingParams
from ..tokenizer import IncrementalDetokenizer, Tokenizer
from .block_manager import BlockManager
from .model_runner import LaunchedStep, ModelRunner, StepResult, cache_bytes_per_token, engine_max_model_len
from .request_checks import RequestChecks
from .scheduler import ScheduledSequence, Scheduler
from .sequence import Sequence, SequenceStatus
from .workers import Control, ModelSource, WorkerError, Workers, start_model

logger = logging.getLogger("deepseek_v2")


class StepError(RuntimeError):
    """A step raised (an out-of-memory error, a bug in sampling, ...); the requests it ran were
    aborted and are listed in `request_ids`; the others and the engine are unharmed."""

    def __init__(self, request_ids: list[str], cause: BaseException):
        super().__init__(f"the engine step failed: {cause!r}")
        self.request_ids, self.cause = request_ids, cause

    def __reduce__(self):  # crosses an engine process's pipe; the cause as its text, whatever its type
        return StepError, (self.request_ids, RuntimeError(repr(self.cause)))


def is_fatal(error: BaseException) -> bool:
    """Whether an error from a step leaves the engine unable to serve: a tensor-parallel rank or
    collective failed (the ranks are out of step), or a device error other than running out of
    memory (an illegal address or a device-side assert poisons the CUDA context)."""
    if isinstance(error, WorkerError):
        return True
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return False
    return isinstance(error, getattr(torch, "AcceleratorError", ())) or "CUDA error" in str(error)


@dataclass
class SampleState:
    """Output bookkeeping of one sequence: detokenized text, stop handling, logprobs."""

    seq: Sequence
    detokenizer: IncrementalDetokenizer
    text: str = ""
    sent_text: int = 0  # characters already handed out as deltas
    sent_tokens: int = 0
    logprobs: list[dict[int, float]] | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    samples: list[SampleState]
    metrics: RequestMetrics
    prompt_logprobs: list[dict[int, float] | None] | None = None

    @property
    def finished(self) -> bool:
        for s in self.samples:  # (a loop, not all() over a generator: this runs for every token)
            if s.finish_reason is None:
                return False
        return True


LOAD_FORMATS = ("auto", "dummy")


class LLMEngine(RequestChecks):
    def __init__(self, model: DeepseekV2ForCausalLM, tokenizer: Tokenizer, config: EngineConfig | None = None,
                 workers: Workers | None = None, control: Control | None = None, graphs: bool = True):
        """model: the whole model, or rank 0's part of a tensor-parallel one whose other ranks are
        `workers`, reached through `control` (use from_pretrained / from_source to build those)."""
        self.model = model
        self.tokenizer = tokenizer
        self.config = config = config or EngineConfig()
        self.workers, self.control = workers, control
        self.max_model_len = engine_max_model_len(config, model.args)
        self.vocab_size = model.args.vocab_size
        if config.max_model_len and config.max_model_len > self.max_model_len:
            logger.warning("max_model_len %d is above the model's limit (max_position_embeddings %d); using %d",
                           config.max_model_len, self.max_model_len, self.max_model_len)
        self.runner = ModelRunner(model, config, self.max_model_len, tp=model.tp, control=control, graphs=graphs)
        self.config = config = self.runner.config  # with the batch budgets sized for the device
        blocks_per_seq = -(-self.max_model_len // config.block_size)
        if blocks_per_seq > self.runner.num_blocks:
            fit = self.runner.num_blocks * config.block_size
            logger.warning("max_model_len %d does not fit in the cache (%d tokens); lowering it to %d",
                           self.max_model_len, fit, fit)
            self.max_model_len = fit
        self.block_manager = BlockManager(self.runner.num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens,
                                   config.long_prefill_token_threshold, config.max_prefill_tokens_beside_decodes)
        self.requests: dict[str, Request] = {}
        self.num_prompt_tokens = 0  # totals for metrics
        self.num_generation_tokens = 0
        # the other tensor-parallel ranks get each step's inputs from the host (control): none launched ahead
        if config.async_scheduling == "on" and control is not None:
            raise ValueError("async_scheduling needs the engine in one process (tensor_parallel_size 1)")
        self.async_scheduling = control is None and (config.async_scheduling == "on" or (
            config.async_scheduling == "auto" and bool(self.runner.graphs)))
        self._ahead: LaunchedStep | None = None  # the decode step launched before the last one's tokens came
        self.num_steps_ahead = 0
        self.num_prompt_steps_ahead = 0  # of those, the steps that held prompt tokens
        self._log_memory()

    @classmethod
    def from_pretrained(cls, model: str | os.PathLike | None = None, dtype: str | torch.dtype = "auto",
                        device: str | None = None, load_format: str = "auto", **knobs) -> "LLMEngine":
        """Load a checkpoint (default: the shipped model) and build the engine; with
        tensor_parallel_size > 1 the other ranks are started on this node. load_format "dummy" (vLLM's
        name): random weights of the checkpoint's architecture, its tokenizer, no weight files read
        (benchmarks of a shape whose weights are not at hand)."""
        if load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format must be one of {', '.join(LOAD_FORMATS)}, got {load_format!r}")
        source = ModelSource(path=str(model or DEFAULT_MODEL))
        args = source.model_args()  # a missing or foreign directory is named before its tokenizer is looked for
        tokenizer = Tokenizer.from_pretrained(source.path)
        if load_format == "dummy":
            source = ModelSource(args=args)
        return cls.from_source(source, tokenizer, EngineConfig(**knobs), dtype, device)

    @classmethod
    def from_source(cls, source: ModelSource, tokenizer: Tokenizer, config: EngineConfig,
                    dtype: str | torch.dtype = "auto", device: str | None = None) -> "LLMEngine":
        """The engine over a model source, on one process or as rank 0 of a tensor-parallel group
        (engine/workers.py's start_model starts the other ranks, or joins those torchrun started)."""
        start = start_model(source, config, dtype, device)
        try:
            engine = cls(start.model, tokenizer, config, start.workers, start.control, graphs=start.graphs)
        except BaseException:
            if start.workers is not None:
                start.workers.close(None)
            raise
        if start.workers is not None:
            atexit.register(engine.close)
        return engine

    def close(self) -> None:
        """Stop the other tensor-parallel ranks (nothing to do on one process). Idempotent."""
        if self.workers is not None:
            workers, self.workers = self.workers, None
            workers.close(self.control)

    def _log_memory(self) -> None:
        a = self.model.args
        per_token = cache_bytes_per_token(self.model, self.runner.cache_dtype)
        tokens = self.runner.num_blocks * self.config.block_size
        fp8 = self.runner.cache_dtype == torch.uint8
        logger.info("latent cache (%s): %d blocks x %d tokens = %d tokens (%.2f GiB), %d bytes/token "
                    "(%d values/token/layer; a full per-head K/V cache would need %d, %.1fx more); "
                    "max_model_len %d, up to %.1f concurrent max-length sequences",
                    "fp8: e4m3 and one fp32 scale per token and layer" if fp8 else str(self.model.dtype)[6:],
                    self.runner.num_blocks, self.config.block_size, tokens, tokens * per_token / 2**30,
                    per_token, a.kv_cache_dim, a.mha_cache_dim, a.mha_cache_dim / a.kv_cache_dim,
                    self.max_model_len, tokens / self.max_model_len)
        if self.config.tensor_parallel_size > 1:
            logger.info("tensor parallel over %d ranks: rank 0 holds %d of %d heads and %s routed experts; the "
                        "latent cache is replicated on every rank (MLA's latent has a single head)",
                        self.config.tensor_parallel_size, self.model.model.layers[0].self_attn.num_heads,
                        a.num_attention_heads, self._experts_held() or "no")

    def _experts_held(self) -> str:
        for layer in self.model.model.layers:
            experts = getattr(layer.mlp, "experts", None)
            if experts is not None:
                return f"{experts.gate_up_proj.shape[0]} of {experts.num_experts}"
        return ""

    # ---- requests ---------------------------------------------------------------------------------
    @functools.cached_property
    def grammar_compiler(self):
        """RequestChecks' compiler, and the sampler's masks made from it."""
        from ..structured_outputs import GrammarMasks
        compiler = RequestChecks.grammar_compiler.func(self)
        self.runner.sampler.grammars = GrammarMasks(compiler)
        return compiler

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                    arrival_time: float | None = None) -> None:
        """Check the request (InvalidRequestError) and queue it."""
        params = params or SamplingParams()
        text, ids = self.encode_prompt(prompt, params)
        self.validate_request(ids, params)
        self.enqueue(request_id, text, ids, params, arrival_time)

    def enqueue(self, request_id: str, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams,
                arrival_time: float | None = None) -> None:
        """Queue a request that validate_request has passed: one sequence per sample."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if params.structured_outputs is not None:  # checked elsewhere (another process) or not: this
            self.grammar_compiler  # engine's sampler gets its grammar masks (made once, here if not yet)
        ids = prompt_token_ids
        now = time.monotonic() if arrival_time is None else arrival_time
        params.tokenize_bad_words(self.tokenizer)  # (done already where the request was checked, if it was)
        samples = []
        for i in range(params.n):
            p = params
            if params.n > 1 and params.seed is not None:  # distinct but reproducible samples
                p = replace(params, seed=params.seed + i)
            seq = Sequence(ids, p, request_id, i, now, eos_token_id=self.tokenizer.eos_token_id)
            detok = IncrementalDetokenizer(self.tokenizer, skip_special_tokens=params.skip_special_tokens)
            samples.append(SampleState(seq, detok, logprobs=[] if params.logprobs is not None else None,
                                       cumulative_logprob=0.0 if params.logprobs is not None else None))
            self.scheduler.add(seq)
        self.requests[request_id] = Request(request_id, prompt, ids, params, samples, RequestMetrics(now),
                                            prompt_logprobs=[None] if params.prompt_logprobs is not None else None)
        self.num_prompt_tokens += len(ids) * params.n

    def abort(self, request_id: str) -> bool:
        """Stop a request now and free its blocks. Returns False for an unknown request."""
        req = self.requests.get(request_id)
        if req is None:
            return False
        for s in req.samples:
            if s.finish_reason is None:
                self._finish(s, SequenceStatus.FINISHED_ABORTED)
        del self.requests[request_id]
        return True

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # ---- the step ---------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One step: the step launched ahead by the last call if there is one, else what the scheduler
        makes now; then, where it can, the next step is launched before this one's tokens reach the
        host (asynchronous scheduling: the device runs it while the host handles them); returns this
        step's outputs."""
        launched, self._ahead = self._ahead, None
        if launched is not None and not any(item.seq.status is SequenceStatus.RUNNING for item in launched.step.items):
            # every sequence in it finished or was aborted since it was launched: wait for it all the
            # same, so that the host buffers it was launched from are free for the steps after it
            self.runner.collect(launched)
            launched = None
        items: list[ScheduledSequence] = [] if launched is None else launched.step.scheduled  # (collect's order)
        try:
            if launched is None:
                sched = self.scheduler.schedule()
                if sched.is_empty:
                    return []
                if sched.preempted:
                    logger.warning("cache full: preempted %d sequence(s), they will be recomputed", len(sched.preempted))
                items = sched.scheduled
                launched = self._on_workers(self.runner.launch, sched)
            if self.async_scheduling:
                self._ahead = self._launch_next(launched)
            return self._process(items, self._on_workers(self.runner.collect, launched))  # (scheduler order)
        except Exception as e:
            self._drop_ahead()
            if is_fatal(e):
                raise
            # The step's sequences hold blocks for tokens that may never have been computed, and
            # some may have been advanced and others not: aborting their requests frees the blocks
            # and takes the sequences out of the scheduler, which leaves both consistent.
            failed = list(dict.fromkeys(item.seq.request_id for item in items))
            for request_id in failed:
                self.abort(request_id)
            raise StepError(failed, e) from e

    def _drop_ahead(self) -> None:
        """Forget the step launched ahead after a failure, once the device is done with it (as far as
        it can tell: a device in error raises again here, and the step's own error is the one to report)."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead.ready is not None:
            try:
                ahead.ready.synchronize()
            except Exception:
                pass

    def _on_workers(self, fn, *args):
        """fn(*args) on rank 0, checking the other ranks first and naming a rank that failed."""
        if self.workers is None:
            return fn(*args)
        self.workers.check()
        try:
            return fn(*args)
        except Exception as e:
            raise self.workers.explain(e) from e

    def _launch_next(self, launched: LaunchedStep) -> LaunchedStep | None:
        """Launch the step after `launched` now, as the scheduler would make it once launched's tokens
        are counted (Scheduler.schedule_ahead), when launched sampled on the device and that step needs
        nothing its tokens decide on the host. Its decodes read launched's tokens on the device. A
        sequence that launched's token ends by length is left out; one that it ends otherwise (a stop
        token or string) computes one position for nothing, dropped. Waiting sequences are admitted up
        to the first whose tokens need the host (_samples_ahead): with that one first in line, nothing
        is launched, so that the next step, scheduled then, admits it. Requests added meanwhile are
        scheduled one step later."""
        if launched.tokens is None:
            return None
        items = launched.step.items
        token_of = {id(items[k].seq): row for row, k in enumerate(launched.step.sample_rows)}  # launched's tokens
        in_flight = {id(item.seq): (item.num_new_tokens, id(item.seq) in token_of) for item in items
                     if item.seq.status is SequenceStatus.RUNNING}
        sched = self.scheduler.schedule_ahead(in_flight, self._ends_by_length, self._samples_ahead)
        if sched is None or sched.is_empty:
            return None
        self.num_steps_ahead += 1
        self.num_prompt_steps_ahead += any(item.num_new_tokens > 1 for item in sched.scheduled)
        token_rows = [token_of[id(item.seq)] for item in sched.scheduled if item.reads_device_token]
        return self.runner.launch_next(launched, sched.scheduled, token_rows)

    @staticmethod
    def _samples_ahead(seq: Sequence) -> bool:
        """Whether a sequence may be in a step launched ahead: its token, if that step samples one, is
        drawn on the device, and it wants no prompt logprobs."""
        p = seq.sampling_params
        return p.samples_on_device and p.prompt_logprobs is None

    def _ends_by_length(self, seq: Sequence, position: int) -> bool:
        """Whether the token sampled for seq (not yet appended) at `position` ends it by length: its
        max_tokens, or max_model_len (as _append_token decides)."""
        max_tokens = seq.sampling_params.max_tokens
        return (max_tokens is not None and len(seq.output_token_ids) + 1 >= max_tokens
                or position + 1 >= self.max_model_len)

    def _process(self, items: list[ScheduledSequence], results: list[StepResult]) -> list[RequestOutput]:
        """Count the step's computed tokens, append its sampled ones and make the outputs. A sequence
        that finished or was aborted after a step was launched ahead for it takes nothing from it."""
        now = time.monotonic()
        touched: dict[str, Request] = {}
        for item, result in zip(items, results):
            seq = item.seq
            if seq.is_finished:
                continue
            req = self.requests[seq.request_id]
            if req.metrics.first_scheduled_time is None:
                req.metrics.first_scheduled_time = now
            seq.num_computed_tokens += item.num_new_tokens
            self.block_manager.commit(seq)
            if result.prompt_logprobs is not None and req.prompt_logprobs is not None and seq.index == 0:
                # a preempted sequence recomputes its prompt: keep only entries not recorded yet
                skip = len(req.prompt_logprobs) - result.prompt_logprobs_start
                req.prompt_logprobs += [e.as_dict() for e in result.prompt_logprobs[max(skip, 0):]]
            if result.token_id is not None:
                self._append_token(req, req.samples[seq.index], result, now)
                touched[req.request_id] = req
        outputs = [self._make_output(req) for req in touched.values()]
        for req in touched.values():
            if req.finished:
                del self.requests[req.request_id]
        return outputs

    def _append_token(self, req: Request, s: SampleState, result: StepResult, now: float) -> None:
        seq, p = s.seq, req.params
        token = result.token_id
        seq.output_token_ids.append(token)
        self.num_generation_tokens += 1
        if req.metrics.first_token_time is None:
            req.metrics.first_token_time = now
        req.metrics.last_token_time = now
        if s.logprobs is not None and result.logprobs is not None:
            s.logprobs.append(result.logprobs.as_dict())
            s.cumulative_logprob += result.logprobs.logprob
        n_out = len(seq.output_token_ids)
        if token in seq.stop_token_ids and n_out >= p.min_tokens:  # (the sampler masks them until then)
            s.stop_reason = token if token in p.stop_token_ids else None  # None: EOS
            return self._finish(s, SequenceStatus.FINISHED_STOPPED)
        before = len(s.text)
        if p.detokenize:
            s.text += s.detokenizer.add([token])
        if p.stop and n_out >= p.min_tokens:
            longest = max(len(x) for x in p.stop)
            window_start = max(0, before - longest + 1)
            for stop in p.stop:
                at = s.text.find(stop, window_start)
                if at != -1:
                    s.text = s.text[:at + len(stop) if p.include_stop_str_in_output else at]
                    s.stop_reason = stop
                    return self._finish(s, SequenceStatus.FINISHED_STOPPED)
        if p.max_tokens is not None and n_out >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            return self._finish(s, SequenceStatus.FINISHED_LENGTH)

    def _finish(self, s: SampleState, status: SequenceStatus) -> None:
        if s.seq.sampling_params.detokenize and status is not SequenceStatus.FINISHED_ABORTED and (
                status is not SequenceStatus.FINISHED_STOPPED or s.stop_reason is None):
            s.text += s.detokenizer.flush()
        s.finish_reason = status.value
        self.scheduler.finish(s.seq, status)
        self.runner.release(s.seq.seq_id)
        req = self.requests.get(s.seq.request_id)
        if req is not None and req.finished:
            req.metrics.finished_time = time.monotonic()

    def _make_output(self, req: Request) -> RequestOutput:
        outs = []
        stop = req.params.stop
        hold = max(map(len, stop)) - 1 if stop else 0  # could be a stop string's start
        for s in req.samples:
            done = s.finish_reason is not None
            visible = len(s.text) if done else max(s.sent_text, len(s.text) - hold)
            token_ids = s.seq.output_token_ids
            outs.append(CompletionOutput(  # token_ids: a snapshot when finished, else the live list
                index=s.seq.index, text=s.text[:visible] if visible < len(s.text) else s.text,
                token_ids=list(token_ids) if done else token_ids,
                cumulative_logprob=s.cumulative_logprob, logprobs=s.logprobs,
                finish_reason=s.finish_reason, stop_reason=s.stop_reason,
                delta_text=s.text[s.sent_text:visible], delta_token_ids=token_ids[s.sent_tokens:],
                delta_logprobs=None if s.logprobs is None else s.logprobs[s.sent_tokens:]))
            s.sent_text, s.sent_tokens = visible, len(token_ids)
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, outs, req.finished,
                             prompt_logprobs=req.prompt_logprobs,
                             num_cached_tokens=req.samples[0].seq.num_cached_prompt_tokens,
                             metrics=req.metrics)

    # ---- statistics -------------------------------------------------------------------------------
    def stats(self) -> dict:
        bm = self.block_manager
        return {"num_running": len(self.scheduler.running), "num_waiting": len(self.scheduler.waiting),
                "cache_usage": bm.usage, "num_free_blocks": bm.num_free_blocks, "num_blocks": bm.num_blocks,
                "prefix_cache_queries": bm.prefix_queries, "prefix_cache_hits": bm.prefix_hits,
                "num_preemptions": self.scheduler.num_preemptions,
                "prompt_tokens": self.num_prompt_tokens, "generation_tokens": self.num_generation_tokens,
                "steps_launched_ahead": self.num_steps_ahead,
                "steps_launched_ahead_with_prompts": self.num_prompt_steps_ahead}

