"""The one config schema (`opd.configs.default_config`): every field defined once with a
comment, every experiment config built on it (no missing or unknown fields), dataclass
defaults taken from their dataclasses, typos named with the nearest field."""

import dataclasses
import glob
import inspect
import json
import os

import pytest

from opd import configs
from opd.training.opd_loss import OPDLossConfig
from opd.training.opd_step import OPDConfig
from opd.training.optim import OptimConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = {  # every experiment config with a few variants each
    "regenerate_smollm2.py": ["", "tiny", "scale", "answers", "text"],
    "sft_smollm2.py": ["eagle3", "dflash,tiny", "eagle3,scale", "dflash,scale,tiny", "eagle3,scale,src_code"],
    "opd_smollm2.py": ["eagle3", "dflash,sft_cont", "eagle3,sft_rollouts,tiny", "eagle3,plateau,reference,s1",
                       "dflash,plateau,sft_cont,s2", "eagle3,plateau,sft_rollouts,tiny", "eagle3,plateau,abl_suffix,s0"],
    "quickstart.py": ["", "tiny"],
    "main_table_smollm2.py": ["", "shipped", "shipped,quick", "shipped,t0", "shipped,t1", "shipped,t1,b4", "decisive",
                              "decisive,s2", "decisive,s1,sofar"],
    "pod.py": ["qwen3_8b,dflash,v5p-8", "llama31_8b,eagle3,v6e-32,from_sft", "tiny"],
}


def test_every_experiment_file_is_listed():
    files = {os.path.basename(p) for p in glob.glob(os.path.join(REPO, "experiments", "*.py"))}
    tools = {"aot_compile.py", "ship_drafter.py", "ship_data.py"}  # scripts, not configs
    assert files - tools == set(VARIANTS)


@pytest.mark.parametrize("name,variant", [(n, v) for n, vs in VARIANTS.items() for v in vs])
def test_experiment_configs_have_exactly_the_schemas_fields(name, variant):
    config = configs.load_config(os.path.join(REPO, "experiments", name) + ":" + variant)
    configs.check_fields(config)
    if name != "pod.py" or "from_sft" in variant or variant == "tiny":  # pod launches need --config.drafter.init
        configs.validate(config)


def test_every_schema_field_has_a_comment():
    src = inspect.getsource(configs.default_config) + inspect.getsource(configs._probe) + inspect.getsource(configs._mesh)
    bare = [line.strip() for line in src.splitlines()
            if " = " in line and line.strip().startswith(("c.", "p.")) and "#" not in line]
    assert not bare, bare


def test_dataclass_defaults_are_defined_once():
    c = configs.default_config()
    assert dict(c.opd.loss) == dataclasses.asdict(OPDLossConfig())
    assert {k: v for k, v in dataclasses.asdict(OptimConfig()).items() if k != "total_steps"} == dict(c.sft.optimizer)
    o = OPDConfig()
    assert (c.opd.num_rounds, c.opd.num_draft_tokens, c.opd.rollout_temperature) == (
        o.num_rounds, o.num_draft_tokens, o.rollout_temperature)


def test_unknown_and_missing_fields_are_named():
    c = configs.default_config()
    c.opd.num_draft = 4  # the old name
    with pytest.raises(ValueError, match=r"unknown config field config\.opd\.num_draft; did you mean "
                                         r"config\.opd\.num_draft_tokens\?"):
        configs.validate(c)
    c = configs.default_config()
    del c.sft.probe
    with pytest.raises(ValueError, match=r"no `sft\.probe` block"):
        configs.check_fields(c)
    c = configs.default_config()
    c.drafter.overrides.anything = 1  # the drafter kind's own options are not the schema's
    configs.check_fields(c)


def test_probe_k_defaults_to_the_draft_opd_k():
    c = configs.default_config()
    c.opd.num_draft_tokens = 7
    assert configs.probe_num_draft_tokens(c, "sft") == configs.probe_num_draft_tokens(c, "opd") == 7
    c.sft.probe.num_draft_tokens = 3
    assert configs.probe_num_draft_tokens(c, "sft") == 3


