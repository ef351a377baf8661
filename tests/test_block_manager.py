# Run: python -m pytest -q tests/test_block_manager.py
"""Block manager and scheduler on their own: pure Python, no model, no torch."""

import subprocess
import sys

import pytest

from deepseek_v2.engine.block_manager import BlockManager
from deepseek_v2.engine.scheduler import Scheduler
from deepseek_v2.engine.sequence import Sequence, SequenceStatus


def test_scheduler_and_block_manager_import_no_torch():
    code = ("import sys, deepseek_v2.engine.scheduler, deepseek_v2.engine.block_manager, "
            "deepseek_v2.engine.sequence; sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def run_tokens(bm: BlockManager, seq: Sequence, n: int) -> None:
    """Pretend n tokens of seq were computed."""
    bm.allocate(seq, n)
    seq.num_computed_tokens += n
    bm.commit(seq)


def test_allocate_free_and_reference_counts():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = Sequence(list(range(10)))
    assert bm.can_allocate(a, 10)
    run_tokens(bm, a, 10)
    assert len(a.block_table) == 3 and bm.num_free_blocks == 5
    assert all(bm.blocks[b].ref_count == 1 for b in a.block_table)
    # decoding into the last block needs no new block until it is full
    a.output_token_ids += [100, 101]
    run_tokens(bm, a, 2)
    assert len(a.block_table) == 3
    a.output_token_ids.append(102)
    run_tokens(bm, a, 1)
    assert len(a.block_table) == 4 and bm.num_free_blocks == 4
    bm.free(a)
    assert bm.num_free_blocks == 8 and a.block_table == []
    assert not bm.can_allocate(Sequence(list(range(40))), 33)


def test_prefix_hits_share_blocks_and_count_references():
    bm = BlockManager(num_blocks=10, block_size=4)
    a = Sequence(list(range(13)))
    run_tokens(bm, a, 13)  # 3 full blocks cached, one partial
    b = Sequence(list(range(12)) + [99, 98])
    hits = bm.find_cached_prefix(b)
    assert hits == a.block_table[:3]
    assert bm.can_admit(b, hits, b.num_tokens - 12)
    bm.admit(b, hits)
    assert b.num_computed_tokens == 12 and b.num_cached_prompt_tokens == 12
    assert [bm.blocks[x].ref_count for x in hits] == [2, 2, 2]
    run_tokens(bm, b, 2)
    assert b.block_table[3] != a.block_table[3]
    bm.free(a)
    assert [bm.blocks[x].ref_count for x in hits] == [1, 1, 1]
    assert bm.prefix_queries == 14 and bm.prefix_hits == 12


def test_cache_salt_shares_blocks_only_with_the_same_salt():
    from deepseek_v2.sampling_params import SamplingParams
    bm = BlockManager(num_blocks=16, block_size=4)
    a = Sequence(list(range(9)), SamplingParams(cache_salt="tenant-a"))
    run_tokens(bm, a, 9)
    same = Sequence(list(range(9)), SamplingParams(cache_salt="tenant-a"))
    assert bm.find_cached_prefix(same) == a.block_table[:2]
    assert bm.find_cached_prefix(Sequence(list(range(9)), SamplingParams(cache_salt="tenant-b"))) == []
    assert bm.find_cached_prefix(Sequence(list(range(9)))) == []  # unsalted requests do not see it either
    plain = Sequence(list(range(9)))
    run_tokens(bm, plain, 9)
    assert bm.find_cached_prefix(Sequence(list(range(9)), SamplingParams(cache_salt="tenant-b"))) == []
    assert bm.find_cached_prefix(Sequence(list(range(9)))) == plain.block_table[:2]


def test_a_fully_cached_prompt_still_computes_its_last_block():
    bm = BlockManager(num_blocks=6, block_size=4)
    a = Sequence(list(range(8)))
    run_tokens(bm, a, 8)
    again = Sequence(list(range(8)))
    assert bm.find_cached_prefix(again) == a.block_table[:1]  # leaves tokens 4..7 to compute


def test_freed_blocks_stay_reusable_until_reallocated_in_lru_order():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = Sequence([1, 2, 3, 4, 5])
    run_tokens(bm, a, 5)
    blocks = list(a.block_table)
    bm.free(a)
    # a freed prefix is still a hit
    b = Sequence([1, 2, 3, 4, 9])
    assert bm.find_cached_prefix(b) == blocks[:2]
    # eviction order: the never-used block first, then a's tail before its head
    c = Sequence([7, 7])
    run_tokens(bm, c, 2)
    assert c.block_table == [3]
    d = Sequence([8, 8, 8, 8])
    run_tokens(bm, d, 4)
    assert d.block_table == [blocks[2], blocks[1]]
    assert bm.find_cached_prefix(b) == blocks[:1]  # block 1 evicted, block 0 (the head) survives


def test_prefix_cache_switch_off():
    bm = BlockManager(num_blocks=6, block_size=2, enable_prefix_caching=False)
    a = Sequence([1, 2, 3, 4, 5])
    run_tokens(bm, a, 5)
    assert bm.find_cached_prefix(Sequence([1, 2, 3, 4, 5])) == []


def make_scheduler(num_blocks=16, block_size=4, max_num_seqs=8, max_tokens=32):
    bm = BlockManager(num_blocks, block_size)
    return Scheduler(bm, max_num_seqs, max_tokens), bm


def finish_step(sched_out):
    """What the engine does after a step: mark tokens computed, append a token when sampled."""
    for item in sched_out.scheduled:
        samples = item.samples
        item.seq.num_computed_tokens += item.num_new_tokens
        if samples:
            item.seq.output_token_ids.append(7)


def following_step(s: Scheduler, in_flight, ahead: bool):
    """The step after in_flight, as the engine makes it: launched ahead of its tokens (schedule_ahead),
    or once they are counted and its full blocks cached (schedule)."""
    if ahead:
        flight = {id(i.seq): (i.num_new_tokens, i.samples) for i in in_flight.scheduled}
        out = s.schedule_ahead(flight, lambda seq, position: False, lambda seq: True)
        finish_step(in_flight)
        return out
    finish_step(in_flight)
    for item in in_flight.scheduled:
        s.block_manager.commit(item.seq)
    return s.schedule()


def test_budgets_and_chunked_prefill():
    s, bm = make_scheduler(max_tokens=10, max_num_seqs=2)
    seqs = [Sequence(list(range(25))), Sequence(list(range(100, 103))), Sequence([5, 6])]
    for q in seqs:
        s.add(q)
    out = s.schedule()
    assert [(i.seq, i.num_new_tokens) for i in out.scheduled] == [(seqs[0], 10)]  # chunk 1 fills the budget
    finish_step(out)
    out = s.schedule()
    assert [(i.seq, i.num_new_tokens) for i in out.scheduled] == [(seqs[0], 10)]
    finish_step(out)
    out = s.schedule()  # last chunk of 5, then the second prompt joins; max_num_seqs=2 keeps the third out
    assert [(i.seq, i.num_new_tokens) for i in out.scheduled] == [(seqs[0], 5), (seqs[1], 3)]
    assert out.scheduled[0].samples and out.scheduled[1].samples
    finish_step(out)
    out = s.schedule()  # both decode one token each
    assert [i.num_new_tokens for i in out.scheduled] == [1, 1]
    assert len(s.waiting) == 1 and seqs[2].status is SequenceStatus.WAITING


def test_long_prefill_token_threshold_chunks_each_prompt_beside_the_others():
    """At most this many tokens of one prompt a step, the budget's rest going to the next prompts and
    the running decodes (vLLM's long_prefill_token_threshold)."""
    bm = BlockManager(16, 4)
    s = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=32, long_prefill_token_threshold=6)
    running = Sequence([1, 2])
    s.add(running)
    out = s.schedule()
    assert [i.num_new_tokens for i in out.scheduled] == [2]
    finish_step(out)
    long, short = Sequence(list(range(10, 25))), Sequence([3, 4, 5])
    s.add(long)
    s.add(short)
    out = s.schedule()
    assert [(i.seq, i.num_new_tokens) for i in out.scheduled] == [(running, 1), (long, 6), (short, 3)]
    assert not out.scheduled[1].samples  # a chunk in the middle of its prompt samples nothing
    finish_step(out)
    out = s.schedule()
    assert [(i.seq, i.num_new_tokens) for i in out.scheduled] == [(running, 1), (long, 6), (short, 1)]
    finish_step(out)
    out = s.schedule()
    assert [(i.seq, i.num_new_tokens) for i in out.scheduled] == [(running, 1), (long, 3), (short, 1)]
    assert out.scheduled[1].samples


