"""The Colab notebooks in colab/ run end to end at tiny scale (nbclient), so they cannot rot.

Each notebook reads OPD_COLAB_TINY=1 and its inputs from the environment: the quickstart a
workdir, the Qwen3 one a tiny random Qwen3 HF checkpoint (with a byte-level tokenizer and a
ChatML + thinking chat template) and a DFlash drafter exported for it.
"""

import json
import os

import pytest

from conftest import make_hf_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLAB = os.path.join(REPO, "colab")
NOTEBOOKS = ("quickstart.ipynb", "tpu_qwen3.ipynb")


def _nbformat():
    return pytest.importorskip("nbformat", reason="nbformat is not installed (pip install -e '.[test]')")


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_clean_nbformat_v4(name):
    """Valid nbformat v4 JSON, a python3 kernel, no stored outputs or execution counts."""
    nbformat = _nbformat()
    path = os.path.join(COLAB, name)
    with open(path, encoding="utf-8") as f:
        raw = json.load(f)
    assert raw["nbformat"] == 4
    nb = nbformat.reads(json.dumps(raw), as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.outputs == [] and c.execution_count is None for c in code), "clear the outputs before saving"
    assert 'if "google.colab" in sys.modules' in code[0].source  # the install cell is a no-op outside Colab
    assert "OPD_COLAB_TINY" in "".join(c.source for c in code)


def _execute(name, env, monkeypatch, cell_timeout):
    """Runs the notebook in a fresh python3 kernel (cwd = repo root); returns it with outputs."""
    nbformat = _nbformat()
    nbclient = pytest.importorskip("nbclient", reason="nbclient is not installed (pip install -e '.[test]')")
    pytest.importorskip("ipykernel", reason="ipykernel is not installed (pip install -e '.[test]')")
    for k, v in {"OPD_COLAB_TINY": "1", "JAX_NUMPY_RANK_PROMOTION": "raise", **env}.items():
        monkeypatch.setenv(k, v)  # the kernel inherits this process's environment
    nb = nbformat.read(os.path.join(COLAB, name), as_version=4)
    nbclient.NotebookClient(nb, timeout=cell_timeout, kernel_name="python3",
                            resources={"metadata": {"path": REPO}}).execute()
    return nb


def _text(nb) -> str:
    out = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            out.append(o.get("text", "") if o.output_type == "stream" else o.get("data", {}).get("text/plain", ""))
    return "".join(out)


@pytest.mark.slow
def test_quickstart_notebook(tmp_path, monkeypatch):
    """SmolLM2 greedy AR vs n-gram speculative decoding, the shipped EAGLE-3 drafter timed against
    AR, the quickstart:tiny pipeline, its report, and the exported Draft-OPD drafter decoding
    losslessly."""
    workdir = tmp_path / "workdir"
    nb = _execute("quickstart.ipynb", {"OPD_COLAB_WORKDIR": str(workdir)}, monkeypatch, cell_timeout=900)
    text = _text(nb)
    assert "TINY=True" in text and text.count("identical to autoregressive decoding: True") == 2
    assert "eagle3 drafter: tau = " in text and "shipped EAGLE-3: tau = " in text and "speed-up" in text
    assert (workdir / "report" / "results.md").exists() and (workdir / "report" / "curves.png").exists()
    displayed = [o for c in nb.cells for o in c.get("outputs", []) if o.output_type == "display_data"]
    assert any("image/png" in o.data for o in displayed) and any("text/markdown" in o.data for o in displayed)


# A tiny byte-level tokenizer with Qwen3's special tokens, and a ChatML template with Qwen3's
# thinking switch (default on), so the notebook's string prompts work on a random checkpoint.
_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_THINK = ["<think>", "</think>"]
_TEMPLATE = (
    "{%- for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}"
)


def _write_tiny_qwen3(path) -> None:
    """A random 2-layer, width-64 Qwen3 HF checkpoint whose tokenizer.json fits its vocabulary."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in _SPECIAL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in _THINK])
    n = tok.get_vocab_size(with_added_tokens=True)
    eos, pad = tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")
    # 16 spare embedding rows past the tokenizer, like Qwen3's padded vocabulary (DFlash's mask id)
    model, _ = make_hf_model("qwen3_qknorm", vocab_size=n + 16, max_position_embeddings=512, eos_token_id=eos,
                             pad_token_id=pad)
    model.save_pretrained(str(path), safe_serialization=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None, "chat_template": _TEMPLATE}))


@pytest.mark.slow  # ~1 min: the whole notebook at tiny scale
def test_tpu_qwen3_notebook(tmp_path, monkeypatch):
    """Thinking-mode chat on a tiny random Qwen3 checkpoint, DFlash speculative decoding (loaded
    from its HF layout) equal to greedy at T=0, and τ at T=1."""
    import opd

    target_dir, drafter_dir = tmp_path / "qwen3", tmp_path / "dflash"
    _write_tiny_qwen3(target_dir)
    target = opd.load_target(str(target_dir))
    assert target.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]).endswith("<|im_start|>assistant\n")
    opd.export_drafter(opd.init_drafter("dflash", target, block_size=8), str(drafter_dir))
    nb = _execute("tpu_qwen3.ipynb", {"OPD_COLAB_TARGET": str(target_dir), "OPD_COLAB_DRAFTER": str(drafter_dir)},
                  monkeypatch, cell_timeout=300)
    text = _text(nb)
    assert "TINY=True" in text and "<|im_start|>user\nHow many positive divisors" in text
    assert "dflash drafter, K = 7: tau = " in text and "identical to greedy decoding: True" in text
    assert "acceptance by draft offset" in text
