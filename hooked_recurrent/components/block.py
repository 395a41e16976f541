"""A pre-norm residual block: token mixer at `attn`, optional MLP at `mlp`."""

from __future__ import annotations

from jaxtyping import Float
from torch import Tensor, nn

from hooked_recurrent.hook_points import RecurrentHookPoint
from hooked_recurrent.state import RunContext


class Block(nn.Module):
    """resid_mid = resid_pre + attn(ln1(resid_pre)); resid_post = resid_mid + mlp(ln2(resid_mid)).

    Blocks without an MLP (Mamba-2) have no `ln2`, `mlp`, `hook_resid_mid` or `hook_mlp_out`;
    blocks without a token mixer (Nemotron-H's MLP and MoE blocks: `attn=None`) have no `ln1`,
    `attn`, `hook_attn_out` or `hook_resid_mid`: resid_post = resid_pre + mlp(ln2(resid_pre)).
    """

    #: read by TransformerLens's logit lens: `hook_resid_post` is the one stream the model unembeds
    hook_out_is_single_residual_stream = True

    def __init__(
        self,
        layer: int,
        ln1: nn.Module | None,
        attn: nn.Module | None,
        ln2: nn.Module | None = None,
        mlp: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.layer = layer
        if attn is None and mlp is None:
            raise ValueError(f"block {layer} needs a token mixer (attn), an MLP, or both")
        self.ln1, self.attn = ln1, attn
        self.hook_resid_pre = RecurrentHookPoint()  # [batch, pos, d_model]
        if attn is not None:
            self.hook_attn_out = RecurrentHookPoint()  # [batch, pos, d_model]
        self.hook_resid_post = RecurrentHookPoint()  # [batch, pos, d_model]
        if mlp is not None:
            self.ln2, self.mlp = ln2, mlp
            if attn is not None:
                self.hook_resid_mid = RecurrentHookPoint()  # [batch, pos, d_model]
            self.hook_mlp_out = RecurrentHookPoint()  # [batch, pos, d_model]
        else:
            self.mlp = None

    def forward(self, resid: Float[Tensor, "batch pos d_model"], run: RunContext) -> Tensor:
        """One pre-norm block: `x + mixer(norm(x))`, then `+ mlp(norm(.))`; returns `[batch, pos,
        d_model]`.
        """
        resid = self.hook_resid_pre(resid)
        if self.attn is not None:
            resid = resid + self.hook_attn_out(self.attn(self.ln1(resid), run))
        if self.mlp is not None:
            if self.attn is not None:
                resid = self.hook_resid_mid(resid)
            resid = resid + self.hook_mlp_out(self.mlp(self.ln2(resid), run))
        return self.hook_resid_post(resid)


class ParallelBlock(nn.Module):
    """Falcon-H1's block: the Mamba-2 mixer and softmax attention read the same normed residual,
    in parallel, and their outputs are summed; then the MLP.

        n = ln1(resid_pre)
        resid_mid = resid_pre + attn(n) + attn2(n)        hook_attn_out, hook_attn2_out
        resid_post = resid_mid + mlp(ln2(resid_mid))      hook_mlp_out

    `attn` is the recurrent (Mamba-2) mixer, so every state hook keeps its name
    (`blocks.{l}.attn.hook_state`); `attn2` is the attention, with TransformerLens's attention
    hooks (`blocks.{l}.attn2.hook_pattern`, ...). The family's scalar multipliers are folded into
    the projections when the weights are converted.
    """

    hook_out_is_single_residual_stream = True

    def __init__(
        self, layer: int, ln1: nn.Module, attn: nn.Module, attn2: nn.Module, ln2: nn.Module,
        mlp: nn.Module,
    ) -> None:  # fmt: skip
        super().__init__()
        self.layer = layer
        self.ln1, self.attn, self.attn2, self.ln2, self.mlp = ln1, attn, attn2, ln2, mlp
        self.hook_resid_pre = RecurrentHookPoint()  # [batch, pos, d_model]
        self.hook_attn_out = RecurrentHookPoint()  # [batch, pos, d_model]
        self.hook_attn2_out = RecurrentHookPoint()  # [batch, pos, d_model]
        self.hook_resid_mid = RecurrentHookPoint()  # [batch, pos, d_model]
        self.hook_mlp_out = RecurrentHookPoint()  # [batch, pos, d_model]
        self.hook_resid_post = RecurrentHookPoint()  # [batch, pos, d_model]

    def forward(self, resid: Float[Tensor, "batch pos d_model"], run: RunContext) -> Tensor:
        """One parallel block (see the class docstring); returns `[batch, pos, d_model]`."""
        resid = self.hook_resid_pre(resid)
        n = self.ln1(resid)
        mixed = self.hook_attn_out(self.attn(n, run)) + self.hook_attn2_out(self.attn2(n, run))
        resid = self.hook_resid_mid(resid + mixed)
        resid = resid + self.hook_mlp_out(self.mlp(self.ln2(resid), run))
        return self.hook_resid_post(resid)
