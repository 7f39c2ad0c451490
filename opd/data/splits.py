"""Train / held-out splits of prompt sets, so evaluation prompts never reach training.

AlpacaEval is split deterministically by a hash of each record's normalised instruction
text (not its position in the file): the same instruction always lands on the same side,
whatever file order or copy it comes from, and duplicates cannot straddle the split.
About 80 % is "train" (may be used for SFT / Draft-OPD data), 20 % "heldout" (evaluation).

MT-Bench and HumanEval are evaluation-only: `training_records` refuses them, and removes from
any training set every record whose text equals one of their prompts (AlpacaEval contains
MT-Bench questions verbatim, e.g. its records 791 and 801).
"""

from __future__ import annotations

import hashlib
from typing import Iterable, Sequence

from opd.data import assets

SPLITS = ("train", "heldout")
HELDOUT_PER_MILLE = 200  # 20 % held out
EVAL_ONLY_SETS = ("mtbench", "humaneval")
_SALT = "draft-opd/alpacaeval-split/v1"  # changing it reshuffles the split: never do it silently


def normalise(text: str) -> str:
    """What prompt texts are compared on: whitespace collapsed, lower case."""
    return " ".join(text.split()).lower()


def record_text(record: dict) -> str:
    """The text a split is keyed on: the first user turn (AlpacaEval: the instruction)."""
    if "instruction" in record:
        return record["instruction"]
    if record.get("turns"):
        return record["turns"][0]
    raise ValueError(f"record {record.get('id')!r} has neither 'instruction' nor 'turns' to split on")


def split_of(text: str) -> str:
    """"train" or "heldout" for one instruction text (deterministic, platform-independent)."""
    digest = hashlib.sha256(f"{_SALT}\0{normalise(text)}".encode("utf-8")).digest()
    return "heldout" if int.from_bytes(digest[:8], "big") % 1000 < HELDOUT_PER_MILLE else "train"


def alpaca_split(records: Sequence[dict], split: str) -> list[dict]:
    """The records of AlpacaEval (or any instruction set) that fall in `split`, in input order.

    Args:
      records: dicts with an `instruction` (or `turns`) field, e.g. `load_prompt_set("alpacaeval")`.
      split: "train" or "heldout".
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return [r for r in records if split_of(record_text(r)) == split]


def training_records(prompt_set: str) -> list[dict]:
    """Prompt records that training stages may use; the only entry point training should call.

    "alpacaeval" -> its train split; a JSONL path -> all of it; MT-Bench / HumanEval ->
    ValueError (they are evaluation sets).
    """
    if prompt_set in EVAL_ONLY_SETS:
        raise ValueError(f"prompt set {prompt_set!r} is evaluation-only and must not be used for training")
    records = assets.load_prompt_set(prompt_set)
    if prompt_set == "alpacaeval":
        records = alpaca_split(records, "train")
    return drop_eval_prompts(records)


def eval_prompt_texts() -> set:
    """Normalised texts of every user turn of the evaluation-only sets."""
    return {normalise(t) for name in EVAL_ONLY_SETS for r in assets.load_prompt_set(name) for t in r["turns"]}


def all_eval_prompt_texts() -> set:
    """Normalised texts of every evaluation prompt: the evaluation-only sets' user turns and
    AlpacaEval's held-out instructions."""
    heldout = alpaca_split(assets.load_prompt_set("alpacaeval"), "heldout")
    return eval_prompt_texts() | {normalise(record_text(r)) for r in heldout}


def drop_eval_prompts(records: Sequence[dict]) -> list[dict]:
    """`records` without any whose text equals an evaluation prompt (MT-Bench / HumanEval)."""
    banned = eval_prompt_texts()
    return [r for r in records if normalise(record_text(r)) not in banned]


def check_disjoint(train: Iterable[dict], heldout: Iterable[dict]) -> None:
    """Raises ValueError if any held-out instruction text also occurs in `train`."""
    seen = {normalise(record_text(r)) for r in train}
    leaked = [r.get("id") for r in heldout if normalise(record_text(r)) in seen]
    if leaked:
        raise ValueError(f"{len(leaked)} evaluation prompt(s) also occur in the training data, e.g. ids {leaked[:5]}")
