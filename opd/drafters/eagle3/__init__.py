"""The EAGLE-3 drafter plug-in: network (`model`), chain drafting and training hooks
(`drafter`), SFT loss / replay / FLOPs (`training`), the public HF layout (`hf`)."""

from __future__ import annotations


from opd.drafters.eagle3 import hf
from opd.drafters.eagle3.drafter import Eagle3Spec, init_eagle3
from opd.drafters.eagle3.model import Eagle3Config
from opd.drafters.eagle3.training import Eagle3SFTLoss
from opd.drafters.registry import DrafterKind


class Eagle3Kind(DrafterKind):
    name = "eagle3"
    trainable = True
    architectures = (hf.ARCHITECTURE,)
    uses_token_counts = True  # the draft vocabulary: the training data's most frequent tokens
    sft_loss_config = Eagle3SFTLoss

    def init(self, target, seed: int = 0, **overrides):
        return init_eagle3(target, seed=seed, **overrides)

    def recognizes(self, hf_config):  # also EAGLE's training configs (LlamaForCausalLM + EAGLE-3 fields)
        return hf.is_eagle3_config(hf_config)

    def load(self, path, target):
        return hf.load_eagle3_hf(path, target)

    def export(self, drafter, path):
        hf.export_eagle3_hf(drafter, path)

    def scaled_overrides(self, overrides, full_target_config, target_config):
        L, L_full = target_config.num_layers, full_target_config.num_layers
        if L == L_full:
            return dict(overrides)
        ids = Eagle3Config.for_target(full_target_config, **overrides).target_layers
        return {**overrides, "target_layers": tuple(min(L - 1, i * L // L_full) for i in ids)}


__all__ = ["Eagle3Kind", "Eagle3Spec", "Eagle3SFTLoss", "init_eagle3"]
