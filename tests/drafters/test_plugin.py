"""Drafter kinds are plug-ins: a third kind, defined and registered in this file alone (a
one-layer MLP head on the target's last-layer feature, chained on its own hidden state), runs
lossless speculative decoding, export / import in its own HF-style layout, and the SFT and
Draft-OPD stages of the launcher - with no change to `opd/`."""

import dataclasses
import json
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import opd
from conftest import make_hf_model, make_target
from opd import pipeline
from opd.checkpoints.errors import CheckpointError
from opd.configs import load_config
from opd.decoding.sampling import process_logits
from opd.drafters import registry
from opd.drafters.base import Drafter, DrafterSpec, LossOut
from opd.paths import read_jsonl
from opd.training.losses import as_aux, shift_left

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ARCH = "ToyMLPDrafter"


@dataclasses.dataclass(frozen=True)
class ToySpec(DrafterSpec):
    """params = {"toy": {"w1": [2D, D], "w2": [D, V]}, "embedding": the target's [V, D]}.

    Step k reads (f, x): f the target's last-layer feature of position t (step 1) or its own
    hidden of step k - 1, x the token after it; h = tanh([f, emb(x)] @ w1); logits = h @ w2
    predict the token after x. State between rounds: the feature of the last position whose
    target feature is known (committed length n: position n - 2)."""

    hidden_size: int = 0
    layer: int = 0

    kind = "toy_mlp"

    def __post_init__(self):
        object.__setattr__(self, "target_hidden_layers", (self.layer,))

    def _step(self, params, f_BD, x_B):
        h = jnp.tanh(jnp.concatenate([f_BD, params["embedding"][x_B]], -1) @ params["toy"]["w1"])
        return h, h @ params["toy"]["w2"]

    def _chain(self, params, f_BD, x_B, steps, key=None, sp=None, tokens_BK=None):
        """Logits of `steps` chained drafts; the inputs are its own samples (inference) or
        `tokens_BK` (replay)."""
        out, toks = [], []
        keys = jax.random.split(key, steps) if key is not None else [None] * steps
        for k in range(steps):
            f_BD, logits = self._step(params, f_BD, x_B)
            out.append(logits)
            if tokens_BK is not None:
                x_B = tokens_BK[:, k]
            elif sp.greedy:
                x_B = jnp.argmax(logits, -1).astype(jnp.int32)
            else:
                x_B = jax.random.categorical(keys[k], process_logits(logits, sp), -1).astype(jnp.int32)
            toks.append(x_B)
        return jnp.stack(out, 1), jnp.stack(toks, 1)

    # inference
    def prefill(self, params, ctx, target_aux, cache_len):
        rows = jnp.arange(ctx.seq_BS.shape[0])
        return target_aux[0][rows, ctx.seq_len_B - 2]

    def propose(self, params, f_BD, ctx, key, num_draft_tokens, sp):
        logits, toks = self._chain(params, f_BD, ctx.pending(), num_draft_tokens, key=key, sp=sp)
        return toks, None if sp.greedy else process_logits(logits, sp), f_BD

    def commit(self, params, f_BD, ctx, n_accepted_B, target_aux):
        # target_aux: features of [pending, d_1..d_K]; the last known one is now offset n_accepted
        return target_aux[0][jnp.arange(f_BD.shape[0]), n_accepted_B]

    # training hooks
    def split_params(self, params):
        return params["toy"], {}

    def join_params(self, trainable, frozen, target_params):
        return {"toy": trainable, "embedding": target_params["embedding"]}

    def shared_params(self, params):
        return {"embedding": params["embedding"]}

    def abstract_trainable(self):
        D, V = self.hidden_size, self.vocab_size
        return jax.eval_shape(lambda: {"w1": nn.Partitioned(jnp.zeros((2 * D, D)), ("concat_embed", "embed")),
                                       "w2": nn.Partitioned(jnp.zeros((D, V)), ("embed", "vocab"))})

    def with_param_dtype(self, dtype):
        return self  # float32 only

    def sft_loss(self, trainable, frozen, target_params, target_config, features, tokens_BT, loss_mask_BT, key,
                 loss_config):
        f = as_aux(features.aux, 1, "toy")[0]  # f_t predicts, with x_{t+1}, the token x_{t+2}
        params = self.join_params(trainable, frozen, target_params)
        _, logits = self._step(params, f, shift_left(tokens_BT, 1))
        labels, mask = shift_left(tokens_BT, 2), shift_left(loss_mask_BT.astype(jnp.float32), 2)
        logq = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
        ce = -jnp.take_along_axis(logq, labels[..., None], -1)[..., 0]
        n = jnp.maximum(mask.sum(), 1.0)
        acc = jnp.sum(mask * (jnp.argmax(logq, -1) == labels)) / n
        loss = jnp.sum(mask * ce) / n
        return LossOut(loss, loss[None], acc[None], jnp.ones((1,)), mask.sum())

    def sft_flops(self, target_config, batch, seq_len, loss_config):
        return 6 * (3 * self.hidden_size ** 2 + self.hidden_size * self.vocab_size) * batch * seq_len

    def replay_logits(self, trainable, params, target_config, rec, aux, error_anchors=False):
        params = self.join_params(trainable, {}, params)
        B, R, K = rec.drafts_BRK.shape
        f_BSD, rows = aux[0], jnp.arange(B)[:, None]

        def chain(n_BR, steps, drafts_BRK):  # the chain anchored at committed length n
            f = f_BSD[rows, jnp.maximum(n_BR - 2, 0)].reshape(B * R, -1)
            x = rec.seq_BS[rows, n_BR - 1].reshape(B * R)
            logits, _ = self._chain(params, f, x, steps, tokens_BK=drafts_BRK.reshape(B * R, K))
            return logits.reshape(B, R, steps, -1)

        main = chain(rec.anchor_BR, K, rec.drafts_BRK)
        if not error_anchors:
            return main
        return main, chain(rec.anchor_BR + rec.num_accepted_BR, 1, rec.drafts_BRK)[:, :, 0]

    def opd_flops(self, target_config, batch, prompt_len, num_rounds, num_draft_tokens, seq_len, error_anchors=False):
        n = 3 * self.hidden_size ** 2 + self.hidden_size * self.vocab_size
        return (2 + 6 * (2 if error_anchors else 1)) * n * batch * num_rounds * num_draft_tokens


