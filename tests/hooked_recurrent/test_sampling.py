"""Sampling in `generate`: torch's global generator without `seed=`, a private one with it."""

from __future__ import annotations

import torch

from hooked_recurrent import HookedRecurrentModel
from tests.hooked_recurrent.qwen_helpers import qwen_hf


def test_sampling_follows_torch_manual_seed_and_seed_is_reproducible():
    model = HookedRecurrentModel.from_hf_model(qwen_hf("tied", seed=1)).eval()
    prompt = torch.tensor([[5, 17, 33, 2]])

    def sample(**kw):
        return model.generate(prompt, 20, do_sample=True, stop_at_eos=False, verbose=False, **kw)

    torch.manual_seed(0)
    first, second = sample(), sample()
    assert not torch.equal(first, second)  # successive calls draw on
    torch.manual_seed(0)
    assert torch.equal(sample(), first)  # reseeding reproduces the first
    torch.manual_seed(1)
    assert not torch.equal(sample(), first)

    torch.manual_seed(1)
    seeded = sample(seed=7)
    torch.manual_seed(2)
    assert torch.equal(sample(seed=7), seeded)  # seed= ignores the global generator
    assert not torch.equal(sample(seed=8), seeded)