@pytest.mark.parametrize("ahead", [False, True])
def test_prompt_tokens_beside_decodes_are_capped(ahead):
    """max_prefill_tokens_beside_decodes: a step that also decodes takes at most this many prompt tokens
    in all (chunks of running prompts, then admissions; the rest wait), while a step without decodes
    takes the whole budget; a step launched ahead caps them alike."""
    bm = BlockManager(32, 4)
    s = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=32, max_prefill_tokens_beside_decodes=6)
    first, second, third = Sequence(list(range(10, 30))), Sequence(list(range(40, 44))), Sequence([5, 6, 7])
    s.add(first)
    s.add(second)
    out = s.schedule()  # no decodes yet: the whole budget
    assert [(i.seq, i.num_new_tokens) for i in out.scheduled] == [(first, 20), (second, 4)]
    finish_step(out)
    long = Sequence(list(range(50, 60)))
    s.add(long)
    s.add(third)
    in_flight = s.schedule()
    following = following_step(s, in_flight, ahead)
    # beside the two decodes: long's first 6 tokens; then its last 4 and 2 of the third prompt
    assert [(i.seq, i.num_new_tokens) for i in in_flight.scheduled] == [(first, 1), (second, 1), (long, 6)]
    assert [(i.seq, i.num_new_tokens) for i in following.scheduled] == [(first, 1), (second, 1), (long, 4), (third, 2)]


