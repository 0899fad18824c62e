"""The one logistic loss (``gdmix.logistic``) and every backend's copy of it."""
import numpy as np
import pytest

from gdmix import logistic
from gdmix.random_effect import newton

S = np.concatenate([np.linspace(-50, 50, 201), [-800.0, -40.0, -1e-9, 0.0, 1e-9, 40.0, 800.0]])
RNG = np.random.default_rng(0)
Y = (RNG.random(len(S)) < 0.5).astype(np.float64)
W = RNG.uniform(0.1, 3.0, len(S))


def test_the_loss_and_its_derivatives():
    moderate = np.abs(S) <= 30
    s, y, w = S[moderate], Y[moderate], W[moderate]
    assert logistic.loss(s, y, w) == pytest.approx(float(w @ (np.log1p(np.exp(s)) - y * s)), rel=1e-13)
    # the derivatives are those of the loss, by central differences
    h = 1e-5
    for i in range(0, len(s), 7):
        one = slice(i, i + 1)  # one row: the sum's rounding does not swamp the difference
        fd = (logistic.loss(s[one] + h, y[one], w[one]) - logistic.loss(s[one] - h, y[one], w[one])) / (2 * h)
        assert logistic.residual(s, y, w)[i] == pytest.approx(fd, rel=1e-6, abs=1e-9)
        fd2 = (logistic.residual(s[one] + h, y[one], w[one]) - logistic.residual(s[one] - h, y[one], w[one]))[0] / (2 * h)
        assert logistic.curvature(s, w)[i] == pytest.approx(fd2, rel=1e-6, abs=1e-9)
    # no overflow at extreme scores: log(1 + e^800) = 800, σ(−800) = 0
    assert np.all(np.isfinite(logistic.softplus(S))) and logistic.softplus(np.array([800.0]))[0] == 800.0
    assert logistic.sigmoid(np.array([-800.0]))[0] == 0.0 and logistic.curvature(np.array([800.0]), np.ones(1))[0] == 0.0


def test_the_compiled_kernel_inlines_the_same_functions():
    sp = np.array([newton._softplus(float(v)) for v in S])
    sg = np.array([newton._sigmoid(float(v)) for v in S])
    np.testing.assert_allclose(sp, logistic.softplus(S), rtol=1e-14, atol=1e-300)
    np.testing.assert_allclose(sg, logistic.sigmoid(S), rtol=1e-14, atol=1e-300)


@pytest.mark.parametrize("dtype, rtol", [("float64", 1e-13), ("float32", 1e-5)])
def test_the_tf_workers_copies(dtype, rtol):
    """The linear worker runs them in float64, the deep worker in float32."""
    import tensorflow as tf

    from gdmix.fixed_effect.worker import tf_curvature, tf_loss, tf_residual

    s, y, w = (tf.constant(a, dtype=dtype) for a in (S, Y, W))
    assert float(tf_loss(tf, s, y, w)) == pytest.approx(logistic.loss(S, Y, W), rel=rtol)
    np.testing.assert_allclose(tf_residual(tf, s, y, w).numpy(), logistic.residual(S, Y, W), rtol=rtol, atol=rtol)
    np.testing.assert_allclose(tf_curvature(tf, s, w).numpy(), logistic.curvature(S, W), rtol=rtol, atol=rtol)
