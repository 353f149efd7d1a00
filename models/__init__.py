"""The PyTorch reference: config, model, checkpoints.

Names resolve lazily, so reading a config (every CLI command does) does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dsv3c.models.config import DeepseekV3Config
    from dsv3c.models.deepseek_v3 import DeepseekV3ForCausalLM

__all__ = ["DeepseekV3Config", "DeepseekV3ForCausalLM"]


def __getattr__(name: str) -> Any:
    if name == "DeepseekV3Config":
        from dsv3c.models.config import DeepseekV3Config

        return DeepseekV3Config
    if name == "DeepseekV3ForCausalLM":
        from dsv3c.models.deepseek_v3 import DeepseekV3ForCausalLM

        return DeepseekV3ForCausalLM
    raise AttributeError(f"module 'dsv3c.models' has no attribute {name!r}")
