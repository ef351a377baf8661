"""Sample conversations with a trained demo model: held-out questions from the chat set plus a few
of our own, answered greedily. Writes markdown to stdout.

    PYTHONPATH=. python scripts/demo_samples.py MODEL_DIR [data/demo/chat_val.jsonl] [N]
"""

import json
import sys

from deepseek_v2 import LLM, SamplingParams

OWN_QUESTIONS = [
    "What does the Python function len do?",
    "What does the word serendipity mean?",
    "What is a dictionary in Python?",
    "What does json.dumps do?",
    "What does the word river mean?",
]


def main(model: str, val_path: str = "data/demo/chat_val.jsonl", n: int = 8) -> None:
    held_out = []
    with open(val_path) as f:
        for line in f:
            held_out.append(json.loads(line)["messages"])
            if len(held_out) == int(n):
                break
    llm = LLM(model, max_num_seqs=16)
    params = SamplingParams(temperature=0, max_tokens=120)
    convs = [c[:1] for c in held_out]  # the first user turn
    convs += [[{"role": "user", "content": q}] for q in OWN_QUESTIONS]
    outs = llm.chat(convs, params, use_tqdm=False)
    for i, (conv, out) in enumerate(zip(convs, outs)):
        kind = "held-out" if i < len(held_out) else "not from the data set"
        print(f"**User** ({kind}): {conv[-1]['content']}\n")
        if i < len(held_out):
            ref = held_out[i][1]["content"]
            print(f"*Reference answer*: {ref}\n")
        print(f"**Model**: {out.outputs[0].text.strip()}\n")


if __name__ == "__main__":
    main(*sys.argv[1:])
