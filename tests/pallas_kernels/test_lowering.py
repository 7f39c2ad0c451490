"""The verify kernels, the speculative decoding loop and the Draft-OPD step lower for TPU and
CUDA from a CPU-only host (`jax.export` with `platforms=[...]`, lowering only, no compile).

What lowering proves: the Pallas kernel bodies pass Pallas' Mosaic (TPU) and Triton (GPU)
lowering rules at the pod configs' shapes (experiments/pod.py: Qwen3 V = 151936, Llama-3.1
V = 128256, K = 15 DFlash / 6 EAGLE-3, bfloat16 and float32 logits), and `verify` picks the
platform's formulation when the program is lowered.  What it does not prove: Mosaic's and
Triton's own compilers (layout passes, register allocation, VMEM / shared-memory limits):
test_tpu_compile.py runs the TPU compiler (libtpu, no TPU attached); Triton's runs on a GPU
only (experiments/benchmarks/verify_kernel.py compiles and times there).

Custom calls in the lowered module: Mosaic kernels are `tpu_custom_call`; jax 0.10.2's
Pallas Triton lowering emits `__gpu$xla.gpu.triton` (the Triton IR inside, compiled by XLA
on the GPU).  Each carries its kernel's name (`verify_grid_*`, `verify_split_*`).
"""

import functools
import os
import re

import jax
import jax.numpy as jnp
import pytest
from jax import export

from pallas_kernels.verify import verify

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
POD = os.path.join(REPO, "experiments", "pod.py")

KERNEL_CALL = {"tpu": "tpu_custom_call", "cuda": "__gpu$xla.gpu.triton"}
FORMULATION = {"tpu": "grid", "cuda": "split"}
# Triton calls have no export compatibility guarantee (the IR is compiled by the installed
# jaxlib's XLA); exporting them at all needs this check off.  Nothing here is serialized.
DISABLED = [export.DisabledSafetyCheck.custom_call(KERNEL_CALL["cuda"])]
MODES = {  # (temperature, top_k, top_p) -> the kernels a round runs
    "greedy": ((0.0, 0, 1.0), ("argmax",)),
    "sampling": ((0.7, 0, 1.0), ("logsumexp", "draw")),
    "top_k_top_p": ((0.7, 50, 0.9), ("logsumexp", "draw")),
}
# custom calls any platform's SPMD partitioner understands (the OPD step's sharding annotations)
NEUTRAL_CALLS = {"Sharding", "SPMDFullToShardShape", "SPMDShardToFullShape"}


def _pod_shapes() -> dict:
    """{variant: (B, K, V)} of every pod model x drafter: B = eval.batch_size, K =
    opd.num_draft_tokens (eval uses the same), V = the target preset's vocabulary."""
    from opd.configs import load_config
    from opd.models.presets import preset_config

    shapes = {}
    for model in ("qwen3_4b", "qwen3_8b", "llama31_8b"):
        for kind in ("dflash", "eagle3"):
            c = load_config(f"{POD}:{model},{kind}")
            shapes[f"{model},{kind}"] = (int(c.eval.batch_size), int(c.opd.num_draft_tokens),
                                         preset_config(c.target.preset).vocab_size)
    return shapes


POD_SHAPES = _pod_shapes()
LARGEST = max(POD_SHAPES.values(), key=lambda s: (s[2], s[1]))  # (4, 15, 151936): Qwen3 + DFlash


def custom_calls(text: str) -> list:
    """(call target, kernel name or None) of every custom call in a lowered module's text."""
    calls = []
    for line in text.splitlines():
        target = re.search(r"stablehlo\.custom_call @([\w$.]+)", line)
        if target:
            name = re.search(r'name = "(verify_\w+)"', line)
            calls.append((target.group(1), name.group(1) if name else None))
    return calls


def export_verify(platform: str, b: int, k: int, v: int, dtype: str, mode: str, **kw):
    (temperature, top_k, top_p), _ = MODES[mode]
    x = jax.ShapeDtypeStruct((b, k + 1, v), jnp.dtype(dtype))
    d = jax.ShapeDtypeStruct((b, k), jnp.int32)
    lq = jax.ShapeDtypeStruct((b, k, v), jnp.dtype(dtype)) if temperature else None
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype) if temperature else None
    fn = functools.partial(verify, temperature=temperature, top_k=top_k, top_p=top_p, **kw)
    return export.export(jax.jit(fn), platforms=[platform], disabled_checks=DISABLED)(x, d, lq, key)


def assert_kernels(exported, platform: str, mode: str):
    """Exactly the round's kernels of the platform's formulation, one custom call each."""
    want = [(KERNEL_CALL[platform], f"verify_{FORMULATION[platform]}_{r}") for r in MODES[mode][1]]
    assert exported.platforms == (platform,)
    assert custom_calls(exported.mlir_module()) == want


