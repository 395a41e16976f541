"""The TransformerLens Main Demo and Exploratory Analysis Demo, ported to the three shipped models.

Every number is checked against an independent computation: the residual decomposition against the
cached final residual, per-head direct logit attribution against the logits, activation patching
against runs of the clean and corrupted prompts, generation with hooks against full forward passes.
"""

from __future__ import annotations

import pytest
import torch
from transformer_lens import patching
from transformer_lens.utilities import get_act_name

from hooked_recurrent import HookedRecurrentModel
from hooked_recurrent.config import NotApplicableError
from hooked_recurrent.tl_compat import (
    HookedRecurrentCache,
    get_act_patch_state_by_head_pos,
    get_act_patch_write_by_head_pos,
)

FAMILIES = ["tiny-qwen3.5-shakespeare", "tiny-mamba2-shakespeare", "tiny-rwkv7-shakespeare"]
CLEAN, CORRUPT = "To be, or not", "To die, or not"  # same length, differ at position 1


@pytest.fixture(scope="module", params=FAMILIES)
def model(request) -> HookedRecurrentModel:
    return HookedRecurrentModel.from_pretrained(request.param)


@pytest.fixture(scope="module")
def run(model):
    """Clean and corrupted tokens, the clean cache (with write and state), and a logit-diff metric
    between the clean run's top prediction and a fixed other token at the last position."""
    clean, corrupt = model.to_tokens(CLEAN), model.to_tokens(CORRUPT)
    assert clean.shape == corrupt.shape
    # every hook but the attention pattern (caching it takes the unfused attention path, whose
    # logits differ from a plain run's in the last bit)
    logits, cache = model.run_with_cache(
        clean, names_filter=lambda n: not n.endswith(("hook_pattern", "hook_attn_scores"))
    )
    assert torch.equal(logits, model(clean))
    right = int(logits[0, -1].argmax())
    wrong = model.to_single_token(" the") if right != model.to_single_token(" the") else 0

    def metric(lg: torch.Tensor) -> torch.Tensor:
        return (lg[0, -1, right] - lg[0, -1, wrong]).detach()

    return clean, corrupt, logits, cache, right, wrong, metric


# ---------------------------------------------------------------- config, weights, tokens
def test_config_fields(model):
    cfg = model.cfg
    assert cfg.d_head == (32 if cfg.architecture != "qwen3_5" else cfg.hf_config["head_dim"])
    assert cfg.device == torch.device("cpu") and cfg.dtype == torch.float32
    assert cfg.normalization_type == ("LN" if cfg.architecture == "rwkv7" else "RMS")
    assert cfg.default_prepend_bos is False
    assert cfg.tokenizer_name == cfg.model_name
    assert isinstance(cfg.attn_only, bool)
    if cfg.architecture == "qwen3_5":
        assert cfg.n_ctx == 4096 and cfg.positional_embedding_type == "rotary"
        assert cfg.n_key_value_heads == 2 and cfg.act_fn == "silu" and cfg.d_mlp == 384
    else:
        with pytest.raises(NotApplicableError, match="no context window"):
            _ = cfg.n_ctx
        assert cfg.positional_embedding_type == "none" and cfg.n_key_value_heads is None
    if cfg.architecture == "mamba2":
        assert cfg.d_mlp is None and cfg.attn_only and cfg.act_fn is None
    # cfg.dtype / cfg.device follow the model
    m64 = HookedRecurrentModel.from_pretrained(cfg.model_name).to(torch.float64)
    assert m64.cfg.dtype == torch.float64 and m64.W_E.dtype == torch.float64


