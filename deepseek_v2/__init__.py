"""DeepSeek-V2: Multi-head Latent Attention, DeepSeekMoE and YaRN, with an inference engine,
an OpenAI-compatible server and training.

Public names are imported lazily, so that the torch-free parts (scheduler, block manager) can
be imported without torch."""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "DeepseekV2ForCausalLM": "deepseek_v2.model",
    "ModelArgs": "deepseek_v2.config",
    "EngineConfig": "deepseek_v2.config",
    "LLM": "deepseek_v2.llm",
    "SamplingParams": "deepseek_v2.sampling_params",
    "StructuredOutputsParams": "deepseek_v2.sampling_params",
    "BeamSearchParams": "deepseek_v2.beam_search",
    "InvalidRequestError": "deepseek_v2.sampling_params",
    "Tokenizer": "deepseek_v2.tokenizer",
    "LLMEngine": "deepseek_v2.engine.llm_engine",
    "RequestOutput": "deepseek_v2.outputs",
    "CompletionOutput": "deepseek_v2.outputs",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'deepseek_v2' has no attribute {name!r}")
