"""Evaluation harness on a tiny random target: metrics, greedy check, files; prompt splits."""

import json
import logging

import jax
import jax.numpy as jnp
import pytest

import opd
from conftest import make_hf_model
from opd.data import splits
from opd.eval import harness
from opd.models import transformer as tfm

# Repetitive token-id prompts, so prompt lookup finds matches.
PROMPTS = [[5, 9, 2, 5, 9, 2, 5, 9], [17, 3] * 6, [1, 2, 3, 4, 1, 2, 3], list(range(40, 60))]
KEYS = {
    "tau": float, "acceptance_by_offset": list, "speedup": float, "tokens_per_second": float,
    "target_forwards": int, "generated_tokens": int, "temperature": float, "num_draft_tokens": int,
    "batch_size": int, "prompt_set": str, "num_prompts": int, "drafter": str, "training": str,
    "training_flops": float, "round_accept_hist": list, "tau_per_batch": list, "greedy_mismatches": list,
}


@pytest.fixture(scope="module")
def target():
    model, d = make_hf_model("llama", seed=3)
    config = opd.TransformerConfig.from_hf(d)
    params = jax.tree.map(jnp.asarray, tfm.params_from_hf(config, {k: v.detach().numpy() for k, v in model.state_dict().items()}))
    return opd.Target(config, params)


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "ids.jsonl"
    path.write_text("".join(json.dumps({"id": f"p{i}", "prompt_ids": p}) + "\n" for i, p in enumerate(PROMPTS)))
    return str(path)


@pytest.fixture(scope="module")
def greedy_metrics(target, prompt_file):
    drafter = opd.init_drafter("ngram", target)
    return harness.evaluate(target, drafter, prompt_file, num_prompts=4, num_draft_tokens=3, batch_size=2,
                            max_new_tokens=12, training="none")


def test_metrics_keys_types_and_greedy_equality(greedy_metrics):
    m = greedy_metrics
    for key, typ in KEYS.items():
        assert isinstance(m[key], typ), (key, m[key])
    assert m["greedy_matches_ar"] is True and m["greedy_mismatches"] == []
    assert m["drafter"] == "ngram" and m["num_prompts"] == 4 and m["prompt_set"].endswith("ids.jsonl")
    assert m["speedup"] > 0 and m["tokens_per_second"] > 0 and m["ar_tokens_per_second"] > 0
    assert m["generated_tokens"] == m["ar_generated_tokens"] == 4 * 12
    assert len(m["acceptance_by_offset"]) == 3 and all(a is None or 0 <= a <= 1 for a in m["acceptance_by_offset"])
    # tau from the per-round histogram agrees with the engine's committed count (no round is truncated here
    # unless it hits max_new_tokens, so tau <= mean(n + 1)).
    hist = m["round_accept_hist"]
    assert sum(hist) == m["verify_rounds"] > 0 and len(m["tau_per_batch"]) == 2
    assert 1.0 <= m["tau"] <= sum((n + 1) * c for n, c in enumerate(hist)) / sum(hist) + 1e-9
    assert m["target_forwards"] < m["ar_target_forwards"] + 2  # drafting saved (or at worst matched) forwards


