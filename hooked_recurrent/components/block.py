"""A pre-norm residual block: token mixer at `attn`, optional MLP at `mlp`."""

from __future__ import annotations

from jaxtyping import Float
from torch import Tensor, nn

from hooked_recurrent.hook_points import RecurrentHookPoint
from hooked_recurrent.state import RunContext


class Block(nn.Module):
    """resid_mid = resid_pre + attn(ln1(resid_pre)); resid_post = resid_mid + mlp(ln2(resid_mid)).

    Blocks without an MLP (Mamba-2) have no `ln2`, `mlp`, `hook_resid_mid` or `hook_mlp_out`.
    Post-norm blocks (OLMo hybrid's attention layers) pass `ln1=None`, `ln2=None` and norm the
    outputs instead, with TransformerLens's Gemma-2 names: resid_mid = resid_pre +
    ln1_post(attn(resid_pre)), resid_post = resid_mid + ln2_post(mlp(resid_mid)); `hook_attn_out`
    and `hook_mlp_out` are after those norms.
    """

    #: read by TransformerLens's logit lens: `hook_resid_post` is the one stream the model unembeds
    hook_out_is_single_residual_stream = True

    def __init__(
        self,
        layer: int,
        ln1: nn.Module | None,
        attn: nn.Module,
        ln2: nn.Module | None = None,
        mlp: nn.Module | None = None,
        ln1_post: nn.Module | None = None,
        ln2_post: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.layer = layer
        self.ln1 = nn.Identity() if ln1 is None else ln1
        self.attn = attn
        self.ln1_post = ln1_post
        self.ln2_post = ln2_post
        self.hook_resid_pre = RecurrentHookPoint()
        self.hook_attn_out = RecurrentHookPoint()
        self.hook_resid_post = RecurrentHookPoint()
        if mlp is not None:
            self.ln2, self.mlp = (nn.Identity() if ln2 is None else ln2), mlp
            self.hook_resid_mid = RecurrentHookPoint()
            self.hook_mlp_out = RecurrentHookPoint()
        else:
            self.mlp = None

    def forward(self, resid: Float[Tensor, "batch pos d_model"], run: RunContext) -> Tensor:
        """One pre-norm block: `x + mixer(norm(x))`, then `+ mlp(norm(.))`; returns `[batch, pos,
        d_model]`.
        """
        resid = self.hook_resid_pre(resid)
        out = self.attn(self.ln1(resid), run)
        if self.ln1_post is not None:
            out = self.ln1_post(out)
        resid = resid + self.hook_attn_out(out)
        if self.mlp is not None:
            resid = self.hook_resid_mid(resid)
            out = self.mlp(self.ln2(resid), run)
            if self.ln2_post is not None:
                out = self.ln2_post(out)
            resid = resid + self.hook_mlp_out(out)
        return self.hook_resid_post(resid)
