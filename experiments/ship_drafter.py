"""Ship an exported drafter in the repo: its public HF layout in float16 (half the bytes; loaders
cast back), a SHA256SUMS file, and where it came from (the run, its step, cumulative training
FLOPs and answer tokens, its last held-out probe tau) with the training metrics of every leg.

  python experiments/ship_drafter.py --export=workdirs/smollm2_scale/export/sft_scale_eagle3 \\
      --run=workdirs/smollm2_scale/sft_scale/eagle3 --name=smollm2_eagle3_scale

writes experiments/drafters/<name>/ (loadable with `opd.load_drafter(path, target)`; a later leg
of the same run continues from it with `config.drafter.init`).
"""

import json
import os
import shutil

from absl import app, flags

from opd.data.assets import asset_path
from opd.drafters import registry
from opd.paths import read_jsonl, write_json, write_sha256sums
from opd.target import load_target

_EXPORT = flags.DEFINE_string("export", None, "an exported drafter (DIR/export/<run>_<kind>)")
_RUN = flags.DEFINE_string("run", None, "its training run dir (metrics.jsonl, sft_config.json)")
_NAME = flags.DEFINE_string("name", None, "experiments/drafters/<name>/")
_TARGET = flags.DEFINE_string("target", "asset:smollm2_gguf", "the drafter's target (asset:<name> or a path)")
_PREVIOUS = flags.DEFINE_string("previous", None, "the shipped drafter this run continued from (`drafter.init`): "
                                "its metrics.jsonl legs go first in the new one's")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "where <name>/ goes (default experiments/drafters, `shipped:<name>`)")
flags.mark_flags_as_required(["export", "run", "name"])

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv):
    del argv
    spec = _TARGET.value
    target = load_target(asset_path(spec.split(":", 1)[1]) if spec.startswith("asset:") else spec)
    drafter = registry.load_drafter(_EXPORT.value, target)
    out = os.path.join(_OUT_DIR.value or os.path.join(REPO, "experiments", "drafters"), _NAME.value)
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    registry.export_drafter(drafter, tmp, dtype="float16")
    rows = read_jsonl(os.path.join(_RUN.value, "metrics.jsonl"))
    # metrics.jsonl: every leg's rows, each tagged with its leg (sft_scale_curves.py reads them)
    legs = read_jsonl(os.path.join(_PREVIOUS.value, "metrics.jsonl")) if _PREVIOUS.value else []
    leg = max((r["leg"] for r in legs), default=-1) + 1
    with open(os.path.join(tmp, "metrics.jsonl"), "w") as f:
        for r in legs + [{**r, "leg": leg} for r in rows]:
            f.write(json.dumps(r) + "\n")
    probes = [r for r in rows if "probe_tau" in r]
    with open(os.path.join(_EXPORT.value, "export.json")) as f:
        exported = json.load(f)
    shutil.copy(os.path.join(_EXPORT.value, "export.json"), tmp)  # its training and cumulative FLOPs (a later
    # leg's `config.drafter.init` continues them; eval reports them)
    write_json(os.path.join(tmp, "provenance.json"), {
        "target": spec, "kind": drafter.kind, "export": exported,
        "training_config": json.load(open(os.path.join(_RUN.value, "sft_config.json"))),
        "last_probe": probes[-1] if probes else None,
        "flops": max((r.get("flops", 0) for r in rows), default=0),
        "answer_tokens": max((r.get("tokens", 0) for r in rows), default=0),  # trained on in this run
    })
    write_sha256sums(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    registry.load_drafter(out, target)  # it loads
    print(f"shipped {drafter.kind} drafter -> {out}")


if __name__ == "__main__":
    app.run(main)
