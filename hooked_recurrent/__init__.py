"""hooked_recurrent: recurrent and hybrid LMs with hooks on the state write, state and read.

Qwen3.5 (Gated DeltaNet + gated attention), Mamba-2 and RWKV-7, re-implemented in the
TransformerLens style so that edits at `hook_write` / `hook_state` propagate through the recurrence
and every hook fires during generation.
"""

from hooked_recurrent._version import __version__
from hooked_recurrent.config import HookedRecurrentConfig
from hooked_recurrent.hook_points import RecurrentHookPoint
from hooked_recurrent.model import HookedRecurrentModel
from hooked_recurrent.pretrained import list_pretrained
from hooked_recurrent.recurrence import Transition, propagate, scan
from hooked_recurrent.state import RecurrentState

__all__ = [
    "__version__",
    "HookedRecurrentModel",
    "HookedRecurrentConfig",
    "RecurrentHookPoint",
    "RecurrentState",
    "Transition",
    "list_pretrained",
    "propagate",
    "scan",
]
