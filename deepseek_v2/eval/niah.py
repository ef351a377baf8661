"""Needle in a haystack, as in the DeepSeek-V2 paper's Figure 4: a needle (needles.py: a pass key or a
fact) hidden at depths 0-100% of haystacks of several lengths, the question asked after it, greedy
replies scored by exact match, and a heatmap of the scores (length x depth).

    deepseek-v2 eval niah [--model DIR | --base-url URL/v1 [--api-key KEY] [--model NAME]] [--lengths 1k,2k,...]

- Against a checkpoint (in-process engine) or any OpenAI-compatible server (/v1/chat/completions,
  temperature 0), so a V2-Lite-Chat or 236B deployment can be checked the same way.
- Lengths count tokens of the whole request: the rendered prompt plus max_tokens of reply fit in
  the length. They are counted with the checkpoint's tokenizer (a server's: --tokenizer, else the
  bundled one; every result also records the prompt_tokens the server reports).
- The haystack is a text file, repeated when it is shorter than the longest length; by default
  haystack.txt beside this module: held-out pages of the Python documentation (PSF License Version 2)
  and WordNet 3.0 entries (WordNet 3.0 licence), text the demonstration model never trained on;
  haystack-NOTICE.txt holds the notices.
- Writes a JSON file with every case (prompt, expected value, reply, score) and the score matrix,
  and a PNG heatmap in the paper's style (matplotlib, the `eval` extra).
"""

from __future__ import annotations

import concurrent.futures
import json
import random
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from .needles import Needle, insert_needle, make_needle, retrieval_prompt, score

HAYSTACK = Path(__file__).with_name("haystack.txt")
DEPTHS = tuple(d / 100 for d in range(0, 101, 10))


@dataclass
class Case:
    length: int
    depth: float
    trial: int
    needle: Needle
    messages: list[dict]
    prompt_tokens: int  # counted with our tokenizer
    reply: str = ""
    server_prompt_tokens: int | None = None  # as the server counted them
    score: float = 0.0


def parse_length(text: str) -> int:
    """'4096', '4k' or '4K' (x1024)."""
    text = text.strip().lower()
    return int(float(text[:-1]) * 1024) if text.endswith("k") else int(text)


def build_cases(tokenizer, haystack: str, lengths: list[int], depths: list[float], kind: str, trials: int,
                max_tokens: int, seed: int = 0) -> list[Case]:
    """One case per (length, depth, trial): the haystack cut so that the chat prompt is as long as
    fits in length - max_tokens tokens, the needle inserted at the depth."""
    ids = tokenizer.encode(haystack, add_special_tokens=False)
    while len(ids) < max(lengths):  # a short text is repeated
        haystack = haystack + "\n\n" + haystack
        ids = tokenizer.encode(haystack, add_special_tokens=False)
    cases = []
    for length in lengths:
        budget = length - max_tokens
        for depth in depths:
            for trial in range(trials):
                needle = make_needle(kind, random.Random(f"{seed}-{length}-{depth}-{trial}"))
                n = budget
                while True:
                    text = tokenizer.decode(ids[:max(n, 0)]).strip()
                    messages = [{"role": "user", "content": retrieval_prompt(insert_needle(text, needle.text, depth),
                                                                             needle)}]
                    count = len(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
                    if count <= budget or n <= 0:
                        break
                    n -= count - budget
                if count > budget:
                    raise ValueError(f"length {length}: the question alone takes {count} tokens")
                cases.append(Case(length, depth, trial, needle, messages, count))
    return cases


class EngineBackend:
    """A checkpoint run by this package's engine, in-process."""

    def __init__(self, path: str | None, **engine_knobs):
        from ..llm import LLM
        self.llm = LLM(path, **engine_knobs)
        self.tokenizer = self.llm.tokenizer
        self.name = self.llm.model_path
        self.max_len = self.llm.engine.max_model_len

    def answer(self, cases: list[Case], max_tokens: int) -> None:
        from ..sampling_params import SamplingParams
        outputs = self.llm.chat([c.messages for c in cases], SamplingParams(temperature=0.0, max_tokens=max_tokens))
        for case, out in zip(cases, outputs):
            case.reply, case.server_prompt_tokens = out.outputs[0].text, len(out.prompt_token_ids)


class ServerBackend:
    """An OpenAI-compatible server: POST {base_url}/chat/completions, greedy, `concurrency` at a time."""

    def __init__(self, base_url: str, api_key: str | None, model: str | None, tokenizer, concurrency: int = 4,
                 timeout: float = 600.0):
        self.base_url, self.api_key, self.timeout = base_url.rstrip("/"), api_key, timeout
        self.model = model or self._get("/models")["data"][0]["id"]
        self.name, self.tokenizer, self.concurrency, self.max_len = f"{self.model} at {self.base_url}", tokenizer, \
            concurrency, None

    def _request(self, path: str, body: dict | None = None) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base_url + path, data=data, headers=headers)
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            return json.loads(response.read())

    def _get(self, path: str) -> dict:
        return self._request(path)

    def _ask(self, case: Case, max_tokens: int) -> None:
        reply = self._request("/chat/completions", {"model": self.model, "messages": case.messages,
                                                    "temperature": 0, "max_tokens": max_tokens})
        case.reply = reply["choices"][0]["message"]["content"] or ""
        case.server_prompt_tokens = (reply.get("usage") or {}).get("prompt_tokens")

    def answer(self, cases: list[Case], max_tokens: int) -> None:
        from tqdm import tqdm
        with concurrent.futures.ThreadPoolExecutor(self.concurrency) as pool, \
                tqdm(total=len(cases), desc="needles", unit="prompt") as bar:
            for future in concurrent.futures.as_completed([pool.submit(self._ask, c, max_tokens) for c in cases]):
                future.result()
                bar.update(1)


