"""save / load round trip and the errors for broken files."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from writesae import FlatSAE, WriteSAE, WriteSAEConfig, load_sae
from writesae.saes import CFG_FILE, WEIGHTS_FILE


def cfg(**kw):
    base = dict(d_k=6, d_v=5, n_atoms=12, k=3, hook_name="blocks.2.attn.hook_state", head=1)
    base.update(kw)
    return WriteSAEConfig(**base)


@pytest.mark.parametrize(
    "make",
    [
        lambda: WriteSAE(cfg(), seed=0),
        lambda: WriteSAE(cfg(encoder="dense", decoder_bias=False), seed=0),
        lambda: FlatSAE(cfg(kind="flat"), seed=0),
    ],
)
def test_round_trip_identical_codes(tmp_path, make):
    sae = make()
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.1 * torch.randn_like(p))
    sae.save(tmp_path / "sae")
    assert sorted(p.name for p in (tmp_path / "sae").iterdir()) == [CFG_FILE, WEIGHTS_FILE]
    loaded = type(sae).load(tmp_path / "sae")
    assert type(loaded) is type(sae) and loaded.cfg == sae.cfg
    x = torch.randn(20, 6, 5)
    assert torch.equal(loaded.encode(x), sae.encode(x))
    assert torch.equal(loaded(x), sae(x))


def test_corrupt_and_mismatched_files(tmp_path):
    d = WriteSAE(cfg(), seed=0).save(tmp_path / "sae")
    good_weights = (d / WEIGHTS_FILE).read_bytes()

    (d / WEIGHTS_FILE).write_bytes(good_weights[:40])
    with pytest.raises(ValueError, match=rf"{WEIGHTS_FILE}: cannot read safetensors"):
        WriteSAE.load(d)
    (d / WEIGHTS_FILE).write_bytes(good_weights)

    raw = json.loads((d / CFG_FILE).read_text())
    (d / CFG_FILE).write_text(json.dumps({**raw, "n_atoms": 13}))
    with pytest.raises(ValueError, match=r"W_dec_key.*shape \(12, 6\).*n_atoms=13.*\(13, 6\)"):
        WriteSAE.load(d)
    (d / CFG_FILE).write_text(json.dumps({**raw, "d_v": 4}))
    with pytest.raises(
        ValueError, match=rf"{WEIGHTS_FILE}: tensor '(W_dec_value|W_enc_value|b_dec)'"
    ):
        WriteSAE.load(d)
    (d / CFG_FILE).write_text(json.dumps({**raw, "decoder_bias": False}))
    with pytest.raises(ValueError, match=r"unexpected \['b_dec'\]"):
        WriteSAE.load(d)
    (d / CFG_FILE).write_text("{not json")
    with pytest.raises(ValueError, match=rf"{CFG_FILE}: not valid JSON"):
        WriteSAE.load(d)
    (d / CFG_FILE).write_text(json.dumps({**raw, "activaton": "topk"}))
    with pytest.raises(ValueError, match=r"unknown WriteSAEConfig fields \['activaton'\]"):
        WriteSAE.load(d)
    (d / CFG_FILE).write_text(json.dumps(raw))
    t = load_file(str(d / WEIGHTS_FILE))
    t["b_enc"][0] = float("nan")
    save_file(t, str(d / WEIGHTS_FILE))
    with pytest.raises(ValueError, match="'b_enc' contains NaN"):
        WriteSAE.load(d)
    (d / WEIGHTS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=WEIGHTS_FILE):
        WriteSAE.load(d)


def test_load_wrong_class(tmp_path):
    d = FlatSAE(cfg(kind="flat")).save(tmp_path / "flat")
    with pytest.raises(ValueError, match="not a WriteSAE"):
        WriteSAE.load(d)
    assert isinstance(load_sae(d), FlatSAE)


@pytest.mark.parametrize("kind, cls", [("write", WriteSAE), ("flat", FlatSAE)])
def test_config_saved_with_the_old_key_architecture_loads(tmp_path, kind, cls):
    """Configs saved before the field was renamed `kind` carry the SAE kind as `architecture`."""
    sae = cls(cfg(kind=kind), seed=0)
    d = sae.save(tmp_path / "sae")
    raw = json.loads((d / CFG_FILE).read_text())
    raw["architecture"] = raw.pop("kind")
    (d / CFG_FILE).write_text(json.dumps(raw))
    loaded = load_sae(d)
    assert type(loaded) is cls and loaded.cfg == sae.cfg and loaded.cfg.kind == kind
    x = torch.randn(4, 6, 5)
    assert torch.equal(loaded.encode(x), sae.encode(x))
    (d / CFG_FILE).write_text(json.dumps({**raw, "kind": "write" if kind == "flat" else "flat"}))
    with pytest.raises(ValueError, match="kind=.*architecture="):
        load_sae(d)


def test_registry_names_every_kind():
    from writesae import SAE_KINDS

    assert SAE_KINDS == {"write": WriteSAE, "flat": FlatSAE}
    for kind, cls in SAE_KINDS.items():
        assert cls.kind == kind and cls(cfg(kind=kind)).cfg.kind == kind
