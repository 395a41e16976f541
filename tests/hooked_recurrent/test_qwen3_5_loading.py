"""Loading Qwen3.5 checkpoints from disk: multimodal and text-only layouts; clear errors."""

import json
import logging

import pytest
import torch

from hooked_recurrent import HookedRecurrentModel
from tests.hooked_recurrent.qwen_helpers import qwen_hf, qwen_text_config, randomise


@torch.no_grad()
def test_text_only_checkpoint(tmp_path):
    hf = qwen_hf("gqa", seed=11)
    hf.save_pretrained(tmp_path)
    model = HookedRecurrentModel.from_pretrained(str(tmp_path))
    tokens = torch.randint(0, hf.config.vocab_size, (2, 21))
    assert (model(tokens) - hf(tokens).logits).abs().max() <= 1e-4


@torch.no_grad()
def test_multimodal_checkpoint(tmp_path, caplog):
    from transformers import Qwen3_5Config, Qwen3_5ForCausalLM, Qwen3_5ForConditionalGeneration

    text = qwen_text_config("equal").to_dict()
    vision = dict(
        depth=1,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        patch_size=4,
        temporal_patch_size=2,
        spatial_merge_size=2,
        out_hidden_size=text["hidden_size"],
    )
    cfg = Qwen3_5Config(text_config=text, vision_config=vision)
    torch.manual_seed(4)
    vlm = Qwen3_5ForConditionalGeneration(cfg).eval()
    randomise(vlm, seed=4)
    vlm.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "qwen3_5"
    with caplog.at_level(logging.INFO, logger="hooked_recurrent"):
        model = HookedRecurrentModel.from_pretrained(str(tmp_path))
    assert any("vision" in r.message for r in caplog.records)
    # reference: the text model as transformers loads it from the same folder
    ref = Qwen3_5ForCausalLM.from_pretrained(str(tmp_path)).eval()
    tokens = torch.randint(0, text["vocab_size"], (2, 13))
    assert (model(tokens) - ref(tokens).logits).abs().max() <= 1e-4
    assert (model(tokens) - vlm(input_ids=tokens).logits).abs().max() <= 1e-4


def test_unsupported_model_type_names_the_families(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="Qwen3.5") as e:
        HookedRecurrentModel.from_pretrained(str(tmp_path))
    assert "llama" in str(e.value)


def test_missing_path_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="not a shipped model"):
        HookedRecurrentModel.from_pretrained("./no/such/folder")


def test_tied_embeddings_stay_one_parameter(tmp_path):
    """A tied checkpoint must stay tied: training our model then saving must not lose the head."""
    hf = qwen_hf("tied", seed=2)
    model = HookedRecurrentModel.from_hf_model(hf)
    assert model.unembed.weight is model.embed.weight
    with torch.no_grad():
        model.embed.weight.add_(0.1)
    from hooked_recurrent.pretrained.qwen3_5 import to_hf_state_dict

    hf.load_state_dict(to_hf_state_dict(model.state_dict(), model.cfg), strict=False)
    hf.save_pretrained(tmp_path)
    tokens = torch.randint(0, 97, (1, 9))
    reloaded = HookedRecurrentModel.from_pretrained(str(tmp_path))
    with torch.no_grad():
        assert (reloaded(tokens) - model(tokens)).abs().max() <= 1e-5
