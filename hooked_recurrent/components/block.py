"""A pre-norm residual block: token mixer at `attn`, optional MLP at `mlp`; Falcon-H1's parallel
block; Zamba2's block and the shared transformer it runs at its hybrid layers."""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor, nn

from hooked_recurrent.components.norms import RMSNorm
from hooked_recurrent.hook_points import RecurrentHookPoint
from hooked_recurrent.state import RunContext


class Block(nn.Module):
    """resid_mid = resid_pre + attn(ln1(resid_pre)); resid_post = resid_mid + mlp(ln2(resid_mid)).

    Blocks without an MLP (Mamba-2) have no `ln2`, `mlp`, `hook_resid_mid` or `hook_mlp_out`;
    blocks without a token mixer (Nemotron-H's MLP and MoE blocks: `attn=None`) have no `ln1`,
    `attn`, `hook_attn_out` or `hook_resid_mid`: resid_post = resid_pre + mlp(ln2(resid_pre)).

    Post-norm blocks (OLMo hybrid's attention layers) pass `ln1=None`, `ln2=None` and norm the
    outputs instead, with TransformerLens's Gemma-2 names: resid_mid = resid_pre +
    ln1_post(attn(resid_pre)), resid_post = resid_mid + ln2_post(mlp(resid_mid)); `hook_attn_out`
    and `hook_mlp_out` are after those norms.

    With `scales` = (a_attn, b_attn, a_mlp, b_mlp) (MiniMax) the residual carried past each
    sub-layer is its *normalised* input, scaled: resid_mid = a_attn ln1(resid_pre) + b_attn
    attn(ln1(resid_pre)), resid_post = a_mlp ln2(resid_mid) + b_mlp mlp(ln2(resid_mid));
    `hook_attn_out` / `hook_mlp_out` are the sub-layer outputs before their b factor.
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
        ln1_post: nn.Module | None = None,
        ln2_post: nn.Module | None = None,
        scales: tuple[float, float, float, float] | None = None,
    ) -> None:
        super().__init__()
        self.layer = layer
        if attn is None and mlp is None:
            raise ValueError(f"block {layer} needs a token mixer (attn), an MLP, or both")
        if scales is not None and (attn is None or mlp is None):
            raise ValueError(f"block {layer}: scales need both a token mixer and an MLP")
        self.attn = attn
        self.ln1 = None if attn is None else (nn.Identity() if ln1 is None else ln1)
        self.ln1_post, self.ln2_post, self.scales = ln1_post, ln2_post, scales
        self.hook_resid_pre = RecurrentHookPoint()  # [batch, pos, d_model]
        if attn is not None:
            self.hook_attn_out = RecurrentHookPoint()  # [batch, pos, d_model]
        self.hook_resid_post = RecurrentHookPoint()  # [batch, pos, d_model]
        if mlp is not None:
            self.ln2, self.mlp = (nn.Identity() if ln2 is None else ln2), mlp
            if attn is not None:
                self.hook_resid_mid = RecurrentHookPoint()  # [batch, pos, d_model]
            self.hook_mlp_out = RecurrentHookPoint()  # [batch, pos, d_model]
        else:
            self.mlp = None

    @classmethod
    def rms_norm(
        cls,
        layer: int,
        d_model: int,
        eps: float,
        attn: nn.Module,
        mlp: nn.Module,
        scales: tuple[float, float, float, float] | None = None,
    ) -> Block:
        """The pre-norm block with an `RMSNorm(d_model, eps)` (weight applied as is) before the
        mixer and another before the MLP, as most families build it."""
        return cls(layer, RMSNorm(d_model, eps), attn, RMSNorm(d_model, eps), mlp, scales=scales)

    def forward(self, resid: Float[Tensor, "batch pos d_model"], run: RunContext) -> Tensor:
        """One block: `x + mixer(norm(x))`, then `+ mlp(norm(.))` (or the post-norm or scaled
        forms above); returns `[batch, pos, d_model]`."""
        resid = self.hook_resid_pre(resid)
        if self.scales is not None:
            a1, b1, a2, b2 = self.scales
            h = self.ln1(resid)
            resid = self.hook_resid_mid(a1 * h + b1 * self.hook_attn_out(self.attn(h, run)))
            h = self.ln2(resid)
            return self.hook_resid_post(a2 * h + b2 * self.hook_mlp_out(self.mlp(h, run)))
        if self.attn is not None:
            out = self.attn(self.ln1(resid), run)
            if self.ln1_post is not None:
                out = self.ln1_post(out)
            resid = resid + self.hook_attn_out(out)
        if self.mlp is not None:
            if self.attn is not None:
                resid = self.hook_resid_mid(resid)
            out = self.mlp(self.ln2(resid), run)
            if self.ln2_post is not None:
                out = self.ln2_post(out)
            resid = resid + self.hook_mlp_out(out)
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


class SharedTransformer(nn.Module):
    """Zamba2's shared transformer block, as one layer runs it (its weights are copies of the
    shared block's, with that layer's adapters): attention then MLP, with no residual, on the
    concatenation of the residual stream and the token embeddings:

        x = concat(resid, embed)                          hook_in [batch, pos, 2 d_model]
        a = attn(ln1(x))                                  hook_attn_out [batch, pos, d_model]
        out = mlp(ln2(a))                                 hook_mlp_out [batch, pos, d_model]
    """

    def __init__(self, ln1: nn.Module, attn: nn.Module, ln2: nn.Module, mlp: nn.Module) -> None:
        super().__init__()
        self.ln1, self.attn, self.ln2, self.mlp = ln1, attn, ln2, mlp
        self.hook_in = RecurrentHookPoint()  # [batch, pos, 2 d_model]
        self.hook_attn_out = RecurrentHookPoint()  # [batch, pos, d_model]
        self.hook_mlp_out = RecurrentHookPoint()  # [batch, pos, d_model]

    def forward(
        self,
        resid: Float[Tensor, "batch pos d_model"],
        embed: Float[Tensor, "batch pos d_model"],
        run: RunContext,
    ) -> Tensor:
        """The block's output `[batch, pos, d_model]` (see the class docstring)."""
        x = self.hook_in(torch.cat((resid, embed.to(resid.dtype)), dim=-1))
        a = self.hook_attn_out(self.attn(self.ln1(x), run))
        return self.hook_mlp_out(self.mlp(self.ln2(a), run))


