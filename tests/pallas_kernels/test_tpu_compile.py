"""Compiled, not only lowered, for TPU from a CPU-only host: libtpu describes a slice's chips
(`jax.experimental.topologies`, `opd.training.aot.tpu_devices`) and its compiler compiles for
them with no TPU attached.

What compiling adds to test_lowering.py: the TPU compiler's own passes run, Mosaic's included,
so a Pallas block that overflows VMEM or a layout Mosaic cannot tile fails here; and XLA:TPU's
fusion passes run on the whole program (they aborted on the Draft-OPD step until
`rollout.support_index` stopped building the vocabulary inverse by scatter). What it does not
prove: the kernel's numbers and speed on a TPU (experiments/benchmarks/verify_kernel.py runs
there).

libtpu is installed with the test extra (`jax[tpu]`); without it these tests skip.  Several
processes may load it at once (`aot.tpu_devices` allows that: only compiling, no chip is opened).
"""

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

pytest.importorskip("libtpu", reason="libtpu (jax[tpu]) compiles for TPU on this host")

from jax.sharding import SingleDeviceSharding  # noqa: E402

from conftest import load_script  # noqa: E402
from opd.training import aot  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
POD = os.path.join(REPO, "experiments", "pod.py")
VK = load_script("experiments/benchmarks/verify_kernel.py")  # its verify_args and TPU_CHIPS (v5p, v6e)
CHIPS = VK.TPU_CHIPS
LARGEST = (4, 15, 151936)  # Qwen3 + DFlash: eval batch, K, V (test_lowering.POD_SHAPES)
MODES = {"greedy": ("argmax",), "sampling": ("logsumexp", "draw")}  # the kernels a round runs


@functools.lru_cache(maxsize=None)
def chip(generation: str):
    return aot.tpu_devices(CHIPS[generation])[0]


def compile_verify(generation: str, b: int, k: int, v: int, dtype: str, mode: str):
    """The jitted `verify` (TPU: the grid kernels) compiled for one chip of `generation`."""
    fn, args = VK.verify_args(b, k, v, mode, dtype, SingleDeviceSharding(chip(generation)))
    return fn.lower(*args).compile()


def test_the_topology_is_the_slice():
    devices = aot.tpu_devices("v5p:2x2x1")
    assert len(devices) == 4 and {d.platform for d in devices} == {"tpu"}
    assert devices[0].device_kind == "TPU v5"
    with pytest.raises(ValueError, match="config.tpu_topology is empty"):
        aot.tpu_devices("")
    with pytest.raises(RuntimeError, match="no TPU topology 'v9z:1x1'"):
        aot.tpu_devices("v9z:1x1")


@pytest.mark.parametrize("generation,dtype,mode", [
    pytest.param(g, d, m, marks=[pytest.mark.slow] if (g, m) == ("v5p", "sampling") else [])  # ~45 s each on 2 cores
    for g in CHIPS for d in ("bfloat16", "float32") for m in MODES])
def test_verify_kernel_compiles_at_the_largest_pod_shape(generation, dtype, mode):
    compiled = compile_verify(generation, *LARGEST, dtype, mode)
    text = compiled.as_text()
    assert "tpu_custom_call" in text
    for r in MODES[mode]:
        assert f"verify_grid_{r}" in text, r
    # the kernel's VMEM blocks are Mosaic's, not XLA's: HBM temp stays below one logits copy
    assert compiled.memory_analysis().temp_size_in_bytes < 4 * 16 * 151936 * jnp.dtype(dtype).itemsize


def test_verify_kernel_compiles_at_k16():
    # K + 1 = 17 target rows: not a multiple of TPU's 8 sublanes
    assert "verify_grid_draw" in compile_verify("v6e", 1, 16, LARGEST[2], "float32", "sampling").as_text()


def test_mosaic_rejects_a_block_over_vmem():
    """The control: compiling runs Mosaic's own checks, which lowering does not (a 256 MiB block)."""
    from jax.experimental import pallas as pl

    def double(x_ref, o_ref):
        o_ref[...] = x_ref[...] * 2

    def f(x, rows):
        spec = pl.BlockSpec((rows, x.shape[1]), lambda i: (i, 0))
        return pl.pallas_call(double, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype), grid=(x.shape[0] // rows,),
                              in_specs=[spec], out_specs=spec)(x)

    x = jax.ShapeDtypeStruct((16384, 8192), jnp.float32, sharding=SingleDeviceSharding(chip("v6e")))
    jax.jit(functools.partial(f, rows=8)).lower(x).compile()
    lowered = jax.jit(functools.partial(f, rows=8192)).lower(x)
    with pytest.raises(Exception, match="RESOURCE_EXHAUSTED.*vmem"):
        lowered.compile()


