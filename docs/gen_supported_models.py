"""mkdocs hook: the "Supported models" page is generated from the family registry at build time.

Every registered `Family` (`hooked_recurrent.pretrained`) gives one row: its name, the
`model_type`s it loads, the real checkpoints, the layer layout, and what TransformerLens 4.3's
TransformerBridge offers for the same model.
"""

from __future__ import annotations


def _rows() -> str:
    from hooked_recurrent.pretrained import _FAMILIES, FAMILY_MODULES, _load_families

    _load_families()
    lines = [
        "| family | `model_type` | checkpoints | layout | TransformerLens 4.3 TransformerBridge |",
        "|---|---|---|---|---|",
    ]
    for fam in _FAMILIES.values():
        types = ", ".join(f"`{t}`" for t in fam.model_types)
        ckpts = "<br>".join(fam.checkpoints) or "(none listed)"
        lines.append(
            f"| {fam.display} | {types} | {ckpts} | {fam.layout or ''} | {fam.bridge or ''} |"
        )
    lines += ["", f"{len(_FAMILIES)} families, from {len(FAMILY_MODULES)} modules."]
    return "\n".join(lines)


def on_page_markdown(markdown, page, config, files):
    if "{{ supported_models }}" not in markdown:
        return markdown
    return markdown.replace("{{ supported_models }}", _rows())
