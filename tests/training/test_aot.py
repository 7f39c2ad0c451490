"""AOT compile check (opd.training.aot): a reduced-layer pod config compiles on 8 fake CPU devices
with positive memory numbers whose argument bytes hold the sharded inputs; the clear errors."""

import json
import os
import subprocess
import sys

import pytest

from opd.configs import sibling_config
from opd.training import aot

TESTS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO = os.path.dirname(TESTS_DIR)
POD = os.path.join(REPO, "experiments", "pod.py")

# qwen3_8b at full width, 2 of its 36 layers, on v6e-8's mesh (data 4 x tensor 2): one compile
# of each step (~15-40 s each on 2 CPU cores), then a batch of 6 rows on data = 4 (an error)
_SCRIPT = """
import json
from opd.configs import sibling_config
from opd.training import aot
config = sibling_config(POD, "pod.py", VARIANT)
report = aot.check(config, num_layers=2)
with config.unlocked():
    config.sft.batch_size = 6  # data 4 x fsdp 1 does not divide it
try:
    aot.check(config, num_layers=2, steps=["sft"])
    report["batch_error"] = None
except ValueError as e:
    report["batch_error"] = str(e)
print("RESULT" + json.dumps(report))
"""


def _pod(variant: str):
    return sibling_config(POD, "pod.py", variant)


def _run_check(variant: str) -> dict:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    script = _SCRIPT.replace("POD", repr(POD)).replace("VARIANT", repr(variant))
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads([l for l in proc.stdout.splitlines() if l.startswith("RESULT")][-1][len("RESULT"):])


def _assert_sane(report: dict, kind: str) -> None:
    assert report["num_devices"] == 8 and report["target"]["num_layers"] == 2
    assert report["drafter"]["kind"] == kind and report["drafter"]["trainable_params"] > 0
    ids = report["drafter"]["target_layers"]  # the full-size drafter's feature layers, mapped into 2
    assert len(ids) == {"dflash": 5, "eagle3": 3}[kind] and all(0 <= i < 2 for i in ids), ids
    assert set(report["steps"]) == {"opd", "sft"}
    for step, r in report["steps"].items():
        m = r["memory_bytes"]
        assert r["mesh"] == {"data": 4, "fsdp": 1, "tensor": 2}, r["mesh"]
        assert m["argument"] > 0 and m["output"] > 0 and m["temp"] > 0 and m["total"] > 0, (step, m)
        # the inputs are resident: at least the target's and the train state's shards
        assert m["argument"] >= r["target_bytes_per_device"] + r["state_bytes_per_device"], (step, m, r)
        assert m["alias"] >= r["state_bytes_per_device"] > 0, (step, m)  # the train state is donated
        assert m["total"] == m["argument"] + m["output"] + m["temp"] - m["alias"]
        assert r["fits"] == (r["total_gib"] <= r["hbm_gib"]) and r["compile_seconds"] > 0
    assert "config.sft.batch_size 6 must be divisible by the mesh's data x fsdp = 4" in report["batch_error"]


@pytest.mark.slow  # ~2 min: full-width compiles
def test_dflash_qwen3_8b_two_layers_on_8_fake_devices():
    report = _run_check("qwen3_8b,dflash,v6e-8")
    _assert_sane(report, "dflash")
    # tensor = 2 halves the sharded target: a device holds less than the whole bf16/f32 target
    t = report["target"]
    itemsize = 4 if t["param_dtype"] == "float32" else 2
    assert report["steps"]["opd"]["target_bytes_per_device"] < t["params"] * itemsize
    assert report["steps"]["opd"]["batch"]["tokens"] == [16, 1024]  # ROWS_PER_DATA_SHARD x data


@pytest.mark.slow
def test_eagle3_qwen3_8b_two_layers_on_8_fake_devices():
    _assert_sane(_run_check("qwen3_8b,eagle3,v6e-8"), "eagle3")


# ----------------------------------------------------------------------------- clear errors (1 device)


def test_no_preset_is_an_error():
    config = _pod("qwen3_8b,dflash")
    with config.unlocked():
        config.target.preset = ""
    with pytest.raises(ValueError, match="target.preset"):
        aot.check(config)


def test_mesh_not_dividing_the_devices_is_an_error():
    import jax

    config = _pod("qwen3_8b,dflash")
    with config.unlocked():
        config.opd.mesh.tensor = jax.device_count() + 1
    with pytest.raises(ValueError, match=r"config\.opd\.mesh .* on \d+ devices: .*does not divide"):
        aot.check(config, steps=["opd"])