def test_the_schemas_stages_are_the_launchers():
    from opd import pipeline

    assert tuple(pipeline.STAGES) == configs.STAGES


def test_a_branch_runs_a_stage_again_with_its_partial_config_on_top():
    c = configs.load_config(os.path.join(REPO, "experiments", "quickstart.py:tiny"))
    assert configs.stage_parts("sft@sft_cont") == ("sft", "sft_cont", "")
    assert configs.stage_parts("export:opd") == ("export", "", "opd")
    b = configs.branch_config(c, "sft_cont")
    assert (b.sft.name, b.sft.match_flops, b.drafter.init) == ("sft_cont", "workdir:opd/eagle3", "shipped:smollm2_eagle3")
    assert b.sft.seq_len == c.sft.seq_len and b.sft.probe.every == 1000 and b.sft.probe.num_prompts == c.sft.probe.num_prompts
    assert (c.sft.name, c.drafter.init) == ("sft", "")  # the plain stages keep theirs
    configs.validate(c)
    with pytest.raises(ValueError, match=r"no config.branches.nope .*branches: \['sft_cont'\]"):
        configs.validate(_with(c, stages=("sft@nope",)))
    c.branches.sft_cont.sft.seqlen = 64
    with pytest.raises(ValueError, match=r"config.branches.sft_cont: unknown config field sft.seqlen; did you mean sft.seq_len\?"):
        configs.validate(c)
    del c.branches.sft_cont.sft["seqlen"]
    c.branches.sft_cont.sft.seq_len = 0  # the branch's stage is validated under the merged config
    with pytest.raises(ValueError, match=r"config.sft.seq_len must be >= 1"):
        configs.validate(c)


def _with(c, **fields):
    c = c.copy_and_resolve_references()
    for k, v in fields.items():
        c[k] = v
    return c


def test_the_quickstart_decodes_its_drafters_side_by_side():
    """Its table's speed-ups compare: per prompt set one decode run, one AR timing for all drafters."""
    from opd.pipeline import eval_groups

    for variant in ("", ":tiny"):
        c = configs.load_config(os.path.join(REPO, "experiments", "quickstart.py" + variant))
        groups = eval_groups(configs.eval_runs(c), bool(c.eval.side_by_side))
        assert [{r["prompt_set"] for r in g} for g in groups] == [{ps} for ps in dict.fromkeys(
            r["prompt_set"] for r in c.eval.runs)]
        assert [len(g) for g in groups] == [5] * len(groups)  # n-gram, sft, opd, sft_cont, shipped


