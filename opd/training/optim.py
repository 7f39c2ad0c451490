"""AdamW with linear warm-up, cosine decay and global-norm clipping (optax).

The learning rate goes linearly 0 -> `learning_rate` over `warmup_steps`, then follows a
cosine to `learning_rate * end_lr_ratio` at `total_steps` (constant after). Gradients are
clipped to global norm `clip_norm` before Adam. Weight decay applies to matrices only
(rank >= 2); norm scales and biases are not decayed.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import optax


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    learning_rate: float = 1e-4  # peak learning rate after warm-up
    warmup_steps: int = 100  # linear warm-up from 0
    total_steps: int = 10_000  # warm-up + cosine decay length
    end_lr_ratio: float = 0.1  # final lr = learning_rate * end_lr_ratio
    weight_decay: float = 0.0  # decoupled (AdamW) decay on rank >= 2 parameters
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 0.5  # global-norm gradient clipping threshold

    def __post_init__(self):
        def num(name):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"optimizer {name} must be a finite number, got {v!r}")
            return v

        if num("learning_rate") <= 0:
            raise ValueError(f"optimizer learning_rate must be > 0, got {self.learning_rate}")
        for name in ("warmup_steps", "total_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"optimizer {name} must be a non-negative integer, got {v!r}")
        if self.total_steps < 1:
            raise ValueError(f"optimizer total_steps must be >= 1, got {self.total_steps}")
        if self.warmup_steps > self.total_steps:
            raise ValueError(f"optimizer warmup_steps ({self.warmup_steps}) exceeds total_steps ({self.total_steps})")
        if not 0.0 <= num("end_lr_ratio") <= 1.0:
            raise ValueError(f"optimizer end_lr_ratio must be in [0, 1], got {self.end_lr_ratio}")
        if num("weight_decay") < 0:
            raise ValueError(f"optimizer weight_decay must be >= 0, got {self.weight_decay}")
        for name in ("b1", "b2"):
            if not 0.0 <= num(name) < 1.0:
                raise ValueError(f"optimizer {name} must be in [0, 1), got {getattr(self, name)}")
        if num("eps") <= 0:
            raise ValueError(f"optimizer eps must be > 0, got {self.eps}")
        if num("clip_norm") <= 0:
            raise ValueError(f"optimizer clip_norm must be > 0, got {self.clip_norm}")

    @classmethod
    def from_config(cls, cfg: Any) -> "OptimConfig":
        """From a mapping or an attribute object (e.g. an ml_collections ConfigDict); unknown
        keys are an error, missing ones take the defaults."""
        known = {f.name for f in dataclasses.fields(cls)}
        items = dict(cfg.items()) if hasattr(cfg, "items") else dict(vars(cfg))
        unknown = sorted(set(items) - known)
        if unknown:
            raise ValueError(f"unknown optimizer options {unknown}; known: {sorted(known)}")
        return cls(**items)


def learning_rate_schedule(cfg: OptimConfig) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.learning_rate,
        warmup_steps=cfg.warmup_steps,
        decay_steps=max(cfg.total_steps, cfg.warmup_steps + 1),  # warm-up may fill the whole run
        end_value=cfg.learning_rate * cfg.end_lr_ratio,
    )


def _decay_mask(params):
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(cfg: OptimConfig | Mapping | Any) -> optax.GradientTransformation:
    """clip_by_global_norm(clip_norm) -> AdamW(schedule) from an `OptimConfig` (or a mapping /
    config object with its fields)."""
    if not isinstance(cfg, OptimConfig):
        cfg = OptimConfig.from_config(cfg)
    return optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm),
        optax.adamw(learning_rate_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                    weight_decay=cfg.weight_decay, mask=_decay_mask),
    )
