"""draft-opd: speculative decoding and on-policy distillation of draft models, in JAX.

Public API (kept stable; notebooks and outside checks use it):
  opd.load_target(path) -> opd.Target
  opd.generate(target, prompts, max_new_tokens=..., temperature=0.0, seed=0)
  opd.init_drafter("ngram" | "lm" | "eagle3" | "dflash" | a registered kind, target, seed=0, **overrides)
  opd.load_drafter(path, target) / opd.export_drafter(drafter, path)   (public HF layouts)
  opd.speculative_generate(target, drafter, prompts, max_new_tokens=..., num_draft_tokens=K,
                           temperature=0.0, seed=0)
"""

from opd.checkpoints.errors import CheckpointError
from opd.decoding.batching import PromptError
from opd.decoding.generate import GenerateOutput, generate
from opd.decoding.speculative import speculative_generate
from opd.drafters import Drafter, export_drafter, init_drafter, load_drafter
from opd.decoding.sampling import SamplingParams
from opd.models.config import ConfigError, TransformerConfig
from opd.target import Target, load_target

__all__ = [
    "CheckpointError",
    "ConfigError",
    "Drafter",
    "GenerateOutput",
    "PromptError",
    "SamplingParams",
    "Target",
    "TransformerConfig",
    "export_drafter",
    "generate",
    "init_drafter",
    "load_drafter",
    "load_target",
    "speculative_generate",
]
