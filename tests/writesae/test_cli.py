"""The writesae command line end to end on a tiny model saved to disk."""

import json

import pytest
import torch
from typer.testing import CliRunner

from writesae.cli import app


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from tests.hooked_recurrent.qwen_helpers import qwen_hf

    d = tmp_path_factory.mktemp("tiny")
    words = [f"w{i}" for i in range(90)]
    vocab = {w: i + 2 for i, w in enumerate(words)}
    vocab.update({"<pad>": 0, "<eos>": 1})
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>"
    ).save_pretrained(d)
    qwen_hf("gqa", seed=1, vocab=97).save_pretrained(d)
    g = torch.Generator().manual_seed(0)
    text = " ".join(words[i] for i in torch.randint(0, 90, (6000,), generator=g).tolist())
    (d / "text.txt").write_text(text)
    return d


def test_train_then_evaluate_writes_json_report_and_plots(tiny_model_dir, tmp_path):
    runner = CliRunner()
    sae_dir = tmp_path / "sae"
    r = runner.invoke(
        app,
        [
            "train",
            "--model",
            str(tiny_model_dir),
            "--text",
            str(tiny_model_dir / "text.txt"),
            "--layer",
            "1",
            "--head",
            "2",
            "--n-atoms",
            "32",
            "--k",
            "4",
            "--steps",
            "30",
            "--batch-size",
            "64",
            "--context",
            "32",
            "--out",
            str(sae_dir),
        ],
    )
    assert r.exit_code == 0, r.output
    assert (sae_dir / "cfg.json").exists()
    out = tmp_path / "eval"
    r = runner.invoke(
        app,
        [
            "evaluate",
            "--sae",
            str(sae_dir),
            "--out",
            str(out),
            "--model",
            str(tiny_model_dir),
            "--text",
            str(tiny_model_dir / "text.txt"),
            "--firings",
            "40",
            "--context",
            "32",
            "--rank-band",
            "10,50",
        ],
    )
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())
    assert res["substitution"]["n"] >= 40
    lo, hi = res["substitution"]["ci_vs_delete"]
    assert lo <= res["substitution"]["win_rate_vs_delete"] <= hi
    assert "r2" in res["closed_form"] and res["install"]["n"] > 0
    for png in ("substitution.png", "calibration.png", "closed_form.png", "install.png"):
        assert (out / png).stat().st_size > 1000
    md = (out / "report.md").read_text()
    assert "Substitution" in md and "Closed-form" in md and "Install" in md
    assert f"first-order R^2 = {res['closed_form']['r2']:.3f}" in md
    assert "direct-path R^2 = " in md and "Scale sweep" in md and "median decay" in md
    assert set(res["substitution"]["scale_sweep"]) == {"matched_norm", "coefficient", "0.1x_norm"}


def test_help_comes_from_the_config_docs():
    from writesae.config import WriteSAEConfig, field_help

    r = CliRunner().invoke(app, ["train", "--help"], terminal_width=200)
    assert r.exit_code == 0
    assert field_help(WriteSAEConfig)["n_atoms"][:30] in " ".join(r.output.split())


def test_bad_layer_is_a_clear_error(tiny_model_dir, tmp_path):
    r = CliRunner().invoke(
        app,
        [
            "train",
            "--model",
            str(tiny_model_dir),
            "--layer",
            "3",
            "--text",
            str(tiny_model_dir / "text.txt"),
            "--out",
            str(tmp_path),
        ],
    )
    assert r.exit_code != 0
    assert "not recurrent" in r.output
