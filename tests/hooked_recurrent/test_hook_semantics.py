"""What a hook's return value means, and the gradients at every hook, on the three shipped models.

Each number is checked against a brute force written here: the layer's recurrence stepped token by
token in float64 from the factors the model cached (q, k, v, the strength and the decay), with the
edit applied as the docs specify it (`docs/concepts.md`, "Edit semantics"):

* `hook_write`: the returned writes are the layer's inputs;
* `hook_state`: where the returned tensor differs from what the hook got, the state *is* the
  returned value, and the recurrence goes on from it;
* a cache taken in the same run shows the states and reads the recurrence used;
* the gradient at `hook_write` / `hook_state` is dL/dS_t (zero at `hook_write` where the state was
  assigned), from backward hooks, from `run_with_cache(incl_bwd=True)` and through a returned
  `w + d`.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from hooked_recurrent import HookedRecurrentModel, list_pretrained
from tests.hooked_recurrent.references import brute_force_states

FAMILIES = {
    "qwen3_5": ("tiny-qwen3.5-shakespeare", 1),
    "mamba2": ("tiny-mamba2-shakespeare", 1),
    "rwkv7": ("tiny-rwkv7-shakespeare", 1),
}
TEXT = "ROMEO: But soft, what light through yonder window breaks? It is the east, and Juliet"


@pytest.fixture(scope="module", params=list(FAMILIES))
def fam(request):
    name, layer = FAMILIES[request.param]
    if name not in list_pretrained():
        pytest.skip(f"shipped model {name} not installed")
    model = HookedRecurrentModel.from_pretrained(name)
    tokens = model.to_tokens([TEXT, TEXT[::-1]])[:, :24]
    return request.param, model, layer, tokens


def factors(model, layer, tokens):
    """The layer's cached factors (float64): q, the write's key and value, and the transition."""
    p = f"blocks.{layer}.attn."
    with torch.no_grad():
        _, c = model.run_with_cache(tokens, names_filter=lambda n: n.startswith(p))
    f = {k.removeprefix(p).removeprefix("hook_"): v.double() for k, v in c.items()}
    arch = model.cfg.architecture
    if arch == "qwen3_5":  # S_t = alpha (I - beta k k^T) S + beta k v^T
        f["wk"], f["wv"] = f["beta"][..., None] * f["k"], f["v"]
        f["ea"], f["eb"] = -(f["decay"] * f["beta"])[..., None] * f["k"], f["k"]
    elif arch == "mamba2":  # S_t = exp(dt A) S + B (dt x)^T
        f["wk"], f["wv"] = f["k"], f["dt"][..., None] * f["v"]
        f["ea"] = f["eb"] = None
    else:  # RWKV-7: S_t = (diag(exp w) - (a kappa) kappa^T) S + k v^T
        f["wk"], f["wv"] = f["k"], f["v"]
        f["ea"], f["eb"] = -(f["a"] * f["kappa"]), f["kappa"]
    return f


def brute_force(f, writes=None, assign=None, perturb=None):
    """States and reads, token by token (float64). `writes` [b, T, h, k, v] replace k v^T;
    `assign` = (mask [b, T, h], values) sets the state; `perturb` [b, T, h, k, v] is added to
    every state (zero: a leaf whose gradient is dL/dS_t)."""
    if writes is None:
        writes = f["wk"][..., :, None] * f["wv"][..., None, :]
    return brute_force_states(f["q"], f["decay"], f["ea"], f["eb"], writes, assign, perturb)


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


# ------------------------------------------------------------ item 1: assignment semantics
def assigned_mask(kind, B, T, H):
    g = torch.Generator().manual_seed(3)
    m = torch.zeros(B, T, H, dtype=torch.bool)
    if kind == "all":
        m[:] = True
    elif kind == "every_other":
        m[:, ::2] = True
    elif kind == "random_subset":
        m = torch.rand(B, T, H, generator=g) < 0.3
    elif kind == "one":
        m[0, T - 6, H - 1] = True
    return m


@pytest.mark.parametrize("kind", ["all", "every_other", "random_subset", "one"])
def test_state_hook_assigns(fam, kind):
    """The state is the returned value where it differs; later states follow from it; the cache
    shows the states and reads the recurrence used (S^T q == read)."""
    _, model, layer, tokens = fam
    f = factors(model, layer, tokens)
    B, T, H = f["q"].shape[:3]
    mask = assigned_mask(kind, B, T, H)
    got = {}

    def assign(x, hook):
        g = torch.Generator().manual_seed(4)
        new = 0.5 * x + 0.1 * x.abs().mean() * torch.randn(x.shape, generator=g)
        got["received"] = x.clone()
        got["X"] = torch.where(mask[..., None, None], new, x)
        return got["X"]

    p = f"blocks.{layer}.attn."
    with torch.no_grad(), model.hooks(fwd_hooks=[(p + "hook_state", assign)]):
        _, cache = model.run_with_cache(tokens, names_filter=[p + "hook_state", p + "hook_read"])
    native, _ = brute_force(f)
    states, reads = brute_force(f, assign=(mask, got["X"]))
    print(
        f"\n{fam[0]} assign {kind}: rel err states {rel(cache[p + 'hook_state'], states):.2e}, "
        f"reads {rel(cache[p + 'hook_read'], reads):.2e}"
    )
    assert rel(got["received"], native) <= 1e-5
    assert rel(cache[p + "hook_state"], states) <= 1e-5
    assert rel(cache[p + "hook_read"], reads) <= 1e-5
    via_cache = torch.einsum("bthkv,bthk->bthv", cache[p + "hook_state"].double(), f["q"])
    assert rel(via_cache, cache[p + "hook_read"]) <= 1e-5
    # the assignment is not an addition: later unassigned states differ from received + change
    if kind == "every_other":
        assert rel(states[:, 1::2], native[:, 1::2]) > 1e-3
    if kind == "all":
        assert torch.equal(cache[p + "hook_state"], got["X"])


def test_zeroing_the_state_everywhere_zeroes_the_read(fam):
    _, model, layer, tokens = fam
    p = f"blocks.{layer}.attn."
    with torch.no_grad(), model.hooks(fwd_hooks=[(p + "hook_state", lambda x, hook: 0 * x)]):
        _, cache = model.run_with_cache(tokens, names_filter=[p + "hook_read"])
    assert cache[p + "hook_read"].abs().max().item() == 0.0


def test_write_edits_at_several_positions_and_state_cache(fam):
    _, model, layer, tokens = fam
    f = factors(model, layer, tokens)
    B, T, H, K = f["q"].shape
    V = f["wv"].shape[-1]
    g = torch.Generator().manual_seed(5)
    where = [(0, 3, 0), (1, 7, H - 1), (0, 12, 0), (1, 20, 0)]
    delta = torch.zeros(B, T, H, K, V)
    for b, t, h in where:
        delta[b, t, h] = torch.randn(K, V, generator=g) * f["wk"].abs().max() * f["wv"].abs().max()

    p = f"blocks.{layer}.attn."
    with torch.no_grad(), model.hooks(fwd_hooks=[(p + "hook_write", lambda w, hook: w + delta)]):
        _, cache = model.run_with_cache(
            tokens, names_filter=[p + "hook_state", p + "hook_read", p + "hook_write"]
        )
    writes = f["wk"][..., :, None] * f["wv"][..., None, :] + delta.double()
    states, reads = brute_force(f, writes=writes)
    print(
        f"\n{fam[0]} write edits: rel err states {rel(cache[p + 'hook_state'], states):.2e}, "
        f"reads {rel(cache[p + 'hook_read'], reads):.2e}"
    )
    assert rel(cache[p + "hook_write"], writes) <= 1e-5
    assert rel(cache[p + "hook_state"], states) <= 1e-5
    assert rel(cache[p + "hook_read"], reads) <= 1e-5


# ------------------------------------------------------------ item 2: gradients
def loss_of(logits):
    R = torch.randn(logits.shape, generator=torch.Generator().manual_seed(6))
    return (logits[:, 4:] * R[:, 4:]).sum() / logits.shape[1]


def brute_force_adjoint(f, grad_read, writes=None, assign=None):
    """dL/dS_t by autograd through the float64 brute force, for dL/d(read) = grad_read."""
    B, T, H, K = f["q"].shape
    V = grad_read.shape[-1]
    P = torch.zeros(B, T, H, K, V, dtype=torch.float64, requires_grad=True)
    _, reads = brute_force(f, writes=writes, assign=assign, perturb=P)
    (reads * grad_read.double()).sum().backward()
    return P.grad


def read_gradient(model, layer, tokens, hooks):
    """dL/d(read) of the layer (through the model's own autograd) and the backward-hook grads."""
    p = f"blocks.{layer}.attn."
    got = {}

    def keep(name):
        def h(grad, hook):
            got[name] = grad.detach().clone()

        return h

    bwd = [(p + n, keep(n)) for n in ("hook_read", "hook_write", "hook_state")]
    with model.hooks(fwd_hooks=hooks, bwd_hooks=bwd):
        logits = model(tokens)
        loss_of(logits).backward()
    return got


def positions8(B, T, H):
    g = torch.Generator().manual_seed(7)
    return [
        (int(torch.randint(B, (1,), generator=g)), int(t), int(torch.randint(H, (1,), generator=g)))
        for t in torch.randperm(T, generator=g)[:8]
    ]


def fd(model, tokens, hook_name, b, t, h, i, j, eps, base_hooks=()):
    """Fourth-order central difference of the loss along entry (i, j) of the hooked tensor at
    b, t, h: (8 (L(e) - L(-e)) - (L(2e) - L(-2e))) / 12e."""

    def bump(s):
        def f(x, hook):
            x = x.clone()
            x[b, t, h, i, j] += s
            return x

        return f

    L = {}
    with torch.no_grad():
        for s in (eps, -eps, 2 * eps, -2 * eps):
            logits = model.run_with_hooks(tokens, fwd_hooks=[*base_hooks, (hook_name, bump(s))])
            L[s] = loss_of(logits).item()
    return (8 * (L[eps] - L[-eps]) - (L[2 * eps] - L[-2 * eps])) / (12 * eps)


@pytest.mark.parametrize("edited", [False, True])
def test_backward_hooks_give_the_adjoint_state(fam, edited):
    """Backward hooks at hook_write and hook_state == autograd through the float64 brute force
    at 8 random positions, and == a central finite difference; the same gradients reach a
    returned w + d at every entry, and run_with_cache(incl_bwd=True)."""
    _, model, layer, tokens = fam
    f = factors(model, layer, tokens)
    B, T, H, K = f["q"].shape
    V = f["wv"].shape[-1]
    p = f"blocks.{layer}.attn."
    d = torch.zeros(B, T, H, K, V)
    if edited:  # additive write edits at a few positions, among those checked below
        for b, t, h in positions8(B, T, H)[:3]:
            d[b, t, h] = 0.3 * torch.randn(K, V, generator=torch.Generator().manual_seed(t))
    d.requires_grad_(True)
    got = read_gradient(model, layer, tokens, [(p + "hook_write", lambda w, hook: w + d)])
    writes = f["wk"][..., :, None] * f["wv"][..., None, :] + d.detach().double()
    lam = brute_force_adjoint(f, got["hook_read"], writes=writes)
    assert lam.abs().max() > 1e-4
    worst = max(
        max(rel(got[n][b, t, h], lam[b, t, h]) for n in ("hook_state", "hook_write"))
        for b, t, h in positions8(B, T, H)
    )
    print(f"\n{fam[0]} edited={edited}: adjoint rel err at 8 positions {worst:.2e}, ", end="")
    print(f"w + d {rel(d.grad, lam):.2e}")
    for b, t, h in positions8(B, T, H):
        assert rel(got["hook_state"][b, t, h], lam[b, t, h]) <= 1e-4, (b, t, h)
        assert rel(got["hook_write"][b, t, h], lam[b, t, h]) <= 1e-4, (b, t, h)
    # the w + d trick: every entry of d, where it is zero too
    assert rel(d.grad, lam) <= 1e-4
    # finite differences at two of the positions, along the largest entry
    for b, t, h in positions8(B, T, H)[:2]:
        i, j = divmod(int(lam[b, t, h].abs().argmax()), V)
        want = lam[b, t, h, i, j].item()
        for name in ("hook_write", "hook_state"):
            base = [(p + "hook_write", lambda w, hook: w + d.detach())] if edited else []
            eps = 0.05 / max(1.0, abs(want))  # smaller steps where the loss is steeper
            got_fd = fd(model, tokens, p + name, b, t, h, i, j, eps, base)
            print(f"{fam[0]} {name} t={t}: adjoint {want:.5f}, central difference {got_fd:.5f}")
            assert abs(got_fd - want) <= 0.02 * abs(want) + 1e-4, (name, got_fd, want)


def test_gradient_with_an_assigned_state(fam):
    """A state assigned at t0 cuts the adjoint there: hook_state's gradient is dL/dS_t of the
    assigned trajectory, hook_write's is zero where the state was assigned."""
    _, model, layer, tokens = fam
    f = factors(model, layer, tokens)
    B, T, H, _ = f["q"].shape
    p = f"blocks.{layer}.attn."
    mask = torch.zeros(B, T, H, dtype=torch.bool)
    mask[:, T // 2] = True
    got_X = {}

    def assign(x, hook):
        got_X["X"] = torch.where(mask[..., None, None], 0.5 * x.detach(), x)
        return got_X["X"]

    got = read_gradient(model, layer, tokens, [(p + "hook_state", assign)])
    lam = brute_force_adjoint(f, got["hook_read"], assign=(mask, got_X["X"].detach()))
    assert rel(got["hook_state"], lam) <= 1e-4
    w_lam = lam.masked_fill(mask[..., None, None], 0.0)
    assert rel(got["hook_write"], w_lam) <= 1e-4
    assert got["hook_write"][:, T // 2].abs().max() == 0
    # before the assignment nothing reaches back from after it
    assert lam[:, : T // 2].abs().max() > 0


def test_run_with_cache_incl_bwd_caches_the_adjoint(fam):
    _, model, layer, tokens = fam
    p = f"blocks.{layer}.attn."
    names = [p + "hook_write", p + "hook_state", p + "hook_read", f"blocks.{layer}.hook_resid_post"]
    loss, cache = model.run_with_cache(
        tokens, names_filter=names, incl_bwd=True, return_type="loss"
    )
    for n in names:
        assert n + "_grad" in cache.keys(), n
    f = factors(model, layer, tokens)
    lam = brute_force_adjoint(f, cache[p + "hook_read_grad"])
    assert rel(cache[p + "hook_state_grad"], lam) <= 1e-4
    assert rel(cache[p + "hook_write_grad"], lam) <= 1e-4


def test_backward_hooks_fire_without_forward_hooks(fam):
    _, model, layer, tokens = fam
    calls = []
    with model.hooks(
        bwd_hooks=[(f"blocks.{layer}.hook_resid_post", lambda g, hook: calls.append(g))]
    ):
        model(tokens)[0, -1, 5].backward()
    assert len(calls) == 1 and calls[0].abs().max() > 0


# ------------------------------------------------------------ item 5: edits that bypass autograd
def ablate_in_place(how, t, h):
    def f(x, hook):
        if how == "data":
            x.data[:, t, h] = 0
        elif how == "numpy":
            x.numpy()[:, t, h] = 0
        else:
            x[:, t, h] = 0
        return None

    return f


@pytest.mark.parametrize("how", ["data", "numpy"])
@pytest.mark.parametrize("point", ["hook_write", "hook_state"])
def test_edits_through_data_or_numpy_are_applied(fam, how, point):
    _, model, layer, tokens = fam
    name = f"blocks.{layer}.attn.{point}"
    with torch.no_grad():
        clean = model(tokens)
        want = model.run_with_hooks(tokens, fwd_hooks=[(name, ablate_in_place("plain", 5, 0))])
        got = model.run_with_hooks(tokens, fwd_hooks=[(name, ablate_in_place(how, 5, 0))])
    assert (want - clean).abs().max() > 1e-4
    assert torch.equal(got, want)


@pytest.mark.parametrize("point", ["hook_write", "hook_state"])
def test_edits_under_inference_mode_are_applied_and_later_calls_work(fam, point):
    _, model, layer, tokens = fam
    name = f"blocks.{layer}.attn.{point}"
    tokens = tokens.repeat(3, 1)  # a batch no earlier test used: fresh write memory is taken
    with torch.inference_mode():
        got = model.run_with_hooks(tokens, fwd_hooks=[(name, ablate_in_place("plain", 5, 0))])
    with torch.no_grad():  # the same edit outside inference mode, and nothing left broken
        want = model.run_with_hooks(tokens, fwd_hooks=[(name, ablate_in_place("plain", 5, 0))])
        again = model.run_with_hooks(tokens, fwd_hooks=[(name, ablate_in_place("plain", 5, 0))])
        clean = model(tokens)
    assert torch.equal(got, want)
    assert torch.equal(again, want)
    assert (want - clean).abs().max() > 1e-4


def test_two_threads_never_share_hooks(fam):
    """A plain forward in one thread while another runs with hooks: clean logits or a clear
    error, never the other thread's hooks."""
    _, model, layer, tokens = fam
    name = f"blocks.{layer}.attn.hook_write"
    with torch.no_grad():
        clean = model(tokens)
    results, errors, stop = [], [], threading.Event()

    def hooked():
        with torch.no_grad():
            while not stop.is_set():
                try:
                    model.run_with_hooks(tokens, fwd_hooks=[(name, lambda w, hook: 3 * w)])
                except RuntimeError as e:
                    errors.append(str(e))

    def plain():
        with torch.no_grad():
            for _ in range(30):
                try:
                    results.append(model(tokens))
                except RuntimeError as e:
                    errors.append(str(e))

    a, b = threading.Thread(target=hooked), threading.Thread(target=plain)
    a.start()
    b.start()
    b.join()
    stop.set()
    a.join()
    assert all("another thread" in e for e in errors), errors[:1]
    assert all(torch.equal(r, clean) for r in results)
    assert len(errors) > 0  # the two did overlap: the check above was put to the test


def test_numpy_arrays_are_views(fam):
    """The NumPy test above relies on .numpy() sharing memory (CPU)."""
    x = torch.zeros(3)
    x.numpy()[0] = 1
    assert np.float32(x[0]) == 1


def test_generation_with_a_state_hook_equals_one_forward_pass(fam):
    """`x + d` at hook_state at positions in the prompt and during generation: generate hands
    the hook the same trajectory (without state edits) as one forward pass over the result."""
    _, model, layer, tokens = fam
    name = f"blocks.{layer}.attn.hook_state"
    g = torch.Generator().manual_seed(8)
    _, cache = model.run_with_cache(tokens, names_filter=[name])
    d = torch.randn(model.cfg.d_k, model.cfg.d_v, generator=g) * cache[name].abs().amax()
    at = torch.tensor([3, 7, 9])

    def add(x, hook):
        x = x.clone()
        x[:, torch.isin(hook.positions, at), 0] += d
        return x

    with torch.no_grad():
        out = model.generate(tokens[:, :6], 8, fwd_hooks=[(name, add)], stop_at_eos=False)
        logits = model.run_with_hooks(out, fwd_hooks=[(name, add)])
        clean = model(out)
    assert torch.equal(logits[:, 5:-1].argmax(-1), out[:, 6:])
    assert (logits[:, 9:] - clean[:, 9:]).abs().max() > 1e-2  # the edits reach the new tokens


def test_parameter_gradients_through_an_assigned_state(fam):
    """Assigning S_p = x_p / 2 at `hook_state` is the same edit as adding -x_p / 2 to the write at
    p (no earlier state edit), computed along another path (`hook.native_state()`, the write
    propagation): outputs and the gradients of every parameter agree."""
    _, model, layer, tokens = fam
    p, h = 5, 1

    def halve_state(x, hook):
        x = x.clone()
        x[:, p, h] = 0.5 * x[:, p, h]
        return x

    def subtract_from_write(w, hook):
        S = hook.native_state()
        w = w.clone()
        w[:, p, h] = w[:, p, h] - 0.5 * S[:, p, h]
        return w

    outs, grads = [], []
    for point, fn in (("hook_state", halve_state), ("hook_write", subtract_from_write)):
        model.zero_grad(set_to_none=True)
        out = model.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{layer}.attn.{point}", fn)])
        (out[:, -3:] ** 2).mean().backward()
        outs.append(out.detach())
        grads.append({n: q.grad for n, q in model.named_parameters() if q.grad is not None})
    model.zero_grad(set_to_none=True)
    assert (outs[0] - outs[1]).abs().max() <= 1e-4
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for n in grads[0]:
        if grads[1][n].abs().max() == 0:  # a parameter the loss does not reach on either path
            assert grads[0][n].abs().max() == 0, n
        else:
            assert rel(grads[0][n], grads[1][n]) <= 1e-4, n
