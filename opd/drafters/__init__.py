"""Drafters for speculative decoding, behind one interface (`opd.drafters.base`)."""

from opd.drafters.base import DraftContext, Drafter, DrafterSpec

KINDS = ("ngram", "lm", "eagle3", "dflash")


def init_drafter(kind: str, target, seed: int = 0, **overrides) -> Drafter:
    """Builds a drafter for `target`.

    kinds: "ngram" (prompt lookup; overrides max_ngram, min_ngram), "lm" (an independent
    small LM: pass `model=<opd.Target with the target's vocabulary>`), "eagle3" (feature-fusion
    chain drafter; see `opd.drafters.eagle3.init_eagle3`) and "dflash" (block
    diffusion drafter over the target's features; see `opd.drafters.dflash.init_dflash`).
    """
    if kind == "ngram":
        from opd.drafters.ngram import NGramSpec

        return Drafter(NGramSpec(vocab_size=target.config.vocab_size, **overrides), None)
    if kind == "lm":
        from opd.drafters.lm import LMSpec

        model = overrides.pop("model", None)
        if model is None:
            raise ValueError('init_drafter("lm", target, model=...) needs the small LM (an opd.Target)')
        if overrides:
            raise ValueError(f"unknown options for the lm drafter: {sorted(overrides)}")
        return Drafter(LMSpec(vocab_size=model.config.vocab_size, config=model.config), model.params, model.tokenizer)
    if kind == "eagle3":
        from opd.drafters.eagle3 import init_eagle3

        return init_eagle3(target, seed=seed, **overrides)
    if kind == "dflash":
        from opd.drafters.dflash import init_dflash

        return init_dflash(target, seed=seed, **overrides)
    raise ValueError(f"unknown drafter kind {kind!r}; available: {KINDS}")


__all__ = ["DraftContext", "Drafter", "DrafterSpec", "KINDS", "init_drafter"]
