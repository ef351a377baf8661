"""DeepSeek-V2: Multi-head Latent Attention, DeepSeekMoE and YaRN, with an inference engine,
an OpenAI-compatible server and training."""

from .config import EngineConfig, ModelArgs
from .model import DeepseekV2ForCausalLM

__version__ = "0.1.0"
__all__ = ["DeepseekV2ForCausalLM", "ModelArgs", "EngineConfig", "__version__"]
