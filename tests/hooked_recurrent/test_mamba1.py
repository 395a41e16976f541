"""Mamba-1 and Falcon-Mamba: parity with transformers, loading (also the mamba_ssm layout), edit
propagation, generation, WriteSAE.

References: Hugging Face `MambaForCausalLM` / `FalconMambaForCausalLM` (logits, hidden states,
caches, greedy generate) and `mamba1_helpers.brute_force_logits`, a float64 token-by-token loop
over the Mamba-1 equations written from the HF weights (not the package's scan).
"""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch

from hooked_recurrent import HookedRecurrentModel
from tests.hooked_recurrent.mamba1_helpers import MAMBA1_CONFIGS, brute_force_logits, mamba1_hf

logging.getLogger("transformers").setLevel(logging.ERROR)
torch.set_num_threads(2)

CONFIGS = list(MAMBA1_CONFIGS)
VOCAB = 101


@pytest.fixture(scope="module", params=CONFIGS)
def pair(request):
    hf = mamba1_hf(request.param, seed=CONFIGS.index(request.param))
    return hf, HookedRecurrentModel.from_hf_model(hf)


def tokens(batch: int = 2, T: int = 50, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, T), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- parity with Hugging Face
def test_config_conversion(pair):
    hf, model = pair
    c = hf.config
    assert (model.cfg.n_heads, model.cfg.d_k, model.cfg.d_v) == (
        1,
        c.state_size,
        c.intermediate_size,
    )
    assert model.cfg.architecture == c.model_type
    assert model.cfg.dt_rank == c.time_step_rank
    assert model.cfg.tie_word_embeddings == c.tie_word_embeddings


def test_logits_hidden_states_and_final_state_match_hf(pair):
    hf, model = pair
    toks = tokens(3, 50)  # the fast path's chunk is 8: 50 leaves a partial chunk
    with torch.no_grad():
        out = hf(toks, output_hidden_states=True, use_cache=True)
        logits, cache = model.run_with_cache(
            toks, names_filter=lambda n: n.endswith("resid_post") or n == "hook_embed"
        )
        _, state = model(toks, return_state=True)
    assert (logits - out.logits).abs().max() <= 1e-4
    L = hf.config.num_hidden_layers
    hs = out.hidden_states  # the output of each block, then norm_f(last) (5.25+: embeddings first)
    first = 1 if torch.equal(hs[0], cache["hook_embed"]) else 0
    for layer in range(L - first):
        diff = (cache[f"blocks.{layer}.hook_resid_post"] - hs[layer + first]).abs().max()
        assert diff <= 1e-4, (layer, diff)
    for layer in range(L):
        hf_S = out.cache.layers[layer].recurrent_states[0]  # [b, d_inner, d_state]
        diff = (state.layers[layer]["S"][:, 0] - hf_S.transpose(-1, -2)).abs().max()
        assert diff <= 1e-5, (layer, diff)


def test_brute_force_reference_matches_hf(pair):
    hf, _ = pair
    toks = tokens(2, 30)
    with torch.no_grad():
        assert (brute_force_logits(hf, toks) - hf(toks).logits.double()).abs().max() <= 1e-4


def test_per_position_states_match_hf_decode(pair):
    hf, model = pair
    toks = tokens(2, 16, seed=3)
    L = hf.config.num_hidden_layers
    hf_states = [[] for _ in range(L)]
    with torch.no_grad():
        cache = None
        for t in range(toks.shape[1]):
            out = hf(toks[:, t : t + 1], cache=cache, use_cache=True)
            cache = out.cache
            for layer in range(L):
                hf_states[layer].append(cache.layers[layer].recurrent_states[0].clone())
        _, ours = model.run_with_cache(toks, names_filter=lambda n: n.endswith("hook_state"))
    for layer in range(L):
        ref = torch.stack(hf_states[layer], 1).transpose(-1, -2)  # [b, T, d_state, d_inner]
        diff = (ours[f"blocks.{layer}.attn.hook_state"][:, :, 0] - ref).abs().max()
        assert diff <= 1e-5, (layer, diff)