# ----------------------------------------------------------------------------- the kernels
def test_pod_shapes_are_the_launch_configs():
    # the sweep below follows experiments/pod.py; this pins what it covers today
    assert set(POD_SHAPES.values()) == {(4, 15, 151936), (4, 6, 151936), (4, 15, 128256), (4, 6, 128256)}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_verify_lowers_at_the_largest_pod_shape(platform, dtype, mode):
    assert_kernels(export_verify(platform, *LARGEST, dtype, mode), platform, mode)


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_verify_lowers_at_k16(platform):
    # K + 1 = 17 target rows: neither a multiple of TPU's 8 sublanes nor a power of two
    assert_kernels(export_verify(platform, 1, 16, LARGEST[2], "float32", "sampling"), platform, "sampling")


@pytest.mark.slow  # 8 exports per variant (~5-10 s each), ~1 min for the sweep
@pytest.mark.parametrize("variant", list(POD_SHAPES))
def test_verify_lowers_for_every_pod_config(variant):
    for platform in ("tpu", "cuda"):
        for dtype in ("bfloat16", "float32"):
            for mode in ("greedy", "sampling"):
                assert_kernels(export_verify(platform, *POD_SHAPES[variant], dtype, mode), platform, mode)


def test_cpu_lowering_interprets():
    # platforms other than TPU / CUDA / ROCm get the interpreter: plain HLO, no kernel call
    exported = export_verify("cpu", 2, 3, 1000, "float32", "sampling", block_v=256)
    assert custom_calls(exported.mlir_module()) == []


@pytest.mark.parametrize("platform,formulation,other", [("cuda", "grid", "tpu"), ("tpu", "split", "gpu")])
def test_a_formulation_does_not_lower_for_the_other_platform(platform, formulation, other):
    # the grid formulation's sequential reduction axis would race under Triton: it never compiles there
    with pytest.raises(ValueError, match=f"Compiler params for platform {other} cannot be used"):
        export_verify(platform, 2, 3, 1000, "float32", "greedy", formulation=formulation)


# ----------------------------------------------------------------------------- whole programs
@pytest.fixture(scope="module")
def pod_dflash():
    """qwen3_8b + DFlash on v5p-8 at full width with 2 of the target's 36 layers (lowering
    time grows with the layer count only where layers are unrolled; scan_layers is on),
    everything abstract (`opd.training.aot`): nothing is allocated."""
    from opd.configs import load_config
    from opd.training import aot

    config = load_config(f"{POD}:qwen3_8b,dflash,v5p-8")
    tconfig = aot.target_config(config, num_layers=2)
    spec, trainable, frozen = aot.abstract_drafter(config, tconfig, aot.target_config(config))
    return config, tconfig, spec, trainable, frozen


def test_speculative_decoding_lowers_for_tpu_with_the_kernel(pod_dflash):
    """The whole jitted generation (prefill + the while loop of draft / verify / commit
    rounds) with verify_impl="pallas", sampling: the round's verify is the Mosaic kernels."""
    import flax.linen as nn

    from opd.decoding import speculative
    from opd.decoding.sampling import SamplingParams
    from opd.models import transformer as tfm

    config, tconfig, spec, trainable, frozen = pod_dflash
    tparams = nn.unbox(tfm.abstract_params(tconfig))
    dparams = jax.eval_shape(spec.join_params, trainable, frozen, tparams)
    B, P, K, N = int(config.eval.batch_size), 256, int(config.opd.num_draft_tokens), 64
    sds = jax.ShapeDtypeStruct
    args = (tparams, dparams, sds((B, P), jnp.int32), sds((B,), jnp.int32), sds((B,), jnp.bool_),
            sds((2,), jnp.uint32), sds((len(tconfig.eos_token_ids),), jnp.int32))
    fn = functools.partial(speculative._speculative_jit, tconfig=tconfig, dspec=spec, sp=SamplingParams(1.0, 0, 1.0),
                           num_draft_tokens=K, max_new_tokens=N, cache_len=512, verify_impl="pallas")
    exported = export.export(jax.jit(fn), platforms=["tpu"])(*args)
    assert custom_calls(exported.mlir_module()) == [("tpu_custom_call", "verify_grid_logsumexp"),
                                                    ("tpu_custom_call", "verify_grid_draw")]


def test_opd_step_lowers_for_tpu(pod_dflash):
    """The Draft-OPD train step as the stage builds it (`opd_stage.build_run`: rollout of R
    rounds, replay, loss, AdamW update, shardings, donation) at the pod's batch (16 x 1024,
    K = 15, R = 32) on a 1-device mesh.  Its rollout verifies with the jnp reference
    (opd/training/rollout.py), so the module holds no kernel call: only HLO and sharding
    annotations (test_tpu_compile.py compiles it with the TPU compiler)."""
    from opd.training import aot

    config, tconfig, spec, _, frozen = pod_dflash
    run = aot.build("opd", config, tconfig, spec, frozen)
    exported = export.export(run.step, platforms=["tpu"])(*run.abstract_args())
    assert exported.platforms == ("tpu",)
    assert {t for t, _ in custom_calls(exported.mlir_module())} <= NEUTRAL_CALLS
