"""xLSTM: parity with transformers' xLSTMForCausalLM, loading, edit propagation, generation.

References: `xLSTMForCausalLM` (logits, hidden states, the cache's stabilised (C, n, m), one-token
decode steps, greedy generate) on its native torch kernels: the chunkwise kernel over whole
chunks, then the step-by-step kernel over the rest; and `brute_mlstm`, a float64 token-by-token
mLSTM written here from the reference layer's weights (its own sequential max-stabiliser) and
swapped into the (float64) reference model.
"""

from __future__ import annotations

import logging
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from hooked_recurrent import HookedRecurrentModel
from tests.hooked_recurrent import family_checks as fc

logging.getLogger("transformers").setLevel(logging.ERROR)
torch.set_num_threads(2)

VOCAB = 97
CONFIGS = {
    # separate projections, 4 heads of 16 x 16, chunks of 16 (T = 37: two chunks and 5 steps),
    # a logit cap the logits reach
    "single": dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_heads=4,
        qk_dim_factor=1.0,
        v_dim_factor=1.0,
        chunk_size=16,
        gate_soft_cap=15.0,
        output_logit_soft_cap=2.0,
    ),
    # fused projections, 2 heads of 32 x 64, chunks of 8, a gate cap the gates reach, a read
    # epsilon that shows
    "fused": dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_heads=2,
        qk_dim_factor=1.0,
        v_dim_factor=2.0,
        chunk_size=8,
        weight_mode="fused",
        gate_soft_cap=4.0,
        output_logit_soft_cap=30.0,
        eps=1e-2,
    ),
}


def _skip(self, module):
    pass


def xlstm_hf(name: str, seed: int = 0):
    from transformers import xLSTMConfig, xLSTMForCausalLM
    from transformers.models.xlstm.modeling_xlstm import xLSTMPreTrainedModel

    cfg = xLSTMConfig(
        vocab_size=VOCAB, ffn_proj_factor=1.5, ffn_round_up_to_multiple_of=16, pad_token_id=0,
        eos_token_id=1, bos_token_id=1, norm_reduction_force_float32=False, **CONFIGS[name],
    )  # fmt: skip
    # the reference's own initialisation fails on the fused layout (its gate-bias shapes) and
    # sets the norms to ones and the gate weights to zero: every parameter is drawn here instead
    with mock.patch.object(xLSTMPreTrainedModel, "_init_weights", _skip):
        hf = xLSTMForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "norm" in n:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            elif "gate_preact" in n and "ogate" not in n:  # input and forget gates
                p.copy_((2.0 if n.endswith("bias") else 0.3) * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return hf


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request):
    hf = xlstm_hf(request.param, seed=list(CONFIGS).index(request.param))
    return hf, HookedRecurrentModel.from_hf_model(hf)


def state_of(cache, layer: int):
    """The reference's stabilised (C, n) of a layer as our state: n as the last column."""
    C, n, _ = cache.rnn_state[layer]
    return torch.cat((C, n[..., None]), -1)


def brute_mlstm(la, x, write_edits=None, state_edits=None):
    """The mLSTM one token at a time from the reference layer's weights; returns (output, its
    final (C, n, m)) as the reference layer does."""
    c = la.config
    B, T, _ = x.shape
    H = c.num_heads
    if c.weight_mode == "single":
        q, k, v, o = la.q(x), la.k(x), la.v(x), la.ogate_preact(x)
        i, f = la.igate_preact(x), la.fgate_preact(x)
    else:
        q, k, v, o = la.qkv_opreact(x).split([la.qk_dim, la.qk_dim, la.v_dim, la.v_dim], -1)
        i, f = la.ifgate_preact(x).split(H, -1)
    cap = c.gate_soft_cap
    i, log_f = cap * torch.tanh(i / cap), F.logsigmoid(cap * torch.tanh(f / cap))
    q, k, v = (t.view(B, T, H, -1) for t in (q, k, v))
    K, V = q.shape[-1], v.shape[-1]
    m, ms = x.new_zeros(B, H), []
    for t in range(T):  # the stabiliser, step by step
        ms.append(m)
        m = torch.maximum(log_f[:, t] + m, i[:, t])
    m_prev = torch.stack(ms, 1)
    m_all = torch.cat((m_prev[:, 1:], m[:, None]), 1)
    decay = torch.exp(log_f + m_prev - m_all)
    v1 = torch.cat((v, v.new_ones(B, T, H, 1)), -1)
    writes = torch.exp(i - m_all)[..., None, None] * k[..., :, None] * v1[..., None, :]
    read, states = fc.brute_recurrence(
        lambda t, S: decay[:, t, :, None, None] * S, writes, q / K**0.5, write_edits, state_edits
    )
    floor = torch.maximum(read[..., V].abs(), torch.exp(-m_all)) + c.eps
    h = la.multihead_norm(read[..., :V] / floor[..., None])
    y = la.out_proj(torch.sigmoid(o) * h)
    S = states[:, -1]
    return y, (S[..., :V], S[..., V], m[..., None])


