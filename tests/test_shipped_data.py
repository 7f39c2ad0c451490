"""Training data shipped in the repo (`experiments/data/<name>/`, `data:<name>` in configs): intact
(SHA256SUMS), with its provenance, never an evaluation prompt, read as trajectory shards; and
`experiments/ship_data.py`, which writes it."""

import glob
import gzip
import json
import os
import subprocess
import sys

import pytest

from opd.data import regenerate, splits
from opd.data import builders
from opd.data.builders import read_trajectory_shards
from opd.data.tokenizer import load_tokenizer
from opd.paths import DATA_DIR, path_exists, resolve_path, verify_sha256sums
from opd.training import stage_common

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = sorted(os.path.basename(os.path.dirname(p)) for p in glob.glob(os.path.join(DATA_DIR, "*", "SHA256SUMS")))


def test_the_plateau_answers_are_shipped():
    assert "smollm2_alpacaeval_answers" in SHIPPED  # the plateau SFT and Draft-OPD configs read them


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_data_is_intact_and_never_an_evaluation_prompt(name, smollm2_gguf_path):
    folder = resolve_path(f"data:{name}")
    verify_sha256sums(folder)
    prov = json.load(open(os.path.join(folder, "provenance.json")))
    rows = read_trajectory_shards(folder)
    assert len(rows) == prov["rows"] and sum(len(r["response_ids"]) for r in rows) == prov["answer_tokens"]
    # every row's prompt is, token for token, a training prompt in the chat template: AlpacaEval's
    # train split without MT-Bench / HumanEval texts (`splits.training_records`), never its held-out split
    assert prov["prompt_sets"] == ["alpacaeval_train"]
    train = {r["id"]: r for r in splits.training_records("alpacaeval")}
    tok = load_tokenizer(smollm2_gguf_path)
    for r in rows:
        assert r["prompt_id"] in train, r["prompt_id"]
        assert list(r["prompt_ids"]) == regenerate.chat_prompt_ids(tok, train[r["prompt_id"]]["turns"][0])
    # its generation speed, next to it as a regenerate stage keeps it (the data-source benchmark prices it)
    assert os.path.exists(regenerate.metrics_path(folder))


def test_ship_data_gzips_and_checksums_a_regenerate_stages_shards(tmp_path):
    src = tmp_path / "w" / "regenerate" / "alpacaeval"
    src.mkdir(parents=True)
    row = dict(prompt_id="0", prompt_set="alpacaeval_train", target="asset:smollm2_gguf", prompt_ids=[1, 2],
               response_ids=[3, 4, 5], messages=[{"role": "user", "content": "Name a prime."},
                                                 {"role": "assistant", "content": "7"}])
    regenerate.write_shard(regenerate.shard_path(str(src), 0), [row, {**row, "prompt_id": "1"}])
    regenerate.write_shard(regenerate.shard_path(str(src), 1), [{**row, "prompt_id": "2"}])
    with open(regenerate.metrics_path(str(src)), "w") as f:
        f.write(json.dumps({"shard": 0, "prompts": 2, "generated_tokens": 6, "seconds": 1.5}) + "\n")
    json.dump({"regenerate": {"batch_size": 32}}, open(tmp_path / "w" / "config.json", "w"))

    def ship(src=src, name="tiny"):
        out = subprocess.run([sys.executable, os.path.join(REPO, "experiments", "ship_data.py"), f"--src={src}",
                              f"--name={name}", f"--out_dir={tmp_path / 'data'}"], capture_output=True, text=True, cwd=REPO)
        assert out.returncode == 0, out.stderr[-2000:]
        return tmp_path / "data" / name

    folder = ship()
    verify_sha256sums(str(folder))
    assert sorted(os.listdir(folder)) == ["SHA256SUMS", "provenance.json", "shard-00000.jsonl.gz", "shard-00001.jsonl.gz"]
    assert [r["prompt_id"] for r in read_trajectory_shards(str(folder))] == ["0", "1", "2"]
    prov = json.load(open(folder / "provenance.json"))
    assert (prov["rows"], prov["answer_tokens"], prov["regenerate"], prov["generation_seconds"]) == (3, 9, {"batch_size": 32}, 1.5)
    assert os.path.exists(regenerate.metrics_path(str(folder)))
    # shipped data shipped again (gzipped shards in): unpacked first, not gzipped twice
    assert [r["prompt_id"] for r in read_trajectory_shards(str(ship(folder, "again")))] == ["0", "1", "2"]
    first = open(folder / "SHA256SUMS").read()
    assert ship() and open(folder / "SHA256SUMS").read() == first  # the same bytes each time (gzip mtime 0)
    # a damaged file is named
    with gzip.open(folder / "shard-00001.jsonl.gz", "wt") as f:
        f.write(json.dumps(row) + "\n")
    with pytest.raises(ValueError, match="shard-00001.jsonl.gz does not match"):
        verify_sha256sums(str(folder))


def test_a_missing_data_spec_names_what_is_shipped():
    assert not path_exists("data:nope")
    with pytest.raises(FileNotFoundError, match=r"no shipped data 'nope' in .*experiments/data \(there: .*smollm2"):
        resolve_path("data:nope")


def test_training_stages_read_the_shipped_answers(tmp_path):
    """What the plateau configs' SFT and Draft-OPD stages do with `data:smollm2_alpacaeval_answers`:
    the folder check, then the tfds trajectory set built from the gzipped shards."""
    (folder,) = stage_common.trajectory_folders(("data:smollm2_alpacaeval_answers",), str(tmp_path), "opd.data")
    assert len(builders.load_source(f"trajectories:{folder}", str(tmp_path / "tfds"))) == 652
    with pytest.raises(FileNotFoundError, match=r"config.opd.data: no \*.jsonl trajectory shards in"):
        stage_common.trajectory_folders((str(tmp_path),), str(tmp_path), "opd.data")
