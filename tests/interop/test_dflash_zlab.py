"""DFlash exports against z-lab's own PyTorch model, both ways.

The `dflash` package (PyPI 0.1.0; .ci/run installs it with --no-deps) ships z-lab's
`DFlashDraftModel` (`dflash/model.py`). On a tiny random Qwen3 target that both sides run
(transformers' model for z-lab, `opd.load_target` of its save for us):
  * our export -> `DFlashDraftModel.from_pretrained` (no missing / unexpected tensors);
  * `DFlashDraftModel.save_pretrained` -> `opd.load_drafter`;
each checked by equal block logits (float32 tolerance) and identical greedy draft tokens at a
few anchors, with z-lab's context features `hidden_states[id + 1]` against our layer ids.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import opd
from conftest import make_hf_model, tol
from opd.drafters.dflash import model as dfm

torch = pytest.importorskip("torch")
zlab = pytest.importorskip("dflash.model", reason="z-lab's dflash package: pip install --no-deps dflash==0.1.0")

V, L, BLOCK, IDS = 128, 4, 5, (1, 2)  # ids: 0-based decoder-layer outputs, L-1 = 3 excluded
MASK = V - 1
# The draft network, the same both ways (so its jitted forward compiles once): 2 layers of 2
# query heads over 1 kv head of width 32, MLP width 80 (the target: 4 / 1 heads of 32, MLP 96).
DRAFT = dict(num_layers=2, num_heads=2, num_kv_heads=1, head_dim=32, intermediate_size=80)
SEQ = [5, 17, 3, 99, 42, 8, 61, 23, 70, 11, 4, 90]
ANCHORS = (3, 7, 12)  # sequence lengths m: context = the first m-1 tokens, anchor = token m


@pytest.fixture(scope="module")
def targets(tmp_path_factory):
    """(transformers model, opd.Target) of the same tiny random Qwen3 checkpoint."""
    model, _ = make_hf_model("qwen3_qknorm", seed=4, num_hidden_layers=L, vocab_size=V)
    with torch.no_grad():
        model.lm_head.weight.mul_(10.0)  # logits spread over a few units: clear greedy choices
    path = tmp_path_factory.mktemp("qwen3")
    model.save_pretrained(str(path), safe_serialization=True)
    return model, opd.load_target(str(path))


def _zlab_logits(zl, hf_model, m):
    """z-lab's block logits [Q-1, V] for the block anchored at SEQ[m-1], as `dflash_generate`
    computes them (context features of the m-1 earlier tokens, no cache)."""
    ids = torch.tensor([SEQ[:m]])
    with torch.no_grad():
        hs = hf_model(ids[:, : m - 1], output_hidden_states=True).hidden_states
        ctx = zlab.extract_context_feature(hs, zl.target_layer_ids)
        block = torch.tensor([[SEQ[m - 1]] + [zl.mask_token_id] * (zl.block_size - 1)])
        noise = hf_model.get_input_embeddings()(block)
        pos = torch.arange(m - 1 + zl.block_size)[None]
        hidden = zl(target_hidden=ctx, noise_embedding=noise, position_ids=pos)[:, 1:]
        return zl.compute_logits(hidden, hf_model.lm_head)[0].numpy()


def _our_logits(drafter, target):
    """Our block logits [len(ANCHORS), Q-1, V] for the same blocks: one target forward over SEQ
    (causal, so row b's context is its first m-1 positions) and the uncached reference path."""
    c, p = drafter.spec.config, drafter.params
    tokens = jnp.asarray([SEQ] * len(ANCHORS), jnp.int32)
    _, aux = target.forward(tokens, hidden_layers=c.target_layer_ids)
    m = jnp.asarray(ANCHORS, jnp.int32)
    out = _block_logits(p["dflash"], p["target"], c, target.config, aux, tokens[jnp.arange(len(ANCHORS)), m - 1], m - 1)
    return np.asarray(out)


_block_logits = jax.jit(dfm.logits_from_features, static_argnums=(2, 3))


def _assert_same_drafts(ours, theirs):
    np.testing.assert_allclose(ours, theirs, atol=tol(), rtol=0)
    top2 = np.sort(theirs, -1)[:, -2:]
    assert (top2[:, 1] - top2[:, 0]).min() > 2 * tol()  # no near-ties (the inputs' choice, not a tolerance)
    np.testing.assert_array_equal(ours.argmax(-1), theirs.argmax(-1))  # the greedy draft tokens


def _jitter(drafter, seed):
    """Non-trivial weights (norm scales away from 1, larger projections) so layout bugs show."""
    trainable, _ = drafter.split()
    rng = np.random.RandomState(seed)
    return drafter.with_trainable(jax.tree.map(lambda x: jnp.asarray(x + 0.2 * rng.randn(*x.shape), x.dtype), trainable))


def test_our_export_is_zlab_dflash_draft_model(tmp_path, targets):
    hf_model, target = targets
    drafter = _jitter(opd.init_drafter("dflash", target, seed=1, block_size=BLOCK, target_layer_ids=IDS, mask_token_id=MASK,
                                       **DRAFT), seed=3)
    opd.export_drafter(drafter, str(tmp_path))
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert "auto_map" not in cfg  # no modeling file is shipped: load through the dflash package
    assert cfg["max_position_embeddings"] == target.config.max_position_embeddings == 256

    zl, info = zlab.DFlashDraftModel.from_pretrained(str(tmp_path), dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    zl.eval()
    assert (list(zl.target_layer_ids), zl.block_size, zl.mask_token_id) == (list(IDS), BLOCK, MASK)
    ours = _our_logits(drafter, target)
    for b, m in enumerate(ANCHORS):
        _assert_same_drafts(ours[b], _zlab_logits(zl, hf_model, m))

    # z-lab's own speculative loop (its KV caches, block after block) runs on the export; greedy,
    # so it must reproduce the target's greedy continuation.
    prompt = torch.tensor([SEQ[:6]])
    out = zl.spec_generate(hf_model, prompt, max_new_tokens=10, stop_token_ids=None)[0, 6:].tolist()
    with torch.no_grad():
        greedy = hf_model.generate(prompt, max_new_tokens=10, do_sample=False)[0, 6:].tolist()
    assert out == greedy


def test_zlab_save_pretrained_loads_into_opd(tmp_path, targets):
    import transformers

    hf_model, target = targets
    cfg = transformers.Qwen3Config(
        vocab_size=V, hidden_size=64, intermediate_size=DRAFT["intermediate_size"], num_hidden_layers=DRAFT["num_layers"],
        num_attention_heads=DRAFT["num_heads"], num_key_value_heads=DRAFT["num_kv_heads"], head_dim=DRAFT["head_dim"],
        rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=256,
        tie_word_embeddings=False, num_target_layers=L, block_size=BLOCK,
        dflash_config={"mask_token_id": MASK, "target_layer_ids": list(IDS)})
    torch.manual_seed(0)
    zl = zlab.DFlashDraftModel(cfg).eval()
    with torch.no_grad():
        for p in zl.parameters():
            p.copy_(torch.randn_like(p) * (0.1 if p.ndim == 1 else 0.2) + (1.0 if p.ndim == 1 else 0.0))
    zl.save_pretrained(str(tmp_path))

    drafter = opd.load_drafter(str(tmp_path), target)
    c = drafter.spec.config
    assert (drafter.kind, c.target_layer_ids, c.block_size, c.mask_token_id, c.num_layers) == ("dflash", IDS, BLOCK, MASK, 2)
    ours = _our_logits(drafter, target)
    for b, m in enumerate(ANCHORS):
        _assert_same_drafts(ours[b], _zlab_logits(zl, hf_model, m))
