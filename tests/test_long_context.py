# Run: python -m pytest -q tests/test_long_context.py   (CPU; one test starts a server subprocess)
"""Long context: the needles and their scoring, the YaRN config of a context extension round-tripping
through the official format, the extension recipe's rows and a few steps of it lowering the held-out
long-context loss (with activation checkpointing, which changes no gradient), sliding-window
perplexity against a plain forward, and `deepseek-v2 eval niah` against a real server."""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from deepseek_v2 import DeepseekV2ForCausalLM, Tokenizer
from deepseek_v2.config import DEFAULT_MODEL, ModelArgs
from deepseek_v2.eval.needles import insert_needle, make_needle, score
from deepseek_v2.eval.niah import HAYSTACK
from deepseek_v2.eval.ppl import sliding_window_nll
from deepseek_v2.rope import yarn_inv_freq
from deepseek_v2.train.checkpointing import TOKENIZER_FILES
from deepseek_v2.train.config import TrainConfig
from deepseek_v2.train.data import DOC_SEPARATOR, IGNORE, tokenize_text_files
from deepseek_v2.train.long_context import LongContextRows, extend
from deepseek_v2.train.train import build_model

EXTENDED = {"max_position_embeddings": 32768,
            "rope_scaling": {"type": "yarn", "factor": 32.0, "original_max_position_embeddings": 1024,
                             "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 0.707, "mscale_all_dim": 0.707}}


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_pretrained(DEFAULT_MODEL)


def test_needle_placement_and_exact_match():
    text = "One sentence. Another one.\nA third line. The end."
    needle = make_needle("passkey", random.Random(1))
    assert insert_needle(text, needle.text, 0.0).startswith(needle.text)
    assert insert_needle(text, needle.text, 1.0).endswith(needle.text)
    middle = insert_needle(text, needle.text, 0.5)
    assert middle.replace(needle.text + " ", "") == text  # at a sentence boundary, nothing else changed
    assert score(needle.answer, needle) == 1.0 and score(f"It is {needle.value}", needle) == 1.0
    assert score(f"It is {needle.value}1", needle) == 0.0 and score("I do not know", needle) == 0.0
    fact = make_needle("fact", random.Random(2))
    assert fact.value in fact.text and fact.value in fact.answer and score(fact.answer, fact) == 1.0


def test_yarn_extension_config_round_trip(tmp_path):
    """A 4K checkpoint (the shipped model's weights under its pre-extension positions: YaRN x4 to 4096)
    continued with the recipe's model changes gets the 32K positions and keeps its weights."""
    start = tmp_path / "start"
    shutil.copytree(DEFAULT_MODEL, start)
    config = json.loads((start / "config.json").read_text())
    config["max_position_embeddings"], config["rope_scaling"]["factor"] = 4096, 4.0
    (start / "config.json").write_text(json.dumps(config))
    cfg = TrainConfig(init_from=str(start), model=EXTENDED)
    model = build_model(cfg)
    args = model.args
    assert args.max_position_embeddings == 32768 and args.rope_scaling.factor == 32.0
    assert args.rope_scaling.original_max_position_embeddings == 1024
    m = 0.1 * 0.707 * torch.log(torch.tensor(32.0)).item() + 1  # yarn_get_mscale(32, mscale_all_dim)
    assert model.model.layers[0].self_attn.softmax_scale == pytest.approx(args.qk_head_dim ** -0.5 * m * m)
    assert torch.equal(model.model.rotary_emb.inv_freq, yarn_inv_freq(args)[0])
    base = DeepseekV2ForCausalLM.from_pretrained(start, dtype=torch.float32)
    assert not torch.equal(model.model.rotary_emb.inv_freq, base.model.rotary_emb.inv_freq)
    for (name, p), (_, q) in zip(model.named_parameters(), base.named_parameters()):
        assert torch.equal(p, q), name  # the weights are the checkpoint's
    model.save_pretrained(tmp_path / "out")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["rope_scaling"] == EXTENDED["rope_scaling"] and written["max_position_embeddings"] == 32768
    assert ModelArgs.from_pretrained(tmp_path / "out").replace(torch_dtype=args.torch_dtype) == args  # saved in fp32
    with pytest.raises(ValueError, match="hidden_size"):
        build_model(TrainConfig(init_from=str(start), model={"hidden_size": 64}))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tokenizer):
    """Token files of the bundled haystack cut into documents, and a small chat file."""
    out = tmp_path_factory.mktemp("corpus")
    docs = [d for d in HAYSTACK.read_text().split("\n\n") if d.strip()]
    (out / "docs.txt").write_text(f"\n{DOC_SEPARATOR}\n".join(docs))
    tokenize_text_files([out / "docs.txt"], tokenizer, out, val_fraction=0.1)
    return out


def test_long_share_puts_the_first_question_past_half_the_row(corpus, tokenizer):
    """retrieval_long_share 1: every retrieval row's first question comes after half the row (its
    conversation began at the row's start); 0 (log-uniform from 1K): some come in the first quarter."""
    def first_reply(share, i):
        rows = LongContextRows(corpus / "train.bin", tokenizer, 8192,
                               TrainConfig(retrieval_fraction=1.0, retrieval_long_share=share))
        targets = rows.get([i])[1][0]
        return int((targets != IGNORE).nonzero()[0])
    assert min(first_reply(1.0, i) for i in range(6)) >= 8192 // 2 - 128
    assert min(first_reply(0.0, i) for i in range(6)) < 8192 // 4


def test_rows_mix_text_chat_and_retrieval(corpus, tokenizer):
    cfg = TrainConfig(retrieval_fraction=0.5, chat_data="tests/data/demo_chat_heldout.jsonl", chat_fraction=0.25)
    rows = LongContextRows(corpus / "train.bin", tokenizer, 2048, cfg)
    kinds = {"text": 0, "retrieval": 0}
    for i in range(12):
        inputs, targets = rows.get([i])
        assert inputs.shape == targets.shape == (1, 2048)
        again = rows.get([i])
        assert torch.equal(inputs, again[0]) and torch.equal(targets, again[1])  # a row follows from its index
        trained = targets[targets != IGNORE].tolist()
        text = tokenizer.decode(inputs[0].tolist())
        if len(trained) < 200:  # a retrieval row: the loss is on the replies only
            kinds["retrieval"] += 1
            replies = tokenizer.decode(trained)
            assert replies.count(tokenizer.eos_token) == replies.count("The ") >= 1  # each reply closed
            assert "pass key is" in replies or "secret" in replies
            assert "Remember it." in text or " of the " in text  # the needles are in the prompts
        else:  # a text row: chat conversations first, then documents, nearly every token trained
            kinds["text"] += 1
            assert text.startswith(tokenizer.bos_token + "User: ")
            assert len(trained) > 1500
    assert kinds["retrieval"] >= 3 and kinds["text"] >= 3


def tiny_checkpoint(path, tokenizer) -> str:
    args = ModelArgs(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                     num_attention_heads=2, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                     n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=32,
                     max_position_embeddings=256, bos_token_id=0, eos_token_id=1, torch_dtype="float32",
                     rope_scaling={"factor": 4.0, "original_max_position_embeddings": 64, "mscale": 0.707,
                                   "mscale_all_dim": 0.707})
    DeepseekV2ForCausalLM(args).init_weights(seed=0).save_pretrained(path)
    for name in TOKENIZER_FILES:
        shutil.copy(Path(DEFAULT_MODEL) / name, path / name)
    return str(path)


def test_activation_checkpointing_changes_no_gradient(tmp_path, tokenizer):
    from deepseek_v2.train.processes import start_processes, stop_processes
    from deepseek_v2.train.train import place_model
    cfg = TrainConfig(init_from=tiny_checkpoint(tmp_path, tokenizer), device="cpu")
    x = torch.randint(0, len(tokenizer), (2, 48))
    procs = start_processes("cpu")
    grads = []
    for checkpointing in (False, True):
        model = build_model(cfg)
        place_model(model, procs, checkpointing)
        F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    stop_processes(procs)
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, msg=name)


