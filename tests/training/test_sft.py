"""SFT: the jitted train step (built by `opd.training.run.sft_run`) overfits a fixed batch for
both drafters, never touches frozen parameters, gives the same result on 1 device and on a
(2, 2, 2) mesh of 8 fake CPU devices; sharding rules, optimizer / loss config checks, FLOPs."""

import json
import math
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import opd
from conftest import make_hf_model
from opd import sharding as shd
from opd.drafters import registry
from opd.drafters.dflash import model as dfm
from opd.drafters.eagle3 import model as e3
from opd.models import transformer as tfm
from opd.training import checkpoint as ckpt
from opd.training import flops, optim
from opd.training import run as run_mod

TESTS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO = os.path.dirname(TESTS_DIR)


def _target(seed=3, logit_scale=40.0):
    model, d = make_hf_model("llama", seed=seed)
    config = opd.TransformerConfig.from_hf(d)
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    sd["lm_head.weight"] = sd["lm_head.weight"] * logit_scale  # peaked targets: the soft CE can drop far
    return opd.Target(config, jax.tree.map(jnp.asarray, tfm.params_from_hf(config, sd)))


def _drafter(target, kind):
    if kind == "eagle3":
        return opd.init_drafter("eagle3", target, seed=1, draft_vocab_size=64)
    return opd.init_drafter("dflash", target, seed=2, block_size=4)


def _batch(vocab, B=4, T=12, seed=0):
    rs = np.random.RandomState(seed)
    tokens = rs.randint(0, vocab, (B, T)).astype(np.int32)
    mask = np.ones((B, T), np.float32)
    mask[:, :3] = 0  # a "prompt" whose tokens are not trained
    return {"tokens": tokens, "loss_mask": mask}


LOSS_OPTIONS = {"eagle3": dict(ttt_steps=3), "dflash": dict(num_anchors=3)}


def _setup(target, drafter, mesh, lr=1e-2, batch_size=4, seq_len=12):
    """(run, step-0 state, placed target params, placed frozen drafter parts)."""
    optimizer = optim.make_optimizer(optim.OptimConfig(learning_rate=lr, warmup_steps=1, total_steps=100, clip_norm=1.0))
    trainable, frozen = drafter.split()
    loss_cfg = registry.get_kind(drafter.kind).loss_config(LOSS_OPTIONS[drafter.kind])
    run = run_mod.sft_run(drafter.spec, frozen, target.config, mesh=mesh, optimizer=optimizer, loss_config=loss_cfg,
                          batch_size=batch_size, seq_len=seq_len)
    tparams, frozen = run.place_frozen(target.params, frozen)
    return run, run.init_state(trainable, seed=0), tparams, frozen


def _steps(run, state, tparams, frozen, batches, on_metrics=None):
    """Runs the step over host batches (placed on the run's batch shardings)."""
    for batch in batches:
        placed = jax.device_put({k: jnp.asarray(batch[k]) for k in run.batch}, run.shardings.batch)
        state, metrics = run(state, tparams, frozen, placed)
        if on_metrics is not None:
            on_metrics(metrics)
    return state


@pytest.fixture(scope="module")
def target():
    return _target()


@pytest.mark.parametrize("kind", ["eagle3", "dflash"])
def test_sft_overfits_and_keeps_frozen_parts(target, kind):
    drafter = _drafter(target, kind)
    before = jax.tree.map(np.array, {"target": target.params, "drafter": drafter.params})
    mesh = shd.make_mesh(1, 1, 1)
    run, state, tparams, frozen = _setup(target, drafter, mesh)
    batch = _batch(target.config.vocab_size)
    history = []
    state = _steps(run, state, tparams, frozen, [batch] * 12, lambda m: history.append(jax.device_get(m)))
    losses = [float(m["loss"]) for m in history]
    assert int(state.step) == 12
    assert losses[-1] < 0.75 * losses[0] and losses[-1] == min(losses), losses
    n_steps = 3  # eagle3: ttt_steps; dflash: block_size 4 - 1 offsets
    assert history[0]["accuracy"].shape == (n_steps,) and history[0]["per_step_loss"].shape == (n_steps,)
    assert all(np.isfinite(m["grad_norm"]) and m["grad_norm"] > 0 for m in history)
    # Frozen: the target, the shared embedding / LM head and the vocabulary maps are bit-identical;
    # the drafter's own initial trainable arrays were not donated away.
    after = jax.tree.map(np.array, {"target": target.params, "drafter": drafter.params})
    jax.tree.map(np.testing.assert_array_equal, after, before)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.array, tparams), before["target"])
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.array, frozen),
                 {"vocab": before["drafter"]["vocab"]} if kind == "eagle3" else {})
    trained = jax.tree.map(np.array, state.params)
    init, _ = drafter.spec.split_params(before["drafter"])
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(init)))


