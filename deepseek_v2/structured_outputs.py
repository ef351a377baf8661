"""Structured outputs: the grammars that constrain what a sequence may generate, through llguidance.

`GrammarCompiler` turns a request's `StructuredOutputsParams` (a JSON schema, a regex, a choice, a
Lark or GBNF grammar, any JSON object) into a grammar, checks it against the tokenizer (an invalid one
is an `InvalidRequestError` naming what is wrong) and keeps it, so a schema is compiled once however
many requests use it; each sequence gets a copy of the compiled matcher. `GrammarMasks` (the
sampler's) holds the matcher of every constrained sequence, fills the token bitmask of a step's rows
(in a worker thread, while the model's forward runs) and applies it to the logits on any device.

Why llguidance rather than xgrammar (both are used by vLLM; `scripts/bench_grammar.py`, figures in
docs/benchmarks.md): it needs no other package (xgrammar requires transformers and triton), one wheel
serves every Python version and it compiles a schema in about 1 ms (xgrammar 3-7 ms). Its mask is
slower (50-90 us per token against 6-7 us), but it is filled while the forward runs: the grammar
work left on a step's path is under 1 ms for 16 constrained rows. The mask of step N+1 depends on
step N's token, so step N's forward is all it can overlap with.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

import llguidance
import numpy as np
import torch

from .sampling_params import InvalidRequestError, StructuredOutputsParams
from .tokenizer import Tokenizer

# JSON without free whitespace: a model cannot spend its tokens on blank lines, and outputs are compact
JSON_OPTIONS = {"whitespace_flexible": False}
CACHE_SIZE = 256  # compiled grammars kept, least recently used dropped


def grammar_text(so: StructuredOutputsParams) -> str:
    """The llguidance grammar of a request's structured output (not yet checked)."""
    M = llguidance.LLMatcher
    kind, value = so.kind, getattr(so, so.kind)
    if kind == "json":
        try:
            return M.grammar_from_json_schema(value, defaults=JSON_OPTIONS)
        except ValueError as e:  # not a JSON object at all
            raise InvalidRequestError(f"invalid JSON schema: {e}", "structured_outputs") from None
    if kind == "json_object":
        return M.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
    if kind == "regex":
        return M.grammar_from_regex(value)
    if kind == "choice":
        return M.grammar_from_lark("start: " + " | ".join(lark_string(c) for c in value))
    if "::=" in value:  # GBNF (llama.cpp's, and vLLM's xgrammar grammars)
        try:
            value = llguidance.gbnf_to_lark.any_to_lark(value)
        except Exception as e:
            raise InvalidRequestError(f"invalid grammar: {e}", "structured_outputs") from None
    return M.grammar_from_lark(value)


def lark_string(text: str) -> str:
    """A Lark string literal matching exactly `text` (llguidance reads them as JSON strings)."""
    return json.dumps(text, ensure_ascii=False)


def apply_token_bitmask(logits: torch.Tensor, bitmask: np.ndarray, rows: list[int]) -> torch.Tensor:
    """logits [N, V] with the tokens that bitmask [len(rows), W] forbids in `rows` set to -inf (a copy):
    bit t % 32 of word t // 32 set = token t allowed. Every tensor is made on the logits' device, so
    the same code serves CPU and GPU (the test runs it on the meta device, which refuses any other)."""
    V = logits.shape[1]
    words = torch.from_numpy(bitmask).to(logits.device, non_blocking=True)  # [R, W] int32
    bits = torch.arange(32, dtype=torch.int32, device=logits.device)
    allowed = ((words[:, :, None] >> bits) & 1).bool().flatten(1)[:, :V]  # [R, W * 32] -> [R, V]
    index = torch.tensor(rows, device=logits.device)
    logits = logits.clone()
    logits[index] = logits[index].masked_fill(~allowed, float("-inf"))
    return logits