def test_extension_recipe_lowers_the_long_context_loss(tmp_path, corpus, tokenizer):
    cfg = TrainConfig(init_from=tiny_checkpoint(tmp_path / "base", tokenizer),
                      model={"max_position_embeddings": 1024,
                             "rope_scaling": {"type": "yarn", "factor": 16.0, "original_max_position_embeddings": 64,
                                              "mscale": 0.707, "mscale_all_dim": 0.707}},
                      train_data=str(corpus / "train.bin"), val_data=str(corpus / "val.bin"),
                      chat_data="tests/data/demo_chat_heldout.jsonl", chat_fraction=0.25, retrieval_fraction=0.3,
                      activation_checkpointing=True, seq_len=1024, micro_batch_size=2, max_steps=12, lr=3e-3,
                      warmup_steps=2, eval_every=12, eval_sequences=2, log_every=4, out_dir=str(tmp_path / "run"),
                      device="cpu")
    extend(cfg)
    evals = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [e["val_loss"] for e in evals if "val_loss" in e]
    assert len(evals) == 2 and evals[1] < evals[0] - 0.5, evals
    written = ModelArgs.from_pretrained(tmp_path / "run" / "model")
    assert written.max_position_embeddings == 1024 and written.rope_scaling.factor == 16.0


def test_sliding_window_perplexity_matches_a_plain_forward(tokenizer):
    model = DeepseekV2ForCausalLM.from_pretrained(DEFAULT_MODEL, dtype=torch.float32)
    ids = tokenizer.encode(HAYSTACK.read_text()[:1500])
    with torch.no_grad():
        x = torch.tensor(ids)[None]
        whole = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[0, 1:]).item()
    one = sliding_window_nll(model, ids, len(ids))
    assert one["tokens"] == len(ids) - 1 and one["nll"] == pytest.approx(whole, rel=1e-5)
    sliding = sliding_window_nll(model, ids, 128, 64)
    assert sliding["tokens"] == len(ids) - 1 and sliding["windows"] == -(-(len(ids) - 128) // 64) + 1
    disjoint = sliding_window_nll(model, ids, 128)
    assert disjoint["tokens"] == len(ids) - disjoint["windows"]


def test_niah_against_a_server(tmp_path):
    pytest.importorskip("fastapi")
    pytest.importorskip("matplotlib")
    from deepseek_v2.cli import main
    from server_process import start_server, stop_server
    proc, url, _ = start_server("--num-kv-blocks", "64", "--served-model-name", "demo")
    try:
        out = tmp_path / "niah"
        assert main(["eval", "niah", "--base-url", url + "/v1", "--lengths", "256,512", "--depths", "0,50,100",
                     "--max-tokens", "12", "--out", str(out)]) == 0
    finally:
        stop_server(proc)
    result = json.loads(out.with_suffix(".json").read_text())
    assert result["lengths"] == [256, 512] and result["depths"] == [0.0, 0.5, 1.0]
    assert result["model"].startswith("demo at http")  # the served name, asked of /v1/models
    assert len(result["cases"]) == 6 and len(result["scores"]) == 3
    assert all(0.0 <= s <= 1.0 for row in result["scores"] for s in row) and 0.0 <= result["mean"] <= 1.0
    for case in result["cases"]:
        assert case["server_prompt_tokens"] == case["prompt_tokens"] <= case["length"] - 12
        assert case["prompt_tokens"] > case["length"] - 12 - 40  # the haystack fills the length
        assert case["score"] == (1.0 if re.search(rf"(?<!\w){case['expected']}(?!\w)", case["reply"]) else 0.0)
    png = out.with_suffix(".png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000
