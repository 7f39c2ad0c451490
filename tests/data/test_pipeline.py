"""Tests for opd.data.pipeline: chat-template loss masks, packing/padding, sharding, resumable state."""

import json

import grain
import numpy as np
import pytest
import tensorflow_datasets as tfds
import tokenizers
from tokenizers import models, pre_tokenizers

from opd.data import builders, pipeline
from opd.data.assets import asset_path
from opd.data.tokenizer import Tokenizer

tfds.disable_progress_bar()

CONVERSATION = [
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
]


@pytest.fixture(scope="module")
def smollm2():
    return Tokenizer.from_gguf(asset_path("smollm2_gguf"))


@pytest.fixture(scope="module")
def tiny_tok():
    words = ["<unk>", "system", "user", "assistant", "hi", "hello", "you", "four", "what", "is", "2+2?", "ok"]
    tok = tokenizers.Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([tokenizers.AddedToken(t, special=True) for t in ("<|im_start|>", "<|im_end|>")])
    return Tokenizer(tok, bos_token_id=None, eos_token_ids=[tok.token_to_id("<|im_end|>")], chat_template="chatml")


def masked_pieces(tok, tokens, mask):
    """The masked-in tokens, grouped into maximal runs, decoded."""
    runs, cur = [], []
    for t, m in zip(tokens.tolist(), mask.tolist()):
        if m:
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [tok.decode(r, skip_special_tokens=False) for r in runs]


def test_smollm2_chatml_mask(smollm2):
    tokens, mask = pipeline.chat_tokens_and_mask(smollm2, CONVERSATION)
    assert tokens.dtype == mask.dtype == np.int32 and tokens.shape == mask.shape
    text = smollm2.apply_chat_template(CONVERSATION, add_generation_prompt=False)
    assert tokens.tolist() == smollm2.encode(text)
    assert masked_pieces(smollm2, tokens, mask) == ["Hello! How can I help?<|im_end|>", "4<|im_end|>"]
    # The generation header "<|im_start|>assistant\n" right before each span is not masked in.
    header = smollm2.encode("<|im_start|>assistant\n")
    first = int(np.argmax(mask))
    assert tokens[first - len(header):first].tolist() == header and mask[:first].sum() == 0


def test_tiny_tokenizer_mask(tiny_tok):
    conv = [{"role": "user", "content": "what is 2+2?"}, {"role": "assistant", "content": "four ok"}]
    tokens, mask = pipeline.chat_tokens_and_mask(tiny_tok, conv, default_system_prompt=None)
    pieces = [tiny_tok.id_to_token(int(t)) for t in tokens]
    assert pieces == ["<|im_start|>", "user", "what", "is", "2+2?", "<|im_end|>",
                      "<|im_start|>", "assistant", "four", "ok", "<|im_end|>"]
    assert mask.tolist() == [0] * 8 + [1, 1, 1]
    # A jinja template given explicitly (the model's own would be used by default).
    jinja = ("{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|> {% endfor %}"
             "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}")
    tokens, mask = pipeline.chat_tokens_and_mask(tiny_tok, conv, template=jinja)
    assert [tiny_tok.id_to_token(int(t)) for t in tokens[mask == 1]] == ["four", "ok", "<|im_end|>"]
    assert mask.tolist() == [0] * 8 + [1, 1, 1]


def test_template_that_rewrites_history_is_refused(tiny_tok):
    jinja = "{% for m in messages %}{{ m['role'] }}{% if not loop.last %} hi{% endif %}<|im_end|>{% endfor %}"
    with pytest.raises(ValueError, match="rewrites earlier turns"):
        pipeline.chat_tokens_and_mask(tiny_tok, [{"role": "user", "content": "hi"},
                                                 {"role": "assistant", "content": "ok"}], template=jinja)


def test_pretokenized_mask():
    out = pipeline.tokenize_trajectory({"prompt_ids": [5, 6, 7], "response_ids": [8, 2]})
    assert out["tokens"].tolist() == [5, 6, 7, 8, 2] and out["loss_mask"].tolist() == [0, 0, 0, 1, 1]
    with pytest.raises(ValueError, match="pass the target's tokenizer"):
        pipeline.tokenize_trajectory({"id": "x", "messages": CONVERSATION})