def test_the_plateau_experiment_starts_every_branch_from_the_shipped_drafter():
    def load(variant):
        return configs.load_config(os.path.join(REPO, "experiments", f"opd_smollm2.py:{variant}"))

    opd = load("dflash,plateau,reference,s1")
    assert (opd.opd.name, opd.opd.init, opd.seed) == ("opd_plateau_reference_s1", "shipped:smollm2_dflash", 2)
    # no stage regenerates: the plateau run's answers ship in the repo (~0.5 CPU-h each machine saved)
    assert {"sft", "regenerate"}.isdisjoint(opd.stages) and opd.opd.data == ("data:smollm2_alpacaeval_answers",)
    assert (opd.opd.probe.num_prompts, opd.opd.probe.max_new_tokens) == (64, 128)  # as the plateau run's probe
    assert opd.opd.loss_preset == "reference_yaml" and opd.opd.rollout_temperature == 0.0
    assert (opd.opd.prefix, opd.opd.prompt_len) == ("prompt", 128)
    cont = load("dflash,plateau,reference,sft_cont,s1")
    assert (cont.sft.name, cont.drafter.init, cont.seed) == ("sft_cont_plateau_reference_s1", "shipped:smollm2_dflash", 2)
    assert cont.sft.match_flops == "workdir:opd_plateau_reference_s1/dflash"
    assert (opd.opd.probe.every, cont.sft.probe.every) == (10, 40)  # about the same FLOPs apart
    assert cont.sft.data == load("dflash,plateau").sft.data and len(cont.sft.data) == 4  # the plateau run's mix
    assert "regenerate" not in cont.stages and cont.sft.data[0] == opd.opd.data[0]
    with pytest.raises(ValueError, match="at most one of"):
        load("eagle3,plateau,s1,s2")
    # the plateau run's evaluation compares the shipped drafter (its start) with the run
    assert [r["drafter_path"] for r in opd.eval.runs[:2]] == ["shipped:smollm2_dflash",
                                                              "workdir:export/opd_plateau_reference_s1_dflash"]
    # an ablation: one reference difference on our default, its own run name, probe curves only
    default, abl = load("eagle3,plateau,s0"), load("eagle3,plateau,abl_correction,s0")
    assert abl.opd.name == "opd_plateau_abl_correction_s0" and "eval" not in abl.stages
    changed = {k for k in default.opd.loss if default.opd.loss[k] != abl.opd.loss[k]}
    assert changed == {"response_weight"} and abl.opd.loss_preset == ""
    assert load("eagle3,plateau,abl_update").opd.accumulate == 4
    ttt, sft = load("eagle3,plateau,reference,ttt_rollouts,s0"), load("eagle3,plateau,reference,sft_rollouts,s0")
    assert (ttt.sft.loss.ttt_steps, sft.sft.loss.ttt_steps) == (7, 4) and ttt.sft.data == sft.sft.data
    assert ttt.sft.name == "ttt_rollouts_plateau_reference_s0"
    with pytest.raises(ValueError, match="EAGLE-3's recipe"):
        load("dflash,plateau,ttt_rollouts")
    with pytest.raises(ValueError, match="an ablation"):
        load("eagle3,plateau,reference,abl_suffix")


def test_a_missing_shipped_drafter_is_named_at_config_time():
    c = configs.load_config(os.path.join(REPO, "experiments", "quickstart.py:tiny"))
    c.eval.runs.append(dict(name="shipped_nope", drafter="eagle3", drafter_path="shipped:nope", prompt_set="mtbench"))
    with pytest.raises(FileNotFoundError, match=r"no shipped drafter 'nope' in .*experiments/drafters"):
        configs.validate(c)


def test_a_half_of_the_shipped_main_table_reports_the_full_tables_runs():
    """`shipped,t0` / `shipped,t1` name the same eval runs (same settings) as `shipped`, split by
    temperature, so a half can be reported while the other still runs."""
    path = os.path.join(REPO, "experiments", "main_table_smollm2.py")
    full = {r["name"]: r for r in configs.load_config(f"{path}:shipped").eval.runs}
    halves = [configs.load_config(f"{path}:shipped,{t}") for t in ("t0", "t1")]
    runs = [r for h in halves for r in h.eval.runs]
    assert sorted(r["name"] for r in runs) == sorted(full) and all(r == full[r["name"]] for r in runs)
    assert {r["temperature"] for r in halves[0].eval.runs} == {0.0}
    assert [h.report.results_name for h in halves] == ["main_table_shipped_t0", "main_table_shipped_t1"]
    with pytest.raises(ValueError, match="halves of one table"):
        configs.load_config(f"{path}:shipped,t0,t1")
    # `b1` / `b4`: one batch size's runs (a quarter with a temperature)
    quarter = configs.load_config(f"{path}:shipped,t1,b1")
    assert quarter.eval.runs and all(r == full[r["name"]] for r in quarter.eval.runs)
    assert {(r["temperature"], r["batch_size"]) for r in quarter.eval.runs} == {(1.0, 1)}
    assert len(quarter.eval.runs) == len(full) // 4 and quarter.report.results_name == "main_table_shipped_t1_b1"
    with pytest.raises(ValueError, match="halves of one table"):
        configs.load_config(f"{path}:shipped,b1,b4")