def test_schedule_ahead_is_the_next_schedule_with_the_step_in_flight_not_yet_counted():
    """The step after one in flight (asynchronous scheduling), made before its tokens are counted, is
    what schedule() makes once they are: a decode for a sequence that sampled (past that token: its
    input), the next chunk of a prompt, an admitted prompt, the budget and the blocks as schedule()
    spends them; a token that ends its sequence leaves it out; None where the outcome is needed."""
    bm = BlockManager(16, 4)
    s = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=12)
    dec, long, new = Sequence([1, 2, 3]), Sequence(list(range(10, 30))), Sequence([4, 5, 6, 7])
    s.add(dec)
    finish_step(s.schedule())  # dec has sampled: it decodes from now on
    s.add(long)
    in_flight = s.schedule()  # dec decodes, long's first chunk of 11
    assert [(i.seq, i.num_new_tokens) for i in in_flight.scheduled] == [(dec, 1), (long, 11)]
    s.add(new)
    flight = {id(i.seq): (i.num_new_tokens, i.samples) for i in in_flight.scheduled}
    ahead = s.schedule_ahead(flight, lambda seq, position: False, lambda seq: True)
    assert [(i.seq, i.num_new_tokens, i.ahead) for i in ahead.scheduled] == [(dec, 1, 1), (long, 9, 11), (new, 2, 0)]
    assert [i.reads_device_token for i in ahead.scheduled] == [True, False, False]
    assert [i.samples for i in ahead.scheduled] == [True, True, False]
    for seq, positions in ((dec, 5), (long, 20), (new, 2)):  # room for the positions in flight and these
        assert len(seq.block_table) * 4 >= positions
    # once the step in flight is counted, schedule() would have made the same step
    finish_step(in_flight)
    assert [(i.seq, i.num_new_tokens) for i in ahead.scheduled] == [(dec, 1), (long, 9), (new, 2)]
    # a token that ends its sequence leaves it out; a sequence sampled on the host stops the launch
    assert [i.seq for i in s.schedule_ahead({id(dec): (1, True), id(long): (9, True), id(new): (2, False)},
                                            lambda seq, position: seq is dec, lambda seq: True).scheduled] \
        == [long, new]
    assert s.schedule_ahead({id(dec): (1, True)}, lambda seq, position: False, lambda seq: True) is None
    assert s.schedule_ahead({id(q): (1, True) for q in (dec, long, new)}, lambda seq, position: False,
                            lambda seq: seq is not new) is None