def test_write_eval_files_and_plots(greedy_metrics, tmp_path):
    harness.write_eval(greedy_metrics, str(tmp_path))
    back = json.load(open(tmp_path / "metrics.json"))
    assert back["tau"] == greedy_metrics["tau"] and "provenance" in back
    assert "| ngram |" in (tmp_path / "metrics.md").read_text()
    for png in ("tau_hist.png", "acceptance_by_offset.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_greedy_mismatch_is_loud_and_recorded(target, prompt_file, monkeypatch, caplog):
    real_spec = harness._Runner.spec

    def corrupted(self, chunk, ci, side=0):
        out = real_spec(self, chunk, ci, side)
        out.tokens[0] = out.tokens[0][:5] + [(out.tokens[0][5] + 1) % 128] + out.tokens[0][6:]
        return out

    monkeypatch.setattr(harness._Runner, "spec", corrupted)
    with caplog.at_level(logging.ERROR):
        m = harness.evaluate(target, opd.init_drafter("ngram", target), prompt_file, num_prompts=4,
                             num_draft_tokens=3, batch_size=2, max_new_tokens=12)
    assert m["greedy_matches_ar"] is False
    assert [(x["prompt_index"], x["position"]) for x in m["greedy_mismatches"]] == [(0, 5), (2, 5)]
    assert any("GREEDY MISMATCH" in r.getMessage() and "prompt 0" in r.getMessage() for r in caplog.records)


def test_sampling_and_no_drafter(target):
    m = harness.evaluate(target, opd.init_drafter("ngram", target), PROMPTS[:2], temperature=1.0,
                         num_draft_tokens=3, batch_size=2, max_new_tokens=6)
    assert m["greedy_matches_ar"] is None and m["prompt_set"] == "custom" and m["tau"] >= 1.0
    ar = harness.evaluate(target, None, PROMPTS[:2], batch_size=2, max_new_tokens=6)
    assert ar["drafter"] == "none" and ar["tau"] == 1.0 and ar["speedup"] == 1.0 and ar["greedy_matches_ar"] is True
    assert ar["num_draft_tokens"] == 0 and ar["acceptance_by_offset"] == []


def test_side_by_side_shares_one_autoregressive_timing(target, prompt_file, greedy_metrics):
    """Two drafters in one run: each side's metrics equal its own run's (greedy: same tokens,
    rounds, tau), against one autoregressive measurement common to both."""
    ngram, eagle = opd.init_drafter("ngram", target), opd.init_drafter("eagle3", target, seed=1)
    both = harness.evaluate_side_by_side(
        target, [harness.Side(ngram, "ngram", 3), harness.Side(eagle, "eagle3", 2, "sft", 5.0)], prompt_file,
        num_prompts=4, batch_size=2, max_new_tokens=12, return_tokens=True)
    alone = harness.evaluate(target, eagle, prompt_file, num_prompts=4, num_draft_tokens=2, batch_size=2,
                             max_new_tokens=12, return_tokens=True)
    assert [m["drafter"] for m in both] == ["ngram", "eagle3"] and both[1]["training_flops"] == 5.0
    assert all(m["side_by_side"] == ["ngram", "eagle3"] for m in both)
    assert both[0]["ar_seconds"] == both[1]["ar_seconds"] and both[0]["seconds"] != both[1]["seconds"]
    for key in ("tau", "round_accept_hist", "verify_rounds", "target_forwards", "greedy_matches_ar"):
        assert both[0][key] == greedy_metrics[key], key
        assert both[1][key] == alone[key], key
    assert both[1]["tokens"] == alone["tokens"] and both[1]["num_draft_tokens"] == 2
    with pytest.raises(ValueError, match="drafter name must be one of"):
        harness.evaluate_side_by_side(target, [harness.Side(ngram, "medusa", 3)], prompt_file)


def test_an_interrupted_evaluation_resumes_at_its_next_batch(target, prompt_file, greedy_metrics, monkeypatch, tmp_path):
    """A kill after the first batch: the rerun reads that batch back from the journal, decodes only
    the second, and gives the uninterrupted run's metrics; other settings start the journal over."""
    journal = str(tmp_path / "batches.jsonl")
    kw = dict(num_prompts=4, num_draft_tokens=3, batch_size=2, max_new_tokens=12, journal=journal)
    real_ar, calls, kill = harness._Runner.ar, [], [True]

    def ar_killed_at_batch_1(self, chunk, ci):
        calls.append(ci)
        if kill[0] and len(calls) == 4:  # warm-up of the two shapes (ci 0), batch 0, then the kill at batch 1
            raise RuntimeError("killed")
        return real_ar(self, chunk, ci)

    monkeypatch.setattr(harness._Runner, "ar", ar_killed_at_batch_1)
    with pytest.raises(RuntimeError, match="killed"):
        harness.evaluate(target, opd.init_drafter("ngram", target), prompt_file, **kw)
    with open(journal, "a") as f:
        f.write('{"tag": "turn1", "ci": 1, "promp')  # a line torn by the kill
    calls.clear()
    kill[0] = False
    m = harness.evaluate(target, opd.init_drafter("ngram", target), prompt_file, **kw)
    assert calls == [0, 1]  # warm-up of the one shape, then batch 1 alone
    for key in ("tau", "round_accept_hist", "verify_rounds", "target_forwards", "generated_tokens",
                "ar_generated_tokens", "greedy_matches_ar", "tau_per_batch"):
        assert m[key] == greedy_metrics[key], key
    assert len(open(journal).read().splitlines()) == 3  # settings + both batches, the torn line gone
    calls.clear()
    harness.evaluate(target, opd.init_drafter("ngram", target), prompt_file, **{**kw, "max_new_tokens": 10})
    assert calls == [0, 0, 0, 1] and (tmp_path / "batches.jsonl.stale").exists()


def test_bad_arguments_are_clear_errors(target, prompt_file):
    drafter = opd.init_drafter("ngram", target)
    with pytest.raises(ValueError, match="has only 4 prompts"):
        harness.evaluate(target, drafter, prompt_file, num_prompts=5)
    with pytest.raises(ValueError, match="drafter name must be one of"):
        harness.evaluate(target, drafter, prompt_file, drafter_name="medusa")
    with pytest.raises(ValueError, match="does not match"):
        harness.evaluate(target, None, prompt_file, drafter_name="ngram")


# ----------------------------------------------------------------------------- splits

RECORDS = [{"id": str(i), "instruction": f"Instruction number {i}: write about topic {i * 7 % 13}."} for i in range(500)]


def test_alpaca_split_is_deterministic_disjoint_and_complete():
    train, held = splits.alpaca_split(RECORDS, "train"), splits.alpaca_split(RECORDS, "heldout")
    assert splits.alpaca_split(list(reversed(RECORDS)), "heldout") == list(reversed(held))  # order-independent
    ids_t, ids_h = {r["id"] for r in train}, {r["id"] for r in held}
    assert not ids_t & ids_h and ids_t | ids_h == {r["id"] for r in RECORDS}
    assert 0.12 < len(held) / len(RECORDS) < 0.28
    # Whitespace / case variants of a held-out instruction are held out too.
    r = held[0]
    assert splits.alpaca_split([{"instruction": "  " + r["instruction"].upper() + "\n"}], "heldout")
    splits.check_disjoint(train, held)
    with pytest.raises(ValueError, match="also occur in the training data"):
        splits.check_disjoint(train + [held[0]], held)
    with pytest.raises(ValueError, match="split must be one of"):
        splits.alpaca_split(RECORDS, "test")


def test_eval_prompt_sets_never_leak_into_training():
    from opd.data.assets import load_prompt_set

    for name in ("mtbench", "humaneval"):
        with pytest.raises(ValueError, match="evaluation-only"):
            splits.training_records(name)
    _, heldout = harness.load_eval_records("alpacaeval")
    train = splits.training_records("alpacaeval")
    assert not {r["id"] for r in train} & {r["id"] for r in heldout}
    splits.check_disjoint(train, heldout)
    # AlpacaEval holds MT-Bench questions verbatim: they are dropped from training too.
    for name in ("mtbench", "humaneval"):
        splits.check_disjoint(train, [{"id": r["id"], "turns": [t]} for r in load_prompt_set(name) for t in r["turns"]])
    dropped = 805 - len(heldout) - len(train)
    assert 1 <= dropped <= 10
    _, everything = harness.load_eval_records("alpacaeval", heldout_split=False)
    assert len(everything) == 805
