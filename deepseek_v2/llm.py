"""`LLM`: the offline Python API (vLLM's shape) over the engine: `generate` for text or token-id
prompts, `chat` for conversations rendered with the checkpoint's chat template, and `beam_search`."""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence as Seq

import torch

from .beam_search import BeamSearch, BeamSearchOutput, BeamSearchParams
from .config import DEFAULT_MODEL
from .engine.llm_engine import LLMEngine
from .outputs import RequestOutput
from .sampling_params import SamplingParams

Prompt = str | list[int] | dict


def prompt_list(prompts: Prompt | Seq[Prompt]) -> list[str | list[int]]:
    """One prompt or a list of them, each a string or token ids (a dict's "prompt_token_ids" or "prompt")."""
    if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
        prompts = [prompts]
    return [p.get("prompt_token_ids", p.get("prompt")) if isinstance(p, dict) else p for p in prompts]


class LLM:
    """Load a checkpoint (default: the model that ships with the package) and generate.

    Engine knobs are keyword arguments, EngineConfig's fields with vLLM's names: max_model_len,
    max_num_seqs, max_num_batched_tokens, block_size, enable_prefix_caching, enforce_eager,
    gpu_memory_utilization, tensor_parallel_size (GPUs the model is split over), plus num_kv_blocks (fixed
    cache size) and cpu_kv_cache_gib (cache budget on CPU)."""

    def __init__(self, model: str | os.PathLike | None = None, dtype: str | torch.dtype = "auto",
                 device: str | None = None, seed: int = 0, **engine_knobs):
        self.model_path = str(model or DEFAULT_MODEL)
        self.engine = LLMEngine.from_pretrained(self.model_path, dtype=dtype, device=device, seed=seed,
                                                **engine_knobs)
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def generate(self, prompts: Prompt | Seq[Prompt], sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """prompts: a string, a list of token ids, a dict with "prompt" or "prompt_token_ids", or a
        list of these. Returns one RequestOutput per prompt, in order."""
        prompts = prompt_list(prompts)
        params = sampling_params or SamplingParams()
        params_list = list(params) if isinstance(params, Seq) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params_list)} sampling params")
        ids = []
        for prompt, p in zip(prompts, params_list):
            rid = str(next(self._ids))
            self.engine.add_request(rid, prompt, p)
            ids.append(rid)
        return self._run(ids, use_tqdm)

    def beam_search(self, prompts: Prompt | Seq[Prompt], params: BeamSearchParams) -> list[BeamSearchOutput]:
        """The params.beam_width most likely continuations of each prompt (vLLM's beam search,
        beam_search.py), best first; prompts as for generate."""
        search = BeamSearch([self.engine.encode_prompt(p)[1] for p in prompt_list(prompts)], params,
                            self.tokenizer.eos_token_id)
        while not search.done:  # every prompt's live beams in one batch a step
            search.advance(self.generate(search.step_prompts(), search.step_params, use_tqdm=False))
        return search.results(lambda tokens: self.tokenizer.decode(tokens, skip_special_tokens=True))

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params: SamplingParams | None = None,
             add_generation_prompt: bool = True, use_tqdm: bool = True, continue_final_message: bool = False,
             chat_template_kwargs: dict | None = None, tools: list[dict] | None = None) -> list[RequestOutput]:
        """One conversation (a list of {"role", "content"} dicts) or a list of conversations.
        continue_final_message=True (with add_generation_prompt=False): the output continues the last
        message (an assistant reply begun by the caller). tools: OpenAI's function definitions, written
        into the prompt for a checkpoint that can call tools (tool_calls.ToolCallParser.parse reads the
        calls out of the text; decode with skip_special_tokens=False to keep their markers)."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.tokenizer.apply_chat_template(c, add_generation_prompt=add_generation_prompt,
                                                      continue_final_message=continue_final_message, tools=tools,
                                                      **(chat_template_kwargs or {}))
                   for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        final: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm and len(request_ids) > 1:
            from tqdm import tqdm
            bar = tqdm(total=len(request_ids), desc="Generating", unit="prompt")
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.finished:
                    final[out.request_id] = out
                    if bar is not None:
                        bar.update(1)
        if bar is not None:
            bar.close()
        return [final[r] for r in request_ids]
