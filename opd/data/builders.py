"""TFDS builders for prompt sets and regenerated trajectories, written without TensorFlow.

Every builder here is a `tfds.core.GeneratorBasedBuilder` that writes `array_record` files
(TensorFlow is never imported) and is read back as a random-access data source with
`builder.as_data_source()`, the input grain pipelines take (`opd.data.pipeline`).
Examples keep the generator's order (`disable_shuffling=True`), so a built set lists its records
exactly as the source module returns them.

Prompt sets (`PromptSetBuilder`, tfds name "opd_prompts", one config per set):

| config | records from | split | training? |
|---|---|---|---|
| mtbench | `assets.load_prompt_set("mtbench")` | test | no |
| humaneval | `assets.load_prompt_set("humaneval")` | test | no |
| alpacaeval_heldout | `splits.alpaca_split(alpacaeval, "heldout")` | test | no |
| alpacaeval_train | `splits.alpaca_split(alpacaeval, "train")` minus MT-Bench/HumanEval texts | train | yes |
| stdlib_code | `text_sources.stdlib_code_prompts()` | train | yes |
| pydocs | `text_sources.pydocs_prompts()` (empty if the docs are absent) | train | yes |

Any local prompt JSONL (the format `assets.load_prompt_set` reads) is built by
`JsonlPromptBuilder` (tfds name "opd_jsonl_prompts"), config named by the file's sha256, split
"train". Prompt example features: `id` (text), `turns` (sequence of text), `extra` (text: JSON
object of the record's other fields). `decode_prompt(example)` gives back the exact dict the
source returned.

Trajectories (`TrajectoryBuilder`, tfds name "opd_trajectories", split "train") are built from
the JSONL shards a regenerate stage writes: files matching `*.jsonl` (optionally `.gz`) in one
folder, read in sorted name order, one JSON object per line:

    {"prompt_id": "123",                        # id of the prompt in its prompt set (str)
     "prompt_set": "alpacaeval_train",          # a training prompt set (eval sets are refused)
     "target": "HuggingFaceTB/SmolLM2-135M-Instruct",  # the target model that wrote it
     "prompt_ids": [1, 9690, ...],              # the prompt as the target saw it: chat template
                                                #   applied, generation header included
     "response_ids": [504, 2, ...],             # the target's tokens (its EOS kept if it stopped)
     "messages": [{"role": "user", "content": "..."},      # optional: the same conversation as
                  {"role": "assistant", "content": "..."}], #   text (needed if ids are empty)
     "id": "alpacaeval_train/123/0"}            # optional, unique; default
                                                #   "<prompt_set>/<prompt_id>/<k>" (k-th sample)

A record needs non-empty `response_ids` or a `messages` list ending with an assistant message.
Trajectory example features: `id`, `prompt_id`, `prompt_set`, `target` (text); `prompt_ids`,
`response_ids` (int32 [None]); `roles`, `contents` (sequences of text; empty when the record had
no `messages`). `decode_trajectory(example)` returns plain Python values.

`load_source(name, data_dir)` builds (once) and opens any of these.
"""

from __future__ import annotations

import dataclasses
import errno
import gzip
import hashlib
import inspect
import json
import os
from typing import Any, Callable, Iterable, Sequence

from absl import logging
from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from opd.data import assets, splits, text_sources

FILE_FORMAT = "array_record"
EVAL_SETS = ("mtbench", "humaneval", "alpacaeval_heldout")
TRAINING_SETS = ("alpacaeval_train", "stdlib_code", "pydocs")
# Prompt-set names a trajectory may come from only if it is not an evaluation set.
_FORBIDDEN_TRAJECTORY_SETS = frozenset(EVAL_SETS) | {"alpacaeval"}


