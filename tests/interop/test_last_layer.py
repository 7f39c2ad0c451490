"""The target's last decoder layer (id L-1) stays out of the public layouts.

Our id i is the output of decoder layer i, transformers' `hidden_states[i + 1]`; for i = L-1
that index is the final-normed output (ours is pre-norm), and SGLang / vLLM, which capture the
*input* of layer i + 1, cannot capture it at all. Exports refuse it where the drafter knows its
target's depth (DFlash), imports always, and the defaults for tiny targets never pick it.
"""

import json

import pytest

import opd
from conftest import make_target
from opd.drafters.dflash import model as dfm
from opd.drafters.eagle3 import model as e3


@pytest.mark.parametrize("L", [2, 3, 4, 5, 8, 36])
def test_default_taps_avoid_the_last_layer(L):
    assert L - 1 not in e3.default_target_layers(L)
    assert L - 1 not in dfm.default_target_layer_ids(L, 1)
    if L >= 4:
        assert L - 1 not in dfm.default_target_layer_ids(L, 3)


def test_dflash_export_and_import_refuse_the_last_layer(tmp_path):
    target = make_target("llama", seed=1, num_hidden_layers=3)
    last = opd.init_drafter("dflash", target, seed=2, block_size=4, target_layer_ids=(0, 2))
    with pytest.raises(ValueError, match=r"include 2, the target's last layer .*hidden_states\[3\].* Use layers 0\.\.1"):
        opd.export_drafter(last, str(tmp_path / "last"))
    assert not (tmp_path / "last").exists()  # refused before writing

    # a z-lab-layout file that taps it (e.g. written elsewhere) is refused on import
    ok = opd.init_drafter("dflash", target, seed=2, block_size=4, target_layer_ids=(0, 1))
    opd.export_drafter(ok, str(tmp_path / "ok"))
    assert opd.load_drafter(str(tmp_path / "ok"), target).spec.config.target_layer_ids == (0, 1)
    cfg = json.loads((tmp_path / "ok" / "config.json").read_text())
    cfg["dflash_config"]["target_layer_ids"] = [0, 2]
    (tmp_path / "ok" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(opd.CheckpointError, match="include 2, the target's last layer"):
        opd.load_drafter(str(tmp_path / "ok"), target)


def test_tiny_default_drafters_export_and_load(tmp_path):
    """The 2-layer targets of the test suite and tiny configs: defaults export and load back."""
    target = make_target("llama", seed=1)  # 2 layers
    for kind, kw in (("eagle3", {"draft_vocab_size": 32}), ("dflash", {"block_size": 4})):
        opd.export_drafter(opd.init_drafter(kind, target, seed=0, **kw), str(tmp_path / kind))
        assert opd.load_drafter(str(tmp_path / kind), target).spec.target_hidden_layers == (0,) * {"eagle3": 3, "dflash": 1}[kind]