def test_weights(model, run):
    clean, _, logits, cache, *_ = run
    cfg = model.cfg
    assert model.W_E.shape == (cfg.d_vocab, cfg.d_model)
    assert model.W_U.shape == (cfg.d_model, cfg.d_vocab) and model.b_U.shape == (cfg.d_vocab,)
    # logits = ln_final(resid) @ W_U + b_U, and the embedding is W_E[tokens]
    torch.testing.assert_close(
        cache["ln_final.hook_normalized"] @ model.W_U + model.b_U, logits, atol=1e-5, rtol=0
    )
    torch.testing.assert_close(cache["hook_embed"], model.W_E[clean])
    with pytest.raises(NotApplicableError, match="no positional embedding"):
        _ = model.W_pos
    for l, block in enumerate(model.blocks):  # hook_out = sum_h hook_z[h] @ W_O[h] in every mixer
        z = cache[f"blocks.{l}.attn.hook_z"]
        if cfg.layer_types[l] == "attention":
            z = z * torch.sigmoid(cache[f"blocks.{l}.attn.hook_gate"])
        W_O = block.attn.W_O
        torch.testing.assert_close(
            torch.einsum("bphd,hdm->bpm", z, W_O), cache["attn_out", l], atol=1e-5, rtol=0
        )
    if cfg.architecture == "qwen3_5":
        (l,) = cfg.attention_layers
        assert model.W_Q.shape == model.W_K.shape == model.W_V.shape == (1, 4, 128, 32)
        assert model.W_O.shape == (1, 4, 32, 128)
        a = model.blocks[l].attn  # per block, as in TransformerLens
        assert torch.equal(a.W_Q, model.W_Q[0]) and a._W_K.shape == (2, 128, 32)
        x1 = cache["normalized", l, "ln1"]
        gate = torch.einsum("bpm,hmd->bphd", x1, a.W_gate)
        torch.testing.assert_close(gate, cache["gate", l, "attn"], atol=1e-5, rtol=0)
        # hook_v = x W_V (per kv head): W_V repeats kv heads over query heads (GQA)
        x = cache["normalized", l, "ln1"]
        v = cache["v", l, "attn"]
        torch.testing.assert_close(
            torch.einsum("bpm,hmd->bphd", x, model.W_V[0])[:, :, ::2], v, atol=1e-5, rtol=0
        )
        assert model.W_gate.shape == model.W_in.shape == (cfg.n_layers, 128, cfg.d_mlp)
        assert model.W_out.shape == (cfg.n_layers, cfg.d_mlp, 128)
    else:
        with pytest.raises(NotApplicableError, match="no softmax attention"):
            _ = model.W_Q
        assert model.W_O.shape == (cfg.n_layers, cfg.n_heads, cfg.d_head, cfg.d_model)
    if cfg.attn_only:
        with pytest.raises(NotApplicableError, match="no MLP"):
            _ = model.W_in


def test_tokens(model):
    toks = model.to_tokens(CLEAN)
    strs = model.to_str_tokens(CLEAN)
    assert "".join(strs) == CLEAN and strs == model.to_str_tokens(toks) == model.to_str_tokens(
        toks[0]
    )
    assert model.to_str_tokens([CLEAN, CORRUPT]) == [strs, model.to_str_tokens(CORRUPT)]
    both = torch.cat([toks, model.to_tokens(CORRUPT)])
    assert model.to_str_tokens(both) == [strs, model.to_str_tokens(CORRUPT)]  # no silent flatten
    with pytest.raises(ValueError):
        model.to_str_tokens(both[None])
    comma = model.to_single_token(",")
    assert model.to_single_str_token(comma) == ","
    with pytest.raises(ValueError, match="not one"):
        model.to_single_token(" question mark")
    assert model.get_token_position(",", CLEAN) == strs.index(",")
    assert model.get_token_position(comma, toks, mode="last") == len(strs) - 1 - strs[::-1].index(
        ","
    )
    bos = model.to_tokens(CLEAN, prepend_bos=True)
    assert bos[0, 0] == model.tokenizer.bos_token_id and torch.equal(bos[:, 1:], toks)
    assert torch.equal(model(CLEAN, prepend_bos=True), model(bos))


