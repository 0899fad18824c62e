"""The coordinate-descent plan: which step runs when, and whose state each step writes.

Defined once here; the embedded driver and the KFP pipeline both walk this plan, so
they cannot disagree on order.

A step ``(k, c)`` trains coordinate ``c`` in pass ``k`` with the latest scores of every
other coordinate as offsets. A random-effect step that follows a trained linear fixed
effect also rewrites the fixed effect (the exact step along the slow direction, see
``gdmix.shift``), so "the latest model of coordinate d" is the last step that *wrote* d.

With ``acceleration: newton`` (the default) and at least two coordinates it can move, each
pass ends with the joint Newton step ``(k, _joint)`` (docs/design.md §2.5, ``gdmix.accelerate``),
which writes every coordinate it moves. ``steps`` lists the coordinates' training steps;
``sequence`` every step in run order, the joint steps included: "latest", "state" and
"previous" follow ``sequence``.
"""
from __future__ import annotations

from dataclasses import dataclass

from gdmix.config import RESERVED_STEP, Config

JOINT = RESERVED_STEP  # the joint step's coordinate name: iter-<k>/_joint/


@dataclass(frozen=True)
class Step:
    iteration: int
    coordinate: str

    def __str__(self) -> str:
        return f"iter-{self.iteration}/{self.coordinate}"


def steps(cfg: Config) -> list[Step]:
    return [Step(k, c.name) for k in range(cfg.iterations) for c in cfg.coordinates]


def is_joint(step: Step) -> bool:
    return step.coordinate == JOINT


def accelerated(cfg: Config) -> tuple[str, ...]:
    """The coordinates the joint step moves, in config order (empty: no joint step).

    Those whose objective is the convex one of docs/design.md §1 with explicit
    coefficients: a linear fixed effect and random effects, except those training on a
    sample (``max_samples``: their block objective is the sample's), writing variances
    (they would no longer match the models) or estimating their penalty (``l2: auto``: F
    changes with it). The others are held fixed (their scores are
    offsets), so the step is still an exact descent step on F. None with ``acceleration:
    none`` or fewer than two such coordinates (one alone is already solved by its step)."""
    if cfg.acceleration != "newton":
        return ()
    names = tuple(c.name for c in cfg.coordinates
                  if (c.model == "linear" if c.is_fixed_effect else True)
                  and c.max_samples is None and c.variance == "none" and not c.l2_auto)
    return names if len(names) >= 2 else ()


def sequence(cfg: Config) -> list[Step]:
    """Every step in run order: each pass's training steps, then its joint step (if any)."""
    joint = bool(accelerated(cfg))
    out = []
    for k in range(cfg.iterations):
        out += [Step(k, c.name) for c in cfg.coordinates] + ([Step(k, JOINT)] if joint else [])
    return out


def shifts_fixed_effect(cfg: Config, step: Step) -> bool:
    """Whether this random-effect step also moves mass into the (already trained) fixed effect.

    Only a linear fixed effect has coefficients to move mass into: the step is part of the
    objective's mathematics (docs/design.md §2.3), not a dispatch on kinds, and this is the
    one place the plan looks at a coordinate's ``model``."""
    fe = cfg.fixed_effect
    if fe is None or fe.model != "linear" or step.coordinate == fe.name or is_joint(step):
        return False
    plan = steps(cfg)
    return any(s.coordinate == fe.name for s in plan[: plan.index(step)])


def writes(cfg: Config, step: Step) -> tuple[str, ...]:
    """The coordinates whose coefficients and scores this step writes."""
    if is_joint(step):
        return accelerated(cfg)
    if shifts_fixed_effect(cfg, step):
        return (step.coordinate, cfg.fixed_effect.name)
    return (step.coordinate,)


def latest(cfg: Config, coordinate: str, before: Step | None, inclusive: bool = False) -> Step | None:
    """The last step up to ``before`` (excluded unless ``inclusive``) that wrote ``coordinate``.

    ``before=None`` means after the whole plan. None when the coordinate is untrained.
    """
    plan = sequence(cfg)
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
    plan = sequence(cfg)
    i = plan.index(step)
    return plan[i - 1] if i else None