# ----------------------------------------------------------------------------- sharding


def _logical_names(boxed):
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    return {n for leaf in leaves for n in leaf.names if n is not None}


def test_rule_table_covers_every_logical_name(target):
    c = target.config
    names = set()
    for tc in (c, c.replace(scan_layers=True), c.replace(family="qwen3", qk_norm=True, attention_bias=True,
                                                          tie_word_embeddings=True)):
        names |= _logical_names(tfm.abstract_params(tc))
    names |= _logical_names(e3.abstract_params(_drafter(target, "eagle3").spec.config))
    names |= _logical_names(dfm.abstract_params(_drafter(target, "dflash").spec.config.replace(attention_bias=True)))
    rules = dict(shd.LOGICAL_AXIS_RULES)
    assert names <= set(rules), names - set(rules)
    assert {"layers", "fused_embed", "concat_embed", "aux_embed", "draft_vocab", "vocab"} <= names


def test_specs_replicate_indivisible_dims_and_reject_unknown_names():
    mesh = jax.sharding.AbstractMesh((2, 2, 2), shd.MESH_AXES)
    P = jax.sharding.PartitionSpec
    assert shd.logical_to_spec(("vocab", "embed"), (128, 64), mesh) == P("tensor", "fsdp")
    assert shd.logical_to_spec(("embed", "heads", "head_dim"), (64, 3, 16), mesh) == P("fsdp", None, None)
    assert shd.logical_to_spec(("batch", None), (4, 7), mesh) == P(("data", "fsdp"), None)
    assert shd.logical_to_spec(("batch", None), (6, 7), mesh) == P(None, None)  # 6 % 4: replicated
    with pytest.raises(ValueError, match="no sharding rule"):
        shd.logical_to_spec(("embed", "mystery"), (64, 8), mesh)
    with pytest.raises(ValueError, match="unknown mesh axis"):
        shd.logical_to_spec(("embed",), (64,), mesh, rules=(("embed", "model"),))


def test_make_mesh_errors():
    n = len(jax.devices())
    with pytest.raises(ValueError, match=f"{n} device"):
        shd.make_mesh(2, n, 1)
    with pytest.raises(ValueError, match="positive"):
        shd.make_mesh(0, 1, 1)
    assert shd.make_mesh(1, 1, 1, devices=jax.devices()[:1]).axis_names == shd.MESH_AXES


_SHARDED_SCRIPT = r"""
import json, sys
import jax, numpy as np
sys.path[:0] = [TESTS_DIR]
import test_sft as t
from opd import sharding as shd
assert len(jax.devices()) == 8, jax.devices()
target = t._target()
batch = t._batch(target.config.vocab_size)
result = {}
for kind in ("eagle3", "dflash"):
    drafter = t._drafter(target, kind)
    runs = {}
    for name, mesh in (("one", shd.make_mesh(1, 1, 1, devices=jax.devices()[:1])), ("mesh", shd.make_mesh(2, 2, 2))):
        run, state, tparams, frozen = t._setup(target, drafter, mesh)
        losses = []
        state = t._steps(run, state, tparams, frozen, [batch] * 3, lambda m: losses.append(float(m["loss"])))
        specs = sorted({str(x.sharding.spec) for x in jax.tree.leaves(state.params)})
        runs[name] = (losses, jax.tree.map(np.asarray, state.params), specs)
    (l1, p1, _), (l8, p8, specs) = runs["one"], runs["mesh"]
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)))
    result[kind] = {"loss_one": l1, "loss_mesh": l8, "max_param_diff": diff, "specs": specs}
print("RESULT" + json.dumps(result))
""".replace("TESTS_DIR", repr(os.path.join(TESTS_DIR, "training")))


