"""The coordinate-descent plan: which step runs when, and whose state each step writes.

Defined once here; the embedded driver and the KFP pipeline both walk this plan, so
they cannot disagree on order.

A step ``(k, c)`` trains coordinate ``c`` in pass ``k`` with the latest scores of every
other coordinate as offsets. A random-effect step that follows a trained linear fixed
effect also rewrites the fixed effect (the exact step along the slow direction, see
``gdmix.shift``), so "the latest model of coordinate d" is the last step that *wrote* d.
"""
from __future__ import annotations

from dataclasses import dataclass

from gdmix.config import Config


@dataclass(frozen=True)
class Step:
    iteration: int
    coordinate: str

    def __str__(self) -> str:
        return f"iter-{self.iteration}/{self.coordinate}"


def steps(cfg: Config) -> list[Step]:
    return [Step(k, c.name) for k in range(cfg.iterations) for c in cfg.coordinates]


def shifts_fixed_effect(cfg: Config, step: Step) -> bool:
    """Whether this random-effect step also moves mass into the (already trained) fixed effect.

    Only a linear fixed effect has coefficients to move mass into: the step is part of the
    objective's mathematics (docs/design.md §2.3), not a dispatch on kinds, and this is the
    one place the plan looks at a coordinate's ``model``."""
    fe = cfg.fixed_effect
    if fe is None or fe.model != "linear" or step.coordinate == fe.name:
        return False
    plan = steps(cfg)
    return any(s.coordinate == fe.name for s in plan[: plan.index(step)])


def writes(cfg: Config, step: Step) -> tuple[str, ...]:
    """The coordinates whose coefficients and scores this step writes."""
    if shifts_fixed_effect(cfg, step):
        return (step.coordinate, cfg.fixed_effect.name)
    return (step.coordinate,)


def latest(cfg: Config, coordinate: str, before: Step | None, inclusive: bool = False) -> Step | None:
    """The last step up to ``before`` (excluded unless ``inclusive``) that wrote ``coordinate``.

    ``before=None`` means after the whole plan. None when the coordinate is untrained.
    """
    plan = steps(cfg)
    end = len(plan) if before is None else plan.index(before) + (1 if inclusive else 0)
    for s in reversed(plan[:end]):
        if coordinate in writes(cfg, s):
            return s
    return None


def state(cfg: Config, before: Step | None, inclusive: bool = False) -> dict[str, Step]:
    """For every trained coordinate, the step holding its latest coefficients and scores."""
    out = {}
    for c in cfg.coordinates:
        s = latest(cfg, c.name, before, inclusive)
        if s is not None:
            out[c.name] = s
    return out


def previous(cfg: Config, step: Step) -> Step | None:
    plan = steps(cfg)
    i = plan.index(step)
    return plan[i - 1] if i else None
