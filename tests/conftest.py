import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(2)

# the helpers next to the tests (tiny model builders) import as plain modules
for sub in ("hooked_recurrent", "writesae"):
    p = Path(__file__).parent / sub
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