@pytest.mark.slow  # ~50 s; the OPD step's 8-device check stays in the README's test command
def test_step_on_8_fake_devices_matches_one_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([REPO, TESTS_DIR, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT")][-1]
    result = json.loads(line[len("RESULT"):])
    for kind, r in result.items():
        np.testing.assert_allclose(r["loss_mesh"], r["loss_one"], rtol=1e-4, err_msg=kind)
        assert r["max_param_diff"] < 1e-4, (kind, r["max_param_diff"])
        assert any("tensor" in s for s in r["specs"]) and any("fsdp" in s for s in r["specs"]), r["specs"]


# ----------------------------------------------------------------------------- configs, FLOPs


@pytest.mark.parametrize("kw, match", [
    (dict(learning_rate=-1.0), "learning_rate"),
    (dict(learning_rate=float("nan")), "learning_rate"),
    (dict(warmup_steps=50, total_steps=10), "warmup_steps"),
    (dict(total_steps=0), "total_steps"),
    (dict(warmup_steps=1.5), "warmup_steps"),
    (dict(end_lr_ratio=2.0), "end_lr_ratio"),
    (dict(weight_decay=-0.1), "weight_decay"),
    (dict(b2=1.0), "b2"),
    (dict(eps=0.0), "eps"),
    (dict(clip_norm=0.0), "clip_norm"),
])
def test_bad_optimizer_config_is_a_clear_error(kw, match):
    with pytest.raises(ValueError, match=match):
        optim.OptimConfig(**kw)


def test_optimizer_schedule_and_unknown_keys():
    cfg = optim.OptimConfig(learning_rate=1e-3, warmup_steps=10, total_steps=110, end_lr_ratio=0.1)
    sched = optim.learning_rate_schedule(cfg)
    np.testing.assert_allclose([sched(0), sched(5), sched(10), sched(60), sched(110), sched(500)],
                               [0.0, 5e-4, 1e-3, 0.55e-3, 1e-4, 1e-4], rtol=1e-5, atol=1e-9)
    with pytest.raises(ValueError, match="unknown optimizer options"):
        optim.make_optimizer({"lr": 1e-3})
    assert optim.make_optimizer({"learning_rate": 1e-3, "total_steps": 5, "warmup_steps": 1}) is not None


@pytest.mark.parametrize("kind, kw, match", [
    ("eagle3", dict(ttt_steps=0), "ttt_steps"), ("eagle3", dict(step_decay=0.0), "step_decay"),
    ("dflash", dict(num_anchors=0), "num_anchors"), ("dflash", dict(gamma=-7.0), "gamma"),
    ("eagle3", dict(num_anchors=4), "unknown eagle3 SFT loss option"),
])
def test_bad_loss_config_is_a_clear_error(kind, kw, match):
    with pytest.raises(ValueError, match=match):
        registry.get_kind(kind).loss_config(kw)


def test_flop_formulas(target):
    c = target.config
    D, F, V, L = c.hidden_size, c.intermediate_size, c.vocab_size, c.num_layers
    per_layer = D * c.num_heads * c.head_dim * 2 + D * c.num_kv_heads * c.head_dim * 2 + 3 * D * F + 2 * D
    n_target = L * per_layer + D + D * V  # layers + final norm + untied LM head (embedding lookup free)
    assert flops.target_matmul_params(c) == n_target
    d = _drafter(target, "eagle3")
    n_drafter = sum(math.prod(x.shape) for x in jax.tree.leaves(d.params["eagle"]))
    ttt7 = registry.get_kind("eagle3").loss_config(dict(ttt_steps=7))
    assert flops.sft_step_flops(d.spec, c, 2, 8, ttt7) == 2 * n_target * 16 + 6 * n_drafter * 16 * 7
    # cached features: the step pays only the draft vocabulary's W target LM-head columns over the
    # cached last hidden state (the compact teacher)
    W = d.spec.config.draft_vocab_size
    assert W < V
    assert flops.sft_step_flops(d.spec, c, 2, 8, ttt7, cached_features=True) == 2 * D * W * 16 + 6 * n_drafter * 16 * 7


# ----------------------------------------------------------------------------- checkpoint / resume


def test_resume_from_checkpoint_equals_uninterrupted_run(target, tmp_path):
    drafter = _drafter(target, "dflash")  # its anchors come from the state's PRNG key
    mesh = shd.make_mesh(1, 1, 1)
    run, state, tparams, frozen = _setup(target, drafter, mesh)
    batches = [_batch(target.config.vocab_size, seed=s) for s in range(5)]
    trainable, _ = drafter.split()

    def restore_or_init(manager):
        got = ckpt.restore(manager, run.abstract_state())
        return got if got is not None else (run.init_state(trainable, seed=0), {"position": 0})

    def loop(state, data_state, n, manager=None):
        for _ in range(n):
            i = data_state["position"]
            state = _steps(run, state, tparams, frozen, [batches[i]])
            data_state = {"position": i + 1}
            if manager is not None:
                ckpt.save(manager, state, data_state)
        return state, data_state

    straight, _ = loop(state, {"position": 0}, 5)
    straight = jax.tree.map(np.asarray, straight)

    mgr = ckpt.make_manager(tmp_path / "run", max_to_keep=2)
    state, data = restore_or_init(mgr)
    assert data == {"position": 0} and int(state.step) == 0
    loop(state, data, 2, mgr)  # "interrupted" after 2 steps
    mgr.wait_until_finished()
    mgr.close()

    mgr = ckpt.make_manager(tmp_path / "run", max_to_keep=2)
    assert mgr.all_steps() == [1, 2]
    state, data = restore_or_init(mgr)
    assert data == {"position": 2} and int(state.step) == 2
    assert jax.tree.leaves(state.params)[0].sharding == jax.tree.leaves(run.shardings.state.params)[0]
    resumed, data = loop(state, data, 3)
    mgr.close()
    assert data == {"position": 5}
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, resumed), straight)