@torch.no_grad()
def block_output_diffs(hf, model, toks) -> list[float]:
    """Per block, max |hook_resid_post - the reference block's output| (the reference's hidden
    states end with the final norm's output, so the last block's is read with a forward hook)."""
    outs: list = []
    handles = [
        b.register_forward_hook(lambda mod, args, out: outs.append(out[0]))
        for b in hf.backbone.blocks
    ]
    try:
        hf(toks, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    _, cache = model.run_with_cache(toks, names_filter=lambda n: n.endswith("resid_post"))
    return [
        (cache[f"blocks.{i}.hook_resid_post"] - o).abs().max().item() for i, o in enumerate(outs)
    ]


def test_logits_hidden_states_and_final_states_match(pair):
    hf, model = pair
    for T in (37, 7):  # longer than the chunk (chunkwise, then steps) and shorter (steps)
        assert T % hf.config.chunk_size
        toks = fc.tokens(VOCAB, 3, T)
        d = fc.parity(hf, model, toks, state_of)
        assert d["logits"] <= 1e-4, (T, d)
        assert max(d["resid_post"]) <= 1e-4, (T, d["resid_post"])
        assert max(d["state"]) <= 1e-5, (T, d["state"])
        blocks = block_output_diffs(hf, model, toks)
        assert len(blocks) == model.cfg.n_layers and max(blocks) <= 1e-4, (T, blocks)


@pytest.mark.parametrize("pair", ["single"], indirect=True)  # one config is enough here
def test_a_few_hundred_tokens_match(pair):
    hf, model = pair  # the stabilised state stays bounded: float32 keeps its precision
    d = fc.parity(hf, model, fc.tokens(VOCAB, 2, 300, seed=6), state_of)
    assert d["logits"] <= 1e-4 and max(d["state"]) <= 1e-5, d


def test_stabiliser_matches_the_reference_cache(pair):
    hf, model = pair
    toks = fc.tokens(VOCAB, 2, 37, seed=2)
    with torch.no_grad():
        cache = hf(toks, use_cache=True).cache
        _, state = model(toks, return_state=True)
    for layer in range(model.cfg.n_layers):
        m_ref = cache.rnn_state[layer][2][..., 0]
        assert (state.layers[layer]["m"] - m_ref).abs().max() <= 1e-5


def test_per_position_states_match_decode(pair):
    diffs = fc.decode_state_diffs(*pair, fc.tokens(VOCAB, 2, 12, seed=3), state_of)
    assert max(diffs) <= 1e-5, diffs


#: (batch, position, head): one position, and several (heads and rows differ; span > 16 too)
EDITS = {"one": [(0, 17, 1)], "several": [(1, 3, 0), (0, 17, 1), (0, 17, 0), (1, 36, 1)]}


@pytest.mark.parametrize("pair", ["single"], indirect=True)  # one config is enough here
@pytest.mark.parametrize("kind", ["write", "state"])
@pytest.mark.parametrize("where", list(EDITS))
def test_edits_propagate_like_brute_force(pair, kind, where):
    hf, model = pair
    layer = 0 if kind == "write" else model.cfg.n_layers - 1
    edits = fc.random_edits(model, EDITS[where], seed=layer)
    diff, earlier, effect = fc.propagation_diffs(
        hf, model, fc.tokens(VOCAB, 2, 40, seed=5), layer, brute_mlstm, False, kind, edits,
        attr="mlstm_layer", layers=lambda ref: ref.backbone.blocks,
    )  # fmt: skip
    assert diff <= 1e-4, diff
    assert earlier
    assert effect > 1e-5


def test_brute_force_matches_reference(pair):
    hf, model = pair
    toks = fc.tokens(VOCAB, 2, 20)
    layer = model.cfg.n_layers - 1
    with torch.no_grad():
        ref = hf.double()
        try:
            native = ref(toks).logits
            with fc.swapped(ref.backbone.blocks[layer], brute_mlstm, False, "mlstm_layer"):
                brute = ref(toks).logits
        finally:
            hf.float()
    # the reference returns float32 logits (`lm_head(...).float()`) even in float64
    assert (brute - native).abs().max() <= 1e-6


def test_padded_batch_equals_prompts_alone(pair):
    _, model = pair
    assert fc.padding_diff(model, VOCAB) <= 1e-5


@pytest.mark.parametrize("pair", ["fused"], indirect=True)  # one generate comparison
def test_greedy_generation_equals_transformers(pair):
    assert fc.generation_matches(*pair, VOCAB, 32)


@pytest.mark.parametrize("pair", ["single"], indirect=True)  # one config is enough here
def test_hooks_in_generation_match_run_with_hooks(pair):
    _, model = pair
    assert fc.hooked_generation_matches(model, VOCAB, model.cfg.n_layers - 1)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_save_pretrained_loads_and_round_trips(tmp_path, name):
    from hooked_recurrent.pretrained.xlstm import to_hf_state_dict

    hf = xlstm_hf(name, seed=4)
    hf.save_pretrained(tmp_path)
    model = HookedRecurrentModel.from_pretrained(str(tmp_path))
    toks = fc.tokens(VOCAB, 2, 23)
    with torch.no_grad():
        ref = hf(toks).logits
        assert (model(toks) - ref).abs().max() <= 1e-4
        back = xlstm_hf(name, seed=5)  # other weights, then ours converted back
        back.load_state_dict(to_hf_state_dict(model.state_dict(), model.cfg), strict=True)
        assert (back(toks).logits - ref).abs().max() <= 1e-6


@pytest.mark.parametrize("pair", ["single"], indirect=True)  # one config is enough here
def test_writesae_trains_and_evaluates(pair):
    _, model = pair
    fve, kls = fc.writesae_runs(model, VOCAB)
    assert fve == fve and kls
