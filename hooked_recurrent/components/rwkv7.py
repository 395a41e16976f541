"""RWKV-7 "Goose": time mix (at `blocks.{l}.attn`) and channel mix (at `blocks.{l}.mlp`).

Per token t, with h_t the attn-normed input and h_{-1} the carried `shift` (zeros at the start):

    x_c = h_t + (h_{t-1} - h_t) * mu_c                  c in {r, w, k, v, a, g}   (static lerps)
    r = W_r x_r,  k~ = W_k x_k,  v = W_v x_v
    w = -exp(-1/2) sigmoid(w0 + tanh(x_w w1) w2)       log-decay per key channel, in (-0.607, 0)
    a = sigmoid(a0 + (x_a a1) a2)                      in-context learning rate, per key channel
    g = sigmoid(x_g g1) g2                             output gate
    v = v + (v_first - v) sigmoid(v0 + (x_v v1) v2)    value residual (layer 0 sets v_first = v)
    kappa = normalize(k~ * k_k)  per head               removal key
    k = k~ * (1 + (a - 1) * k_a)                       write key
    S_t = (diag(exp w_t) - (a_t * kappa_t) kappa_t^T) S_{t-1} + k_t v_t^T     S in R^{d_k x d_v}
    o_t = S_t^T r_t                                    no 1/sqrt(d_k) scale
    y = W_out( (GroupNorm_heads(o) + ((r * k * r_k).sum per head) v) * g )

GroupNorm uses eps = head_dim * norm_eps (64e-5 at head size 64, BlinkDL's constant). The state is
kept in the shared layout [d_k, d_v] (key side first); BlinkDL and the `rwkv` package store its
transpose [d_v, d_k].

Channel mix: y = W_out relu(W_in (h_t + (h_{t-1} - h_t) * x_k))^2, with its own carried shift.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from hooked_recurrent.hook_points import RecurrentHookPoint
from hooked_recurrent.mixer import RecurrentMixer
from hooked_recurrent.padding import masked_token_shift
from hooked_recurrent.recurrence import Propagation, Transition, scan
from hooked_recurrent.state import RunContext

__all__ = [
    "TimeMix",
    "ChannelMix",
    "DplrMixer",
    "chunk_dplr_rule",
    "token_shift",
    "kappa_normalize",
]

logger = logging.getLogger(__name__)

#: w = -DECAY_SCALE * sigmoid(...): e^{-1/2}, the bound of RWKV-7's log-decay (fla's constant; the
#: rwkv package rounds it to 0.606531, a 5e-8 relative difference)
DECAY_SCALE = math.exp(-0.5)
#: chunks whose cumulative log-decay goes below this use the step-by-step scan instead (the chunked
#: form multiplies by exp(-cumulative log-decay), which must stay finite in float32)
MAX_CHUNK_LOG_DECAY = 60.0


def token_shift(
    x: Float[Tensor, "batch pos d"], prev: Float[Tensor, "batch d"] | None
) -> Float[Tensor, "batch pos d"]:
    """h_{t-1} for every t: the sequence shifted right by one, starting from `prev` (or zeros)."""
    first = x.new_zeros(x.shape[0], 1, x.shape[2]) if prev is None else prev[:, None].to(x.dtype)
    return torch.cat((first, x[:, :-1]), dim=1)


def kappa_normalize(x: Float[Tensor, "... d"], fused: bool) -> Float[Tensor, "... d"]:
    """L2 normalisation of the removal key, as the checkpoint was trained.

    `fused=False` (BlinkDL, the `rwkv` package, fla with fuse_norm=False): x / max(|x|, 1e-12).
    `fused=True` (fla's fused l2_norm): x / sqrt(|x|^2 + 1e-6).
    """
    if fused:
        return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + 1e-6)
    return F.normalize(x, p=2.0, dim=-1)


def chunk_dplr_rule(
    q: Float[Tensor, "batch pos head d_k"],
    log_decay: Float[Tensor, "batch pos head d_k"],
    k: Float[Tensor, "batch pos head d_k"] | None,
    v: Float[Tensor, "batch pos head d_v"] | None,
    erase_a: Float[Tensor, "batch pos head d_k"],
    erase_b: Float[Tensor, "batch pos head d_k"],
    S0: Float[Tensor, "batch head d_k d_v"] | None = None,
    chunk_size: int = 16,
    writes: Float[Tensor, "batch pos head d_k d_v"] | None = None,
    keep_states: bool = False,
) -> tuple[
    Float[Tensor, "batch pos head d_v"],
    Float[Tensor, "batch head d_k d_v"],
    Float[Tensor, "batch pos head d_k d_v"] | None,
]:
    """S_t = diag(exp w_t) S_{t-1} + a_t (b_t^T S_{t-1}) + k_t v_t^T, o_t = S_t^T q_t, in chunks.

    Diagonal-plus-low-rank (WY) form. Within a chunk starting from state S0, let
    G_i = sum_{j<=i} w_j (per channel, from the chunk start), and the removal reads
    u_i = S_{i-1}^T b_i. With b^_i = b_i e^{G_{i-1}}, a'_j = a_j e^{-G_j}, k'_j = k_j e^{-G_j},
    q^_i = q_i e^{G_i}:

        S_i = e^{G_i} * (S0 + sum_{j<=i} a'_j u_j^T + k'_j v_j^T)
        (I - L) U = B^ S0 + tril_{-1}(B^ K'^T) V,            L = tril_{-1}(B^ A'^T)
        O = Q^ S0 + tril(Q^ A'^T) U + tril(Q^ K'^T) V

    so U = W S0 + U0 with W, U0 from one unit-triangular solve, O = P S0 + O0 and the state after
    the chunk is M S0 + N; only `S <- M S + N` runs sequentially across chunks. The factors
    e^{G} e^{-G} are within exp(chunk_size * 0.607) (~1.6e4 at 16) for RWKV-7's own decays; chunks
    with stronger (edited) decays fall back to the step-by-step `scan`. All in float32.

    With dense `writes` W_j instead of k_j v_j^T (k and v then unused; this is how edits of the
    write or the state are propagated), the write terms become prefix sums of W'_j = e^{-G_j} W_j:
    sum_{j<i} W'_j^T b^_i in the solve, sum_{j<=i} W'_j^T q^_i in O, sum_j e^{G_C - G_j} W_j in N.

    With `keep_states`, also every S_i = e^{G_i} * (S0 + cumsum_j (a'_j u_j^T + k'_j v_j^T)).

    Returns:
        (o [batch, pos, head, d_v], final state [batch, head, d_k, d_v], the states
        [batch, pos, head, d_k, d_v] or None), as `scan`.
    """
    (B, T, H, K), V = q.shape, (v if writes is None else writes).shape[-1]
    C = max(1, min(chunk_size, T))
    n = math.ceil(T / C)
    pad = n * C - T

    def prep(x: Tensor) -> Tensor:
        x = x.float().transpose(1, 2)  # [B, H, T, ...]
        if pad:  # zero log-decay, erase and write: an identity step
            x = F.pad(x, (0, 0) * (x.dim() - 3) + (0, pad))
        return x.reshape(B, H, n, C, *x.shape[3:])

    G = prep(log_decay).cumsum(-2)  # inclusive cumulative log-decay, [B, H, n, C, K]
    last = G[..., -1:, :]
    if not float(last.detach().min()) >= -MAX_CHUNK_LOG_DECAY:  # also NaN and -inf
        logger.debug("decays too strong for the chunked RWKV-7 path; using the step-by-step scan")
        tr = Transition(log_decay.float().exp(), erase_a.float(), erase_b.float())
        W = None if writes is None else writes.float()
        return scan(tr, q, k, v, S0, writes=W, keep_states=keep_states)
    q, w, ea, eb = (prep(x) for x in (q, log_decay, erase_a, erase_b))
    inv = (-G).exp()
    q_hat = q * G.exp()
    b_hat = eb * (G - w).exp()
    a_chk = ea * inv
    to_end = (last - G).exp()
    if writes is None:
        k, v = prep(k), prep(v)
    Wd = None if writes is None else prep(writes)  # [B, H, n, C, K, V]
    write_u, write_o, write_end, Wp = _write_terms(k, v, Wd, inv, q_hat, b_hat, to_end)
    W, U0, P, O0, M, N = _wy_solve(
        q_hat, b_hat, a_chk, ea * to_end, last, write_u, write_o, write_end
    )
    starts, S = _chunk_starts(M, N, q.new_zeros(B, H, K, V) if S0 is None else S0.float())
    o = (O0 + P @ starts).reshape(B, H, n * C, V)[:, :, :T].transpose(1, 2)
    if not keep_states:
        return o, S, None
    U = W @ starts + U0  # the removal reads u_i, [B, H, n, C, V]
    states = _chunk_states(G, ea, starts, U, k, v, Wp)
    return o, S, states.reshape(B, H, n * C, K, V)[:, :, :T].transpose(1, 2)


def _wy_solve(
    q_hat: Tensor,
    b_hat: Tensor,
    a_chk: Tensor,
    a_to_end: Tensor,
    last: Tensor,
    write_u: Tensor,
    write_o: Tensor,
    write_end: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """`chunk_dplr_rule`'s unit-triangular solve in every chunk: U = W S0 + U0, O = P S0 + O0 and
    the chunk's end state M S0 + N; returns (W, U0, P, O0, M, N)."""
    K = q_hat.shape[-1]
    L = torch.tril(b_hat @ a_chk.transpose(-1, -2), -1)
    eye = torch.eye(L.shape[-1], dtype=L.dtype, device=L.device)
    X = torch.linalg.solve_triangular(
        eye - L, torch.cat((b_hat, write_u), -1), upper=False, unitriangular=True
    )
    W, U0 = X[..., :K], X[..., K:]
    Qa = torch.tril(q_hat @ a_chk.transpose(-1, -2))
    P = q_hat + Qa @ W  # [B, H, n, C, K]
    O0 = Qa @ U0 + write_o  # [B, H, n, C, V]
    a_end = a_to_end.transpose(-1, -2)  # [B, H, n, K, C]
    M = a_end @ W + torch.diag_embed(last.exp()[..., 0, :])  # [B, H, n, K, K]
    N = a_end @ U0 + write_end  # [B, H, n, K, V]
    return W, U0, P, O0, M, N


def _write_terms(
    k: Tensor | None,
    v: Tensor | None,
    Wd: Tensor | None,
    inv: Tensor,
    q_hat: Tensor,
    b_hat: Tensor,
    to_end: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """`chunk_dplr_rule`'s write terms, from k_j v_j^T or from dense writes `Wd` = W_j
    `[B, H, n, C, K, V]`: (the solve's sum_{j<i} W'_j^T b^_i, the reads' sum_{j<=i} W'_j^T q^_i,
    the chunk end's sum_j e^{G_C - G_j} W_j, and W'_j = e^{-G_j} W_j for dense writes or None)."""
    if Wd is None:
        k_chk = k * inv
        write_u = torch.tril(b_hat @ k_chk.transpose(-1, -2), -1) @ v  # [B, H, n, C, V]
        write_o = torch.tril(q_hat @ k_chk.transpose(-1, -2)) @ v
        write_end = (k * to_end).transpose(-1, -2) @ v  # [B, H, n, K, V]
        return write_u, write_o, write_end, None
    Wp = Wd * inv[..., None]  # rows scaled
    incl = Wp.cumsum(-3)
    write_o = (q_hat[..., None, :] @ incl)[..., 0, :]
    write_u = (b_hat[..., None, :] @ (incl - Wp))[..., 0, :]
    write_end = (to_end[..., None] * Wd).sum(-3)
    return write_u, write_o, write_end, Wp


def _chunk_starts(M: Tensor, N: Tensor, S: Tensor) -> tuple[Tensor, Tensor]:
    """S <- M_c S + N_c across the chunks, from S `[B, H, K, V]`: (the state at every chunk start
    `[B, H, n, K, V]`, the final state)."""
    B, H, n, K, V = N.shape
    starts = []
    for c in range(n):
        starts.append(S)
        S = torch.baddbmm(
            N[:, :, c].reshape(B * H, K, V), M[:, :, c].reshape(B * H, K, K), S.reshape(B * H, K, V)
        ).view(B, H, K, V)
    return torch.stack(starts, 2), S


def _chunk_states(
    G: Tensor,
    ea: Tensor,
    starts: Tensor,
    U: Tensor,
    k: Tensor | None,
    v: Tensor | None,
    Wp: Tensor | None,
) -> Tensor:
    """Every state of `chunk_dplr_rule`'s chunks `[B, H, n, C, K, V]`:
    S_i = e^{G_i} S0 + sum_{j<=i} e^{G_i - G_j} (a_j u_j^T + k_j v_j^T), one batched product over
    j of the masked, decayed (a_j, k_j) with (u_j, v_j); with dense writes (`Wp` = e^{-G_j} W_j)
    the write term is e^{G_i} cumsum_j W'_j."""
    C = G.shape[-2]
    ratio = (G[..., :, None, :] - G[..., None, :, :]).exp()  # [B, H, n, C_i, C_j, K]
    ratio = ratio * torch.ones(C, C, device=G.device).tril()[..., None]
    if Wp is None:
        Z = torch.cat((ratio * ea[..., None, :, :], ratio * k[..., None, :, :]), -2)
        inside = torch.einsum("...ijk,...jv->...ikv", Z, torch.cat((U, v), -2))
    else:
        inside = torch.einsum("...ijk,...jv->...ikv", ratio * ea[..., None, :, :], U)
        inside = inside + G.exp()[..., None] * Wp.cumsum(-3)
    return G.exp()[..., None] * starts[:, :, :, None] + inside


class DplrMixer(RecurrentMixer):
    """A recurrent mixer whose transition is a per-key-channel decay plus a rank-1 removal
    (RWKV-7, Kimi Delta Attention): its states and edit responses run on `chunk_dplr_rule`.

    Subclasses set `chunk_size`.
    """

    chunk_size: int = 16

    def dense_propagation(
        self,
        transition: Transition,
        q: Float[Tensor, "batch pos head d_k"],
        delta: Float[Tensor, "batch pos head d_k d_v"],
    ) -> tuple[Float[Tensor, "batch pos head d_v"], Float[Tensor, "batch head d_k d_v"]]:
        """E_t = A_t(E_{t-1}) + delta_t, dO_t = E_t^T q_t, by `chunk_dplr_rule` with dense writes.

        Only the (batch, head) pairs with an edit run, from the first edited position on; the
        outputs before it are exactly zero.
        """
        B, T, H, K, V = delta.shape
        d_o, E_T = delta.new_zeros(B, T, H, V), delta.new_zeros(B, H, K, V)
        flat = delta.flatten(3)
        touched = (flat.amax(-1) != 0) | (flat.amin(-1) != 0)  # [B, T, H], without a bool copy
        first = touched.any(-1).any(0).nonzero()
        if len(first) == 0:
            return d_o, E_T
        t0 = int(first[0])
        bi, hi = touched.any(1).nonzero(as_tuple=True)

        def pick(x: Tensor) -> Tensor:
            return x[bi, t0:, hi].unsqueeze(2)  # [pairs, T - t0, 1, ...]

        o, E, _ = chunk_dplr_rule(
            pick(q),
            pick(transition.decay).log(),
            None,
            None,
            pick(transition.erase_a),
            pick(transition.erase_b),
            None,
            self.chunk_size,
            writes=pick(delta),
        )
        d_o[bi, t0:, hi] = o[:, :, 0]
        E_T[bi, hi] = E[:, 0]
        return d_o, E_T

    def state_trajectory(
        self,
        transition: Transition,
        q: Float[Tensor, "batch pos head d_k"],
        write_k: Float[Tensor, "batch pos head d_k"] | None,
        write_v: Float[Tensor, "batch pos head d_v"] | None,
        S0: Float[Tensor, "batch head d_k d_v"] | None,
        writes: Float[Tensor, "batch pos head d_k d_v"] | None = None,
    ) -> Float[Tensor, "batch pos head d_k d_v"]:
        """S_t at every position, by `chunk_dplr_rule(keep_states=True)`."""
        return chunk_dplr_rule(
            q,
            transition.decay.log(),
            write_k,
            write_v,
            transition.erase_a,
            transition.erase_b,
            S0,
            self.chunk_size,
            writes=writes,
            keep_states=True,
        )[2]


class TimeMix(DplrMixer):
    """RWKV-7 time mix, the token mixer at `blocks.{l}.attn` (equations in the module docstring).

    Hooks (per head, float32): `hook_q` (r), `hook_k` (k after its a-update), `hook_a` (a),
    `hook_kappa` (the removal key, normalised) `[batch, pos, head, d_k]`; `hook_decay` (exp(w),
    per key channel) `[batch, pos, head, d_k]`; `hook_v` (v after the value residual)
    `[batch, pos, head, d_v]`; `hook_write` (k v^T) and `hook_state` (S_t)
    `[batch, pos, head, d_k, d_v]`; `hook_read` (S_t^T r_t, before GroupNorm and bonus)
    `[batch, pos, head, d_v]`; `hook_gate` (g) `[batch, pos, head, d_v]`; `hook_z` (what the
    output projection reads: GroupNorm, bonus and gate applied; TransformerLens's z)
    `[batch, pos, head, d_v]`; `hook_out` `[batch, pos, d_model]`.

    `hook_a` fires before the key update, so an edit of a changes both the write key k and the
    removal term. In layer 0 the (possibly edited) `hook_v` is the v_first of later layers. Edits of
    `hook_k`, `hook_v`, `hook_a`, `hook_kappa`, `hook_decay`, `hook_write` and `hook_state` reach
    the later tokens of the layer.
    """

    write_strength_hook = None

    def __init__(
        self,
        layer: int,
        d_model: int,
        n_heads: int,
        d_head: int,
        d_decay_lora: int,
        d_a_lora: int,
        d_v_lora: int,
        d_gate_lora: int,
        norm_eps: float = 1e-5,
        fuse_norm: bool = False,
        chunk_size: int = 16,
    ) -> None:
        super().__init__()
        self.layer, self.n_heads, self.d_head = layer, n_heads, d_head
        self.fuse_norm, self.chunk_size = fuse_norm, chunk_size
        self.group_norm_eps = d_head * norm_eps
        C = d_model

        def vec() -> nn.Parameter:
            return nn.Parameter(torch.zeros(C))

        self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g = (vec() for _ in range(6))
        self.w0, self.w1 = vec(), nn.Parameter(torch.zeros(C, d_decay_lora))
        self.w2 = nn.Parameter(torch.zeros(d_decay_lora, C))
        self.a0, self.a1 = vec(), nn.Parameter(torch.zeros(C, d_a_lora))
        self.a2 = nn.Parameter(torch.zeros(d_a_lora, C))
        if layer > 0:  # layer 0 has no value residual (it defines v_first)
            self.v0, self.v1 = vec(), nn.Parameter(torch.zeros(C, d_v_lora))
            self.v2 = nn.Parameter(torch.zeros(d_v_lora, C))
        self.g1 = nn.Parameter(torch.zeros(C, d_gate_lora))
        self.g2 = nn.Parameter(torch.zeros(d_gate_lora, C))
        self.k_k, self.k_a = vec(), vec()
        self.r_k = nn.Parameter(torch.zeros(n_heads, d_head))
        self.W_r = nn.Linear(C, C, bias=False)
        self.W_k = nn.Linear(C, C, bias=False)
        self.W_v = nn.Linear(C, C, bias=False)
        self.W_out = nn.Linear(C, C, bias=False)
        self.ln_x_w = nn.Parameter(torch.ones(C))
        self.ln_x_b = nn.Parameter(torch.zeros(C))
        self.hook_q = RecurrentHookPoint()  # [batch, pos, head, d_head]  (r, the receptance)
        self.hook_k = RecurrentHookPoint()  # [batch, pos, head, d_head]
        self.hook_v = RecurrentHookPoint()  # [batch, pos, head, d_head]
        self.hook_a = RecurrentHookPoint()  # [batch, pos, head, d_head]  (in-context rate)
        self.hook_kappa = RecurrentHookPoint()  # [batch, pos, head, d_head]  (removal key)
        self.hook_decay = RecurrentHookPoint()  # [batch, pos, head, d_head]  exp(w)
        self.hook_read = RecurrentHookPoint()  # [batch, pos, head, d_head]
        self.hook_gate = RecurrentHookPoint()  # [batch, pos, head, d_head]
        self.hook_z = RecurrentHookPoint()  # [batch, pos, head, d_head]
        self.hook_out = RecurrentHookPoint()  # [batch, pos, d_model]

    transition_hooks = ("hook_decay", "hook_a", "hook_kappa")

    @staticmethod
    def make_transition(decay: Tensor, a: Tensor, kappa: Tensor) -> Transition:
        """A_t(S) = diag(exp w_t) S - (a_t * kappa_t) (kappa_t^T S)."""
        return Transition(decay, -(a * kappa), kappa)

    def forward(self, x: Float[Tensor, "batch pos d_model"], run: RunContext) -> Tensor:
        """Run the time mix on `x` `[batch, pos, d_model]` from the state in `run` (if any); returns
        `[batch, pos, d_model]` and saves the final state and token-shift buffer to `run`.
        """
        B, T, C = x.shape
        H, N = self.n_heads, self.d_head
        past = run.layer_in(self.layer)
        m = None if run.mask is None else run.mask[..., None]  # padding: zero inputs, identity step
        if m is None:
            xx = token_shift(x, None if past is None else past["shift"]) - x
            shift = x[:, -1]
        else:  # the previous *real* token; zero inputs (so r, k, v, kappa = 0) at padded positions
            x = x * m.to(x.dtype)
            prev, shift = masked_token_shift(x, None if past is None else past["shift"], run.mask)
            xx = (prev - x) * m.to(x.dtype)
        xr, xw, xk, xv, xa, xg = (
            x + xx * mu for mu in (self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g)
        )
        r = self.W_r(xr)
        k_raw = self.W_k(xk)
        v = self.W_v(xv)
        w = -DECAY_SCALE * torch.sigmoid((self.w0 + torch.tanh(xw @ self.w1) @ self.w2).float())
        a = torch.sigmoid(self.a0 + (xa @ self.a1) @ self.a2)
        g = torch.sigmoid(xg @ self.g1) @ self.g2
        if self.layer > 0:
            v_first = run.shared["v_first"].to(v.dtype)
            v = v + (v_first - v) * torch.sigmoid(self.v0 + (xv @ self.v1) @ self.v2)

        def heads(t: Tensor) -> Tensor:
            return t.float().view(B, T, H, N)

        r = self.hook_q(heads(r))
        a = self.hook_a(heads(a))
        kappa = self.hook_kappa(kappa_normalize(heads(k_raw * self.k_k), self.fuse_norm))
        k = self.hook_k(heads(k_raw) * (1 + (a - 1) * heads(self.k_a.expand(B, T, C))))
        v = self.hook_v(heads(v))
        if self.layer == 0:
            run.shared["v_first"] = v.reshape(B, T, C)
        w = w.view(B, T, H, N)
        if m is not None:
            w = w * m[..., None]  # decay 1 at padded positions (and no erase: kappa = 0 there)
        decay, w = self.hooked_decay(w.exp(), w)

        S0 = None if past is None else past["S"]
        erase_a = -(a * kappa)
        propagation = Propagation.from_rule(
            lambda q, w, k, v, a, b, S0: chunk_dplr_rule(q, w, k, v, a, b, S0, self.chunk_size)[:2],
            (r, w, k, v, erase_a, kappa),
            {2, 3},
            dense=self.dense_propagation,
        )
        o, S_T = self.recur(
            lambda: chunk_dplr_rule(r, w, k, v, erase_a, kappa, S0, self.chunk_size)[:2],
            self.make_transition(decay, a, kappa),
            r,
            k,
            v,
            S0,
            propagation,
            run,
        )
        run.save(self.layer, S=S_T, shift=shift)
        o = self.hook_read(o)

        o = F.group_norm(
            o.reshape(B * T, C), H, self.ln_x_w.float(), self.ln_x_b.float(), self.group_norm_eps
        ).view(B, T, H, N)
        o = o + (r * k * self.r_k.float()).sum(-1, keepdim=True) * v
        g = self.hook_gate(heads(g))
        z = self.hook_z((o * g).to(x.dtype))
        return self.hook_out(self.W_out(z.reshape(B, T, C)))

    @property
    def W_O(self) -> Float[Tensor, "head d_v d_model"]:
        """The output projection per head (TransformerLens layout):
        hook_out = sum_h hook_z[h] @ W_O[h]."""
        return self.W_out.weight.T.reshape(self.n_heads, self.d_head, -1)


class ChannelMix(nn.Module):
    """RWKV-7 channel mix at `blocks.{l}.mlp`: y = W_out relu(W_in (h + (h_{t-1} - h) x_k))^2.

    Hooks: `hook_pre` (W_in of the shifted input, before the activation) and `hook_post`
    (relu(.)^2), both `[batch, pos, d_mlp]`. Carries the last ffn-normed token as `mlp_shift`.
    """

    def __init__(self, layer: int, d_model: int, d_mlp: int) -> None:
        super().__init__()
        self.layer = layer
        self.x_k = nn.Parameter(torch.zeros(d_model))
        self.W_in = nn.Linear(d_model, d_mlp, bias=False)
        self.W_out = nn.Linear(d_mlp, d_model, bias=False)
        self.hook_pre = RecurrentHookPoint()
        self.hook_post = RecurrentHookPoint()

    def forward(self, x: Float[Tensor, "batch pos d_model"], run: RunContext) -> Tensor:
        """The channel mix on `x` `[batch, pos, d_model]`, with its token shift from `run`."""
        past = run.layer_in(self.layer)
        prev = None if past is None else past["mlp_shift"]
        if run.mask is None:
            shifted, shift = token_shift(x, prev), x[:, -1]
        else:  # the previous real token; padded positions carry no state here
            shifted, shift = masked_token_shift(x, prev, run.mask)
        xk = x + (shifted - x) * self.x_k
        pre = self.hook_pre(self.W_in(xk))
        post = self.hook_post(torch.relu(pre).square())
        run.save(self.layer, mlp_shift=shift)
        return self.W_out(post)