def trajectories(n=23):
    """Pre-tokenized trajectories; prompt token 1000 + i identifies trajectory i."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        p, r = int(rng.integers(2, 6)), int(rng.integers(1, 8))
        out.append({"id": str(i), "prompt_ids": [1000 + i] + [1] * (p - 1), "response_ids": list(range(10, 10 + r))})
    return out


def check_batch(batch, B, T):
    assert set(batch) == {"tokens", "loss_mask", "positions", "segment_ids"}
    for v in batch.values():
        assert v.shape == (B, T) and v.dtype == np.int32
    seg, pos = batch["segment_ids"], batch["positions"]
    assert np.all(batch["loss_mask"][seg == 0] == 0) and np.all(batch["tokens"][seg == 0] == 0)
    for b in range(B):
        for s in set(seg[b].tolist()) - {0}:
            idx = np.flatnonzero(seg[b] == s)
            assert idx.tolist() == list(range(idx[0], idx[0] + len(idx)))  # contiguous
            assert pos[b, idx].tolist() == list(range(len(idx)))
            assert batch["tokens"][b, idx[0]] >= 1000  # each segment starts with its prompt


def sequences(batch):
    """{trajectory index: (tokens, loss_mask)} of the sequences in a batch."""
    out = {}
    for b in range(batch["tokens"].shape[0]):
        for s in set(batch["segment_ids"][b].tolist()) - {0}:
            idx = batch["segment_ids"][b] == s
            out.setdefault(int(batch["tokens"][b, idx][0]) - 1000, []).append(
                (batch["tokens"][b, idx].tolist(), batch["loss_mask"][b, idx].tolist()))
    return out


@pytest.mark.parametrize("packing", [True, False])
def test_batches_are_correct(packing):
    data = trajectories()
    cfg = pipeline.PipelineConfig(seq_len=16, batch_size=4, packing=packing, num_epochs=1, seed=3,
                                  drop_remainder=False)
    seen = {}
    for batch in pipeline.make_dataset(data, cfg):
        check_batch(batch, batch["tokens"].shape[0], 16)
        for i, seqs in sequences(batch).items():
            seen.setdefault(i, []).extend(seqs)
    assert sorted(seen) == list(range(len(data)))  # one epoch: every trajectory exactly once
    for i, seqs in seen.items():
        want = pipeline.tokenize_trajectory(data[i])
        assert seqs == [(want["tokens"].tolist(), want["loss_mask"].tolist())]


@pytest.mark.parametrize("packing", [True, False])
def test_indexed_source_names_each_tokens_record(packing):
    """Packed rows carry per-token `record_ids` (with `positions`: the token's place in its
    record), padded rows a per-row `record_index`; both lead back to the record's own tokens."""
    data = trajectories()
    cfg = pipeline.PipelineConfig(seq_len=16, batch_size=4, packing=packing, num_epochs=1, seed=3,
                                  drop_remainder=False)
    covered = {}
    for batch in pipeline.make_dataset(pipeline.IndexedSource(data), cfg):
        B, T = batch["tokens"].shape
        if packing:
            assert "record_index" not in batch
            rec = batch["record_ids"]
            assert rec.shape == (B, T) and rec.dtype == np.int32
        else:
            assert "record_ids" not in batch
            rec = np.broadcast_to(batch["record_index"][:, None], (B, T))
        seg, pos = batch["segment_ids"], batch["positions"]
        if packing:
            assert np.all(rec[seg == 0] == 0)
        for b, t in zip(*np.nonzero(seg)):
            want = pipeline.tokenize_trajectory(data[rec[b, t]])
            assert batch["tokens"][b, t] == want["tokens"][pos[b, t]]
            assert batch["loss_mask"][b, t] == want["loss_mask"][pos[b, t]]
            covered.setdefault(int(rec[b, t]), []).append(int(pos[b, t]))
    for i, x in enumerate(data):  # one epoch: every token of every record exactly once
        assert sorted(covered[i]) == list(range(len(pipeline.tokenize_trajectory(x)["tokens"])))


def test_packing_fills_rows():
    cfg = pipeline.PipelineConfig(seq_len=32, batch_size=2, packing=True, seed=0)
    batch = next(iter(pipeline.make_dataset(trajectories(), cfg)))
    assert batch["segment_ids"].max() >= 3  # several sequences per row