def test_hook_shapes_and_meaning(pair):
    hf, model = pair
    c = hf.config
    toks = tokens(2, 12)
    with torch.no_grad():
        _, cache = model.run_with_cache(toks, names_filter=lambda n: ".attn." in n)
    b, T, N, D = 2, 12, c.state_size, c.intermediate_size
    a = "blocks.0.attn."
    assert cache[a + "hook_q"].shape == cache[a + "hook_k"].shape == (b, T, 1, N)
    for name in ("x", "dt", "v", "read", "gate", "z"):
        assert cache[a + f"hook_{name}"].shape == (b, T, 1, D), name
    for name in ("decay", "write", "state"):
        assert cache[a + f"hook_{name}"].shape == (b, T, 1, N, D), name
    A = -hf.backbone.layers[0].mixer.A_log.exp().T  # [d_state, d_inner]
    dt = cache[a + "hook_dt"]
    torch.testing.assert_close(cache[a + "hook_decay"], (dt[..., None, :] * A).exp())
    torch.testing.assert_close(cache[a + "hook_v"], dt * cache[a + "hook_x"])
    k, v = cache[a + "hook_k"], cache[a + "hook_v"]
    torch.testing.assert_close(cache[a + "hook_write"], k[..., :, None] * v[..., None, :])
    read = torch.einsum("bthnd,bthn->bthd", cache[a + "hook_state"], cache[a + "hook_q"])
    torch.testing.assert_close(cache[a + "hook_read"], read, atol=1e-5, rtol=1e-4)
    # the per-channel view: channel d's state is the column S[:, d] of d_state entries
    S = cache[a + "hook_state"][:, :, 0]
    prev = torch.cat((torch.zeros_like(S[:, :1]), S[:, :-1]), 1)
    d = 3
    col = cache[a + "hook_decay"][:, :, 0, :, d] * prev[..., d] + k[:, :, 0] * v[:, :, 0, d, None]
    torch.testing.assert_close(S[..., d], col)


def test_padded_batch_equals_prompts_run_alone(pair):
    _, model = pair
    a, b = tokens(1, 9, seed=20), tokens(1, 5, seed=21)
    batch = torch.cat((a, torch.cat((torch.zeros(1, 4, dtype=torch.long), b), 1)))
    mask = torch.ones_like(batch)
    mask[1, :4] = 0
    with torch.no_grad():
        both = model(batch, attention_mask=mask)
        assert (both[0] - model(a)[0]).abs().max() <= 1e-5
        assert (both[1, 4:] - model(b)[0]).abs().max() <= 1e-5


