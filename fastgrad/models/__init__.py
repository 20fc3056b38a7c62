"""Models that ``fastgrad pretrain`` trains."""

from fastgrad.models.llama import CONFIGS, LlamaConfig, LlamaForCausalLM, get_config, num_parameters

__all__ = ["CONFIGS", "LlamaConfig", "LlamaForCausalLM", "get_config", "num_parameters"]