def run_niah(backend, haystack: str, lengths: list[int], depths: list[float], kind: str = "passkey",
             trials: int = 1, max_tokens: int = 24, seed: int = 0) -> dict:
    """Ask every case, score the replies; returns the JSON-ready result."""
    if backend.max_len is not None and max(lengths) > backend.max_len:
        raise ValueError(f"length {max(lengths)} is over the model's limit of {backend.max_len} tokens")
    cases = build_cases(backend.tokenizer, haystack, lengths, depths, kind, trials, max_tokens, seed)
    backend.answer(cases, max_tokens)
    for case in cases:
        case.score = score(case.reply, case.needle)
    grid = [[sum(c.score for c in cases if c.length == n and c.depth == d) / trials for n in lengths] for d in depths]
    return {"model": backend.name, "needle": kind, "lengths": lengths, "depths": depths, "trials": trials,
            "max_tokens": max_tokens, "seed": seed, "scores": grid,
            "mean": sum(c.score for c in cases) / len(cases),
            "cases": [{**{k: v for k, v in asdict(c).items() if k not in ("needle", "messages")},
                       "question": c.needle.question, "expected": c.needle.value} for c in cases]}


def plot_heatmap(result: dict, path: str | Path, title: str | None = None) -> None:
    """The paper's picture: context length across, needle depth down, colour = score (red 0 to green 1)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LinearSegmentedColormap

    lengths, depths, grid = result["lengths"], result["depths"], result["scores"]
    cmap = LinearSegmentedColormap.from_list("niah", ["#F0496E", "#EBB839", "#0CD79F"])
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(lengths) + 2), 0.45 * len(depths) + 1.8))
    image = ax.imshow(grid, cmap=cmap, vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(lengths)), [f"{n // 1024}K" if n % 1024 == 0 else str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{round(100 * d)}" for d in depths])
    ax.set_xticks([i - 0.5 for i in range(1, len(lengths))], minor=True)
    ax.set_yticks([i - 0.5 for i in range(1, len(depths))], minor=True)
    ax.grid(which="minor", color="white", linewidth=1)
    ax.tick_params(which="minor", length=0)
    ax.set_xlabel("Context Length (#Tokens)")
    ax.set_ylabel("Document Depth Percent (%)")
    ax.set_title(title or f"Needle in a haystack ({result['needle']}): {result['model']}, mean {result['mean']:.2f}",
                 fontsize=10)
    fig.colorbar(image, ax=ax, label="Score")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
