"""SFT data without generation: real offline text as the assistant turn of one chat exchange.

The `regenerate` stage has the target answer prompts (~100 tokens/s); this module instead wraps
text that already exists as chat records and only tokenises them (the whole stdlib and Python
docs, ~1.9M answer tokens, in about half a minute on one CPU core). The
answers are off-policy, but EAGLE-3's loss distils the target's own distribution at every
position, so its labels stay the target's. Sources (`SOURCES`), each deterministic with stable ids:

* `stdlib_code`: every top-level function and method of the stdlib (`text_sources.stdlib_functions`;
  nested functions are inside their parent's text), user: "Show the source of `<qualname>` from
  `<path>` in the Python standard library.", assistant: its source in a ```python fence.
  Id: the function's `stdlib:<path>:<qualname>` id.
* `pydocs`: prose paragraphs of the Python docs (`text_sources.pydocs_paragraphs`), consecutive
  paragraphs of one file joined while they fit the token budget; user: "Write a passage of the
  Python documentation page `<page>`, from its section "<section>".", assistant: the passage.
  Id: `pydocs:<path>:p<first paragraph index>`. No records when the docs are not installed.
* `alpacaeval_outputs`: AlpacaEval's *train split* instructions (`splits.training_records`) with
  the reference answers its package ships (`assets.alpacaeval_outputs`). Id: `alpacaeval:<id>`.

Evaluation prompts never appear: a record is dropped when its user turn or its answer contains
the text of any evaluation prompt (`splits.all_eval_prompt_texts`: MT-Bench, HumanEval, AlpacaEval
held-out; normalised with `splits.normalise`), which includes the user turns that equal one, what
regenerate drops (`splits.drop_eval_prompts`). Answers that repeat one already kept are dropped.

Each record becomes one trajectory row in the format `regenerate` writes (`opd.data.builders`):
`prompt_ids` = the user turn in the target's chat template with its generation header
(`regenerate.chat_prompt_ids`), `response_ids` = the answer's tokens + the end-of-turn token,
truncated to `max_tokens` (a truncated answer has no end token, like a regenerate answer cut at
`max_new_tokens`), so `opd.data.pipeline.tokenize_trajectory` puts the loss mask on exactly the
answer. `build` writes a source's rows to `<out_dir>/shard-*.jsonl` (resumable, atomic) and
returns its counts.
"""

from __future__ import annotations

import os
from typing import Iterator, Optional

from absl import logging

from opd.data import assets, splits, text_sources
from opd.data.builders import read_trajectory_shards
from opd.data.regenerate import chat_prompt_ids, shard_path, write_shard
from opd.paths import read_json, write_json

SOURCES = ("stdlib_code", "pydocs", "alpacaeval_outputs")

CODE_REQUEST = "Show the source of `{qualname}` from `{path}` in the Python standard library."
DOC_REQUEST = 'Write a passage of the Python documentation page `{page}`, from its section "{section}".'


def _record(uid: str, request: str, answer: str, source: str) -> dict:
    return {"id": uid, "turns": [request], "response": answer, "source": source}


def _stdlib_code(root: Optional[str]) -> Iterator[dict]:
    for fn in text_sources.stdlib_functions(root):
        if "<locals>" not in fn.qualname:
            code = text_sources.function_source(fn.lines, fn.node)
            yield _record(fn.id, CODE_REQUEST.format(qualname=fn.qualname, path=fn.path),
                          f"```python\n{code}\n```", "stdlib_code")


def _pydocs(root: Optional[str], count_tokens, budget: int) -> Iterator[dict]:
    """Consecutive paragraphs of one file, joined by blank lines while their token counts (plus
    one per separator) add up to at most `budget`."""
    group, used = [], 0

    def flush():
        first = group[0]
        page = first.path[: -len(".rst.txt")]
        request = DOC_REQUEST.format(page=page, section=first.section or page)
        return _record(f"pydocs:{first.path}:p{first.index}", request, "\n\n".join(p.text for p in group), "pydocs")

    for p in text_sources.pydocs_paragraphs(root, what="pydocs text"):
        n = count_tokens(p.text)
        if group and (p.path != group[0].path or used + 1 + n > budget):
            yield flush()
            group, used = [], 0
        used += n + (1 if group else 0)
        group.append(p)
    if group:
        yield flush()


def _alpacaeval_outputs() -> Iterator[dict]:
    outputs = assets.alpacaeval_outputs()
    for r in splits.training_records("alpacaeval"):  # the train split, evaluation prompts removed
        yield _record(f"alpacaeval:{r['id']}", r["turns"][0], outputs[r["id"]].strip(), "alpacaeval_outputs")


