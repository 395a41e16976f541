"""mkdocs hook: the hook reference is generated from the models' own `hook_dict` at build time.

Each shipped model (or, before any ships, a tiny Qwen3.5 built in memory) is run once on 5 tokens
with a recording hook on every hook point; the page lists every name with the shape it fired with,
so the reference cannot drift from the code.
"""

from __future__ import annotations

import re

MEANING = {
    "hook_embed": "token embedding",
    "hook_normalized": "output of the norm",
    "hook_scale": "the norm's divisor sqrt(mean(x^2) + eps) (LN: of the centred x), as in TL",
    "hook_resid_pre": "residual stream entering the block",
    "hook_resid_mid": "residual stream after the token mixer",
    "hook_resid_post": "residual stream leaving the block",
    "hook_attn_out": "token mixer output added to the residual",
    "hook_mlp_out": "MLP (channel mix) output added to the residual",
    "hook_pre": "MLP pre-activation",
    "hook_pre_linear": "MLP linear (up) branch",
    "hook_post": "MLP activation output",
    "hook_q": "read query (recurrent: q^ / C / r, per state head) or attention query",
    "hook_k": "write key (recurrent: k^ / B / updated k) or attention key",
    "hook_v": "write value (before the write strength) or attention value",
    "hook_beta": "Gated DeltaNet write strength beta",
    "hook_dt": "Mamba-2 step size dt (after softplus and clamp)",
    "hook_a": "RWKV-7 in-context learning rate a",
    "hook_kappa": "RWKV-7 removal key (normalised k * k_k)",
    "hook_decay": "multiplicative decay in (0, 1): alpha, exp(dt A), exp(w)",
    "hook_write": "the rank-1 write added to the state at t (edits propagate)",
    "hook_state": "the state S_t carried forward (edits propagate)",
    "hook_read": "o_t = S_t^T q_t before norms, gates, bonus and skip",
    "hook_gate": "output gate before its nonlinearity",
    "hook_out": "mixer output (after the output projection)",
    "hook_rot_q": "query after RoPE",
    "hook_rot_k": "key after RoPE",
    "hook_attn_scores": "attention logits (masked)",
    "hook_pattern": "attention probabilities",
    "hook_z": "per head, what the output projection W_O reads (attention layers: the weighted "
    "values, before the sigmoid gate); hook_out = sum_h z_h @ W_O[h]",
}


def _models():
    import torch

    from hooked_recurrent import HookedRecurrentModel, list_pretrained

    names = list_pretrained()
    if names:
        for n in names:
            yield n, HookedRecurrentModel.from_pretrained(n)
        return
    from hooked_recurrent.pretrained.qwen3_5 import Qwen35Config

    cfg = Qwen35Config(
        architecture="qwen3_5",
        n_layers=2,
        d_model=32,
        d_vocab=50,
        layer_types=["recurrent", "attention"],
        n_heads=4,
        d_k=8,
        d_v=12,
        d_mlp=48,
        n_key_heads=2,
        attn_n_heads=2,
        attn_n_kv_heads=1,
        attn_d_head=16,
        rotary_dim=8,
    )
    torch.manual_seed(0)
    yield "tiny Qwen3.5 (in memory)", HookedRecurrentModel(cfg)


def _table(name, model) -> str:
    import torch

    shapes = {}

    def record(x, hook):
        shapes[hook.name] = tuple(x.shape)

    with torch.no_grad():
        model.run_with_hooks(
            torch.zeros(1, 5, dtype=torch.long), fwd_hooks=[(lambda n: True, record)]
        )
    c = model.cfg
    lines = [
        f"### {name}",
        "",
        f"`architecture={c.architecture}`, `n_layers={c.n_layers}`, `d_model={c.d_model}`, "
        f"`d_vocab={c.d_vocab}`, `n_heads={c.n_heads}`, `d_k={c.d_k}`, `d_v={c.d_v}`, "
        f"layer types `{c.layer_types}`. Shapes below are for one sequence of 5 tokens.",
        "",
        "| hook | shape | meaning |",
        "|---|---|---|",
    ]
    seen_layer_kind = set()
    for hook_name in model.hook_dict:
        m = re.match(r"blocks\.(\d+)\.(.*)", hook_name)
        if m:
            layer = int(m.group(1))
            kind = c.layer_types[layer]
            if (kind, m.group(2)) in seen_layer_kind:
                continue
            seen_layer_kind.add((kind, m.group(2)))
            shown = f"blocks.{{l}}.{m.group(2)}" + (
                " (attention layers)" if kind == "attention" else ""
            )
        else:
            shown = hook_name
        last = hook_name.rsplit(".", 1)[-1]
        lines.append(
            f"| `{shown}` | `{list(shapes.get(hook_name, ()))}` | {MEANING.get(last, '')} |"
        )
    fired = len(shapes)
    lines += ["", f"All {len(model.hook_dict)} hook points fired in this run ({fired} recorded)."]
    return "\n".join(lines)


def on_page_markdown(markdown, page, config, files):
    if "{{ hook_reference }}" not in markdown:
        return markdown
    tables = [_table(name, model) for name, model in _models()]
    return markdown.replace("{{ hook_reference }}", "\n\n".join(tables))
