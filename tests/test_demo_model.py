# Run: python -m pytest -q tests/test_demo_model.py
"""The shipped demonstration model: loads in our engine and in transformers with the same greedy
output, stays below its stated held-out loss, and answers in the trained chat format."""

import math

import pytest
import torch
import torch.nn.functional as F

from deepseek_v2 import LLM, DeepseekV2ForCausalLM, SamplingParams, Tokenizer
from deepseek_v2.config import DEFAULT_MODEL

HELD_OUT = "tests/data/demo_chat_heldout.jsonl"  # 200 conversations of the held-out chat split
HELD_OUT_LOSS_BOUND = 1.9  # measured 1.68 nats/token on these (1.77 on the whole split); untrained: 8.3


@pytest.fixture(scope="module")
def llm():
    return LLM(DEFAULT_MODEL, device="cpu", dtype="float32")


def test_greedy_output_matches_transformers(llm):
    from transformers import DeepseekV2ForCausalLM as HFModel
    hf = HFModel.from_pretrained(DEFAULT_MODEL, dtype=torch.float32).eval()
    tok = llm.tokenizer
    questions = ["What does the word \"harbor\" mean?", "What does os.getcwd() do?", "What is a tuple?"]
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)
               for q in questions]
    ours = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True), use_tqdm=False)
    for prompt, out in zip(prompts, ours):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, eos_token_id=None,
                              pad_token_id=tok.eos_token_id)[0, len(prompt):].tolist()
        assert out.outputs[0].token_ids == ref


def test_held_out_loss_below_bound():
    from deepseek_v2.train.data import IGNORE, load_chat
    model = DeepseekV2ForCausalLM.from_pretrained(DEFAULT_MODEL, dtype=torch.float32)
    data = load_chat(HELD_OUT, Tokenizer.from_pretrained(DEFAULT_MODEL), 1024)
    inputs, targets = data.get(list(range(data.num_sequences)))
    with torch.no_grad():
        loss = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten(), ignore_index=IGNORE).item()
    assert loss < HELD_OUT_LOSS_BOUND, f"held-out loss {loss:.3f} (perplexity {math.exp(loss):.2f})"


def test_answers_in_the_trained_format(llm):
    out = llm.chat([{"role": "user", "content": "What does the word \"momentarily\" mean?"}],
                   SamplingParams(temperature=0, max_tokens=40), use_tqdm=False)[0].outputs[0]
    assert out.text.strip().startswith('"momentarily" (adverb):')
    assert out.finish_reason == "stop"  # it ends its answer with the end-of-sentence token
