"""The training methods, each defined once: the span kinds it reads, its losses and their weights.

    FT    min  L_pos + lambda2 L_sent                                  at theta
    EFUF  min  L_pos + lambda1 L_neg + lambda2 L_sent                  at theta
    SARE  min  lambda1 L_neg(theta + eps*) + L_pos + lambda2 L_sent,   eps* = rho grad L_neg / ||grad L_neg||

(docs/method.md sections 3-4; L_neg = -NLL.) A method is data: `at_theta` are the losses whose
gradient is taken at theta, `sharp` the losses taken at the perturbed weights, with the direction
of eps* from their own gradient at theta. The step (sare_ds/train/step.py) runs any method from
this table; the config's list of methods and the per-kind data composer (which kinds a step
draws) read it too.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from sare_ds.data.samples import KINDS

# A coefficient is a number or the name of a field of the method config (lambda1, lambda2).
Coefficient = float | str


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    at_theta: dict[str, Coefficient]
    """kind -> coefficient of its loss in the gradient taken at theta."""
    sharp: dict[str, Coefficient] = field(default_factory=dict)
    """kind -> coefficient of its loss taken at theta + eps*, eps* along the gradient of these losses
    (unweighted) at theta. Empty: no perturbation."""

    @property
    def kinds(self) -> tuple[str, ...]:
        """The span kinds the method reads (samples of other kinds are never drawn or tokenised)."""
        return tuple(k for k in KINDS if k in self.at_theta or k in self.sharp)

    @property
    def sharpness_aware(self) -> bool:
        return bool(self.sharp)

    def weights(self, part: dict[str, Coefficient], method_cfg) -> dict[str, float]:
        """{kind: float} of `part` (at_theta or sharp) with the config's lambdas filled in."""
        return {k: float(getattr(method_cfg, c) if isinstance(c, str) else c) for k, c in part.items()}


FT = Method("ft", "fine-tuning on the grounded spans (capability losses only)", at_theta={"pos": 1.0, "sent": "lambda2"})
EFUF = Method("efuf", "gradient ascent on hallucinated spans with the capability losses, one backward",
              at_theta={"pos": 1.0, "neg": "lambda1", "sent": "lambda2"})
SARE = Method("sare", "targeted SAM: the neg loss at theta + eps*, the capability losses at theta",
              at_theta={"pos": 1.0, "sent": "lambda2"}, sharp={"neg": "lambda1"})

METHODS: dict[str, Method] = {m.name: m for m in (FT, EFUF, SARE)}


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"method.name = {name!r}: unknown method; use one of {', '.join(METHODS)}") from None