def test_the_decisive_main_table_evaluates_what_the_decisive_runs_export():
    """`decisive,sN` evaluates each method's export of seed sN (the names opd_smollm2.py's runs
    export under) next to the shipped drafters, at both temperatures and batch sizes."""
    path = os.path.join(REPO, "experiments", "main_table_smollm2.py")
    c = configs.load_config(f"{path}:decisive,s1")
    exported = set()
    for kind, branches in (("eagle3", ("opd", "sft_cont", "sft_rollouts", "ttt_rollouts")),
                           ("dflash", ("opd", "sft_cont", "sft_rollouts"))):
        for b in branches:
            for ref in (",reference", ""):
                if b != "opd" and not ref:
                    continue
                opd = configs.load_config(os.path.join(REPO, "experiments", f"opd_smollm2.py:{kind},plateau{ref},{b},s1"))
                exported |= {f"workdir:export/{st.split(':')[1]}_{kind}" for st in opd.stages if st.startswith("export:")}
    paths = {r["drafter_path"] for r in c.eval.runs}
    assert paths == exported | {"shipped:smollm2_eagle3", "shipped:smollm2_dflash"}
    assert len(paths) == 11 and len(c.eval.runs) == 11 * 3 * 2 * 2
    assert len({r["name"] for r in c.eval.runs}) == len(c.eval.runs) and c.report.results_name == "main_table_decisive_s1"
    with pytest.raises(ValueError, match="goes with `decisive`"):
        configs.load_config(f"{path}:shipped,s1")
    # each trained row's variant (the runner's, to export it again) exports that row's drafter
    from experiments.main_table_smollm2 import ROWS, get_config, row_variant
    for row in ROWS[2:]:
        opd = configs.load_config(os.path.join(REPO, "experiments", f"opd_smollm2.py:{row_variant(row, 's1')}"))
        export = {f"workdir:export/{st.split(':')[1]}_{row.split('/')[0]}" for st in opd.stages if st.startswith("export:")}
        assert export == {r["drafter_path"] for r in get_config(f"decisive,s1,{row}").eval.runs}
    with pytest.raises(ValueError, match="no trained row"):
        row_variant("eagle3/shipped", "s0")


def test_the_decisive_table_so_far_reports_the_kept_rows_without_decoding(tmp_path):
    """`decisive,sN,sofar` is the report stage alone over the same runs, naming those not decoded;
    decisive_rows puts the kept rows back in a workdir for it."""
    from experiments.main_table_smollm2 import decisive_rows, get_config
    from opd import pipeline
    c = get_config("decisive,s0,sofar")
    assert tuple(c.stages) == ("report",) and c.report.partial
    assert [r["name"] for r in c.eval.runs] == [r["name"] for r in get_config("decisive,s0").eval.runs]
    with pytest.raises(ValueError, match="`sofar` reports the whole `decisive` table"):
        get_config("decisive,s0,eagle3/shipped,sofar")
    with pytest.raises(ValueError, match="`sofar` reports the whole `decisive` table"):
        get_config("shipped,sofar")
    kept, workdir = tmp_path / "kept", tmp_path / "w"
    kept.mkdir()
    name = c.eval.runs[0]["name"]  # e.g. main_eagle3_shipped_smollm2_eagle3_mtbench_t0_b1
    (kept / f"{name}.json").write_text(json.dumps(
        {"drafter": "eagle3", "training": "sft_scale (9000 steps)", "training_flops": 8e14, "prompt_set": "mtbench",
         "temperature": 0.0, "batch_size": 1, "num_draft_tokens": 4, "num_prompts": 16, "tau": 1.37, "speedup": 0.78,
         "tokens_per_second": 21.7, "ar_tokens_per_second": 27.8, "greedy_matches_ar": True}))
    decisive_rows("s0", str(workdir), str(kept))
    c.report.results_root = str(tmp_path / "res")  # not the checkout's experiments/results/
    with pytest.raises(ValueError, match="results_root .* is not a folder"):
        configs.validate(c)
    (tmp_path / "res").mkdir()
    configs.validate(c)
    out = pipeline.stage_report(c, str(workdir))
    assert [r["run"] for r in out["rows"] if r["drafter"] != "none"] == [name]
    assert len(out["missing"]) == len(c.eval.runs) - 1 and name not in out["missing"]
    for md in (workdir / "report" / "results.md", tmp_path / "res" / "main_table_decisive_s0" / "results.md"):
        assert f"**Partial:** {len(c.eval.runs) - 1} of {len(c.eval.runs)} eval runs" in md.read_text()