# ---------------------------------------------------------------- loading checkpoints
def test_mamba_ssm_layout_loads(tmp_path):
    """The original state-spaces/mamba-* layout: mamba_ssm config.json + pytorch_model.bin with
    backbone.embedding.weight, a padded vocabulary and a tied head (saved under both names)."""
    pad, vocab = 8, 99  # padded to 104
    padded = -(-vocab // pad) * pad
    hf = mamba1_hf("mamba", seed=5, vocab=padded, time_step_rank="auto")
    c = hf.config
    config = {
        "d_model": c.hidden_size,
        "n_layer": c.num_hidden_layers,
        "vocab_size": vocab,
        "ssm_cfg": {"d_state": c.state_size, "d_conv": c.conv_kernel, "expand": c.expand},
        "rms_norm": True,
        "residual_in_fp32": True,
        "fused_add_norm": True,
        "pad_vocab_size_multiple": pad,
        "tie_embeddings": True,
    }
    assert c.time_step_rank == math.ceil(c.hidden_size / 16)  # mamba_ssm's dt_rank "auto"
    sd = {
        k.replace("backbone.embeddings.", "backbone.embedding."): v.clone()
        for k, v in hf.state_dict().items()
    }
    assert "backbone.embedding.weight" in sd and "lm_head.weight" in sd
    (tmp_path / "config.json").write_text(json.dumps(config))
    torch.save(sd, tmp_path / "pytorch_model.bin")
    model = HookedRecurrentModel.from_pretrained(str(tmp_path))
    assert model.cfg.architecture == "mamba" and model.cfg.d_vocab == padded
    toks = tokens(2, 40)
    with torch.no_grad():
        assert (model(toks) - hf(toks).logits).abs().max() <= 1e-4


@pytest.mark.parametrize("name", CONFIGS)
def test_hf_save_pretrained_loads_and_round_trips(tmp_path, name):
    from transformers import AutoConfig, AutoModelForCausalLM

    from hooked_recurrent.pretrained.mamba1 import to_hf_config, to_hf_state_dict

    hf = mamba1_hf(name, seed=7)
    hf.save_pretrained(tmp_path)
    model = HookedRecurrentModel.from_pretrained(str(tmp_path))
    toks = tokens(2, 33)
    with torch.no_grad():
        ref = hf(toks).logits
        assert (model(toks) - ref).abs().max() <= 1e-4
        config = AutoConfig.for_model(hf.config.model_type, **to_hf_config(model.cfg))
        back = AutoModelForCausalLM.from_config(config).eval()
        converted = to_hf_state_dict(model.state_dict(), model.cfg)
        back.load_state_dict(converted, strict=False)
        assert set(back.state_dict()) - set(converted) <= {"lm_head.weight"}  # tied
        assert (back(toks).logits - ref).abs().max() <= 1e-5


# ---------------------------------------------------------------- edit propagation
EDIT_T = 19


def _edit_cases(model):
    """(case, hook name, hook fn, brute-force edit fn): one edit at EDIT_T of each editable hook."""
    c = model.cfg
    g = torch.Generator().manual_seed(11)
    N, D = c.d_k, c.d_v
    rank1 = 0.5 * torch.randn(N, generator=g)[:, None] * torch.randn(D, generator=g)[None, :]
    cases = [
        ("x_add", "x", torch.randn(D, generator=g), True),
        ("k_set", "k", torch.randn(N, generator=g), False),
        ("v_add", "v", 0.3 * torch.randn(D, generator=g), True),
        ("dt_set", "dt", torch.full((D,), 0.7), False),
        ("decay_set", "decay", torch.full((N, D), 0.999), False),
        ("write_rank1", "write", rank1, True),
        ("write_dense", "write", 0.3 * torch.randn(N, D, generator=g), False),
        ("state_rank1", "state", rank1, True),
        ("state_dense", "state", 0.3 * torch.randn(N, D, generator=g), False),
    ]
    out = []
    for case, name, value, add in cases:

        def hook(x, hook, value=value, add=add):
            x = x.clone()
            x[:, EDIT_T, 0] = x[:, EDIT_T, 0] + value if add else value.to(x.dtype)
            return x

        def ref(layer, pos, ref_name, x, value=value, add=add, name=name):
            if pos != EDIT_T or ref_name != name:
                return x
            return x + value.double() if add else value.double().expand_as(x).clone()

        out.append((case, f"hook_{name}", hook, ref))
    return out


#: the layer edited by test_edits_propagate_like_brute_force, per model type (the multi-position
#: edits take the last layer)
EDIT_LAYER = {"mamba": 0, "falcon_mamba": 1}


def test_edits_propagate_like_brute_force(pair):
    hf, model = pair
    toks = tokens(2, 28, seed=4)
    li = EDIT_LAYER[hf.config.model_type]
    with torch.no_grad():
        clean = model(toks)
        for case, hook_name, hook, ref in _edit_cases(model):

            def edit(lj, pos, name, x, ref=ref):
                return ref(lj, pos, name, x) if lj == li else x

            edited = model.run_with_hooks(toks, fwd_hooks=[(f"blocks.{li}.attn.{hook_name}", hook)])
            diff = (edited.double() - brute_force_logits(hf, toks, edit)).abs().max()
            assert diff <= 1e-4, (case, diff)
            assert torch.equal(edited[:, :EDIT_T], clean[:, :EDIT_T]), case
            assert (edited[:, EDIT_T + 1 :] - clean[:, EDIT_T + 1 :]).abs().max() > 1e-5, case


#: (batch, position) pairs: a span shorter than the stepped limit (then the chunked response),
#: and a long one (dense chunked propagation)
MULTI_EDITS = {
    "short_span": [(0, 19), (1, 21), (0, 26), (1, 26)],
    "long_span": [(1, 4), (0, 11), (1, 30), (0, 40)],
}


@pytest.mark.parametrize("hook_name", ["hook_write", "hook_state"])
@pytest.mark.parametrize("case", list(MULTI_EDITS))
def test_multi_position_edits_propagate_like_brute_force(pair, case, hook_name):
    """Additive edits at several (batch, pos) of the last layer: added to hook_write; at
    hook_state the state is assigned the received state plus the change."""
    hf, model = pair
    c = model.cfg
    li = c.n_layers - 1
    toks = tokens(2, 45, seed=15)
    g = torch.Generator().manual_seed(16)
    pairs = MULTI_EDITS[case]
    deltas = [0.3 * torch.randn(c.d_k, c.d_v, generator=g) for _ in pairs]

    def hook(x, hook):
        x = x.clone()
        for (b, t), d in zip(pairs, deltas, strict=True):
            x[b, t, 0] += d
        return x

    def edit(lj, pos, name, x):
        if lj != li or name != hook_name.removeprefix("hook_"):
            return x
        x = x.clone()
        for (b, t), d in zip(pairs, deltas, strict=True):
            if t == pos:
                x[b] += d.double()
        return x

    with torch.no_grad():
        clean = model(toks)
        edited = model.run_with_hooks(toks, fwd_hooks=[(f"blocks.{li}.attn.{hook_name}", hook)])
        expected = brute_force_logits(hf, toks, edit)
    assert (edited.double() - expected).abs().max() <= 1e-4
    for b in range(2):  # each row is bit-for-bit clean before its own first edit
        first = min(t for bb, t in pairs if bb == b)
        assert torch.equal(edited[b, :first], clean[b, :first]), b
    t1 = max(t for _, t in pairs)
    assert (edited[:, t1 + 1 :] - clean[:, t1 + 1 :]).abs().max() > 1e-5


def test_state_hook_gradient_is_the_adjoint_state(pair):
    """A backward hook on hook_state sees dL/dS_t: equal to the gradient of the loss with respect
    to an added zero at hook_state, by autograd through the chunked fast path."""
    _, model = pair
    toks = tokens(2, 20, seed=17)
    name = "blocks.0.attn.hook_state"
    seen = {}

    def grab(grad, hook):
        seen["g"] = grad.detach().clone()

    with model.hooks(bwd_hooks=[(name, grab)]):
        model(toks).logsumexp(-1).sum().backward()
    zero = {}

    def add_zero(x, hook):
        zero["z"] = torch.zeros_like(x, requires_grad=True)
        return x + zero["z"]

    model.run_with_hooks(toks, fwd_hooks=[(name, add_zero)]).logsumexp(-1).sum().backward()
    ref = zero["z"].grad
    assert (seen["g"] - ref).abs().max() <= 1e-4 * max(1.0, ref.abs().max().item())
    assert ref.abs().max() > 1e-4


# ---------------------------------------------------------------- generation
def test_greedy_generation_matches_hf(pair):
    hf, model = pair
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    prompt = tokens(2, 7, seed=9)
    with torch.no_grad():
        ref = hf.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=32, do_sample=False
        )
        ours = model.generate(prompt, 32)
    assert ours.shape == ref.shape == (2, 39)
    assert torch.equal(ours, ref)


