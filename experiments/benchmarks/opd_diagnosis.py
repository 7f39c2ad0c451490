"""Why Draft-OPD does or does not beat continued SFT at matched FLOPs: how much supervision each
branch buys per FLOP, and how much of Draft-OPD's supervision is actually on-policy.

For a Draft-OPD run (mean over its logged steps) a verify round with n accepted drafts trains
offsets 1..n+1 (the accepted ones and the first rejected one; later offsets have weight 0 by
default), so with the rollout's acceptance a_i = P(d_i accepted | d_<i accepted):
  supervised positions per round = sum_{i=1..K} P(n >= i-1),  P(n >= i) = a_1 ... a_i;
only offsets >= 2 have a prefix holding the drafter's own tokens (the states SFT never sees);
offset 1 is conditioned on committed target text, like SFT's rows. For an SFT run a step
trains every answer token of its rows (within seq_len) at each of its TTT steps (EAGLE-3) or
its block positions (DFlash: num_anchors x (block_size - 1)).

  python experiments/benchmarks/opd_diagnosis.py --workdir=workdirs/smollm2
      # -> experiments/results/opd_diagnosis/ (results.json, results.md)
"""

import glob
import json
import os

import numpy as np
from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", "workdirs/smollm2", "workdir of experiments/opd_smollm2.py")
_KINDS = flags.DEFINE_list("drafters", ["eagle3", "dflash"], "drafter kinds")
_OUT = flags.DEFINE_string("out_dir", None, "default: experiments/results/opd_diagnosis")


def _rows(path):
    from opd.training.metrics import read_jsonl

    return read_jsonl(path) if os.path.isfile(path) else []


def _probe(rows):
    taus = [r["probe_tau"] for r in rows if r.get("probe_tau") is not None]
    return (taus[0], taus[-1]) if taus else (None, None)


def _flops_per_step(rows):
    pts = sorted({(r["step"], r["flops"]) for r in rows if "flops" in r and r.get("step")})
    return (pts[-1][1] - pts[0][1]) / (pts[-1][0] - pts[0][0]) if len(pts) > 1 else None


def opd_run(workdir, run, kind):
    stage = os.path.join(workdir, run, kind)
    rows = _rows(os.path.join(stage, "metrics.jsonl"))
    train = [r for r in rows if "rollout_tau" in r]
    if not train:
        return None
    cfg = json.load(open(os.path.join(stage, "opd_config.json")))
    K = int(cfg.get("num_draft_tokens", cfg.get("num_draft")))  # workdirs written before the rename
    acc = np.array([[r.get(f"acceptance/{i}") or 0.0 for i in range(1, K + 1)] for r in train]).mean(0)
    reach = np.concatenate([[1.0], np.cumprod(acc)])  # P(n >= i), i = 0..K
    per_round = float(reach[:K].sum())
    rounds = float(np.mean([r["rollout_rounds"] for r in train]))
    fps = _flops_per_step(train)
    start, end = _probe(rows)
    return {"drafter": kind, "run": run, "kind": "opd", "steps": train[-1]["step"], "flops_per_step": fps,
            "supervised_per_step": rounds * per_round, "supervised_per_pflop": rounds * per_round / fps * 1e15,
            "on_policy_share": (per_round - 1.0) / per_round, "rollout_acceptance_1": float(acc[0]),
            "rollout_tau": float(np.mean([r["rollout_tau"] for r in train])), "probe_tau_start": start,
            "probe_tau_end": end, "divergence": cfg["loss"]["divergence"]}