@dataclasses.dataclass(frozen=True)
class ToyLoss:
    """The toy's SFT loss has no options."""


class ToyKind(registry.DrafterKind):
    name = "toy_mlp"
    trainable = True
    architectures = (ARCH,)
    sft_loss_config = ToyLoss

    def init(self, target, seed=0, **overrides):
        if overrides:
            raise ValueError(f"unknown toy_mlp options {sorted(overrides)}")
        c = target.config
        D, V = c.hidden_size, c.vocab_size
        k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
        toy = {"w1": jax.random.normal(k1, (2 * D, D)) / math.sqrt(2 * D), "w2": jax.random.normal(k2, (D, V)) * 0.02}
        spec = ToySpec(vocab_size=V, hidden_size=D, layer=c.num_layers - 1)
        return Drafter(spec, {"toy": toy, "embedding": target.params["embedding"]})

    def load(self, path, target):
        with open(os.path.join(path, "config.json")) as f:
            cfg = json.load(f)
        c = target.config
        if (cfg["hidden_size"], cfg["vocab_size"]) != (c.hidden_size, c.vocab_size):
            raise CheckpointError(f"{path}: a toy drafter for another target")
        sd = load_file(os.path.join(path, "model.safetensors"))
        spec = ToySpec(vocab_size=c.vocab_size, hidden_size=c.hidden_size, layer=int(cfg["target_layer"]))
        return Drafter(spec, {"toy": {k: jnp.asarray(v) for k, v in sd.items()}, "embedding": target.params["embedding"]})

    def export(self, drafter, path):
        os.makedirs(path, exist_ok=True)
        s = drafter.spec
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump({"architectures": [ARCH], "hidden_size": s.hidden_size, "vocab_size": s.vocab_size,
                       "target_layer": s.layer}, f)
        save_file({k: np.asarray(v, np.float32) for k, v in drafter.params["toy"].items()},
                  os.path.join(path, "model.safetensors"))