def test_num_draft_tokens_above_block_size_is_an_error():
    config = _pod("qwen3_8b,dflash")
    with config.unlocked():
        config.opd.num_draft_tokens = 16  # block_size 16 drafts at most 15
    with pytest.raises(ValueError, match=r"block_size - 1 = 15"):
        aot.check(config, num_layers=2, steps=["opd"])


def test_unknown_step_is_an_error():
    with pytest.raises(ValueError, match="steps"):
        aot.check(_pod("qwen3_8b,dflash"), steps=["rollout"])


# ----------------------------------------------------------------------------- the program the stages run


@pytest.mark.parametrize("step", ["sft", "opd"])
def test_aot_lowers_the_program_the_stage_runs(tmp_path, monkeypatch, step):
    """The AOT check's step (`aot.build`, from abstract inputs) and the step the stage runs (its
    first call, on real arrays) lower to the same program."""
    from test_opd_stage import _config, _warm_up
    from test_sft_stage import _save_target, write_pattern_trajectories

    from opd.target import load_target_from_config
    from opd.training import opd_stage, sft_stage
    from opd.training import run as run_mod

    data = tmp_path / "data"
    data.mkdir()
    config = _config(_save_target(tmp_path / "target"), write_pattern_trajectories(data), "eagle3", num_steps=1)
    config.opd.probe.num_prompts = 0
    config.sft.num_steps = 1
    workdir = tmp_path / "run"
    if step == "opd":
        _warm_up(config, workdir)
    lowered = []
    call = run_mod.TrainRun.__call__

    def spy(self, *args):
        if not lowered:
            lowered.append(self.step.lower(*args).as_text())
        return call(self, *args)

    monkeypatch.setattr(run_mod.TrainRun, "__call__", spy)
    stage = sft_stage.stage_sft if step == "sft" else opd_stage.stage_opd
    stage(config, str(workdir))
    assert lowered, "the stage ran no step"
    tconfig = load_target_from_config(config).config
    spec, _, frozen = aot.abstract_drafter(config, tconfig)
    assert aot.build(step, config, tconfig, spec, frozen).lower().as_text() == lowered[0]


@pytest.mark.slow  # ~1-2 min: two full-width compiles of the SFT step
def test_script_without_hoisting_drops_the_cpu_only_weight_copies(tmp_path):
    """`aot_compile.py --nohoist_invariants` turns off XLA:CPU's loop-invariant code motion, which moves
    f32 copies of the scanned bf16 weight stacks out of the layer loop: less temp, recorded in the report."""
    temps = {}
    for name, extra in (("on", []), ("off", ["--nohoist_invariants"])):
        out = subprocess.run([sys.executable, os.path.join(REPO, "experiments", "aot_compile.py"),
                              "--config=experiments/pod.py:qwen3_8b,dflash,v6e-8", "--num_layers=2", "--steps=sft",
                              f"--name={name}", f"--out_dir={tmp_path}", *extra],
                             cwd=REPO, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        with open(tmp_path / f"{name}.json") as f:
            report = json.load(f)
        assert report["hoist_invariants"] == (name == "on")
        temps[name] = report["report"]["steps"]["sft"]["memory_bytes"]["temp"]
    assert temps["off"] < temps["on"], temps
    assert "loop-invariant code motion off" in (tmp_path / "off.md").read_text()
    summary = (tmp_path / "summary.md").read_text()
    assert "| on |" in summary and "| off |" in summary


def test_script_tpu_flag_refuses_the_fake_cpu_device_flags(tmp_path):
    # --tpu compiles for the slice's TPU topology: a fake CPU device count or XLA:CPU pass flag is a mistake
    for extra in ("--num_devices=4", "--nohoist_invariants"):
        out = subprocess.run([sys.executable, os.path.join(REPO, "experiments", "aot_compile.py"), "--tpu", extra,
                              "--config=experiments/pod.py:qwen3_8b,dflash,v5p-8", f"--out_dir={tmp_path}"],
                             cwd=REPO, capture_output=True, text=True, timeout=300)
        assert out.returncode != 0 and "--tpu compiles for the slice's TPU topology" in out.stderr, out.stderr[-2000:]
    assert not list(tmp_path.iterdir())


def test_pod_slices_name_their_tpu_topology():
    # libtpu's topology of each slice has the slice's chip count (x*y*z)
    import math

    for slice_name in ("v5p-8", "v5p-32", "v5p-128", "v6e-8", "v6e-32"):
        config = _pod(f"qwen3_8b,dflash,{slice_name}")
        gen, dims = config.tpu_topology.split(":")
        assert slice_name.startswith(gen) and math.prod(map(int, dims.split("x"))) == config.num_devices
    assert _pod("qwen3_8b,dflash,tiny").tpu_topology == ""
