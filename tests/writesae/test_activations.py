"""Activation sources: tensors, a model streamed through a shuffle buffer, safetensors shards."""

from __future__ import annotations

import pytest
import torch

from tests.writesae.stub_model import StubModel, recurrence
from writesae import ModelSource, ShardSource, TensorSource, WriteFactors, save_shards


def rows_sorted(x: torch.Tensor) -> torch.Tensor:
    """Rows of [N, ...] in a canonical order (by a fixed random projection), for multiset checks."""
    flat = x.reshape(x.shape[0], -1).double()
    proj = flat @ torch.randn(
        flat.shape[1], generator=torch.Generator().manual_seed(0), dtype=flat.dtype
    )
    return flat[proj.argsort()]


def test_tensor_source_epoch_covers_every_sample_once():
    x = torch.arange(10 * 2 * 3, dtype=torch.float32).reshape(10, 2, 3)
    src = TensorSource(x, batch_size=4, drop_last=False, seed=1)
    e1, e2 = list(src), list(src)
    assert [b.shape[0] for b in e1] == [4, 4, 2]
    assert torch.equal(rows_sorted(torch.cat(e1)), rows_sorted(x))
    assert not torch.equal(torch.cat(e1), torch.cat(e2))  # reshuffled per epoch
    k, v = torch.randn(9, 2), torch.randn(9, 3)
    batches = list(TensorSource((k, v), batch_size=4))
    assert len(batches) == 2 and all(isinstance(b, WriteFactors) for b in batches)


def brute_states(model, tokens, layer=0, head=1):
    names = [f"blocks.{layer}.attn.hook_{n}" for n in ("k", "v", "beta", "decay")]
    _, cache = model.run_with_cache(tokens, names_filter=names)
    k, v, beta, alpha = (cache[n] for n in names)
    writes = beta[..., None, None] * k[..., :, None] * v[..., None, :]
    return (
        recurrence(writes, k, alpha, beta)[:, :, head],
        k[:, :, head] * beta[:, :, head, None],
        v[:, :, head],
    )


def test_model_source_states_and_write_factors():
    model = StubModel()
    g = torch.Generator().manual_seed(0)
    texts = [torch.randint(11, (n,), generator=g) for n in (13, 7, 30, 22)]  # 72 tokens
    blocks = torch.cat(texts)[:64].reshape(4, 16)  # packing: 4 blocks of 16, no separators
    states, key, value = brute_states(model, blocks)
    src = ModelSource(
        model,
        texts,
        layer=0,
        head=1,
        kind="state",
        positions=[3, 7, 15],
        batch_size=4,
        buffer_size=8,
        context_len=16,
        model_batch_size=2,
    )
    got = torch.cat(list(src))
    assert got.shape == (12, 4, 3)
    ref = states[:, [3, 7, 15]].reshape(-1, 4, 3)
    torch.testing.assert_close(rows_sorted(got), rows_sorted(ref.float()))

    src = ModelSource(
        model,
        texts,
        layer=0,
        head=1,
        kind="write",
        batch_size=8,
        buffer_size=16,
        context_len=16,
        model_batch_size=4,
    )
    batches = list(src)
    assert all(isinstance(b, WriteFactors) for b in batches) and len(batches) == 8
    k = torch.cat([b.key for b in batches])
    v = torch.cat([b.value for b in batches])
    # the factors rebuild the model's own hook_write: (beta * k) v^T
    _, cache = model.run_with_cache(blocks, names_filter=["blocks.0.attn.hook_write"])
    ref_w = cache["blocks.0.attn.hook_write"][:, :, 1].reshape(-1, 4, 3)
    torch.testing.assert_close(
        rows_sorted(k[:, :, None] * v[:, None, :]), rows_sorted(ref_w.float())
    )
    torch.testing.assert_close(rows_sorted(k), rows_sorted(key.reshape(-1, 4).float()))


@pytest.mark.parametrize("kind", ["state", "write"])
def test_shards_round_trip(tmp_path, kind):
    if kind == "state":
        data = torch.randn(50, 3, 2)
    else:
        data = WriteFactors(torch.randn(50, 3), torch.randn(50, 2))
    paths = save_shards(
        TensorSource(data, batch_size=7, shuffle=False, drop_last=False),
        tmp_path,
        samples_per_shard=20,
        metadata={"hook_name": "blocks.0.attn.hook_" + kind},
    )
    assert len(paths) == 3
    batches = list(ShardSource(tmp_path, batch_size=5, seed=2))
    assert len(batches) == 10
    if kind == "state":
        torch.testing.assert_close(rows_sorted(torch.cat(batches)), rows_sorted(data))
    else:
        got = torch.cat([torch.cat([b.key, b.value], 1) for b in batches])
        torch.testing.assert_close(rows_sorted(got), rows_sorted(torch.cat(data, 1)))
    paths[1].write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"shard_00001.safetensors: cannot read shard"):
        list(ShardSource(tmp_path, batch_size=5, shuffle=False))