def test_an_admission_ahead_hits_the_blocks_the_step_in_flight_fills():
    """A prompt admitted by the step launched ahead takes from the prefix cache the blocks that the step
    in flight fills, as schedule() does once that step is counted (the n = 2 samples of one prompt,
    chunked: the second starts from the first's blocks, not from the start)."""
    steps = []
    for ahead in (True, False):
        bm = BlockManager(16, 4)
        s = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=12)
        first, second = Sequence(list(range(10, 30))), Sequence(list(range(10, 30)))
        s.add(first)
        in_flight = s.schedule()  # first's first chunk: 12 tokens, three full blocks
        s.add(second)
        out = following_step(s, in_flight, ahead)
        steps.append([(i.seq is first, i.num_new_tokens) for i in out.scheduled])
        assert second.num_computed_tokens == 12 and second.block_table[:3] == first.block_table[:3]
    assert steps[0] == steps[1] == [(True, 8), (False, 4)]


def test_new_requests_join_while_others_decode():
    s, _ = make_scheduler()
    a = Sequence([1, 2, 3])
    s.add(a)
    finish_step(s.schedule())
    b = Sequence([4, 5, 6, 7])
    s.add(b)
    out = s.schedule()
    assert [(i.seq, i.num_new_tokens) for i in out.scheduled] == [(a, 1), (b, 4)]


def test_preemption_takes_the_newest_and_recomputes_it():
    s, bm = make_scheduler(num_blocks=4, block_size=2)
    a, b = Sequence([1, 2, 3]), Sequence([4, 5, 6])
    s.add(a)
    s.add(b)
    finish_step(s.schedule())  # prefill: a and b take 2 blocks each; the cache is full
    assert bm.num_free_blocks == 0
    finish_step(s.schedule())  # both decode their 4th token into their 2nd block
    out = s.schedule()  # a needs a 3rd block for its 5th token: b (newest) is preempted
    assert out.preempted == [b] and [i.seq for i in out.scheduled] == [a]
    assert b.status is SequenceStatus.WAITING and b.num_computed_tokens == 0 and b.block_table == []
    assert s.waiting[0] is b and s.num_preemptions == 1
    s.finish(a, SequenceStatus.FINISHED_STOPPED)
    out = s.schedule()  # b comes back and recomputes prompt + output (its cached prefix helps)
    assert out.scheduled[0].seq is b
    assert b.num_computed_tokens + out.scheduled[0].num_new_tokens == b.num_tokens


def test_finish_frees_blocks_and_leaves_queues():
    s, bm = make_scheduler()
    a = Sequence([1, 2, 3, 4, 5])
    s.add(a)
    finish_step(s.schedule())
    s.finish(a, SequenceStatus.FINISHED_ABORTED)
    assert not s.has_unfinished() and bm.num_free_blocks == bm.num_blocks
    w = Sequence([1])
    s.add(w)
    s.finish(w, SequenceStatus.FINISHED_ABORTED)
    assert not s.waiting
