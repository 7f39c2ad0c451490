"""Ship regenerated training data in the repo, so a fresh machine need not regenerate it: a
regenerate stage's JSONL shards, gzipped, with a SHA256SUMS file and where they came from.

  python experiments/ship_data.py --src=workdirs/smollm2_scale/regenerate/alpacaeval \\
      --name=smollm2_alpacaeval_answers

writes experiments/data/<name>/ (configs read it as `data:<name>`: its `shard-*.jsonl.gz` are read
like the stage's own shards) and experiments/data/<name>.metrics.jsonl (the generation speed per
shard, `opd.data.regenerate.metrics_path`, which the data-source benchmark prices data with).
"""

import gzip
import os
import shutil
import subprocess

from absl import app, flags

from opd.data import regenerate
from opd.data.builders import read_trajectory_shards, trajectory_shards
from opd.paths import DATA_DIR, read_json, read_jsonl, write_json, write_sha256sums

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SRC = flags.DEFINE_string("src", None, "a regenerate stage's shard folder (DIR/regenerate/<source>)")
_NAME = flags.DEFINE_string("name", None, "experiments/data/<name>/ (`data:<name>` in configs)")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "where <name>/ goes (default experiments/data)")
flags.mark_flags_as_required(["src", "name"])


def main(argv):
    del argv
    src = os.path.normpath(_SRC.value)
    rows = read_trajectory_shards(src)  # refuses a folder without shards; checks every line parses
    out = os.path.join(_OUT_DIR.value or DATA_DIR, _NAME.value)
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for path in trajectory_shards(src):
        name = os.path.basename(path).removesuffix(".gz") + ".gz"
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f, open(os.path.join(tmp, name), "wb") as g:
            with gzip.GzipFile(filename="", mode="wb", fileobj=g, mtime=0) as z:  # mtime 0: same bytes each time
                shutil.copyfileobj(f, z)  # a gzipped source shard is unpacked first, not gzipped twice
    workdir = os.path.dirname(os.path.dirname(src))
    config = os.path.join(workdir, "config.json")
    commit = subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    gen = read_jsonl(regenerate.metrics_path(src))
    write_json(os.path.join(tmp, "provenance.json"), dict(
        source=os.path.abspath(src), commit=commit, rows=len(rows),
        answer_tokens=sum(len(r["response_ids"]) for r in rows),
        prompt_sets=sorted({r.get("prompt_set", "") for r in rows}),
        targets=sorted({r.get("target", "") for r in rows}),
        regenerate=read_json(config).get("regenerate") if os.path.exists(config) else None,
        generation_seconds=sum(r["seconds"] for r in gen), generated_tokens=sum(r["generated_tokens"] for r in gen)))
    write_sha256sums(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    if gen:
        shutil.copyfile(regenerate.metrics_path(src), regenerate.metrics_path(out))
    print(f"{out}: {len(rows)} rows, {sum(os.path.getsize(os.path.join(out, n)) for n in os.listdir(out)) / 2**20:.2f} MB")


if __name__ == "__main__":
    app.run(main)