def _bytes_to_str(value):
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class _LocalBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of our builders: all data is local, and `code_path` does not need `importlib_resources`.

    tfds 4.9's default `code_path` imports the `importlib_resources` backport (an `etils[epath]`
    extra) for any builder defined inside a package; without it building fails, so we point
    tfds at this file directly.
    """

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        return epath.Path(inspect.getfile(cls))

    def _split_generators(self, dl_manager):
        del dl_manager  # everything is local
        return {self._split_name(): self._generate_examples()}

    def _split_name(self) -> str:
        return "train"


# ----------------------------------------------------------------------------- prompt sets


def _alpacaeval_heldout() -> list[dict]:
    return splits.alpaca_split(assets.load_prompt_set("alpacaeval"), "heldout")


def _alpacaeval_train() -> list[dict]:
    """AlpacaEval's train split minus instructions that are also MT-Bench / HumanEval prompts.

    AlpacaEval contains some MT-Bench questions verbatim (e.g. AlpacaEval 791 and 801 are MT-Bench
    130 and 81), and the hash split alone puts two of them on the train side.
    """
    evaluation = splits.eval_prompt_texts()
    train = splits.alpaca_split(assets.load_prompt_set("alpacaeval"), "train")
    kept = [r for r in train if not any(splits.normalise(t) in evaluation for t in r["turns"])]
    if len(kept) < len(train):
        logging.info("alpacaeval_train: dropped %d instruction(s) that are MT-Bench/HumanEval prompts",
                     len(train) - len(kept))
    return kept


_PROMPT_LOADERS: dict[str, Callable[..., list[dict]]] = {
    "mtbench": lambda: assets.load_prompt_set("mtbench"),
    "humaneval": lambda: assets.load_prompt_set("humaneval"),
    "alpacaeval_heldout": _alpacaeval_heldout,
    "alpacaeval_train": _alpacaeval_train,
    "stdlib_code": text_sources.stdlib_code_prompts,
    "pydocs": text_sources.pydocs_prompts,
}


@dataclasses.dataclass(eq=False)
class PromptSetConfig(tfds.core.BuilderConfig):
    """One prompt set.

    Attributes:
      source: key of the loader (`mtbench`, ..., `pydocs`).
      training: whether training stages may read it (its split is "train", else "test").
      loader_kwargs: extra arguments for the loader (e.g. `max_prompts` for the text sources).
    """

    source: str = ""
    training: bool = False
    loader_kwargs: dict = dataclasses.field(default_factory=dict)

    @property
    def split(self) -> str:
        return "train" if self.training else "test"


PROMPT_CONFIGS = tuple(
    PromptSetConfig(name=n, source=n, training=n in TRAINING_SETS, description=f"{n} prompts")
    for n in EVAL_SETS + TRAINING_SETS
)


def _prompt_features() -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict({
        "id": tfds.features.Text(),
        "turns": tfds.features.Sequence(tfds.features.Text()),
        "extra": tfds.features.Text(),  # JSON object: the record's other fields
    })


def _prompt_example(record: dict) -> dict:
    extra = {k: v for k, v in record.items() if k not in ("id", "turns")}
    return {"id": record["id"], "turns": list(record["turns"]), "extra": json.dumps(extra, sort_keys=True)}


def _prompt_examples(records: Sequence[dict]) -> Iterable[tuple[str, dict]]:
    seen = set()
    for i, r in enumerate(records):
        if r["id"] in seen:
            raise ValueError(f"duplicate prompt id {r['id']!r} (record {i})")
        seen.add(r["id"])
        yield f"{i:08d}", _prompt_example(r)


def decode_prompt(example: dict) -> dict[str, Any]:
    """A prompt example read from a data source -> the source's own record dict."""
    out = {"id": _bytes_to_str(example["id"]), "turns": [_bytes_to_str(t) for t in example["turns"]]}
    out.update(json.loads(_bytes_to_str(example["extra"])))
    return out


class PromptSetBuilder(_LocalBuilder):
    """Prompt sets (MT-Bench, HumanEval, AlpacaEval train/held-out, stdlib code, Python docs)."""

    name = "opd_prompts"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First version."}
    BUILDER_CONFIGS = list(PROMPT_CONFIGS)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self, description=__doc__.split("\n\n")[0], features=_prompt_features(), disable_shuffling=True
        )

    def _split_name(self) -> str:
        return self.builder_config.split

    def _generate_examples(self):
        cfg = self.builder_config
        yield from _prompt_examples(_PROMPT_LOADERS[cfg.source](**cfg.loader_kwargs))