def _decisive_runner(tmp_path, workdir, **env):
    """experiments/opd_decisive_runs.sh with `python` stubbed (`python -c` runs for real; launches
    and summaries are only logged), results under tmp_path/results: (the logged lines, stdout)."""
    import subprocess
    import sys

    log = tmp_path / "launches.txt"
    log.unlink(missing_ok=True)
    stub = tmp_path / "bin" / "python"
    stub.parent.mkdir(exist_ok=True)
    stub.write_text(f'#!/bin/sh\nif [ "$1" = "-c" ]; then exec {sys.executable} "$@"; fi\necho "$@" >> {log}\n')
    stub.chmod(0o755)
    env = {**os.environ, "PATH": f"{stub.parent}:{os.environ['PATH']}", "PYTHONPATH": REPO,
           "RESULTS": str(tmp_path / "results"), **env}
    out = subprocess.run(["bash", os.path.join(REPO, "experiments", "opd_decisive_runs.sh"), str(workdir)],
                         check=True, env=env, cwd=tmp_path, capture_output=True, text=True)
    return (log.read_text().splitlines() if log.exists() else []), out.stdout


def test_the_decisive_runner_launches_valid_variants_in_order(tmp_path):
    """experiments/opd_decisive_runs.sh: every launch is a valid variant of opd_smollm2.py; first
    the goal's pair (reference Draft-OPD, continued SFT) of seed s0 (with its τ on the training
    prompts where both exports exist), the pair at the other seeds, then our default and the
    ablations, the other methods and seed s0's main table; the
    summaries after every run and last; every run once (the ledger), also when started again."""
    import gzip

    from experiments.main_table_smollm2 import DECISIVE, ROWS
    from experiments.opd_smollm2 import ABLATIONS

    w = tmp_path / "w"  # what the runs leave in DIR: the rollouts and the exports
    for k, r, _ in DECISIVE:
        (w / "export" / f"{r}_s0_{k}").mkdir(parents=True)
        for s in ("s0", "s1"):
            (w / f"opd_plateau_reference_{s}" / k / "rollouts").mkdir(parents=True, exist_ok=True)
    shard = w / "opd_plateau_reference_s0" / "eagle3" / "rollouts" / "shard-000001.jsonl"
    shard.write_text('{"prompt_id": "1@opd1.0"}\n')
    logged, _ = _decisive_runner(tmp_path, w, SEEDS="s0 s1")
    # after every run the summaries are rewritten (they keep each run's curve with the results)
    runs = [i for i, ln in enumerate(logged) if "opd_smollm2.py:" in ln]
    assert all("opd_decisive.py" in logged[i + 1] and "opd_ablations_plateau" in logged[i + 2] for i in runs)
    assert all(f"--out_dir={tmp_path / 'results'}/" in ln for ln in logged if "opd_decisive.py" in ln)
    lines = [ln for ln in logged if "opd_decisive.py" not in ln]
    variants = [ln.split("opd_smollm2.py:")[1].split()[0] for ln in lines if "opd_smollm2.py:" in ln]
    for v in set(variants):
        configs.load_config(os.path.join(REPO, "experiments", f"opd_smollm2.py:{v}"))
    assert all(f"--workdir={w}" in ln for ln in lines if "opd.main" in ln)
    pair = lambda s: [f"eagle3,plateau,reference,{s}", f"eagle3,plateau,reference,sft_cont,{s}",
                      f"dflash,plateau,reference,{s}", f"dflash,plateau,reference,sft_cont,{s}"]
    abl = [f"eagle3,plateau,{a},s0" for a in ABLATIONS]
    assert variants[:4 + 4 + 1 + len(abl)] == pair("s0") + pair("s1") + ["eagle3,plateau,s0"] + abl
    assert len(variants) == len(set(variants)) == 2 * 9 + len(ABLATIONS)  # our default at s0 once (the ledger)
    assert "--config.sft.match_flops" not in " ".join(lines)  # the Draft-OPD runs are in DIR
    table = [i for i, ln in enumerate(lines) if "main_table_smollm2.py:decisive,s0 " in ln + " "]
    assert len(table) == 1 and "eagle3,plateau,reference,sft_rollouts,s1" in lines[table[0] + 1]
    assert [ln for ln in lines[:table[0]] if "opd_smollm2.py:" in ln][-1].split()[2].endswith("dflash,plateau,s0")
    # seed s0's rows, decoded after every s0 run while they lack metrics (the stub writes none) and
    # before the report; each with its drafter in DIR (here all), the table so far reported after each
    rows = [i for i, ln in enumerate(lines) if "main_table_smollm2.py:decisive,s0," in ln and ",sofar" not in ln]
    s0_runs = [v for v in variants if v.endswith(",s0") and ",abl_" not in v]  # the ablations have no rows
    assert len(rows) == len(s0_runs) + 1 and rows[-1] == table[0] - 2
    assert all(lines[i].split("decisive,s0,")[1].split()[0] == ",".join(ROWS) for i in rows)
    assert all("main_table_smollm2.py:decisive,s0,sofar " in lines[i + 1] for i in rows)
    # the reports go to RESULTS (the report stage would write into the checkout it runs from)
    reports = [ln for ln in lines if "main_table_smollm2.py:decisive,s0 " in ln or ",sofar " in ln]
    assert len(reports) == len(rows) + 1
    assert all(ln.endswith(f"--config.report.results_root={tmp_path / 'results'}") for ln in reports)
    # the finished reference run's rollouts are kept, gzipped
    kept = tmp_path / "results" / "opd_decisive" / "rollouts" / "eagle3" / "opd_plateau_reference_s0"
    assert gzip.decompress((kept / "shard-000001.jsonl.gz").read_bytes()).decode() == shard.read_text()
    assert not (kept.parent.parent / "dflash").exists()  # its rollouts folder has no shard
    assert all("opd_decisive.py" in ln for ln in logged[-2:]) and "--name=opd_ablations_plateau" in logged[-1]
    ledger = (tmp_path / "results" / "opd_decisive" / "finished.txt").read_text().splitlines()
    assert sorted(ln.split("\t")[0] for ln in ledger) == sorted(
        variants + ["main_table:decisive,s0", "generalization:eagle3,s0", "generalization:dflash,s0"])
    # each pair with its exports in DIR (s0 here) is measured on its training prompts after its runs
    gen = [i for i, ln in enumerate(lines) if "opd_generalization.py" in ln]
    assert [lines[i].split("--drafter=")[1].split()[0] for i in gen] == ["eagle3", "dflash"]
    before = lambda i: [ln for ln in lines[:i] if "opd_smollm2.py:" in ln][-1]
    assert all("sft_cont,s0" in before(i) and f"--workdir={w}" in lines[i] for i in gen)
    assert "--runs=opd_plateau_reference_s0,sft_cont_plateau_reference_s0" in lines[gen[0]]
    # started again: no run is launched (the rows the stub did not decode are tried again), the summaries rewritten
    again, _ = _decisive_runner(tmp_path, w, SEEDS="s0 s1")
    assert again and all("opd_decisive.py" in ln or "main_table_smollm2.py:decisive,s0," in ln for ln in again)


