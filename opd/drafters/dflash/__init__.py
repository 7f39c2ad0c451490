"""The DFlash drafter plug-in: network (`model`), block drafting and training hooks
(`drafter`), SFT loss / replay / FLOPs (`training`), the z-lab HF layout (`hf`)."""

from __future__ import annotations

import types

from opd.drafters.dflash import hf
from opd.drafters.dflash.drafter import DFlashSpec, config_for_target, init_dflash, make_drafter
from opd.drafters.dflash.model import DFlashConfig
from opd.drafters.dflash.training import DFlashSFTLoss
from opd.drafters.registry import DrafterKind


class DFlashKind(DrafterKind):
    name = "dflash"
    trainable = True
    architectures = (hf.ARCHITECTURE,)
    uses_token_counts = True  # a draft vocabulary (draft_vocab_size > 0) is chosen from them
    sft_loss_config = DFlashSFTLoss

    def init(self, target, seed: int = 0, token_counts=None, **overrides):
        return init_dflash(target, seed=seed, token_counts=token_counts, **overrides)

    def load(self, path, target):
        return hf.load_dflash_hf(path, target)

    def export(self, drafter, path):
        hf.export_dflash_hf(drafter, path)

    def draft_limit(self, overrides, path: str = ""):
        """block_size - 1: from the checkpoint's config.json, else the overrides (or the default)."""
        block = hf.declared_block_size(path) if path else dict(overrides).get("block_size", DFlashConfig.block_size)
        return int(block) - 1, f"block_size {block}"

    def scaled_overrides(self, overrides, full_target_config, target_config):
        L, L_full = target_config.num_layers, full_target_config.num_layers
        if L == L_full:
            return dict(overrides)
        full = types.SimpleNamespace(config=full_target_config, tokenizer=None)
        ids = config_for_target(full, **overrides).target_layer_ids
        rest = {k: v for k, v in overrides.items() if k != "num_target_features"}
        return {**rest, "target_layer_ids": tuple(min(L - 1, i * L // L_full) for i in ids)}


__all__ = ["DFlashConfig", "DFlashKind", "DFlashSFTLoss", "DFlashSpec", "config_for_target", "init_dflash",
           "make_drafter"]
