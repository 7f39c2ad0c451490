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


TRAINABLE = {"eagle3": "eagle", "dflash": "dflash"}  # the trained subtree of drafter.params


def with_param_dtype(drafter: Drafter, dtype: str) -> Drafter:
    """The drafter with its trained parameters stored in `dtype` (e.g. float32 master weights,
    and so float32 AdamW moments, next to a bf16 target); the computation keeps the config's
    `dtype` (the modules cast their parameters to it). "" keeps them as they are."""
    import dataclasses

    import jax
    import jax.numpy as jnp

    if not dtype or drafter.kind not in TRAINABLE or drafter.spec.config.param_dtype == dtype:
        return drafter
    key = TRAINABLE[drafter.kind]
    cast = jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, drafter.params[key])
    spec = dataclasses.replace(drafter.spec, config=dataclasses.replace(drafter.spec.config, param_dtype=dtype))
    return Drafter(spec, {**drafter.params, key: cast}, drafter.tokenizer)


__all__ = ["DraftContext", "Drafter", "DrafterSpec", "KINDS", "TRAINABLE", "init_drafter", "with_param_dtype"]
