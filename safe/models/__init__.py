"""SAFE model: frozen LLaVA + frozen audio encoder + trained projector and gated fusion.

Entry points: ``get_preset`` / ``build_safe_model`` (factory), ``SAFEModel`` (forward, generate,
param groups, save/load of the trainable state), ``SafeBatch`` (what forward/generate take).
"""

from safe.models.batching import BatchBuilder, SafeBatch
from safe.models.presets import ModelConfig, get_preset, preset_names
from safe.models.safe_model import SAFEModel, SafeOutput

__all__ = ["BatchBuilder", "SafeBatch", "ModelConfig", "get_preset", "preset_names", "SAFEModel", "SafeOutput",
           "build_safe_model", "count_parameters"]


def build_safe_model(*args, **kwargs):
    from safe.models.factory import build_safe_model as build

    return build(*args, **kwargs)


def count_parameters(*args, **kwargs):
    from safe.models.factory import count_parameters as count

    return count(*args, **kwargs)