class GrammarCompiler:
    """Compiled grammars of one tokenizer, cached by their text. Safe to call from several threads
    (the server validates requests on its event loop while the engine's thread makes matchers)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int):
        # The model's vocabulary may be larger than the tokenizer's: the extra ids are never allowed.
        self.tokenizer = llguidance.LLTokenizer(tokenizer.backend_json(), n_vocab=vocab_size,
                                                eos_token=tokenizer.eos_token_id)
        self.vocab_size = vocab_size
        self._compiled: OrderedDict[tuple[str, str], llguidance.LLMatcher] = OrderedDict()
        self._lock = threading.Lock()

    def compile(self, so: StructuredOutputsParams) -> llguidance.LLMatcher:
        """The compiled matcher of a structured output (a template: copy it before use); raises
        InvalidRequestError, param "structured_outputs", for a grammar that cannot be compiled."""
        key = so.key
        with self._lock:
            matcher = self._compiled.get(key)
            if matcher is not None:
                self._compiled.move_to_end(key)
                return matcher
        matcher = llguidance.LLMatcher(self.tokenizer, grammar_text(so), log_level=0)  # drops the GIL
        if matcher.is_error():
            what = {"json": "JSON schema", "json_object": "JSON grammar"}.get(so.kind, so.kind)
            raise InvalidRequestError(f"invalid {what}: {matcher.get_error()}"[:2000], "structured_outputs")
        with self._lock:
            self._compiled[key] = matcher
            while len(self._compiled) > CACHE_SIZE:
                self._compiled.popitem(last=False)
        return matcher

    def matcher(self, so: StructuredOutputsParams) -> llguidance.LLMatcher:
        """A fresh matcher for one sequence (a copy of the compiled one: microseconds)."""
        return self.compile(so).deep_copy()


class GrammarMasks:
    """The matchers of the constrained sequences and their token bitmasks: 32 tokens per int32
    word, bit set = allowed. A step's masks are filled on the host in a worker thread (`prepare`,
    called before the forward), then applied to the logits where they are (`apply`)."""

    def __init__(self, compiler: GrammarCompiler):
        self.compiler = compiler
        self.matchers: dict[int, llguidance.LLMatcher] = {}  # seq_id -> its matcher
        self.words = -(-compiler.vocab_size // 32)
        self._executor = llguidance.LLExecutor(num_threads=2)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar")
        self._pending: tuple[list[int], Future] | None = None

    def _matcher(self, seq) -> llguidance.LLMatcher:
        m = self.matchers.get(seq.seq_id)
        if m is None:  # its first step; a preempted sequence keeps its matcher (its tokens are kept too)
            m = self.matchers[seq.seq_id] = self.compiler.matcher(seq.sampling_params.structured_outputs)
        return m

    def _fill(self, matchers: list[llguidance.LLMatcher]) -> np.ndarray:
        bitmask = np.zeros((len(matchers), self.words), dtype=np.int32)
        self._executor.unsafe_compute_mask_ptr([(m, i) for i, m in enumerate(matchers)], bitmask.ctypes.data,
                                               self.words * 4, len(matchers))
        return bitmask

    def prepare(self, seqs: list) -> None:
        """Start filling the masks of the constrained ones among `seqs` (a step's sampling rows)."""
        constrained = [s for s in seqs if s.sampling_params.structured_outputs is not None]
        if constrained:
            matchers = [self._matcher(s) for s in constrained]
            self._pending = ([s.seq_id for s in constrained], self._thread.submit(self._fill, matchers))

    def apply(self, logits: torch.Tensor, seqs: list) -> torch.Tensor:
        """logits [N, V] with every token its sequence's grammar forbids set to -inf (a copy)."""
        rows = [i for i, s in enumerate(seqs) if s.sampling_params.structured_outputs is not None]
        if not rows:
            return logits
        ids = [seqs[i].seq_id for i in rows]
        pending, self._pending = self._pending, None
        bitmask = pending[1].result() if pending is not None else None  # never two fills of a matcher at once
        if pending is None or pending[0] != ids:  # not prepared for these rows (a sampler called on its own)
            bitmask = self._fill([self._matcher(seqs[i]) for i in rows])
        return apply_token_bitmask(logits, bitmask, rows)

    def accept(self, seqs: list, tokens: list[int]) -> None:
        """Advance the matchers of the constrained sequences over their sampled tokens."""
        for s, t in zip(seqs, tokens):
            m = self.matchers.get(s.seq_id)
            if m is not None and not m.consume_token(t):
                raise RuntimeError(f"sequence {s.seq_id}: the grammar refused token {t}: {m.get_error()}")

    def release(self, seq_id: int) -> None:
        self.matchers.pop(seq_id, None)
