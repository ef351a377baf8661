# Run: python -m pytest -q tests/test_train.py   (pretraining and SFT on a tiny model, CPU, ~30 s)
"""Training on CPU with a tiny model: the loss goes down, the schedule is the paper's, resume is
bit-exact, SFT trains only on the assistant's tokens, checkpoints load in our engine and in Hugging
Face transformers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from deepseek_v2.model import DeepseekV2ForCausalLM
from deepseek_v2.tokenizer import Tokenizer
from deepseek_v2.train import train as train_module
from deepseek_v2.train.data import (IGNORE, ChatSequences, DataOrder, TokenSequences, chat_example, load_chat,
                                    tokenize_text_files)
from deepseek_v2.train.sft import sft
from deepseek_v2.train.config import TrainConfig
from deepseek_v2.train.train import TimeBudget, train

TOKENIZER = Path(__file__).resolve().parent.parent / "deepseek_v2" / "default_model"
TINY = dict(vocab_size=4096, hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=2,
            q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
            n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=32,
            first_k_dense_replace=1, topk_method="group_limited_greedy", n_group=4, topk_group=2,
            max_position_embeddings=512, rope_scaling={"type": "yarn", "factor": 4.0,
                                                       "original_max_position_embeddings": 64,
                                                       "mscale": 0.707, "mscale_all_dim": 0.707},
            bos_token_id=0, eos_token_id=1)
CHATS = [
    [{"role": "user", "content": "What does json.dumps() do?"},
     {"role": "assistant", "content": "Serialize obj to a JSON formatted str."}],
    [{"role": "system", "content": "Answer briefly."},
     {"role": "user", "content": 'What does the word "dog" mean?'},
     {"role": "assistant", "content": '"dog" (noun): a domesticated member of the genus Canis.'},
     {"role": "user", "content": "And a cat?"},
     {"role": "assistant", "content": "A small domesticated carnivore."}],
]


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_pretrained(str(TOKENIZER))


@pytest.fixture(scope="module")
def data(tmp_path_factory, tokenizer):
    """Token files from the language-reference topics that ship with Python, and a small chat set."""
    from pydoc_data.topics import topics
    root = tmp_path_factory.mktemp("data")
    docs = [topics[k] for k in sorted(topics)][:40]
    (root / "text.txt").write_text("\n\f\n".join(docs))
    meta = tokenize_text_files([root / "text.txt"], tokenizer, root, val_fraction=0.1)
    with open(root / "chat.jsonl", "w") as f:
        for i in range(24):
            f.write(json.dumps({"messages": CHATS[i % 2]}) + "\n")
    return root, meta


def config(data_dir: Path, out: Path, **kw) -> TrainConfig:
    base = dict(model=TINY, train_data=str(data_dir / "train.bin"), val_data=str(data_dir / "val.bin"),
                seq_len=64, micro_batch_size=4, grad_accum_steps=2, max_steps=6, lr=3e-3, warmup_steps=2,
                eval_every=3, eval_sequences=8, log_every=1, out_dir=str(out), device="cpu",
                device_balance_alpha=0.05, comm_balance_alpha=0.02)
    return TrainConfig(**(base | kw))


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ---- data ---------------------------------------------------------------------------------------------
def test_token_files_and_sequences(data, tokenizer):
    root, meta = data
    assert meta["train"]["documents"] > 0 and meta["val"]["documents"] > 0
    tokens = np.fromfile(root / "train.bin", dtype=np.uint16)
    assert len(tokens) == meta["train"]["tokens"]
    assert tokens[0] == tokenizer.bos_token_id and tokens[-1] == tokenizer.eos_token_id
    seqs = TokenSequences(root / "train.bin", 64)
    inputs, targets = seqs.get([0, 3])
    assert inputs.shape == targets.shape == (2, 64) and inputs.dtype == torch.int64
    assert torch.equal(inputs[1], torch.from_numpy(tokens[192:256].astype(np.int64)))
    assert torch.equal(targets[:, :-1], inputs[:, 1:])


def test_data_order_visits_every_sequence_each_epoch_and_resumes():
    order = DataOrder(10, seed=1)
    first = order.take(7)
    state = order.state_dict()
    rest = order.take(8)
    assert sorted(np.concatenate([first, rest[:3]]).tolist()) == list(range(10))
    again = DataOrder(10, seed=1)
    again.load_state_dict(state)
    assert np.array_equal(again.take(8), rest)


def test_peek_shows_the_next_take_across_an_epoch_without_moving():
    order = DataOrder(10, seed=1)
    order.take(6)
    state = order.state_dict()
    ahead = order.peek(7)  # runs into the next epoch
    assert order.state_dict() == state
    assert np.array_equal(order.take(7), ahead)


def test_prefetcher_gives_the_batches_asked_for_made_ahead_or_not():
    import threading
    from deepseek_v2.train.data import Prefetcher
    makers = []

    def get(indices):
        makers.append(threading.current_thread().name)
        return torch.tensor(indices * 10), torch.tensor(indices)

    prefetch = Prefetcher(get)
    groups = [np.array([1, 2]), np.array([3])]
    prefetch.ahead(groups)
    made = prefetch.batches([g.copy() for g in groups])  # the same indices: the rows made ahead
    assert makers == ["prefetch_0", "prefetch_0"]
    assert [(a.tolist(), b.tolist()) for a, b in made] == [([10, 20], [1, 2]), ([30], [3])]
    prefetch.ahead([np.array([4])])
    other = prefetch.batches([np.array([5])])  # not what was made ahead: made now, on this thread
    assert [(a.tolist(), b.tolist()) for a, b in other] == [([50], [5])]
    assert makers[-1] == threading.current_thread().name
    prefetch.close()


# ---- pretraining ----------------------------------------------------------------------------------------
def test_few_steps_lower_the_loss_with_the_papers_schedule(data, tmp_path):
    root, _ = data
    out = tmp_path / "run"
    cfg = config(root, out, max_steps=20, eval_every=10, lr=3e-3)
    train(cfg)
    logs = [m for m in metrics(out) if "loss" in m]
    evals = [m for m in metrics(out) if "val_loss" in m]
    assert logs[-1]["loss"] < logs[0]["loss"] - 1.0
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 1.0
    # linear warm-up over 2 steps, then x0.316 from 60% (step 12) and again from 90% (step 18)
    expect = [3e-3 * (i + 1) / 2 if i < 2 else 3e-3 * 0.316 ** ((i >= 12) + (i >= 18)) for i in range(20)]
    assert [m["lr"] for m in logs] == pytest.approx(expect)
    for m in logs:  # logged balance losses and expert load
        assert m["balance_expert"] > 0 and m["balance_device"] > 0 and m["balance_comm"] > 0
        assert len(m["load"]) == 1 and sum(m["load"][0]) == pytest.approx(1.0)
        assert m["load_spread"] >= 1.0 and m["tok_per_s"] > 0 and m["mfu"] > 0
    assert (out / "expert_load.png").is_file()


def test_resume_continues_bit_exactly(data, tmp_path, monkeypatch):
    root, _ = data
    straight = tmp_path / "straight"
    train(config(root, straight, checkpoint_every=3))
    want = torch.load(straight / "train_state.pt", weights_only=True)

    class Crash(RuntimeError):
        pass

    class CrashingOrder(DataOrder):  # dies while reading the batch of step 5, after the step-3 checkpoint
        calls = 0

        def take(self, count):
            CrashingOrder.calls += 1
            if CrashingOrder.calls == 5:
                raise Crash()
            return super().take(count)

    interrupted = tmp_path / "interrupted"
    monkeypatch.setattr(train_module, "DataOrder", CrashingOrder)
    with pytest.raises(Crash):
        train(config(root, interrupted, checkpoint_every=3))
    monkeypatch.setattr(train_module, "DataOrder", DataOrder)
    assert torch.load(interrupted / "train_state.pt", weights_only=True)["step"] == 3
    train(config(root, interrupted, checkpoint_every=3, resume=True))
    got = torch.load(interrupted / "train_state.pt", weights_only=True)
    assert got["step"] == want["step"] == 6
    for name, tensor in want["model"].items():
        assert torch.equal(got["model"][name], tensor), name
    steps = {m["step"]: m["loss"] for m in metrics(interrupted) if "loss" in m}
    assert [steps[s] for s in (4, 5, 6)] == [m["loss"] for m in metrics(straight) if "loss" in m][3:]


def test_checkpoint_is_official_format_for_engine_and_transformers(data, tmp_path):
    root, _ = data
    out = tmp_path / "run"
    train(config(root, out, max_steps=3, grad_accum_steps=1))
    model_dir = out / "model"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (model_dir / name).is_file()
    cfg = json.loads((model_dir / "config.json").read_text())
    assert cfg["architectures"] == ["DeepseekV2ForCausalLM"] and cfg["torch_dtype"] == "bfloat16"
    assert cfg["topk_method"] == "group_limited_greedy" and cfg["n_group"] == 4 and cfg["topk_group"] == 2

    ours = DeepseekV2ForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(model_dir)
    ids = Tokenizer.from_pretrained(str(model_dir)).apply_chat_template(CHATS[1][:2], add_generation_prompt=True)
    assert hf_tok.apply_chat_template(CHATS[1][:2], add_generation_prompt=True, tokenize=False) == \
        Tokenizer.from_pretrained(str(model_dir)).apply_chat_template(CHATS[1][:2], add_generation_prompt=True,
                                                                      tokenize=False)
    x = torch.tensor([ids])
    with torch.no_grad():
        assert torch.allclose(hf(x).logits, ours(x), atol=1e-4)

    from deepseek_v2.llm import LLM
    from deepseek_v2.sampling_params import SamplingParams
    llm = LLM(str(model_dir), dtype="float32", device="cpu")
    [result] = llm.generate([ids], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)
    seq = list(ids)
    with torch.no_grad():
        for _ in range(6):
            seq.append(int(ours(torch.tensor([seq]))[0, -1].argmax()))
    assert result.outputs[0].token_ids == seq[len(ids):]


def test_config_file_and_overrides(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"model": {"hidden_size": 64}, "lr": 0.1}))
    cfg = TrainConfig.load(tmp_path / "c.json", {"model.num_hidden_layers": 2, "max_steps": 7})
    assert cfg.model == {"hidden_size": 64, "num_hidden_layers": 2} and cfg.lr == 0.1 and cfg.max_steps == 7
    (tmp_path / "c.toml").write_text('lr = 0.5\nbetas = [0.8, 0.9]\n[model]\nhidden_size = 32\n')
    cfg = TrainConfig.load(tmp_path / "c.toml")
    assert cfg.lr == 0.5 and cfg.betas == (0.8, 0.9) and cfg.model == {"hidden_size": 32}
    with pytest.raises(ValueError, match="unknown train config"):
        TrainConfig.load(None, {"learning_rate": 1.0})


# ---- time budget ------------------------------------------------------------------------------------------
def test_time_budget_shortens_the_schedule_once_from_the_measured_speed():
    budget = TimeBudget(seconds=600.0, start_step=0, eval_every=100, eval_rounds=3, grad_accum_steps=1)
    # 2 s per step, and a 2 s evaluation between steps 10 and 11 (paused, not a step's cost)
    for step in range(1, 20):
        elapsed, paused = 2.0 * step + 2.0 * (step > 10), 2.0 * (step > 10)
        assert budget.replan(step, 1000, elapsed, paused) == 1000  # warm-up and measurement: no change
    # step 20, 42 s in: (42 - 10 - 2) / 15 = 2 s per step; an evaluation is 2 * 3 / (3 * 1) = 2 s and
    # (1000 - 20) // 100 + 1 = 10 are to come; left 600 - 42 - 20 = 538 s; int(0.97 * 538 / 2) = 260
    assert budget.replan(20, 1000, 42.0, 2.0) == 20 + 260
    assert budget.per_step_s == 2.0
    assert budget.replan(21, 280, 44.0, 2.0) == 280  # once only
    assert budget.replan(40, 280, 900.0, 2.0) == 280


def test_time_budget_never_lengthens_and_leaves_at_least_one_step():
    # a resumed run (start 100) with 4 micro-steps per step: 45 s / 15 = 3 s per step, evaluations
    # 3 * 6 / (3 * 4) = 1.5 s, 4 to come; 3600 - 1045 - 6 = 2549 s left fit 824 more steps: keep 300
    budget = TimeBudget(seconds=3600.0, start_step=100, eval_every=50, eval_rounds=6, grad_accum_steps=4)
    assert budget.replan(105, 300, 1000.0, 30.0) == 300
    assert budget.replan(120, 300, 1045.0, 30.0) == 300
    # already over time: 30 - 42 - 20 = -32 s left; still one more step (the time check then stops the run)
    late = TimeBudget(seconds=30.0, start_step=0, eval_every=100, eval_rounds=3, grad_accum_steps=1)
    late.replan(5, 1000, 10.0, 0.0)
    assert late.replan(20, 1000, 42.0, 2.0) == 21
    # every process takes rank 0's figure
    seen = []
    ranked = TimeBudget(seconds=600.0, start_step=0, eval_every=100, eval_rounds=3, grad_accum_steps=1)
    ranked.replan(5, 1000, 10.0, 0.0)
    assert ranked.replan(20, 1000, 42.0, 2.0, agree=lambda v: seen.append(v) or 250.0) == 250
    assert seen == [280]


# ---- supervised fine-tuning --------------------------------------------------------------------------------
def test_sft_masks_everything_but_the_assistant_tokens(tokenizer):
    ids, mask = chat_example(tokenizer, CHATS[1])
    assert ids == tokenizer.apply_chat_template(CHATS[1])  # same tokens as the rendered template
    trained = tokenizer.decode([i for i, m in zip(ids, mask) if m])
    eos = tokenizer.eos_token
    replies = [' "dog" (noun): a domesticated member of the genus Canis.', " A small domesticated carnivore."]
    assert trained == f"{replies[0]}{eos}{replies[1]}{eos}"
    prompt = tokenizer.decode([i for i, m in zip(ids, mask) if not m])
    assert "User:" in prompt and "Answer briefly." in prompt and "genus" not in prompt and "carnivore" not in prompt
    # a reply is trained as generated after the generation prompt: its tokens follow the prompt's
    prompt_ids = tokenizer.apply_chat_template(CHATS[1][:2], add_generation_prompt=True)
    assert ids[:len(prompt_ids)] == prompt_ids and mask[len(prompt_ids)] == 1 and not any(mask[:len(prompt_ids)])

    packed = ChatSequences([chat_example(tokenizer, c) for c in CHATS * 3], seq_len=120, pad_id=tokenizer.eos_token_id)
    inputs, targets = packed.get(range(packed.num_sequences))
    kept = targets[targets != IGNORE].tolist()
    expected = [i for c in CHATS * 3 for i, m in zip(*chat_example(tokenizer, c)) if m]
    assert kept == expected  # every assistant token, in order, and nothing else
    with pytest.raises(ValueError):
        chat_example(tokenizer, [{"role": "assistant", "content": "hi"}])


def test_sft_trains_from_a_checkpoint(data, tmp_path):
    root, _ = data
    base = tmp_path / "base"
    train(config(root, base, max_steps=3, grad_accum_steps=1))
    out = tmp_path / "sft"
    chat = str(root / "chat.jsonl")
    sft(config(root, out, model={}, init_from=str(base / "model"), train_data=chat, val_data=chat, max_steps=8,
               eval_every=8, lr=3e-3))
    evals = [m["val_loss"] for m in metrics(out) if "val_loss" in m]
    assert evals[-1] < evals[0]
    assert load_chat(chat, Tokenizer.from_pretrained(str(out / "model")), 64).num_sequences > 0
    with pytest.raises(ValueError, match="init_from"):
        sft(config(root, tmp_path / "x", train_data=chat, val_data=chat))