def corpus_records(source: str, tokenizer, *, max_tokens: int = 256, num_records: Optional[int] = None,
                   root: Optional[str] = None) -> list[dict]:
    """The first `num_records` records of `source` (module docstring): dicts with `id`, `turns`
    (the one user turn), `response` (the assistant text) and `source`.

    `tokenizer` (the target's) sizes the joined pydocs passages to `max_tokens`; `root`: the
    stdlib / docs folder to read (default the installed one)."""
    if source == "stdlib_code":
        stream = _stdlib_code(root)
    elif source == "pydocs":
        stream = _pydocs(root, lambda text: len(tokenizer.encode(text)), max_tokens - 1)  # - 1: the end token
    elif source == "alpacaeval_outputs":
        stream = _alpacaeval_outputs()
    else:
        raise ValueError(f"unknown text corpus source {source!r}; use one of {SOURCES}")
    banned = splits.all_eval_prompt_texts()
    out, answers, dropped = [], set(), 0
    for r in stream:
        if num_records is not None and len(out) >= num_records:
            break
        text = splits.normalise(f"{r['turns'][0]}\n{r['response']}")
        if r["response"] in answers or any(t in text for t in banned):
            dropped += 1
            continue
        answers.add(r["response"])
        out.append(r)
    logging.info("text corpus %s: %d records (%d duplicates / evaluation texts dropped)", source, len(out), dropped)
    return out


def trajectory_row(record: dict, tokenizer, *, max_tokens: int, prompt_set: str, target_name: str) -> dict:
    """One record as a trajectory row (`opd.data.builders` format; module docstring)."""
    response = tokenizer.encode(record["response"]) + [tokenizer.eos_token_ids[0]]
    return {"prompt_id": record["id"], "prompt_set": prompt_set, "target": target_name,
            "prompt_ids": chat_prompt_ids(tokenizer, record["turns"][0]), "response_ids": response[:max_tokens]}


def build(source: str, tokenizer, out_dir: str, *, target_name: str, max_tokens: int = 256,
          num_records: Optional[int] = None, shard_size: int = 512) -> dict:
    """Writes the trajectory shards of one source into `out_dir` and returns its counts.

    Shard i holds records [i * shard_size, (i + 1) * shard_size); shards already there are kept
    (written atomically, so they are complete), the missing ones written. Rows have
    `prompt_set` = "text_<source>". The settings go to `<out_dir>.json`; a resume with other
    settings (they would give other shards) is refused. Returns {"records", "shards",
    "prompt_tokens", "response_tokens", "truncated"} (responses without their end token),
    counted over the shards on disk.
    """
    from tqdm import tqdm

    if shard_size < 1 or max_tokens < 2:
        raise ValueError(f"shard_size must be >= 1 and max_tokens >= 2, got {shard_size}, {max_tokens}")
    if not tokenizer.eos_token_ids:
        raise ValueError("the text corpus needs a tokenizer with an end-of-turn (EOS) token")
    settings = {"source": source, "target": target_name, "max_tokens": max_tokens, "num_records": num_records,
                "shard_size": shard_size}
    settings_path = os.path.normpath(out_dir) + ".json"
    if os.path.exists(settings_path) and read_json(settings_path) != settings:
        raise ValueError(f"{out_dir} was written with {read_json(settings_path)}, not {settings}: its shards would "
                         "differ; use another workdir (or delete that folder)")
    write_json(settings_path, settings)
    records = corpus_records(source, tokenizer, max_tokens=max_tokens, num_records=num_records)
    if not records:  # an empty source would change the data mix of every run that trains on it
        why = text_sources.pydocs_missing() if source == "pydocs" else ""
        raise FileNotFoundError(f"text corpus {source}: no records" + (f" ({why})" if why else ""))
    os.makedirs(out_dir, exist_ok=True)
    shards = [shard_path(out_dir, i) for i in range(-(-len(records) // shard_size))]
    todo = [i for i, p in enumerate(shards) if not os.path.exists(p)]
    logging.info("text corpus %s: %d of %d shards to write into %s", source, len(todo), len(shards), out_dir)
    for i in tqdm(todo, desc=f"text_corpus {source}", unit="shard"):
        write_shard(shards[i], [
            trajectory_row(r, tokenizer, max_tokens=max_tokens, prompt_set=f"text_{source}", target_name=target_name)
            for r in records[i * shard_size : (i + 1) * shard_size]])
    rows = read_trajectory_shards(out_dir) if shards else []
    end = tokenizer.eos_token_ids[0]
    return {"records": len(rows), "shards": len(shards),
            "prompt_tokens": sum(len(r["prompt_ids"]) for r in rows),
            "response_tokens": sum(len(r["response_ids"]) for r in rows),
            "truncated": sum(int(r["response_ids"][-1] != end) for r in rows)}