def test_the_decisive_runner_takes_the_kinds_in_the_order_given(tmp_path):
    """KINDS="dflash eagle3": each seed's DFlash pair runs before EAGLE-3's; the ablations and the
    main table (both kinds) still run."""
    from experiments.main_table_smollm2 import DECISIVE

    w = tmp_path / "w"
    for k, r, _ in DECISIVE:
        (w / "export" / f"{r}_s0_{k}").mkdir(parents=True)
        (w / "opd_plateau_reference_s0" / k / "rollouts").mkdir(parents=True, exist_ok=True)
    logged, _ = _decisive_runner(tmp_path, w, SEEDS="s0", KINDS="dflash eagle3")
    variants = [ln.split("opd_smollm2.py:")[1].split()[0] for ln in logged if "opd.main" in ln and "opd_smollm2.py:" in ln]
    assert variants[:4] == ["dflash,plateau,reference,s0", "dflash,plateau,reference,sft_cont,s0",
                            "eagle3,plateau,reference,s0", "eagle3,plateau,reference,sft_cont,s0"]
    assert "eagle3,plateau,abl_update,s0" in variants
    assert sum("main_table_smollm2.py:decisive,s0 " in ln + " " for ln in logged) == 1


def test_the_decisive_runner_continues_on_a_machine_without_the_workdir(tmp_path):
    """A new machine (empty DIR) with the results of an earlier one: the finished Draft-OPD run is
    skipped, continued SFT and SFT on its rollouts match its FLOPs from the kept curve, the kept
    rollouts and main-table metrics are put back in DIR; SFT on rollouts nobody kept reruns their
    Draft-OPD run first; the main table decodes the rows it can and says which it cannot."""
    import gzip

    res, new = tmp_path / "results", tmp_path / "new"
    for k in ("eagle3", "dflash"):
        kept = res / "opd_decisive" / "runs" / k / "opd_plateau_reference_s0.jsonl"
        kept.parent.mkdir(parents=True)
        kept.write_text('{"step": 0, "flops": 8e14, "probe_tau": 1.45}\n{"step": 60, "flops": 8.2e14, "probe_tau": 1.5}\n')
    (res / "opd_decisive" / "finished.txt").write_text("eagle3,plateau,reference,s0\t-\t-\ndflash,plateau,reference,s0\t-\t-\n")
    rollouts = res / "opd_decisive" / "rollouts" / "eagle3" / "opd_plateau_reference_s0"
    rollouts.mkdir(parents=True)
    (rollouts / "shard-000001.jsonl.gz").write_bytes(gzip.compress(b'{"prompt_id": "1@opd1.0"}\n'))
    table = res / "main_table_decisive_s0" / "runs"
    table.mkdir(parents=True)
    (table / "main_eagle3_shipped_smollm2_eagle3_mtbench_t0_b1.json").write_text('{"tau": 1.4}')
    logged, out = _decisive_runner(tmp_path, new, SEEDS="s0")
    launches = [ln for ln in logged if "opd.main" in ln]
    curve = lambda k: f"--config.sft.match_flops={res / 'opd_decisive' / 'runs' / k / 'opd_plateau_reference_s0.jsonl'}"
    assert "opd_smollm2.py:eagle3,plateau,reference,sft_cont,s0" in launches[0] and launches[0].endswith(curve("eagle3"))
    assert "main_table_smollm2.py:decisive,s0,eagle3/shipped,dflash/shipped " in launches[1]  # all DIR has
    assert (new / "eval" / "main_eagle3_shipped_smollm2_eagle3_mtbench_t0_b1" / "metrics.json").read_text() == '{"tau": 1.4}'
    assert (new / "opd_plateau_reference_s0" / "eagle3" / "rollouts" / "shard-000001.jsonl").read_text() \
        == '{"prompt_id": "1@opd1.0"}\n'
    variants = [ln.split("opd_smollm2.py:")[1].split()[0] for ln in launches if "opd_smollm2.py:" in ln]
    last = variants.index("dflash,plateau,s0")  # the last run; then the main table
    assert "eagle3,plateau,reference,s0" not in variants[:last]  # its rollouts were kept
    i = next(i for i, ln in enumerate(launches) if "eagle3,plateau,reference,sft_rollouts" in ln)
    assert launches[i].endswith(curve("eagle3"))
    i = next(i for i, ln in enumerate(launches) if "dflash,plateau,reference,sft_rollouts" in ln)
    assert launches[i - 1].split()[2:] == ["--config=experiments/opd_smollm2.py:dflash,plateau,reference,s0",
                                           f"--workdir={new}"]  # nobody kept them: the run again
    # the main table: every trained row lacks its export (the stub exports nothing), so each one's
    # run again (SFT on the rollouts after its rollouts, put back or the run again), its rows then
    from experiments.main_table_smollm2 import ROWS, row_variant
    again = [row_variant(r, "s0") for r in ROWS if not r.endswith("/shipped")]
    assert again[-1] == "dflash,plateau,reference,sft_rollouts,s0"
    assert variants[last + 1:] == again[:-1] + ["dflash,plateau,reference,s0"] + again[-1:]  # nobody kept its rollouts
    assert not any("match_flops" in ln for ln in launches if "opd_smollm2.py:" in ln and "sft" not in ln and "ttt" not in ln)
    j = [i for i, ln in enumerate(launches) if "opd_smollm2.py:eagle3,plateau,reference,sft_cont,s0 " in ln + " "][-1]
    assert launches[j].endswith(curve("eagle3")) and "main_table_smollm2.py:decisive,s0,eagle3/shipped,dflash/shipped " \
        in launches[j + 1]  # the rows are tried again after each run
    assert not any("main_table_smollm2.py:decisive,s0 " in ln + " " for ln in launches)
    assert "main_table_smollm2.py:decisive,s0 not reported: no metrics for eagle3/opd_plateau_reference " in out