# ----------------------------------------------------------------------------- whole programs
# Qwen3-8B's vocabulary and layout at test widths, 2 layers: the programs of the pod config, compiled
# in a subprocess (the TPU compiler aborts the process on an internal check, as it did on the OPD step)
_SMALL = dict(hidden_size=256, intermediate_size=512, num_heads=4, num_kv_heads=2, head_dim=64, vocab_size=8192)
_SCRIPT = """
import json, os
from opd.configs import sibling_config
from opd.training import aot
config = sibling_config(POD, "pod.py", VARIANT)
if "draft_vocab_size" in config.drafter.overrides:  # EAGLE-3's 32000 > the test width's vocabulary
    config.drafter.overrides.draft_vocab_size = 2048
devices = aot.tpu_devices(config.tpu_topology)
report = aot.check(config, num_layers=2, steps=STEPS, devices=devices, **SMALL)
print("RESULT" + json.dumps(report))
"""


def _tpu_check(variant: str, steps) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    script = (_SCRIPT.replace("POD", repr(POD)).replace("VARIANT", repr(variant)).replace("STEPS", repr(list(steps)))
              .replace("SMALL", repr(_SMALL)))
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads([line for line in proc.stdout.splitlines() if line.startswith("RESULT")][-1][len("RESULT"):])


@pytest.mark.parametrize("variant", ["qwen3_8b,dflash,v5p-8",  # ~1 min on 2 cores
                                     pytest.param("qwen3_8b,eagle3,v6e-8", marks=pytest.mark.slow)])
def test_opd_step_compiles_for_the_slice(variant):
    """The Draft-OPD step as the stage builds it (rollout, replay, loss, AdamW, shardings) compiles
    for the slice's chips: v5p-8 (4 chips, data 4) and v6e-8 (8 chips, data 4 x tensor 2)."""
    report = _tpu_check(variant, ["opd"])
    r = report["steps"]["opd"]
    assert report["platform"] == "tpu" and report["num_devices"] == {"v5p-8": 4, "v6e-8": 8}[variant.split(",")[-1]]
    m = r["memory_bytes"]
    assert m["argument"] > 0 and m["temp"] > 0 and m["total"] == m["argument"] + m["output"] + m["temp"] - m["alias"]
    assert m["alias"] >= r["state_bytes_per_device"] > 0  # the train state is donated on TPU too


def test_speculative_decoding_compiles_with_the_kernel():
    """The jitted generation (prefill + the while loop of rounds), verify_impl="pallas", sampling,
    at test widths with Qwen3's vocabulary: the round's verify is the compiled Mosaic kernels."""
    import flax.linen as nn

    from opd.configs import sibling_config
    from opd.decoding import speculative
    from opd.decoding.sampling import SamplingParams
    from opd.models import transformer as tfm

    config = sibling_config(POD, "pod.py", "qwen3_8b,dflash,v5p-8")
    tconfig = aot.target_config(config, num_layers=2, **_SMALL)
    spec, trainable, frozen = aot.abstract_drafter(config, tconfig, aot.target_config(config, **_SMALL))
    s = SingleDeviceSharding(chip("v5p"))
    on_chip = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree)  # noqa: E731
    tparams = nn.unbox(tfm.abstract_params(tconfig))
    dparams = jax.eval_shape(spec.join_params, trainable, frozen, tparams)
    B, P, K = int(config.eval.batch_size), 64, int(config.opd.num_draft_tokens)
    sds = jax.ShapeDtypeStruct
    args = on_chip((tparams, dparams, sds((B, P), jnp.int32), sds((B,), jnp.int32), sds((B,), jnp.bool_),
                    sds((2,), jnp.uint32), sds((len(tconfig.eos_token_ids),), jnp.int32)))
    fn = functools.partial(speculative._speculative_jit, tconfig=tconfig, dspec=spec, sp=SamplingParams(1.0, 0, 1.0),
                           num_draft_tokens=K, max_new_tokens=32, cache_len=128, verify_impl="pallas")
    text = jax.jit(fn).lower(*args).compile().as_text()
    assert "verify_grid_logsumexp" in text and "verify_grid_draw" in text
