"""The full-batch solver shared by the reference fit and the distributed workers.

Minimises a smooth convex F(θ), θ ∈ R^p, in float64 from a function returning (F, ∇F):

- with the Hessian matrix ``hess(θ) = ∇²F(θ)`` (small p): the same trust-region Newton
  method with the subproblem solved exactly (scipy ``trust-exact``, Moré–Sorensen). On
  workers this is one all-reduce of p² numbers per iteration instead of one per H·v
  product (a Krylov solve takes ~10 of them per iteration).
- with Hessian-vector products ``hessp(θ, v) = ∇²F(θ) v``: a trust-region Newton method
  whose subproblem min_s g·s + ½ sᵀHs, ‖s‖ ≤ Δ is solved by Krylov iterations
  (scipy ``trust-krylov``). It converges quadratically near the optimum, so it reaches a
  tiny gradient in ~10–20 outer iterations, each costing one (F, ∇F) and a few H·v.
- without: L-BFGS-B, whose progress stalls once F changes by less than its rounding
  error (usually at ‖∇F‖∞ within a small factor of a tight target).

Convergence is measured on the gradient: done when ‖∇F‖ ≤ gtol (trust-region: the
2-norm, which bounds the ∞-norm; L-BFGS-B: the ∞-norm), with L-BFGS-B's relative-decrease
test off (ftol = 0): coordinate descent needs each block solved essentially exactly.

Near the optimum both methods judge steps by the change in F, which there is smaller
than F's rounding error (F is a sum over all rows), so they may stop with ‖∇F‖ a little
above a tight gtol. The gradient itself stays accurate, so a few plain Newton steps
(H s = −∇F solved by conjugate gradients) finish the job, each kept only if it shrinks
‖∇F‖. ``SolveInfo.converged`` reports whether ‖∇F‖∞ ≤ gtol was met in the end.

Every TF worker runs this same deterministic code on identical all-reduced values, so
all take the same steps and make the same calls (each one collective) in the same order.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy import optimize

FunGrad = Callable[[np.ndarray], tuple[float, np.ndarray]]
HessP = Callable[[np.ndarray, np.ndarray], np.ndarray]
Hess = Callable[[np.ndarray], np.ndarray]
Progress = Callable[[int, float, float], None]


@dataclass(frozen=True)
class SolveInfo:
    """What a solve did. Workers write it into their status files (``as_dict``) and the
    stage reads it back whole (``from_status``): every field, every time."""

    objective: float
    iterations: int
    evaluations: int  # (F, ∇F) evaluations
    hessp_calls: int  # Hessian-vector products
    hess_calls: int  # Hessian matrices
    polish_steps: int  # Newton steps after the trust-region method stopped
    grad_inf: float  # ‖∇F‖∞ at the result
    converged: bool  # grad_inf ≤ gtol
    method: str
    message: str  # scipy's own words, kept for a bug report; ``outcome`` says what they mean
    outcome: str = ""

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_status(cls, status: dict) -> "SolveInfo":
        return cls(**{f.name: status[f.name] for f in dataclasses.fields(cls)})


def solve(fun_grad: FunGrad, x0: np.ndarray, *, gtol: float, max_iter: int, hessp: HessP | None = None,
          hess: Hess | None = None, progress: Progress | None = None,
          progress_every: int = 10) -> tuple[np.ndarray, SolveInfo]:
    """Minimise; returns (θ, what the solve did). ``hess`` wins over ``hessp``."""
    last = {"x": None, "g": None}
    counts = {"evaluations": 0, "hessp_calls": 0, "hess_calls": 0}

    def fg(x):
        f, g = fun_grad(np.asarray(x, dtype=np.float64))
        counts["evaluations"] += 1
        last.update(x=np.array(x, dtype=np.float64), g=np.asarray(g, dtype=np.float64))
        return float(f), last["g"]

    def hv(x, v):
        counts["hessp_calls"] += 1
        return np.asarray(hessp(np.asarray(x, dtype=np.float64), np.asarray(v, dtype=np.float64)), dtype=np.float64)

    def h(x):
        counts["hess_calls"] += 1
        return np.asarray(hess(np.asarray(x, dtype=np.float64)), dtype=np.float64)

    iteration = [0]

    def callback(intermediate_result):
        iteration[0] += 1
        if progress is not None and iteration[0] % progress_every == 0:
            # The accepted point is the last one evaluated, so its gradient is known
            # without another evaluation (on workers: a collective out of lockstep).
            x = intermediate_result.x
            g_inf = _inf(last["g"]) if np.array_equal(x, last["x"]) else float("nan")
            progress(iteration[0], float(intermediate_result.fun), g_inf)

    x0 = np.asarray(x0, dtype=np.float64)
    if hess is not None:
        method = "trust-exact"
        res = optimize.minimize(fg, x0, jac=True, hess=h, method=method, callback=callback,
                                options={"gtol": gtol, "maxiter": max_iter})
    elif hessp is not None:
        method = "trust-krylov"
        res = optimize.minimize(fg, x0, jac=True, hessp=hv, method=method, callback=callback,
                                options={"gtol": gtol, "maxiter": max_iter})
    else:
        method = "L-BFGS-B"
        res = optimize.minimize(fg, x0, jac=True, method=method, callback=callback,
                                options={"maxiter": max_iter, "maxfun": 10 * max_iter + 100,
                                         "gtol": gtol, "ftol": 0.0, "maxcor": 20})
    x, f, g = np.asarray(res.x, dtype=np.float64), float(res.fun), np.asarray(res.jac)  # ∇F at res.x
    message = str(res.message)
    polish = 0
    if hess is not None or hessp is not None:
        while _inf(g) > gtol and polish < MAX_POLISH:
            polish += 1
            step = _solve(h(x), g) if hess is not None else _newton_step(lambda v: hv(x, v), g)
            x_new = x + step
            f_new, g_new = fg(x_new)
            if not np.linalg.norm(g_new) < np.linalg.norm(g):
                break
            x, f, g = x_new, f_new, g_new
        if polish:
            message += f" (then {polish} Newton polish step(s))"
    g_inf = _inf(g)
    converged = bool(g_inf <= gtol)
    return x, SolveInfo(objective=f, iterations=int(res.nit), **counts, polish_steps=polish, grad_inf=g_inf,
                        converged=converged, method=method, message=message,
                        outcome=outcome(converged, bool(res.success), int(res.nit), max_iter, polish))


def outcome(converged: bool, success: bool, iterations: int, max_iter: int, polish: int) -> str:
    """What a solve's end means, in plain words. Converged is the gradient test alone
    (§3); scipy's own messages ("A bad approximation caused failure to predict
    improvement", "ABNORMAL_TERMINATION_IN_LNSRCH", "Desired error not necessarily
    achieved due to precision loss") say only that F could not decrease further at
    machine precision, which near the optimum is where a converged solve ends."""
    polished = f", after {polish} Newton polish step(s)" if polish else ""
    if converged:
        if success:
            return f"converged (gradient ≤ tolerance{polished})"
        return f"converged (gradient ≤ tolerance; no further decrease possible at machine precision{polished})"
    if iterations >= max_iter:
        return "stopped at max_iterations (gradient above tolerance: raise max_iterations or check the data)"
    return ("stopped: no further decrease possible at machine precision, gradient above tolerance "
            "(not converged: an ill-conditioned problem; a larger l2 helps)")


MAX_POLISH = 5


def _newton_step(hv: Callable[[np.ndarray], np.ndarray], g: np.ndarray) -> np.ndarray:
    """s ≈ −H⁻¹g by conjugate gradients (H symmetric positive definite near the optimum)."""
    s = np.zeros_like(g)
    r = -g.copy()
    p = r.copy()
    rr = r @ r
    target = (1e-12 * np.sqrt(rr)) ** 2
    for _ in range(min(len(g), 200)):
        hp = hv(p)
        php = p @ hp
        if not php > 0:  # not positive definite along p: stop with what we have
            break
        a = rr / php
        s += a * p
        r -= a * hp
        rr_new = r @ r
        if rr_new <= target:
            break
        p = r + (rr_new / rr) * p
        rr = rr_new
    return s


def _solve(H: np.ndarray, g: np.ndarray) -> np.ndarray:
    """s = −H⁻¹g (least squares if H is singular)."""
    try:
        return -np.linalg.solve(H, g)
    except np.linalg.LinAlgError:
        return -np.linalg.lstsq(H, g, rcond=None)[0]


def _inf(g) -> float:
    return float(np.max(np.abs(g))) if g is not None and g.size else 0.0
