"""The test run checks the packages' annotations at run time (jaxtyping + beartype, configured in
pyproject.toml): a call with a tensor of the wrong rank fails, an int passes where a float is
annotated (PEP 484's numeric tower)."""

import pytest
import torch
from jaxtyping import TypeCheckError

from hooked_recurrent.components.conv import causal_conv
from hooked_recurrent.components.norms import RMSNorm


def test_wrong_rank_is_caught_at_the_call():
    x = torch.randn(5, 8)  # [pos, channels]: the batch axis is missing
    with pytest.raises(TypeCheckError):
        causal_conv(x, torch.randn(8, 4), None, None)


def test_an_int_is_a_float():
    norm = RMSNorm(8, 1)  # eps annotated float
    out = norm(torch.randn(2, 3, 8))
    assert out.shape == (2, 3, 8)