def test_generation_with_hooks_equals_forward_with_them(pair):
    """Hooks keyed on absolute positions act, and record, the same in generate and in one
    forward pass over the generated sequence."""
    _, model = pair
    c = model.cfg
    g = torch.Generator().manual_seed(12)
    atom = 2.0 * torch.randn(c.d_k, generator=g)[:, None] * torch.randn(c.d_v, generator=g)
    targets = {5, 9, 14}  # one in the prompt, two during generation

    def install(x, hook):
        hit = [i for i, p in enumerate(hook.positions.tolist()) if p in targets]
        if not hit:
            return x
        x = x.clone()
        x[:, hit, 0] += atom
        return x

    seen: dict[str, list] = {"gen": [], "fwd": []}

    def recorder(key):
        def rec(x, hook):
            seen[key].append(x.detach().clone())
            return x

        return rec

    last = c.n_layers - 1
    prompt = tokens(2, 8, seed=13)
    with torch.no_grad():
        out = model.generate(
            prompt,
            12,
            fwd_hooks=[
                ("blocks.0.attn.hook_write", install),
                (f"blocks.{last}.attn.hook_state", recorder("gen")),
            ],
        )
        plain = model.generate(prompt, 12)
        logits = model.run_with_hooks(
            out,
            fwd_hooks=[
                ("blocks.0.attn.hook_write", install),
                (f"blocks.{last}.attn.hook_state", recorder("fwd")),
            ],
        )
    assert torch.equal(logits[:, 7:-1].argmax(-1), out[:, 8:])
    assert not torch.equal(out, plain)  # the installed atom changed the continuation
    gen = torch.cat(seen["gen"], 1)  # the prompt, then one position per new token
    fwd = seen["fwd"][0][:, : gen.shape[1]]
    assert (gen - fwd).abs().max() <= 1e-5


