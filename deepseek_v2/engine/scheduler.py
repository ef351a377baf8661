"""The scheduler: continuous batching over a waiting and a running queue. Each step it gives every
running sequence its next tokens (one for a decode, the next chunk for a prompt being prefilled)
and admits waiting sequences while the token budget (max_num_batched_tokens), the sequence budget
(max_num_seqs) and the cache allow. Long prompts are prefilled in chunks so decodes are never
starved. When the cache runs out, the newest running sequence is preempted: its blocks are freed
and it is recomputed later. Pure Python (no torch)."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from .block_manager import BlockManager
from .sequence import Sequence, SequenceStatus


@dataclass
class ScheduledSequence:
    seq: Sequence
    num_new_tokens: int  # tokens to compute this step, starting at seq.num_computed_tokens + ahead
    # In a step launched ahead (asynchronous scheduling): the positions that the step before it, still
    # in flight, computes and that seq.num_computed_tokens does not count yet; this step starts after them.
    # (Valid until that step is counted: samples and reads_device_token are for building this step.)
    ahead: int = 0

    @property
    def samples(self) -> bool:
        """Whether this step reaches the sequence's last token, so a new token is sampled (with ahead,
        the step in flight may have sampled a token not appended yet: its position is then reached)."""
        return self.seq.num_computed_tokens + self.ahead + self.num_new_tokens >= self.seq.num_tokens

    @property
    def reads_device_token(self) -> bool:
        """Its input is the token the step in flight samples for it, on the device (a decode launched
        ahead): its position is past the tokens the host has."""
        return self.ahead > 0 and self.seq.num_computed_tokens + self.ahead >= self.seq.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSequence] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 long_prefill_token_threshold: int = 0, max_prefill_tokens_beside_decodes: int | None = None):
        """long_prefill_token_threshold: the most prompt tokens of one sequence in a step (0: no limit
        but the budget), so that a long prompt is prefilled in chunks beside the running decodes
        instead of one long step that delays all their tokens (vLLM's knob of that name).
        max_prefill_tokens_beside_decodes: the most prompt tokens of all sequences in a step that also
        decodes (None: the budget): a step's time grows with its prompt tokens, and each of its decodes
        waits that long for its next token; a step without decodes still takes the whole budget."""
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_chunk = long_prefill_token_threshold or max_num_batched_tokens
        self.max_prefill_beside_decodes = max_prefill_tokens_beside_decodes or max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the last is the newest
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _prompt_budget(self, decodes: bool) -> int:
        """The most prompt tokens of a step, with or without decodes in it."""
        return self.max_prefill_beside_decodes if decodes else self.max_num_batched_tokens

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        prompt_budget = self._prompt_budget(any(seq.num_uncomputed_tokens == 1 for seq in self.running))
        bm = self.block_manager

        # 1. Running sequences first, oldest first, preempting the newest when the cache is full.
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed_tokens, budget, self.max_chunk)
            if n > 1:  # a prompt's chunk
                n = min(n, prompt_budget)
                if n == 0:
                    i += 1
                    continue
                prompt_budget -= n
            while not bm.can_allocate(seq, n):
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                break
            bm.allocate(seq, n)
            out.scheduled.append(ScheduledSequence(seq, n))
            budget -= n
            i += 1

        # 2. Then waiting sequences in arrival order, unless this step already had to preempt.
        if not out.preempted:
            out.scheduled += self.admit(min(budget, prompt_budget))
        return out

    def schedule_ahead(self, in_flight: dict[int, tuple[int, bool]], ends: Callable[[Sequence, int], bool],
                       eligible: Callable[[Sequence], bool]) -> SchedulerOutput | None:
        """The step after one still in flight, as schedule() would make it once that step's tokens are
        counted. in_flight: for each sequence in that step (by id), the positions it computes and whether
        it samples a token; ends(seq, position): whether the token sampled at position ends seq (then it
        is left out). Running sequences, oldest first while the budget lasts, take one position after
        that token, or their prompt's next chunk; then waiting sequences are admitted up to the first
        that is not eligible. None where that needs the step's outcome: a running sequence not in it or
        not eligible, an ineligible sequence first in line, or too little cache (schedule() would preempt).
        Before admitting, the full blocks the step in flight fills go into the prefix cache, as they would
        once it is counted, so that an admission hits them as it would in schedule()."""
        if self.waiting and len(self.running) < self.max_num_seqs and not eligible(self.waiting[0]):
            return None
        if len(in_flight) != len(self.running):
            return None
        budget, following = self.max_num_batched_tokens, []
        prompt_budget = self._prompt_budget(any(in_flight.get(id(seq), (0, False))[1] for seq in self.running))
        for seq in self.running:
            if budget == 0:
                break
            if id(seq) not in in_flight or not eligible(seq):
                return None
            computed, samples = in_flight[id(seq)]
            done = seq.num_computed_tokens + computed
            if samples:
                if ends(seq, done):
                    continue
                n = 1
            else:
                n = min(seq.num_tokens - done, budget, self.max_chunk)
                if n > 1:  # a prompt's chunk
                    n = min(n, prompt_budget)
                    if n == 0:
                        continue
                    prompt_budget -= n
            following.append(ScheduledSequence(seq, n, ahead=computed))
            budget -= n
        bm = self.block_manager
        needed = sum(bm.blocks_needed(f.seq.num_computed_tokens + f.ahead + f.num_new_tokens) - len(f.seq.block_table)
                     for f in following)
        if needed > bm.num_free_blocks:
            return None
        for f in following:
            bm.allocate(f.seq, f.ahead + f.num_new_tokens)
        # The blocks the step in flight fills are cached from now on, as they are for schedule() once it
        # is counted, so that an admission hits them alike. Their tokens are that step's inputs, known
        # here, and any step that reads them runs after it on the device.
        for seq in self.running:
            bm.commit(seq, seq.num_computed_tokens + in_flight[id(seq)][0])
        return SchedulerOutput(following + self.admit(min(budget, prompt_budget), eligible))

    def admit(self, budget: int, eligible: Callable[[Sequence], bool] | None = None) -> list[ScheduledSequence]:
        """Admit waiting sequences in arrival order, each with its first chunk, while the token budget,
        the sequence budget and the cache allow (and, given `eligible`, up to the first that is not)."""
        bm, admitted = self.block_manager, []
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if eligible is not None and not eligible(seq):
                break
            # prompt logprobs need the logits of every prompt position: no cached prefix
            hits = [] if seq.sampling_params.prompt_logprobs is not None else bm.find_cached_prefix(seq)
            n = min(seq.num_tokens - len(hits) * bm.block_size, budget, self.max_chunk)
            if not bm.can_admit(seq, hits, n):
                break
            self.waiting.popleft()
            bm.admit(seq, hits, count_query=seq.num_preemptions == 0)
            bm.allocate(seq, n)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            admitted.append(ScheduledSequence(seq, n))
            budget -= n
        return admitted

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, status: SequenceStatus) -> None:
        """Take a sequence out of the queues and free its blocks."""
        seq.status = status
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