class Zamba2Block(nn.Module):
    """A Zamba2 layer: a Mamba-2 mixer at `attn`; at the hybrid layers the shared transformer
    (`shared`, a `SharedTransformer`) runs first and its output, through the layer's own
    `linear`, is added to the mixer's input (not to the residual):

        s = linear(shared(resid_pre, embed))              hook_shared_out (hybrid layers only)
        resid_post = resid_pre + attn(ln1(resid_pre + s)) hook_attn_out

    `embed` is the token embedding (`hook_embed`), which the model hands to every block in
    `run.shared["embed"]`.
    """

    hook_out_is_single_residual_stream = True

    def __init__(
        self,
        layer: int,
        ln1: nn.Module,
        attn: nn.Module,
        shared: SharedTransformer | None = None,
        linear: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if (shared is None) != (linear is None):
            raise ValueError(f"block {layer}: the shared transformer needs its linear, and back")
        self.layer = layer
        self.ln1, self.attn, self.shared, self.linear = ln1, attn, shared, linear
        self.hook_resid_pre = RecurrentHookPoint()  # [batch, pos, d_model]
        if shared is not None:
            self.hook_shared_out = RecurrentHookPoint()  # [batch, pos, d_model]
        self.hook_attn_out = RecurrentHookPoint()  # [batch, pos, d_model]
        self.hook_resid_post = RecurrentHookPoint()  # [batch, pos, d_model]

    def forward(self, resid: Float[Tensor, "batch pos d_model"], run: RunContext) -> Tensor:
        """One Zamba2 layer (see the class docstring); returns `[batch, pos, d_model]`."""
        resid = self.hook_resid_pre(resid)
        x = resid
        if self.shared is not None and self.linear is not None:
            if "embed" not in run.shared:
                raise ValueError(
                    f"block {self.layer} reads the token embeddings, which this run does not "
                    "have (start_at_layer > 0?)"
                )
            s = self.linear(self.shared(resid, run.shared["embed"], run))
            x = resid + self.hook_shared_out(s)
        out = self.hook_attn_out(self.attn(self.ln1(x), run))
        return self.hook_resid_post(resid + out)