@pytest.fixture()
def toy_kind():
    registry.register(ToyKind())
    yield
    registry.unregister("toy_mlp")


def test_toy_kind_decodes_losslessly_and_round_trips_its_layout(toy_kind, tmp_path):
    target = make_target("llama", seed=3)
    drafter = opd.init_drafter("toy_mlp", target, seed=1)
    assert "toy_mlp" in registry.names(trainable=True)
    prompts = [[5, 9, 2, 5, 9], [17, 3], [1, 2, 3, 4, 5, 6, 7]]
    want = opd.generate(target, prompts, max_new_tokens=12, eos_token_ids=())
    got = opd.speculative_generate(target, drafter, prompts, max_new_tokens=12, num_draft_tokens=3, eos_token_ids=())
    assert got.tokens == want.tokens and got.stats["verify_rounds"] > 0
    opd.export_drafter(drafter, str(tmp_path / "toy"))
    back = opd.load_drafter(str(tmp_path / "toy"), target)
    assert back.kind == "toy_mlp" and back.spec == drafter.spec
    jax.tree.map(np.testing.assert_array_equal, back.params, drafter.params)


def test_toy_kind_trains_by_sft_and_draft_opd_through_the_launcher(toy_kind, tmp_path):
    model, _ = make_hf_model("llama", seed=7)
    model.config.eos_token_id = 1
    model.save_pretrained(tmp_path / "target", safe_serialization=True)
    rs = np.random.RandomState(0)
    (tmp_path / "data").mkdir()
    with open(tmp_path / "data" / "shard-00000.jsonl", "w") as f:  # answers that follow a pattern
        for i in range(8):
            start = int(rs.randint(2, 120))
            f.write(json.dumps({"prompt_id": f"p{i}", "prompt_set": "test", "target": "tiny",
                                "prompt_ids": rs.randint(2, 128, 5).tolist(),
                                "response_ids": [(start + 5 * j) % 126 + 2 for j in range(12)] + [1]}) + "\n")
    config = load_config(os.path.join(REPO, "experiments", "opd_smollm2.py") + ":eagle3,tiny")
    config.stages = ("sft", "export:sft", "opd", "export:opd")
    config.target.path = str(tmp_path / "target")
    config.drafter.kind = "toy_mlp"
    config.drafter.overrides = ml_collections.ConfigDict()
    config.sft.loss = ml_collections.ConfigDict()  # the toy's loss has no options
    config.sft.update(data=(str(tmp_path / "data"),), seq_len=24, batch_size=2, num_steps=6, log_every=1,
                      target_features="online")
    config.sft.optimizer.update(learning_rate=3e-2, warmup_steps=1)
    config.opd.update(init="workdir:export/sft_toy_mlp", data=(str(tmp_path / "data"),), prompt_len=16,
                      num_steps=3, num_rounds=2, num_draft_tokens=3, log_every=1, tensorboard=False)
    config.opd.probe.num_prompts = 0
    pipeline.run(config, str(tmp_path / "run"))
    sft_rows = [r for r in read_jsonl(str(tmp_path / "run" / "sft" / "toy_mlp" / "metrics.jsonl")) if "loss" in r]
    assert [r["step"] for r in sft_rows] == [1, 2, 3, 4, 5, 6] and sft_rows[-1]["loss"] < sft_rows[0]["loss"]
    opd_rows = [r for r in read_jsonl(str(tmp_path / "run" / "opd" / "toy_mlp" / "metrics.jsonl")) if "loss" in r]
    assert [r["step"] for r in opd_rows] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in opd_rows)
    assert opd_rows[0]["flops"] > sft_rows[-1]["flops"]  # one cumulative FLOPs axis from the warm-up
    target = opd.load_target(config.target.path)
    trained = opd.load_drafter(str(tmp_path / "run" / "export" / "opd_toy_mlp"), target)
    warm = opd.load_drafter(str(tmp_path / "run" / "export" / "sft_toy_mlp"), target)
    assert trained.kind == "toy_mlp"
    assert not np.array_equal(np.asarray(trained.params["toy"]["w2"]), np.asarray(warm.params["toy"]["w2"]))