def test_the_decisive_tables_rows_are_kept_and_put_back(tmp_path):
    """main_table_smollm2.decisive_rows: a row is left to decode while one of its 12 eval runs lacks
    metrics; pending if its drafter is in DIR (shipped, or exported), missing otherwise; metrics
    are kept from DIR and put back in it."""
    from experiments.main_table_smollm2 import ROWS, decisive_rows, get_config

    w, kept = tmp_path / "w", tmp_path / "kept"
    (w / "export" / "opd_plateau_reference_s1_dflash").mkdir(parents=True)
    pending, missing = decisive_rows("s1", str(w), str(kept))
    assert pending == ["eagle3/shipped", "dflash/shipped", "dflash/opd_plateau_reference"]
    assert sorted(pending + missing) == sorted(ROWS)
    names = [r["name"] for r in get_config("decisive,s1,dflash/opd_plateau_reference").eval.runs]
    assert len(names) == 12 and all("_s1_" in n for n in names)
    for n in names:  # decoded: DIR has its metrics, which are kept
        (w / "eval" / n).mkdir(parents=True)
        (w / "eval" / n / "metrics.json").write_text(n)
    assert "dflash/opd_plateau_reference" not in decisive_rows("s1", str(w), str(kept))[0]
    assert sorted(p.name for p in kept.iterdir()) == sorted(f"{n}.json" for n in names)
    new = tmp_path / "new"  # another machine: put back, not missing though its export is gone
    assert "dflash/opd_plateau_reference" not in sum(decisive_rows("s1", str(new), str(kept)), [])
    assert all((new / "eval" / n / "metrics.json").read_text() == n for n in names)