def _sha256_files(paths: Sequence[str]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(os.path.basename(p).encode("utf-8") + b"\0")
        with open(p, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


@dataclasses.dataclass(eq=False)
class PathConfig(tfds.core.BuilderConfig):
    """A builder config for local files; its name is a digest of their contents."""

    path: str = ""


class JsonlPromptBuilder(_LocalBuilder):
    """Any local prompt JSONL file (see `assets.load_prompt_set`); build with `jsonl_builder`."""

    name = "opd_jsonl_prompts"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First version."}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self, description="prompts from a local JSONL file", features=_prompt_features(),
            disable_shuffling=True,
        )

    def _generate_examples(self):
        yield from _prompt_examples(assets.load_prompt_set(self.builder_config.path))


def jsonl_builder(path: str, data_dir: str) -> JsonlPromptBuilder:
    """The builder of one prompt JSONL file; its config name changes when the file does."""
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompt file not found: {path}")
    cfg = PathConfig(name=f"sha256_{_sha256_files([path])[:16]}", path=path, description=path)
    return JsonlPromptBuilder(config=cfg, data_dir=data_dir, file_format=FILE_FORMAT)


# ----------------------------------------------------------------------------- trajectories


def trajectory_shards(folder: str) -> list[str]:
    """The regenerate stage's shards in `folder` (`*.jsonl`, `*.jsonl.gz`), sorted by name."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"trajectory folder not found: {folder}")
    names = sorted(f for f in os.listdir(folder) if f.endswith((".jsonl", ".jsonl.gz")))
    if not names:
        raise FileNotFoundError(f"no *.jsonl trajectory shards in {folder}")
    return [os.path.join(folder, f) for f in names]


def _int_list(value, where: str, field: str) -> np.ndarray:
    if value is None:
        return np.zeros((0,), np.int32)
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ValueError(f"{where}: {field!r} must be a list of ints")
    arr = np.asarray(value, dtype=np.int64).reshape(-1)
    if arr.size and (arr.min() < 0 or arr.max() >= 2**31):
        raise ValueError(f"{where}: {field!r} has token ids outside [0, 2**31)")
    return arr.astype(np.int32)


def parse_trajectory(row: dict, where: str) -> dict:
    """Checks one JSONL trajectory record and returns it as a trajectory example (no id default)."""
    for field in ("prompt_id", "prompt_set", "target"):
        if not isinstance(row.get(field), (str, int)) or isinstance(row.get(field), bool) or row.get(field) == "":
            raise ValueError(f"{where}: field {field!r} is required (a non-empty string)")
    prompt_set = str(row["prompt_set"])
    if prompt_set in _FORBIDDEN_TRAJECTORY_SETS:
        raise ValueError(
            f"{where}: prompt_set {prompt_set!r} is an evaluation set; trajectories for training must come from "
            f"training prompts ({', '.join(TRAINING_SETS)} or a JSONL file)"
        )
    messages = row.get("messages") or []
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages
    ):
        raise ValueError(f"{where}: 'messages' must be a list of {{'role': str, 'content': str}}")
    prompt_ids = _int_list(row.get("prompt_ids"), where, "prompt_ids")
    response_ids = _int_list(row.get("response_ids"), where, "response_ids")
    if not response_ids.size and not (messages and messages[-1]["role"] == "assistant"):
        raise ValueError(f"{where}: needs non-empty 'response_ids' or 'messages' ending with an assistant message")
    return {
        "prompt_id": str(row["prompt_id"]),
        "prompt_set": prompt_set,
        "target": str(row["target"]),
        "prompt_ids": prompt_ids,
        "response_ids": response_ids,
        "roles": [m["role"] for m in messages],
        "contents": [m["content"] for m in messages],
    }


def read_trajectory_shards(folder: str) -> list[dict]:
    """All trajectory records of a folder's shards, checked, ids filled in, in shard order."""
    out, ids, counts = [], set(), {}
    for path in trajectory_shards(folder):
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            rows = assets.read_jsonl_lines(f.read(), path)
        for lineno, row in rows:
            where = f"{path}, line {lineno}"
            ex = parse_trajectory(row, where)
            key = (ex["prompt_set"], ex["prompt_id"])
            k = counts.get(key, 0)
            counts[key] = k + 1
            ex["id"] = str(row.get("id") or f"{ex['prompt_set']}/{ex['prompt_id']}/{k}")
            if ex["id"] in ids:
                raise ValueError(f"{where}: duplicate trajectory id {ex['id']!r}")
            ids.add(ex["id"])
            out.append(ex)
    return out


def decode_trajectory(example: dict) -> dict[str, Any]:
    """A trajectory example read from a data source -> str fields, int32 arrays, message list."""
    roles = [_bytes_to_str(r) for r in example["roles"]]
    contents = [_bytes_to_str(c) for c in example["contents"]]
    return {
        "id": _bytes_to_str(example["id"]),
        "prompt_id": _bytes_to_str(example["prompt_id"]),
        "prompt_set": _bytes_to_str(example["prompt_set"]),
        "target": _bytes_to_str(example["target"]),
        "prompt_ids": np.asarray(example["prompt_ids"], np.int32),
        "response_ids": np.asarray(example["response_ids"], np.int32),
        "messages": [{"role": r, "content": c} for r, c in zip(roles, contents)],
    }


class TrajectoryBuilder(_LocalBuilder):
    """Target-regenerated trajectories from a regenerate stage's JSONL shards."""

    name = "opd_trajectories"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First version."}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="target-generated trajectories",
            features=tfds.features.FeaturesDict({
                "id": tfds.features.Text(),
                "prompt_id": tfds.features.Text(),
                "prompt_set": tfds.features.Text(),
                "target": tfds.features.Text(),
                "prompt_ids": tfds.features.Tensor(shape=(None,), dtype=np.int32),
                "response_ids": tfds.features.Tensor(shape=(None,), dtype=np.int32),
                "roles": tfds.features.Sequence(tfds.features.Text()),
                "contents": tfds.features.Sequence(tfds.features.Text()),
            }),
            disable_shuffling=True,
        )

    def _generate_examples(self):
        for i, ex in enumerate(read_trajectory_shards(self.builder_config.path)):
            yield f"{i:010d}", ex


