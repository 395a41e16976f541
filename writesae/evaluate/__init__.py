"""WriteSAE evaluations, one module each, built on the interventions of `writesae.interventions`.

* :mod:`~writesae.evaluate.substitution`: the single-write replacement test (paper section 3.2,
  App. J): the top atom, deletion and a random rank-1 write in place of the native write;
* :mod:`~writesae.evaluate.closed_form`: the closed-form logit shift of an atom (paper Eq. 1,
  App. A) against the measured one;
* :mod:`~writesae.evaluate.install`: the generation install (paper section 4, App. I.6);
* :mod:`~writesae.evaluate.cell`: choosing the cell (layer, head) to study;
* :mod:`~writesae.evaluate.common`: the SAE's codes on a clean run and the other shared pieces.

Every choice the paper leaves open is a parameter whose default is the paper-faithful reading:

* substitution scale: `"matched_norm"` (App. J: the atom at the native write's Frobenius norm),
  `"coefficient"` (the abstract: the atom's code) or a fraction of the native write's norm;
* KL direction: `"native||edited"` (reference code, `kl_div(native, cond)`) or `"edited||native"`;
* KL position: `"edited"` (the edited token's own next-token distribution, the first read of the
  edited state), `"end"` (the end of the prompt) or `"mean"` (the mean over the rest of the prompt);
* closed form: `method="direct"` (the paper's Eq. 1, direct path) or `"first_order"` (the exact
  derivative through everything after the read, `writesae.closed_form`); eps relative to the
  native write's norm (default) or absolute; direct-path propagator `"gate"` (the paper's scalar
  decay product G) or `"exact"` (the transition product, with the delta rule's erase projections);
* install: additive, at consecutive positions starting at the first generated token, norm
  ||k v^T|| (no beta), key signed by the query, value direction by its first-order effect.
"""

from writesae.evaluate.cell import median_decays, memory_cell
from writesae.evaluate.closed_form import (
    ClosedFormResult,
    closed_form_logit_shift,
    evaluate_closed_form,
)
from writesae.evaluate.common import check_model, kl, sae_codes, sae_layer
from writesae.evaluate.install import (
    InstallResult,
    evaluate_install,
    install_geometry,
    target_direction,
)
from writesae.evaluate.substitution import SubstitutionResult, evaluate_substitution, scale_label

__all__ = [
    "SubstitutionResult",
    "evaluate_substitution",
    "closed_form_logit_shift",
    "ClosedFormResult",
    "evaluate_closed_form",
    "InstallResult",
    "evaluate_install",
    "target_direction",
    "install_geometry",
    "median_decays",
    "memory_cell",
    "scale_label",
    "sae_codes",
    "sae_layer",
    "check_model",
    "kl",
]