def test_loss_fn_and_layers(model, run):
    clean, _, logits, cache, *_ = run
    loss = model(clean, return_type="loss")
    torch.testing.assert_close(model.loss_fn(logits, clean), loss)
    per = model.loss_fn(logits, clean, per_token=True)
    assert per.shape == (1, clean.shape[1] - 1)
    ref = -logits[0, :-1].log_softmax(-1)[torch.arange(clean.shape[1] - 1), clean[0, 1:]]
    torch.testing.assert_close(per[0], ref)
    # stop_at_layer returns resid_pre of that layer; start_at_layer continues from it
    for layer in (1, 3):
        resid = model(clean, stop_at_layer=layer)
        _, own = model.run_with_cache(clean, names_filter=get_act_name("resid_pre", layer))
        torch.testing.assert_close(resid, own["resid_pre", layer], atol=0, rtol=0)
    if model.cfg.architecture == "rwkv7":
        with pytest.raises(ValueError, match="v_first"):
            model(resid, start_at_layer=3)
        resid = model(clean, stop_at_layer=0)
        torch.testing.assert_close(model(resid, start_at_layer=0), logits, atol=1e-5, rtol=0)
    else:
        torch.testing.assert_close(model(resid, start_at_layer=3), logits, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- cache tools
def test_padding_side_attention_mask_and_loss_per_token(model):
    """`to_tokens(padding_side=)`, `attention_mask` and `loss_per_token`, as TransformerLens users
    call them: a left-padded row equals its prompt alone, and the per-token loss equals
    `loss_fn(per_token=True)` of the logits."""
    texts = ["To be", "To be, or not to be, that is"]
    toks, mask = model.to_tokens(texts, padding_side="left", return_mask=True)
    assert mask[0].sum() < mask[1].sum() and mask[0, 0] == 0  # the short row is padded on the left
    logits = model(toks, attention_mask=mask)
    alone = model(model.to_tokens(texts[0]))
    n = int(mask[0].sum())
    assert (logits[0, -n:] - alone[0]).abs().max() <= 1e-4
    long = model.to_tokens(texts[1])
    per = model(long, return_type="loss", loss_per_token=True)
    torch.testing.assert_close(per, model.loss_fn(model(long), long, per_token=True))
    assert per.shape == (1, long.shape[1] - 1)


def test_cache_shorthands(model, run):
    cache = run[3]
    assert isinstance(cache, HookedRecurrentCache)
    l = model.cfg.recurrent_layers[0]
    assert torch.equal(cache["write", l], cache[f"blocks.{l}.attn.hook_write"])
    assert torch.equal(cache["state", l], cache[f"blocks.{l}.attn.hook_state"])
    assert torch.equal(cache["ssm_state", l], cache["state", l])
    assert get_act_name("scale", 1, "ln1") == "blocks.1.ln1.hook_scale"
    # the norm's cached scale reproduces its output: ln1(x) = w * x / scale (RMS), LN centred
    x, scale = cache["resid_pre", 1], cache["scale", 1, "ln1"]
    norm = model.blocks[1].ln1
    if model.cfg.normalization_type == "LN":
        y = (x - x.mean(-1, keepdim=True)) / scale * norm.w + norm.b
    else:
        y = x / scale * ((1 + norm.w) if norm.zero_centred else norm.w)
    torch.testing.assert_close(y, cache["normalized", 1, "ln1"], atol=1e-5, rtol=0)
    reads, layers = cache.stack_activation("read", return_layers=True)
    assert layers == model.cfg.recurrent_layers and reads.shape[0] == len(layers)
    assert cache.stack_activation("resid_pre").shape[0] == model.cfg.n_layers


def test_residual_decomposition(model, run):
    cache = run[3]
    final = cache["resid_post", -1]
    comps, labels = cache.decompose_resid(return_labels=True)
    assert labels[0] == "embed" and len(labels) == comps.shape[0]
    # embed (= resid_pre of block 0, after RWKV-7's ln0) + attn_out + mlp_out = final residual
    err = (comps.sum(0) - final).abs().max().item()
    assert err < 1e-5, err
    # with apply_ln: the final norm's output (its bias, RWKV-7 only, belongs to no component)
    normed = cache.decompose_resid(apply_ln=True)
    bias = getattr(model.ln_final, "b", torch.zeros(()))
    err = (normed.sum(0) + bias - cache["ln_final.hook_normalized"]).abs().max().item()
    assert err < 1e-5, err
    acc, acc_labels = cache.accumulated_resid(apply_ln=True, return_labels=True)
    assert acc_labels[-1] == "final_post"
    torch.testing.assert_close(acc[-1], cache["ln_final.hook_normalized"], atol=1e-6, rtol=0)
    # apply_ln_to_stack on resid_pre of a block = that block's ln1 output (minus its bias)
    stack = cache.apply_ln_to_stack(cache["resid_pre", 2][None], layer=2)
    bias = getattr(model.blocks[2].ln1, "b", torch.zeros(()))
    torch.testing.assert_close(stack[0] + bias, cache["normalized", 2, "ln1"], atol=1e-5, rtol=0)


def test_logit_lens(model, run):
    _, _, logits, cache, right, *_ = run
    result = cache.logit_lens(targets=right)
    lens_logits = cache.accumulated_resid(apply_ln=True) @ model.W_U + model.b_U
    # the last layer of the lens is the model's own prediction
    torch.testing.assert_close(lens_logits[-1], logits, atol=1e-5, rtol=0)
    values = torch.as_tensor(result.values)
    assert values.shape[0] == model.cfg.n_layers + 1
    torch.testing.assert_close(values[-1].reshape(-1)[-1], logits[0, -1, right], atol=1e-4, rtol=0)


def test_direct_logit_attribution_per_head(model, run):
    _, _, logits, cache, right, wrong, metric = run
    stack, labels = cache.stack_head_results(
        layer=-1, return_labels=True, incl_remainder=True, pos_slice=-1, apply_ln=True
    )
    n_heads = sum(
        (
            model.cfg.hf_config.get("num_attention_heads", 0)
            if t == "attention"
            else model.cfg.n_heads
        )
        for t in model.cfg.layer_types
    )
    assert len(labels) == stack.shape[0] == n_heads + 1 and labels[0] == "L0H0"
    direction = model.tokens_to_residual_directions(right) - model.tokens_to_residual_directions(
        wrong
    )
    attrs = stack @ direction
    bias = getattr(model.ln_final, "b", torch.zeros(model.cfg.d_model))
    total = attrs.sum(0)[0] + bias @ direction
    err = abs(float((total - metric(logits)).detach()))
    assert err < 1e-4, err
    # per-head results of one recurrent layer add up to its attn_out
    l = model.cfg.recurrent_layers[0]
    heads = cache[f"blocks.{l}.attn.hook_result"]
    torch.testing.assert_close(heads.sum(-2), cache["attn_out", l], atol=1e-5, rtol=0)


# ---------------------------------------------------------------- patching and ablation
def test_activation_patching_resid_pre(model, run):
    clean, corrupt, logits, cache, _, _, metric = run
    clean_value = float(metric(logits))
    corrupt_value = float(metric(model(corrupt)))
    assert abs(clean_value - corrupt_value) > 1e-3
    same = patching.get_act_patch_resid_pre(model, clean, cache, metric)
    assert same.shape == (model.cfg.n_layers, clean.shape[1])
    assert float((same - clean_value).abs().max()) == 0.0  # clean into clean: no effect
    patched = patching.get_act_patch_resid_pre(model, corrupt, cache, metric)
    # position 1 (the only differing token) of layer 0 carries everything: clean restored
    assert float(patched[0, 1]) == clean_value
    assert float((patched[0, [0, 2, 3]] - corrupt_value).abs().max()) < 1e-5
    # every position of layer 0 at once restores the clean run exactly
    hook = (get_act_name("resid_pre", 0), lambda x, hook: cache["resid_pre", 0])
    assert float(metric(model.run_with_hooks(corrupt, fwd_hooks=[hook]))) == clean_value


def test_patching_heads_state_and_write(model, run):
    clean, corrupt, logits, cache, _, _, metric = run
    clean_value = float(metric(logits))
    if model.cfg.architecture == "qwen3_5":  # TL's sweep over hook_z per (layer, pos, head)
        short = clean[:, :2]  # (a short prompt keeps the sweep's 32 runs quick)
        _, short_cache = model.run_with_cache(short, names_filter=lambda n: n.endswith("hook_z"))
        lg = model(short)

        def short_metric(x):
            return (x[0, -1, 0] - x[0, -1, 1]).detach()

        heads = patching.get_act_patch_attn_head_out_by_pos(model, short, short_cache, short_metric)
        assert heads.shape == (model.cfg.n_layers, 2, model.cfg.n_heads)
        assert float((heads - short_metric(lg)).abs().max()) == 0.0  # clean into clean
    l = model.cfg.recurrent_layers[0]  # one layer keeps the sweep quick
    state = get_act_patch_state_by_head_pos(model, corrupt, cache, metric, layers=[l])
    write = get_act_patch_write_by_head_pos(model, clean, cache, metric, layers=[l])
    assert state.shape == (model.cfg.n_layers, clean.shape[1], model.cfg.n_heads)
    assert bool(state[l].isfinite().all()) and bool(write[l].isfinite().all())
    assert bool(state[l + 1 :].isnan().all())
    assert float((write[l] - clean_value).abs().max()) < 1e-5  # clean into clean
    # one entry, recomputed by hand: assigning the clean state at (layer, pos 1, head 0)

    def assign(s, hook):
        s[:, 1, 0] = cache["state", l][:, 1, 0]
        return s

    ref = metric(model.run_with_hooks(corrupt, fwd_hooks=[(f"blocks.{l}.attn.hook_state", assign)]))
    assert float(state[l, 1, 0]) == float(ref)


def test_head_ablation_and_hooks_context(model, run):
    clean, _, logits, cache, *_ = run
    l = model.cfg.recurrent_layers[-1]
    head = 1

    def ablate(z, hook):
        z[:, :, head] = 0.0
        return z

    name = f"blocks.{l}.attn.hook_z"
    with model.hooks(fwd_hooks=[(name, ablate)]):
        ablated_logits, ablated = model.run_with_cache(
            clean, names_filter=[f"blocks.{l}.hook_attn_out"]
        )
    assert not model.hook_dict[name].fwd_hooks  # the context removed its hook
    # zeroing one head's z removes exactly that head's result from attn_out
    cache.compute_head_results()
    expected = cache["attn_out", l] - cache[f"blocks.{l}.attn.hook_result"][:, :, head]
    torch.testing.assert_close(ablated["attn_out", l], expected, atol=1e-5, rtol=0)
    assert float((ablated_logits - logits).abs().max()) > 0
    torch.testing.assert_close(model(clean), logits, atol=0, rtol=0)


def test_generate_with_hooks(model):
    l = model.cfg.recurrent_layers[0]

    def ablate(z, hook):
        z[:, :, 0] = 0.0
        return z

    hooks = [(f"blocks.{l}.attn.hook_z", ablate)]
    toks = model.to_tokens(CLEAN)
    with model.hooks(fwd_hooks=hooks):
        out = model.generate(toks, max_new_tokens=4, verbose=False)
        out_full = model.generate(toks, max_new_tokens=4, use_past_kv_cache=False, verbose=False)
        # greedy: each new token is the argmax of a full hooked forward pass on the prefix
        for t in range(toks.shape[1], out.shape[1]):
            assert int(model(out[:, :t])[0, -1].argmax()) == int(out[0, t])
    assert torch.equal(out, out_full)
    assert torch.equal(model.generate(toks, 4, fwd_hooks=hooks, verbose=False), out)
    # freq_penalty: a huge penalty forbids repeating any token already in the sequence
    pen = model.generate(toks, 4, freq_penalty=1e4, verbose=False)
    for t in range(toks.shape[1], pen.shape[1]):
        assert int(pen[0, t]) not in pen[0, :t].tolist()
    text = model.generate(CLEAN, 3, prepend_bos=True, verbose=False)
    assert isinstance(text, str) and CLEAN in text
    sampled = model.generate(toks, 4, do_sample=True, seed=0, verbose=False)
    assert torch.equal(sampled, model.generate(toks, 4, do_sample=True, seed=0, verbose=False))


# ---------------------------------------------------------------- SAE objects
def test_sae_saelens_attributes(model, run):
    from writesae import WriteSAE, WriteSAEConfig

    cache = run[3]
    l = model.cfg.recurrent_layers[0]
    cfg = WriteSAEConfig(
        d_k=model.cfg.d_k,
        d_v=model.cfg.d_v,
        n_atoms=16,
        k=2,
        hook_name=f"blocks.{l}.attn.hook_state",
        head=1,
    )
    sae = WriteSAE(cfg, seed=0)
    assert cfg.d_sae == 16 and cfg.d_in == model.cfg.d_k * model.cfg.d_v
    assert sae.W_dec.shape == (16, cfg.d_k, cfg.d_v) and sae.b_enc.shape == (16,)
    assert sae.W_enc.shape == (cfg.d_in, 16) and sae.b_dec.shape == (cfg.d_k, cfg.d_v)
    x = cache["state", l][:, :, 1]
    # SAELens's formulas give the SAE's own pre-activations and decoder
    torch.testing.assert_close(
        x.flatten(-2) @ sae.W_enc + sae.b_enc, sae.pre_acts(x), atol=1e-5, rtol=1e-5
    )
    codes = sae.encode(x)
    torch.testing.assert_close(
        torch.einsum("...n,nkv->...kv", codes, sae.W_dec) + sae.b_dec,
        sae.decode(codes),
        atol=1e-5,
        rtol=1e-5,
    )
    with pytest.raises(ValueError, match="every head"):
        sae.encode(cache["state", l])