def test_truncation():
    cfg = pipeline.PipelineConfig(seq_len=4, batch_size=2, packing=False, seed=0)
    batch = next(iter(pipeline.make_dataset([{"prompt_ids": [1000, 1, 1], "response_ids": [5, 6, 7]}] * 2, cfg)))
    assert batch["tokens"][0].tolist() == [1000, 1, 1, 5] and batch["loss_mask"][0].tolist() == [0, 0, 0, 1]


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_same(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        assert x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)


def test_shuffling_is_deterministic_by_seed():
    data = trajectories()
    make = lambda seed: take(pipeline.make_iterator(data, pipeline.PipelineConfig(16, 4, seed=seed)), 6)
    assert_same(make(0), make(0))
    with pytest.raises(AssertionError):
        assert_same(make(0), make(1))


def test_sharding_splits_records():
    data = trajectories(24)
    cfg = pipeline.PipelineConfig(seq_len=16, batch_size=1, packing=False, num_epochs=1)
    shards = []
    for index in range(3):
        opts = grain.sharding.ShardOptions(shard_index=index, shard_count=3, drop_remainder=True)
        shards.append({i for b in pipeline.make_dataset(data, cfg, shard_options=opts) for i in sequences(b)})
    assert [len(s) for s in shards] == [8, 8, 8]
    assert set.union(*shards) == set(range(24)) and not (shards[0] & shards[1] or shards[1] & shards[2])
    with pytest.raises(ValueError, match="cannot be sharded over 3"):
        pipeline.shard(grain.MapDataset.source(data[:2]), grain.sharding.ShardOptions(0, 3, drop_remainder=True))


@pytest.mark.parametrize("packing,indexed", [(True, False), (False, False), (True, True), (False, True)])
def test_iterator_state_round_trip(packing, indexed):
    data = pipeline.IndexedSource(trajectories()) if indexed else trajectories()
    cfg = pipeline.PipelineConfig(seq_len=16, batch_size=3, packing=packing, seed=7)
    it = pipeline.make_iterator(data, cfg)
    take(it, 5)
    state = pipeline.state_to_bytes(it)
    json.loads(state)  # plain JSON, storable next to a checkpoint
    expected = take(it, 3)
    fresh = pipeline.state_from_bytes(pipeline.make_iterator(data, cfg), state)
    assert_same(take(fresh, 3), expected)
    fresh2 = pipeline.make_iterator(data, cfg)
    fresh2.set_state(json.loads(state))
    assert_same(take(fresh2, 3), expected)


def test_text_trajectories_from_tfds_source(tmp_path, smollm2):
    shards = tmp_path / "regen"
    shards.mkdir()
    rows = [{"prompt_id": str(i), "prompt_set": "stdlib_code", "target": "smollm2",
             "messages": [{"role": "user", "content": f"Question {i}?"},
                          {"role": "assistant", "content": f"Answer number {i}."}]} for i in range(6)]
    rows.append({"prompt_id": "ids", "prompt_set": "stdlib_code", "target": "smollm2",
                 "prompt_ids": [1000, 1, 2], "response_ids": [3, 2]})
    (shards / "shard-00000.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    src = builders.load_source(f"trajectories:{shards}", str(tmp_path / "tfds"))
    cfg = pipeline.PipelineConfig(seq_len=64, batch_size=2, packing=False, num_epochs=1, shuffle=False,
                                  pad_id=smollm2.pad_token_id, drop_remainder=False)
    batches = list(pipeline.make_dataset(src, cfg, tokenizer=smollm2))
    assert [b["tokens"].shape for b in batches] == [(2, 64)] * 3 + [(1, 64)]
    rows_out = [(b["tokens"][r], b["loss_mask"][r], b["segment_ids"][r]) for b in batches for r in range(len(b["tokens"]))]
    for i, (tokens, mask, seg) in enumerate(rows_out[:6]):
        n = int(seg.sum())
        assert masked_pieces(smollm2, tokens[:n], mask[:n]) == [f"Answer number {i}.<|im_end|>"]
        assert np.all(tokens[n:] == smollm2.pad_token_id)
    tokens, mask, _ = rows_out[6]
    assert tokens[:5].tolist() == [1000, 1, 2, 3, 2] and mask[:5].tolist() == [0, 0, 0, 1, 1]