# ---------------------------------------------------------------- WriteSAE
def test_write_sae_trains_and_evaluates(pair):
    """WriteSAE on Mamba-1's rank-1 write B (dt x)^T: a few training steps from the model, then
    the substitution test gives finite numbers."""
    from writesae import ModelSource, WriteSAE, WriteSAEConfig, train
    from writesae.evaluate import evaluate_substitution

    _, model = pair
    c = model.cfg
    layer = c.n_layers - 1
    sae = WriteSAE(
        WriteSAEConfig(
            d_k=c.d_k,
            d_v=c.d_v,
            n_atoms=16,
            k=2,
            hook_name=f"blocks.{layer}.attn.hook_write",
            head=0,
            input_kind="write",
        ),
        seed=0,
    )
    texts = [tokens(1, 24, seed=s)[0] for s in range(8)]
    source = ModelSource(
        model, texts, layer, 0, kind="write", batch_size=32, buffer_size=64, context_len=24
    )
    metrics = train(sae, source, n_steps=6, batch_size=32, log_every=3, progress=False)
    assert all(math.isfinite(f) for f in metrics.fve)
    res = evaluate_substitution(
        model, sae, tokens(3, 12, seed=30), max_firings=6, positions_per_prompt=2, progress=False
    )
    assert res.n >= 6
    assert all(math.isfinite(x) for x in res.kl["atom"] + res.kl["delete"])
    assert 0.0 <= res.win_rate_vs_delete <= 1.0


# ---------------------------------------------------------------- Jamba's mixer
def test_weighted_bcdt_norm_mixer_matches_jamba_mamba_mixer():
    """The same mixer with bcdt_norm="weighted" (and biases on the projections) is Jamba's
    Mamba layer: its output equals transformers' JambaMambaMixer on the same weights (converted
    with the family's weight map), every weight used (strict load)."""
    from types import SimpleNamespace

    from transformers import JambaConfig
    from transformers.models.jamba.modeling_jamba import JambaMambaMixer

    from hooked_recurrent.components.mamba1 import Mamba1Mixer
    from hooked_recurrent.pretrained.mamba1 import mixer_map
    from hooked_recurrent.state import RunContext

    config = JambaConfig(
        hidden_size=24,
        mamba_d_state=6,
        mamba_expand=2,
        mamba_d_conv=3,
        mamba_dt_rank=4,
        mamba_proj_bias=True,
        rms_norm_eps=1e-5,
        num_hidden_layers=1,
    )
    torch.manual_seed(3)
    hf = JambaMambaMixer(config, 0).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("layernorm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            elif name in ("A_log", "D") or name.endswith("bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
    ours = Mamba1Mixer(0, 24, 48, 6, 4, 3, use_bias=True, bcdt_norm="weighted", bcdt_eps=1e-5)
    flags = SimpleNamespace(use_conv_bias=True, use_bias=True, bcdt_norm="weighted")
    theirs = hf.state_dict()
    sd = {}
    for k, v in mixer_map(flags).items():
        t = theirs[v.removeprefix("mixer.")]
        sd[k.removeprefix("attn.")] = t[:, 0, :] if k == "attn.conv_w" else t
    ours.load_state_dict(sd)
    x = torch.randn(2, 23, 24, generator=g)
    with torch.no_grad():
        ref = hf(x)
        got = ours(x, RunContext(positions=torch.arange(23)))
    assert (got - ref).abs().max() <= 1e-5