def trajectory_builder(folder: str, data_dir: str) -> TrajectoryBuilder:
    """The builder of one folder of trajectory shards; its config name changes with their contents."""
    folder = os.path.abspath(os.path.expanduser(folder))
    cfg = PathConfig(name=f"sha256_{_sha256_files(trajectory_shards(folder))[:16]}", path=folder, description=folder)
    return TrajectoryBuilder(config=cfg, data_dir=data_dir, file_format=FILE_FORMAT)


# ----------------------------------------------------------------------------- loading


def builder_for(name: str, data_dir: str) -> tfds.core.GeneratorBasedBuilder:
    """The builder of `name`: a prompt-set config name, a `.jsonl` path, or `trajectories:<folder>`."""
    if name.startswith("trajectories:"):
        return trajectory_builder(name[len("trajectories:"):], data_dir)
    if name in _PROMPT_LOADERS:
        return PromptSetBuilder(config=name, data_dir=data_dir, file_format=FILE_FORMAT)
    if name.endswith((".jsonl", ".jsonl.gz")) or os.path.sep in name:
        return jsonl_builder(name, data_dir)
    raise ValueError(
        f"unknown source {name!r}: use one of {sorted(_PROMPT_LOADERS)}, a .jsonl path, or 'trajectories:<folder>'"
    )


def prepare(builder: tfds.core.GeneratorBasedBuilder) -> tfds.core.GeneratorBasedBuilder:
    """Builds `builder`'s array_record files unless they are already there."""
    builder.download_and_prepare(file_format=FILE_FORMAT)
    return builder


def load_source(name: str, data_dir: str, split: str | None = None):
    """A random-access data source (`len`, `__getitem__`) of one prompt set or trajectory set.

    Builds the set on first use (into `data_dir`), then opens its array_record files with
    `builder.as_data_source()`. Examples are raw tfds examples (text as bytes): decode them with
    `decode_prompt` / `decode_trajectory`, or hand the source to `opd.data.pipeline`.

    Args:
      name: "mtbench", "humaneval", "alpacaeval_heldout", "alpacaeval_train", "stdlib_code",
        "pydocs" (an empty list, with a logged warning, when the Python docs are not installed),
        a prompt `.jsonl` path, or "trajectories:<folder of JSONL shards>".
      data_dir: where tfds keeps built datasets.
      split: default the set's only split ("test" for evaluation sets, else "train").
    """
    if name == "pydocs" and not os.path.isdir(text_sources.DEFAULT_PYDOCS_ROOT):
        text_sources.pydocs_prompts()  # logs why
        return []  # an empty random-access source: tfds cannot write an empty split
    try:
        builder = prepare(builder_for(name, data_dir))
    except OSError as e:
        # the hosts of a multi-host launch share `data_dir` and build the same set: the one
        # that finished first renamed its copy into place, which is what this one would write.
        # The rename fails with FileExistsError (etils saw the folder, or the filesystem says
        # EEXIST) or, when that copy lands between etils' check and the rename, with ENOTEMPTY
        if not isinstance(e, FileExistsError) and e.errno != errno.ENOTEMPTY:
            raise
        builder = prepare(builder_for(name, data_dir))
    sources = builder.as_data_source()
    if split is None:
        if len(sources) != 1:
            raise ValueError(f"{name} has splits {sorted(sources)}: pass split=")
        (split,) = sources
    if split not in sources:
        raise ValueError(f"{name} has no split {split!r}; splits: {sorted(sources)}")
    return sources[split]


def load_prompts(name: str, data_dir: str) -> list[dict]:
    """All records of a prompt source, decoded (see `decode_prompt`)."""
    src = load_source(name, data_dir)
    return [decode_prompt(src[i]) for i in range(len(src))]


def check_no_eval_leak(training: Iterable[dict], evaluation: Iterable[dict]) -> None:
    """Raises ValueError if any user turn of an evaluation record (normalised: whitespace collapsed,
    lower case) occurs as a user turn of a training record."""

    seen = {splits.normalise(t) for r in training for t in r["turns"]}
    leaked = [r["id"] for r in evaluation if any(splits.normalise(t) in seen for t in r["turns"])]
    if leaked:
        raise ValueError(f"{len(leaked)} evaluation prompt(s) occur in the training data, e.g. ids {leaked[:5]}")
