"""Models: the GPT-MoE config and builder, attention features, sizes, Hugging Face conversion.

* :class:`MoEModelConfig` (``config``) -> :func:`build_gpt_moe` (``builder``): a Megatron
  ``GPTModel`` with the PR2 router, any TP/EP/PP/VPP layout;
* ``attention``: q/k norms and MLA core attention the local spec lacks;
* ``parameters``: each parameter under its global (single-process) name;
* ``size``: analytic total / active parameter counts; ``hf``: Hugging Face checkpoints in and
  out (Qwen3-MoE, OLMoE, DeepSeek-V3 / Moonlight).
"""

from pr2_megatron.models.builder import build_gpt_moe, transformer_config
from pr2_megatron.models.config import MoEModelConfig

__all__ = ["MoEModelConfig", "build_gpt_moe", "transformer_config"]
