"""A tiny SFT run for the fault tests: a random 2-layer Llama target saved in HF layout,
pattern trajectories, and a `sft` + `export` config of 6 steps with a checkpoint every 2."""

import json
import os

import numpy as np

from conftest import make_hf_model
from opd import configs

V = 128  # the target's vocabulary


def save_target(path, seed: int = 7) -> str:
    model, _ = make_hf_model("llama", seed=seed)
    model.config.eos_token_id = 1
    model.save_pretrained(path, safe_serialization=True)
    return str(path)


def write_trajectories(d, n: int = 12) -> str:
    """Trajectory shards in `d`: random prompts, answers that follow a fixed pattern."""
    rs = np.random.RandomState(0)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "shard-00000.jsonl"), "w") as f:
        for i in range(n):
            start = int(rs.randint(2, V))
            f.write(json.dumps({"prompt_id": f"p{i}", "prompt_set": "test", "target": "tiny",
                                "prompt_ids": rs.randint(2, V, 4 + i % 3).tolist(),
                                "response_ids": [(start + 5 * j) % (V - 2) + 2 for j in range(10 + i % 4)] + [1]}) + "\n")
    return str(d)


def sft_config(target_dir: str, data_dir: str, **sft):
    """`sft` + `export` of a tiny EAGLE-3 drafter; `sft` overrides fields of config.sft."""
    c = configs.default_config()
    c.stages = ("sft", "export")
    c.target.path = target_dir
    c.drafter.kind = "eagle3"
    c.drafter.overrides.draft_vocab_size = 32
    c.sft.data = (data_dir,)
    c.sft.seq_len, c.sft.batch_size = 24, 2
    c.sft.num_steps, c.sft.log_every, c.sft.save_every, c.sft.keep_checkpoints = 6, 1, 2, 10
    c.sft.tensorboard = False
    c.sft.optimizer.update(learning_rate=3e-3, warmup_steps=1)
    c.sft.loss.ttt_steps = 2
    for k, v in sft.items():
        c.sft[k] = v
    return c


# ----------------------------------------------------------------------------- a bare train loop
# `opd.training.loop.train_loop` around a one-array "model" (no target, no drafter): fast tests
# of what the loop does with checkpoints and signals.


def bare_state(step: int = 0):
    import jax.numpy as jnp

    from opd.training import sft

    return sft.TrainState(step=jnp.int32(step), params={"w": jnp.zeros((64, 64), jnp.float32)},
                          opt_state=(jnp.zeros((3,), jnp.float32),), rng=jnp.asarray([0, 1], jnp.uint32))


def _bare_step(state, batch):
    import jax.numpy as jnp

    w = state.params["w"] + batch["x"]
    return state._replace(step=state.step + 1, params={"w": w}), {"loss": jnp.mean(w)}


class Batches:
    """Batches {"x": step-dependent values, "tokens"}; `position` is the data state."""

    def __init__(self, position: int = 0):
        self.position = position

    def __next__(self):
        self.position += 1
        return {"x": np.full((64, 64), 0.01 * self.position, np.float32), "tokens": np.zeros((2, 3), np.int32)}


def bare_run(directory: str, num_steps: int, save_every: int = 2, writer=None, **kwargs):
    """Runs (or resumes) the bare loop to `num_steps` with checkpoints in `directory`; returns the state."""
    import jax

    from opd.training import checkpoint as ckpt
    from opd.training.loop import train_loop

    manager = ckpt.make_manager(directory, max_to_keep=None)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), bare_state())
    restored = ckpt.restore_latest(manager, abstract)
    state, batches = bare_state(), Batches()
    if restored is not None:
        state, batches = restored[0], Batches(restored[1]["position"])
    if writer is not None:
        writer.truncate_after(int(state.step))
    return train_loop(jax.jit(_bare_step, donate_argnums=0), state, (), batches, num_steps=num_steps, manager=manager,
                      place_batch=lambda b: {"x": b["x"]}, step_flops=lambda b: 1,
                      data_state=lambda: {"position": batches.position}, writer=writer, log_every=1,
                      save_every=save_every, **kwargs)
