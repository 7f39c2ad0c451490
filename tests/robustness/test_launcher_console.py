"""The launcher's console: an unknown `--config.<key>` is one line naming the key and the nearest
known one; other libraries' INFO logs (orbax, jax) and orbax's ERROR tracebacks of a failed save
stay off the console unless `--verbosity=1`;
each stage prints a start line and an end line with its elapsed time and key numbers."""

import glob
import json
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from opd import configs, console

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = "experiments/quickstart.py:tiny"


def _launch(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "opd.main", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


# ----------------------------------------------------------------------------- unknown config keys


@pytest.mark.parametrize("override,message", [
    ("--config.foo=1", "unknown config key config.foo in --config.foo"),
    ("--config.sft.num_step=3", "unknown config key config.sft.num_step in --config.sft.num_step; "
                                "did you mean config.sft.num_steps?"),
])
def test_unknown_config_key_is_one_line(tmp_path, override, message):
    out = _launch(f"--config={TINY}", override, f"--workdir={tmp_path / 'wd'}")
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], out.stderr[-2000:]
    assert not (tmp_path / "wd").exists()  # nothing ran


def test_a_bad_config_value_is_one_line(tmp_path):
    out = _launch(f"--config={TINY}", "--config.opd.optimizer.warmup_steps=9", f"--workdir={tmp_path / 'wd'}")
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert last == "error: optimizer warmup_steps (9) exceeds total_steps (4)", out.stderr[-2000:]
    assert "Traceback" not in out.stderr and not (tmp_path / "wd").exists()


def test_check_overrides_walks_nested_paths():
    def check(*overrides, config=TINY):
        configs.check_overrides(["opd.main", "--config", config, *overrides, "--workdir=/tmp/x"])

    check("--config.sft.num_steps=3", "--config.sft.optimizer.learning_rate=1e-4", "--noconfig.sft.tensorboard",
          "--config.drafter.overrides.draft_vocab_size=64", "--config.eval.runs[0].prompt_set=humaneval")
    check()  # no overrides: the config file is not even loaded
    check("--config.nope=1", config="experiments/no_such_file.py")  # the launcher reports the missing file
    with pytest.raises(ValueError, match=r"config.sft.optimizer.learning_rat in .*did you mean "
                                         r"config.sft.optimizer.learning_rate\?"):
        check("--config.sft.optimizer.learning_rat=1e-4")
    with pytest.raises(ValueError, match=r"config.eval.runs\[0\].promt_set .*did you mean "
                                         r"config.eval.runs\[0\].prompt_set\?"):
        check("--config.eval.runs[0].promt_set=x")
    with pytest.raises(ValueError, match=r"config.drafter.overrides.ttt_steps in .* \(a free-form block: new keys "
                                         r"go in the config file\); config.drafter.overrides has: draft_vocab_size"):
        check("--config.drafter.overrides.ttt_steps=3")
    with pytest.raises(ValueError, match=r"config.zzz in --config.zzz; config has: assets, branches, chat, .*seed, "):
        check("--config.zzz=1")


# ----------------------------------------------------------------------------- log levels


_SCRIPT = textwrap.dedent("""
    import sys

    import numpy as np
    import orbax.checkpoint as ocp
    from absl import app, flags, logging
    from opd import console

    def main(argv):
        console.setup(flags.FLAGS.verbosity)
        logging.info("library info line")  # this file is outside opd: a library, as orbax is
        logging.warning("library warning line")
        with ocp.CheckpointManager(sys.argv[1]) as m:  # orbax logs INFO lines through absl
            m.save(0, args=ocp.args.StandardSave({"x": np.zeros(2)}))
        console.run_stage("chat", lambda: [{"response": "a"}, {"response": "b"}])

    app.run(main)
""")


def _run_script(tmp_path, text: str, verbosity):
    """Runs `text` as a script with a checkpoint directory under `tmp_path` and absl's --verbosity."""
    script = tmp_path / "script.py"
    script.write_text(text)
    args = [] if verbosity is None else [f"--verbosity={verbosity}"]
    return subprocess.run([sys.executable, str(script), str(tmp_path / "ckpt"), *args], capture_output=True, text=True,
                          timeout=120, cwd=REPO)


@pytest.mark.parametrize("verbosity", [None, 1])
def test_library_info_logs_only_with_verbosity(tmp_path, verbosity):
    out = _run_script(tmp_path, _SCRIPT, verbosity)
    assert out.returncode == 0, out.stderr[-2000:]
    assert ("library info line" in out.stderr) == (verbosity == 1)
    assert ("orbax" in out.stderr.lower()) == (verbosity == 1) and (tmp_path / "ckpt" / "0").is_dir()
    assert "library warning line" in out.stderr  # warnings always
    assert "stage chat: start" in out.stderr and re.search(r"stage chat: done in \d+\.\d s \(2 responses\)", out.stderr)


_FAILED_SAVE = textwrap.dedent("""
    import errno, os, sys

    import numpy as np
    import orbax.checkpoint as ocp
    from absl import app, flags
    from orbax.checkpoint._src.handlers import json_checkpoint_handler
    from opd import console

    def main(argv):
        console.setup(flags.FLAGS.verbosity)

        async def full(self, x, directory):  # the disk is full for the JSON item's background write
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))

        json_checkpoint_handler.JsonCheckpointHandler._save_fn = full
        try:
            with ocp.CheckpointManager(sys.argv[1], item_names=("state", "data")) as m:
                m.save(0, args=ocp.args.Composite(state=ocp.args.StandardSave({"x": np.zeros(2)}),
                                                  data=ocp.args.JsonSave({"position": 3})))
                m.wait_until_finished()
        except Exception as e:  # opd's own code reports it in one line (loop.save_failed)
            print("reported:", type(e).__name__, file=sys.stderr)

    app.run(main)
""")


