"""A sequence's bookkeeping: its tokens, how many of them are in the cache, its block table and
status. Pure Python (no torch): the scheduler and block manager work on these."""

from __future__ import annotations

import enum
import itertools
import time

from ..sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (SequenceStatus.FINISHED_STOPPED, SequenceStatus.FINISHED_LENGTH,
                        SequenceStatus.FINISHED_ABORTED)


_ids = itertools.count()


class Sequence:
    def __init__(self, prompt_token_ids: list[int], sampling_params: SamplingParams | None = None,
                 request_id: str = "", index: int = 0, arrival_time: float | None = None,
                 eos_token_id: int | None = None):
        self.seq_id = next(_ids)
        self.request_id = request_id
        self.index = index  # which of the request's n samples this is
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.sampling_params = sampling_params or SamplingParams()
        self.stop_token_ids = self.sampling_params.all_stop_token_ids(eos_token_id)  # EOS unless ignore_eos
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        self.num_hashed_blocks = 0  # leading blocks of block_table already in the prefix cache
        self.num_computed_tokens = 0  # tokens whose latents are in the cache
        self.num_cached_prompt_tokens = 0  # of those, how many came from the prefix cache
        self.num_preemptions = 0
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_at(self, i: int) -> int:
        p = len(self.prompt_token_ids)
        return self.prompt_token_ids[i] if i < p else self.output_token_ids[i - p]

    def tokens_slice(self, start: int, end: int) -> list[int]:
        p = len(self.prompt_token_ids)
        if end <= p:
            return self.prompt_token_ids[start:end]
        if start >= p:
            return self.output_token_ids[start - p:end - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - p]

    @property
    def never_token_ids(self) -> tuple[int, ...]:
        """Tokens this sequence never produces (its one-token bad words)."""
        bad = self.sampling_params.bad_words_tokens
        return bad.never if bad is not None else ()

    def banned_token_ids(self) -> list[int]:
        """Tokens this sequence may not produce next, besides never_token_ids: its stop tokens (EOS
        included) while it has fewer than min_tokens output tokens, and the last token of every bad word
        whose other tokens end the output."""
        out = self.output_token_ids
        banned = list(self.stop_token_ids) if len(out) < self.sampling_params.min_tokens else []
        bad = self.sampling_params.bad_words_tokens
        return banned + bad.banned_after(out) if bad is not None else banned

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    def __repr__(self) -> str:
        return (f"Sequence(id={self.seq_id}, request={self.request_id!r}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, status={self.status.value})")
