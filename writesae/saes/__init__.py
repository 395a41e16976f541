"""SAE kinds over one base class, one file each (the SAELens layout).

* :mod:`writesae.saes.base`: :class:`SAEOutput`, :class:`BaseSAE` (encode/decode, save/load, the
  intervention hooks), the registry :data:`SAE_KINDS` and :func:`load_sae`;
* :mod:`writesae.saes.write_sae`: :class:`WriteSAE`, rank-1 decoder atoms ``u_i w_i^T``;
* :mod:`writesae.saes.flat_sae`: :class:`FlatSAE`, the vector baseline on ``vec(X)``.
"""

from writesae.saes.base import CFG_FILE, SAE_KINDS, WEIGHTS_FILE, BaseSAE, SAEOutput, load_sae
from writesae.saes.flat_sae import FlatSAE
from writesae.saes.write_sae import WriteSAE

__all__ = [
    "SAEOutput",
    "BaseSAE",
    "WriteSAE",
    "FlatSAE",
    "SAE_KINDS",
    "load_sae",
    "CFG_FILE",
    "WEIGHTS_FILE",
]
