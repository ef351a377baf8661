"""Sampling: `SamplingParams` (vLLM's names and defaults) and the batched `Sampler` that turns one
step's logits into tokens on the device, with per-request parameters.

Sampling uses the exponential race: argmax(p / q) with q ~ Exp(1) draws from p, so each row needs
only its own noise; a seeded request draws its noise from its own generator, which makes its
samples independent of whatever else shares the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

GREEDY_EPS = 1e-5  # temperatures below this mean greedy


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16  # None: up to the context length
    min_tokens: int = 0
    logprobs: int | None = None  # top-N alternatives per generated token (0: only the chosen one)
    prompt_logprobs: int | None = None  # same for every prompt token
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    detokenize: bool = True  # False: token ids only (stop strings need text)

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self.validate()

    def validate(self) -> None:
        def check(cond: bool, message: str):
            if not cond:
                raise ValueError(message)

        check(isinstance(self.n, int) and self.n >= 1, f"n must be a positive integer, got {self.n!r}")
        check(self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}")
        check(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        check(isinstance(self.top_k, int) and 0 <= self.top_k < 2**31,
              f"top_k must be a non-negative integer below 2^31 (0 or -1 disables it), got {self.top_k!r}")
        check(0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}")
        check(self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        check(-2 <= self.presence_penalty <= 2, f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        check(-2 <= self.frequency_penalty <= 2,
              f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        check(self.max_tokens is None or (isinstance(self.max_tokens, int) and self.max_tokens >= 1),
              f"max_tokens must be at least 1, got {self.max_tokens!r}")
        check(isinstance(self.min_tokens, int) and self.min_tokens >= 0, "min_tokens must be >= 0")
        check(self.max_tokens is None or self.min_tokens <= self.max_tokens, "min_tokens must be <= max_tokens")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            check(value is None or (isinstance(value, int) and 0 <= value <= 20),
                  f"{name} must be an integer in 0..20, got {value!r}")
        check(all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings")
        check(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
              "stop_token_ids must be non-negative integers")
        check(self.seed is None or (isinstance(self.seed, int) and -2**63 <= self.seed < 2**63 - 2**16),
              f"seed must be a 64-bit integer, got {self.seed!r}")
        check(self.detokenize or not self.stop, "stop strings need detokenize=True")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS

    @property
    def plain_greedy(self) -> bool:
        """Greedy with nothing that needs the sampler: argmax of the raw logits is the answer."""
        return (self.temperature < GREEDY_EPS and self.logprobs is None and self.min_tokens == 0
                and self.repetition_penalty == 1.0 and not self.presence_penalty and not self.frequency_penalty)


@dataclass
class SampleRequest:
    """One row of a sampling batch: a sequence's parameters and the tokens its penalties see."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    generator: torch.Generator | None = None
    blocked_token_ids: list[int] = field(default_factory=list)  # stop tokens before min_tokens


@dataclass
class SampleResult:
    token_ids: torch.Tensor  # [N] sampled tokens
    logprobs: torch.Tensor | None = None  # [N] log-probability of the sampled token
    top_ids: torch.Tensor | None = None  # [N, max_logprobs]
    top_logprobs: torch.Tensor | None = None  # [N, max_logprobs]


class Sampler:
    def __init__(self, generator: torch.Generator | None = None):
        self.generator = generator  # used by rows without a seed

    @torch.no_grad()
    def __call__(self, logits: torch.Tensor, rows: list[SampleRequest]) -> SampleResult:
        """logits [N, V] fp32 (raw model output) -> one token per row."""
        raw = logits
        N, V = logits.shape
        device = logits.device
        params = [r.params for r in rows]
        if any(r.blocked_token_ids or r.params.repetition_penalty != 1.0 or r.params.presence_penalty
               or r.params.frequency_penalty for r in rows):
            logits = self.apply_penalties(logits.clone(), rows)

        if all(p.greedy for p in params):
            tokens = logits.argmax(dim=-1)
        else:
            temps = torch.tensor([1.0 if p.greedy else p.temperature for p in params], device=device)
            logits = logits / temps[:, None]
            if any(p.top_k for p in params):
                k = torch.tensor([p.top_k if p.top_k else V for p in params], device=device).clamp(max=V)
                kth = logits.sort(dim=-1, descending=True).values.gather(1, (k - 1)[:, None])
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = logits.softmax(dim=-1)
            if any(p.top_p < 1 for p in params):
                top_p = torch.tensor([p.top_p for p in params], device=device)
                sorted_probs, order = probs.sort(dim=-1, descending=True)
                mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
                drop_sorted = mass_before > top_p[:, None]  # keeps at least the most likely token
                probs = probs.masked_fill(torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted), 0.0)
            if any(p.min_p > 0 for p in params):
                min_p = torch.tensor([p.min_p for p in params], device=device)
                probs = probs.masked_fill(probs < min_p[:, None] * probs.amax(dim=-1, keepdim=True), 0.0)
            noise = torch.empty_like(probs).exponential_(generator=self.generator)
            for i, r in enumerate(rows):
                if r.generator is not None and not params[i].greedy:
                    noise[i].exponential_(generator=r.generator)
            sampled = (probs / noise).argmax(dim=-1)
            greedy = torch.tensor([p.greedy for p in params], device=device)
            tokens = torch.where(greedy, logits.argmax(dim=-1), sampled)

        result = SampleResult(tokens)
        wanted = [p.logprobs for p in params if p.logprobs is not None]
        if wanted:
            logprobs = raw.log_softmax(dim=-1)
            result.logprobs = logprobs.gather(1, tokens[:, None])[:, 0]
            if max(wanted) > 0:
                result.top_logprobs, result.top_ids = logprobs.topk(max(wanted), dim=-1)
        return result

    @staticmethod
    def apply_penalties(logits: torch.Tensor, rows: list[SampleRequest]) -> torch.Tensor:
        """Repetition penalty over prompt and output tokens (as vLLM / HF apply it); presence and
        frequency penalties over output tokens (OpenAI semantics); min_tokens blocks stop tokens."""
        V = logits.shape[1]
        for i, r in enumerate(rows):
            p = r.params
            if r.blocked_token_ids:
                logits[i, [t for t in r.blocked_token_ids if t < V]] = float("-inf")
            if p.repetition_penalty != 1.0:
                seen = torch.tensor(sorted(set(r.prompt_token_ids) | set(r.output_token_ids)),
                                    dtype=torch.long, device=logits.device)
                seen = seen[seen < V]
                vals = logits[i, seen]
                logits[i, seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
            if (p.presence_penalty or p.frequency_penalty) and r.output_token_ids:
                out = torch.tensor(r.output_token_ids, dtype=torch.long, device=logits.device)
                counts = torch.bincount(out[out < V], minlength=V).to(logits.dtype)
                logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
        return logits
