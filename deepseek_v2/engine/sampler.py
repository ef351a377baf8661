"""The sampler: everything between one step's logits and its tokens, for a batch of sequences with
their own parameters. It owns the random generators (one per seeded sequence, one for the rest), the
token masks (stop tokens before min_tokens, allowed_token_ids, bad words; the grammars of structured
outputs, through structured_outputs.GrammarMasks), logit_bias, the penalties, temperature, top-k / top-p / min-p, the draw itself
and the logprobs handed back.

Sampling uses the exponential race: argmax(p / q) with q ~ Exp(1) draws from p, so each row needs
only its own noise; a seeded sequence draws its noise from its own generator, which makes its
samples independent of whatever else shares the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .sequence import Sequence


def on_device(values, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A tensor of host values (a list or a numpy array) on `device`, copied without waiting for the
    device: torch.tensor(values, device=...) copies synchronously, which waits for every kernel queued
    before it (the step's forward, when the sampling is queued behind it, as a step launched ahead is)."""
    return torch.as_tensor(values, dtype=dtype).to(device, non_blocking=True)


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
class FixedRules:
    """What a sequence may produce that does not change from step to step, on the logits' device:
    never (one-token bad words), allowed (allowed_token_ids), logit_bias as ids and values."""

    never: torch.Tensor | None
    allowed: torch.Tensor | None
    bias_ids: torch.Tensor | None
    bias: torch.Tensor | None


@dataclass
class SampledToken:
    token_id: int
    logprobs: TokenLogprobs | None = None  # when the sequence asked for logprobs