@pytest.mark.parametrize("verbosity", [None, 1])
def test_orbax_error_tracebacks_of_a_failed_save_only_with_verbosity(tmp_path, verbosity):
    out = _run_script(tmp_path, _FAILED_SAVE, verbosity)
    assert "reported:" in out.stderr, out.stderr[-3000:]
    orbax_errors = re.findall(r"^E\d{4} .*(?:future|checkpoint_manager|async_checkpointer)\.py", out.stderr, re.M)
    if verbosity is None:
        assert not orbax_errors and "Traceback" not in out.stderr, out.stderr[-3000:]
        assert out.stderr.strip().splitlines()[-1].startswith("reported:")
    else:
        assert orbax_errors and "Traceback" in out.stderr


def test_stage_lines_name_the_key_numbers():
    assert console.stage_summary("fetch_assets", {"a": "/x", "b": "/y"}) == "2 assets"
    assert console.stage_summary("regenerate", {"alpacaeval": ["s0", "s1"]}) == "alpacaeval: 2 shards"
    assert console.stage_summary("sft", "/w/sft/eagle3/checkpoints") == "/w/sft/eagle3/checkpoints"
    assert (console.stage_summary("eval", [{"run": "ngram", "tau": 1.234, "speedup": 0.9}, {"run": "e3", "tau": None}])
            == "2 runs: ngram tau 1.23 speedup 0.90, e3 tau - speedup -")
    assert console.stage_summary("report", {}) == "" and console.stage_summary("chat", []) == ""
    assert [console.elapsed(s) for s in (4.25, 185, 7620)] == ["4.2 s", "3 min 05 s", "2 h 07 min"]


def _tiny_sft_config(tmp_path) -> str:
    """A config file: `sft` on a tiny random target (HF dir) and hand-written trajectories."""
    from conftest import make_hf_model

    model, _ = make_hf_model("llama", seed=7)
    model.config.eos_token_id = 1
    model.save_pretrained(tmp_path / "target", safe_serialization=True)
    rs = np.random.RandomState(0)
    (tmp_path / "data").mkdir()
    with open(tmp_path / "data" / "shard-00000.jsonl", "w") as f:
        for i in range(4):
            f.write(json.dumps({"prompt_id": f"p{i}", "prompt_set": "test", "target": "tiny",
                                "prompt_ids": rs.randint(2, 128, 4).tolist(),
                                "response_ids": rs.randint(2, 128, 8).tolist() + [1]}) + "\n")
    path = tmp_path / "tiny_sft.py"
    path.write_text(textwrap.dedent(f"""
        from opd.configs import load_config

        def get_config(variant=""):
            c = load_config({os.path.join(REPO, "experiments", "sft_smollm2.py:eagle3,tiny")!r})
            c.stages = ("sft",)
            c.target.path = {str(tmp_path / "target")!r}
            c.target.scan_layers = False
            c.sft.data = ({str(tmp_path / "data")!r},)
            c.sft.update(seq_len=16, batch_size=2, num_steps=2, log_every=1, save_every=1, tensorboard=False)
            c.sft.optimizer.warmup_steps = 1
            c.sft.probe.num_prompts = 0
            c.drafter.overrides.draft_vocab_size = 32
            return c
    """))
    return str(path)


@pytest.mark.slow  # ~40 s alone (a subprocess compiles one tiny SFT step)
def test_launch_prints_stage_lines_and_no_library_info(tmp_path):
    """A real launch (`sft` saves orbax checkpoints, which log INFO lines through absl): every INFO
    line on the console comes from an opd file, and the stage has its start and end lines."""
    out = _launch(f"--config={_tiny_sft_config(tmp_path)}", f"--workdir={tmp_path / 'wd'}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert glob.glob(str(tmp_path / "wd" / "sft" / "eagle3" / "checkpoints" / "2"))  # orbax did save
    opd_files = {os.path.basename(p) for p in glob.glob(os.path.join(REPO, "opd", "**", "*.py"), recursive=True)}
    info = re.findall(r"^I\d{4} [\d:.]+ +\d+ (\S+):\d+\] (.*)$", out.stderr, re.M)
    assert info and all(f in opd_files for f, _ in info), [x for x in info if x[0] not in opd_files][:5]
    assert "orbax" not in out.stderr.lower()
    lines = [m for _, m in info]
    assert "stage sft: start" in lines
    assert any(re.fullmatch(r"stage sft: done in [\d.]+ (s|min \d\d s) \(.*sft/eagle3/checkpoints\)", m)
               for m in lines), lines


def test_eval_shows_progress_with_tokens_per_second(capsys):
    """The eval stage's loop has bars: the warm-up compiles, then the timed batches with tokens/s
    (it printed nothing for minutes). Autoregressive only, to compile one program."""
    from conftest import make_target
    from opd.eval.harness import evaluate

    m = evaluate(make_target("llama", seed=3), None, [[5, 6, 7, 5, 6], [9, 8, 9, 8]], max_new_tokens=4)
    assert m["num_prompts"] == 2
    err = capsys.readouterr().err
    assert "eval none on custom: compiling" in err and "shape" in err
    assert re.search(r"eval none on custom: 100%.*2/2 .*ar [\d.]+ tok/s", err), err[-1000:]