def sft_run(workdir, run, kind, target_flops_per_token=None, opd_end_flops=None):
    from opd.data.builders import read_trajectory_shards
    from opd.paths import resolve_path as resolve

    stage = os.path.join(workdir, run, kind)
    rows = _rows(os.path.join(stage, "metrics.jsonl"))
    cfg_path = os.path.join(stage, "sft_config.json")
    if not rows or not os.path.isfile(cfg_path):
        return None
    cfg = json.load(open(cfg_path))
    folders = [resolve(f, workdir) for f in cfg.get("data") or []] or sorted(
        glob.glob(os.path.join(workdir, "regenerate", "*")))
    seq_len = int(cfg["seq_len"])
    kept = [max(0, min(len(t["prompt_ids"]) + len(t["response_ids"]), seq_len) - len(t["prompt_ids"]))
            for f in folders for t in read_trajectory_shards(f)]
    loss = cfg.get("loss", {})
    per_token = int(loss.get("ttt_steps", 1)) if kind == "eagle3" else None
    if per_token:
        per_row = np.mean(kept) * per_token
    else:  # DFlash: each anchor trains the block_size - 1 positions after it
        block = json.load(open(os.path.join(stage, "init", "config.json")))["block_size"]
        per_row = int(loss["num_anchors"]) * (int(block) - 1)
    fps = _flops_per_step(rows)
    start, end = _probe(rows)
    # A cached-feature run (sft_cont reuses the warm-up's cache) pays only the drafter per step.
    # Had it recomputed the target's features every step (like Draft-OPD must for new text),
    # the matched budget would have ended earlier: its probe tau at that step.
    at_online = None
    if cfg.get("target_features") == "cache" and target_flops_per_token and opd_end_flops and fps:
        probes = [(r["step"], r["flops"], r["probe_tau"]) for r in rows if r.get("probe_tau") is not None]
        online = fps + target_flops_per_token * cfg["batch_size"] * seq_len
        step = (opd_end_flops - probes[0][1]) / online
        at_online = {"step": step, "probe_tau": min(probes, key=lambda p: abs(p[0] - step))[2]}
    return {"drafter": kind, "run": run, "kind": "sft", "steps": max(r["step"] for r in rows), "flops_per_step": fps,
            "probe_tau_if_features_recomputed": at_online["probe_tau"] if at_online else None,
            "matched_step_if_features_recomputed": at_online["step"] if at_online else None,
            "supervised_per_step": float(per_row * cfg["batch_size"]),
            "supervised_per_pflop": float(per_row * cfg["batch_size"]) / fps * 1e15 if fps else None,
            "on_policy_share": 0.0 if run != "sft_rollouts" else None, "probe_tau_start": start,
            "probe_tau_end": end}


def main(argv):
    from opd.eval.report import RESULTS_ROOT, markdown_table, write_results

    from opd.data.assets import cached_path
    from opd.target import load_target
    from opd.training import flops

    wd = _WORKDIR.value
    target_flops_per_token = flops.target_forward_flops(load_target(cached_path("smollm2_gguf")).config, 1, 1)
    out = []
    for kind in _KINDS.value:
        opd_end = _rows(os.path.join(wd, "opd", kind, "metrics.jsonl"))
        opd_end = max((r["flops"] for r in opd_end if "flops" in r), default=None)
        for run in sorted(os.listdir(wd)):
            if os.path.isfile(os.path.join(wd, run, kind, "opd_config.json")):
                r = opd_run(wd, run, kind)
            elif run != "sft":  # the warm-up has no probe rows; its FLOPs are the curves' start
                r = sft_run(wd, run, kind, target_flops_per_token, opd_end)
            else:
                r = None
            if r:
                out.append(r)
    cols = ("drafter", "run", "kind", "steps", "flops_per_step", "supervised_per_step", "supervised_per_pflop",
            "on_policy_share", "rollout_acceptance_1", "rollout_tau", "probe_tau_start", "probe_tau_end",
            "probe_tau_if_features_recomputed")
    table = [{**r, "flops_per_step": f"{r['flops_per_step']:.3g}" if r["flops_per_step"] else ""} for r in out]
    md = markdown_table(table, cols, "{:.3f}")
    write_results("opd_diagnosis", {"rows": out}, md, _OUT.value or os.path.join(RESULTS_ROOT, "opd_diagnosis"))
    print(md)


if __name__ == "__main__":
    app.run(main)