class Sampler:
    def __init__(self, device: torch.device | str = "cpu", seed: int = 0):
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device)  # rows without a seed of their own
        self.generator.manual_seed(seed)
        self.seeded: dict[int, torch.Generator] = {}  # seq_id -> its generator
        self.rules: dict[int, FixedRules] = {}  # seq_id -> its fixed rules (rules_of)
        self.grammars = None  # structured_outputs.GrammarMasks, set by an engine that serves them

    def prepare(self, seqs: list[Sequence]) -> None:
        """Before the step's forward: start computing what does not need its logits (the grammar
        masks of constrained sequences), so that it overlaps with the forward."""
        if self.grammars is not None:
            self.grammars.prepare(seqs)

    @torch.no_grad()
    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[SampledToken]:
        """logits [N, V] fp32 (the raw model output, one row per sequence) -> one token per sequence."""
        params = [s.sampling_params for s in seqs]
        if all(p.plain_greedy for p in params):  # the common fast path: nothing but an argmax
            return [SampledToken(t) for t in logits.argmax(dim=-1).tolist()]
        raw = logits
        tokens = self.pick(self.apply_penalties(self.apply_masks(logits, seqs), seqs), seqs)
        token_list = tokens.tolist()
        if self.grammars is not None:
            self.grammars.accept(seqs, token_list)
        wanted = [p.logprobs for p in params if p.logprobs is not None]
        if not wanted:
            return [SampledToken(t) for t in token_list]
        logprobs = raw.log_softmax(dim=-1)  # of the model's distribution, as vLLM and OpenAI report them
        chosen = logprobs.gather(1, tokens[:, None])[:, 0].tolist()
        top_values, top_ids = logprobs.topk(max(wanted), dim=-1) if max(wanted) else (None, None)
        out = []
        for i, (token, p) in enumerate(zip(token_list, params)):
            packed = None
            if p.logprobs is not None:
                top = (list(zip(top_ids[i, :p.logprobs].tolist(), top_values[i, :p.logprobs].tolist()))
                       if p.logprobs else [])
                packed = TokenLogprobs(token, chosen[i], top)
            out.append(SampledToken(token, packed))
        return out

    @torch.no_grad()
    def pick(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """[N] token ids from logits already masked and penalised, left on their device: the argmax when
        every row is greedy, else `draw`. For rows that need nothing else of the host
        (SamplingParams.samples_on_device) these are the tokens `__call__` returns."""
        if all(s.sampling_params.greedy for s in seqs):
            return logits.argmax(dim=-1)
        return self.draw(logits, seqs)

    def apply_masks(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """What a sequence may produce now, and its logit_bias: tokens its grammar does not allow, tokens
        outside its allowed_token_ids, its bad words (Sequence.never_token_ids, and banned_token_ids with
        its stop tokens while it has fewer than min_tokens output tokens) get -inf; then logit_bias is
        added (vLLM's order: masks and bias before the penalties)."""
        if self.grammars is not None:
            logits = self.grammars.apply(logits, seqs)
        V = logits.shape[1]
        rows, cols, fixed = [], [], []
        for i, s in enumerate(seqs):
            blocked = [t for t in s.banned_token_ids() if t < V]
            rows += [i] * len(blocked)
            cols += blocked
            if s.never_token_ids or s.sampling_params.allowed_token_ids is not None or s.sampling_params.logit_bias:
                fixed.append(i)
        if not (rows or fixed):
            return logits
        logits = logits.clone()
        for i in fixed:
            rules = self.rules_of(seqs[i], V, logits.device)
            if rules.allowed is not None:
                kept = logits[i, rules.allowed]
                logits[i] = float("-inf")
                logits[i, rules.allowed] = kept
            if rules.never is not None:
                logits[i, rules.never] = float("-inf")
        if rows:
            logits[on_device(rows, logits.device), on_device(cols, logits.device)] = float("-inf")
        for i in fixed:
            rules = self.rules[seqs[i].seq_id]
            if rules.bias_ids is not None:
                logits[i].index_add_(0, rules.bias_ids, rules.bias.to(logits.dtype))
        return logits

    def rules_of(self, seq: Sequence, vocab: int, device: torch.device) -> FixedRules:
        """A sequence's fixed rules as index tensors on the logits' device, made on its first step (a
        request with a long list pays for it once, not every step)."""
        rules = self.rules.get(seq.seq_id)
        if rules is None:
            p = seq.sampling_params
            def index(ids) -> torch.Tensor | None:
                ids = [t for t in ids if t < vocab]
                return on_device(ids, device, torch.long) if ids else None
            bias = [(t, b) for t, b in (p.logit_bias or {}).items() if t < vocab]
            rules = self.rules[seq.seq_id] = FixedRules(
                never=index(seq.never_token_ids),
                allowed=index(p.allowed_token_ids) if p.allowed_token_ids is not None else None,
                bias_ids=on_device([t for t, _ in bias], device, torch.long) if bias else None,
                bias=on_device([b for _, b in bias], device, torch.float32) if bias else None)
        return rules

    @staticmethod
    def apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """Repetition penalty over prompt and output tokens (as vLLM and transformers apply it); presence
        and frequency penalties over output tokens (OpenAI's definition)."""
        if not any(s.sampling_params.repetition_penalty != 1.0 or s.sampling_params.presence_penalty
                   or s.sampling_params.frequency_penalty for s in seqs):
            return logits
        logits = logits.clone()
        V = logits.shape[1]
        for i, s in enumerate(seqs):
            p = s.sampling_params
            if p.repetition_penalty != 1.0:
                seen = on_device(sorted(set(s.prompt_token_ids) | set(s.output_token_ids)), logits.device, torch.long)
                seen = seen[seen < V]
                vals = logits[i, seen]
                logits[i, seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
            if (p.presence_penalty or p.frequency_penalty) and s.output_token_ids:
                out = on_device(s.output_token_ids, logits.device, torch.long)
                counts = torch.bincount(out[out < V], minlength=V).to(logits.dtype)
                logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
        return logits

    def draw(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """Temperature, then top-k, top-p and min-p, then the exponential race; greedy rows take the
        argmax. Returns [N] token ids."""
        params = [s.sampling_params for s in seqs]
        V, device = logits.shape[1], logits.device
        temps = on_device([1.0 if p.greedy else p.temperature for p in params], device)
        scaled = logits / temps[:, None]
        if any(p.top_k for p in params):
            k = on_device([p.top_k if p.top_k else V for p in params], device).clamp(max=V)
            kth = scaled.sort(dim=-1, descending=True).values.gather(1, (k - 1)[:, None])
            scaled = scaled.masked_fill(scaled < kth, float("-inf"))
        probs = scaled.softmax(dim=-1)
        if any(p.top_p < 1 for p in params):
            top_p = on_device([p.top_p for p in params], device)
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
            drop_sorted = mass_before > top_p[:, None]  # keeps at least the most likely token
            probs = probs.masked_fill(torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted), 0.0)
        if any(p.min_p > 0 for p in params):
            min_p = on_device([p.min_p for p in params], device)
            probs = probs.masked_fill(probs < min_p[:, None] * probs.amax(dim=-1, keepdim=True), 0.0)
        noise = torch.empty_like(probs).exponential_(generator=self.generator)
        for i, s in enumerate(seqs):
            if params[i].seed is not None and not params[i].greedy:
                noise[i].exponential_(generator=self.generator_of(s))
        sampled = (probs / noise).argmax(dim=-1)
        greedy = on_device([p.greedy for p in params], device)
        return torch.where(greedy, logits.argmax(dim=-1), sampled)

    def generator_of(self, seq: Sequence) -> torch.Generator:
        """The generator of a seeded sequence, made on its first draw."""
        gen = self.seeded.get(seq.seq_id)
        if gen is None:
            gen = self.seeded[seq.seq_id] = torch.Generator(device=self.device)
            gen.manual_seed(seq.sampling_params.seed)
        return gen

    def prompt_logprobs(self, logits: torch.Tensor, seq: Sequence, positions: list[int]) -> list[TokenLogprobs]:
        """logits [len(positions), V] at prompt positions p -> the log-probability of the prompt's
        token p + 1 under them, with the top-N (N = prompt_logprobs)."""
        n = seq.sampling_params.prompt_logprobs
        logprobs = logits.log_softmax(dim=-1)
        targets = [seq.token_at(p + 1) for p in positions]
        chosen = logprobs.gather(1, on_device(targets, logits.device)[:, None])[:, 0].tolist()
        top_values, top_ids = (t.tolist() for t in logprobs.topk(n, dim=-1)) if n else ([], [])
        return [TokenLogprobs(t, lp, list(zip(top_ids[j], top_values[j])) if n else [])
                for j, (t, lp) in enumerate(zip(targets, chosen))]

    def release(self, seq_id: int) -> None:
        """Forget a finished sequence's generator, fixed rules and grammar."""
        self.seeded.pop(seq_id, None)
        self.rules.pop(seq_id, None)
        if self.grammars is not None:
            self.grammars.release(seq_id)

