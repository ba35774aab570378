"""Tests for snas_jax.sampling: the Concrete relaxation of docs/algorithm.md §2 and eq. 6.

Every Monte-Carlo check states its sample size N and its tolerance as a
multiple k of the estimated standard error (se = std / sqrt(N)). The keys are
fixed, so the tests are deterministic; k is chosen so that a correct
implementation would fail with probability < 1e-3 even over fresh seeds, and
each test also checks that its tolerance is small next to the effect it is
meant to detect (so it cannot pass by accident).
"""
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from snas_jax import sampling

E, K = 14, 8  # edges x ops of one cell's α


def _alpha(seed, shape=(E, K), scale=1.0):
  return jnp.asarray(scale * np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _gumbel(seed, shape):
  """Standard Gumbel noise from numpy, where the noise generator is not the
  thing under test (a jax.random draw compiles per shape: seconds on CPU)."""
  u = np.random.default_rng(1000 + seed).uniform(size=shape)
  return jnp.asarray(-np.log(-np.log(u)), jnp.float32)


# ----------------------------------------------------------------------------
# (a) eq. 6: autodiff through the relaxed sample == the closed-form Jacobian.


def _loss_of_z(z):
  """A scalar, nonlinear loss of a [14, 8] weight matrix (no special structure)."""
  w = jnp.sin(jnp.arange(E * K, dtype=jnp.float32).reshape(E, K))
  v = jnp.cos(0.7 * jnp.arange(E * K, dtype=jnp.float32).reshape(E, K))
  return jnp.sum(jnp.tanh(z * w)) + jnp.sum(z * v) ** 2 + jnp.sum(z[:, 3] * z[:, 5])


@jax.jit
def _eq6_gradients(alpha, noise, tau):
  """(autodiff ∂L/∂α, closed-form eq. 6 ∂L/∂α); one compile for every τ."""
  grad_auto = jax.grad(lambda a: _loss_of_z(sampling.relaxed_sample(a, noise, tau)))(alpha)
  z = sampling.relaxed_sample(alpha, noise, tau)
  dl_dz = jax.grad(_loss_of_z)(z)  # ∂L/∂Z_k, [14, 8]
  # ∂Z_k/∂α_j = Z_k (δ_kj − Z_j) / τ, per edge: the full [14, 8, 8] Jacobian.
  jac = (z[:, :, None] * (jnp.eye(K)[None] - z[:, None, :])) / tau
  return grad_auto, jnp.einsum('ek,ekj->ej', dl_dz, jac)


@pytest.mark.parametrize('tau', [2.0, 1.0, 0.5, 0.1])
def test_autodiff_gradient_equals_eq6_closed_form(tau):
  grad_auto, grad_closed = jax.device_get(_eq6_gradients(_alpha(0), _gumbel(1, (E, K)), tau))
  # Both are float32 sums of 8 products; 1e-5 relative to the largest entry.
  scale = float(np.max(np.abs(grad_closed)))
  assert scale > 1e-3  # a non-trivial gradient
  np.testing.assert_allclose(grad_auto, grad_closed, rtol=1e-5, atol=1e-5 * scale)
  # Rows of ∂L/∂α sum to zero (softmax is shift-invariant in α).
  np.testing.assert_allclose(grad_auto.sum(-1), np.zeros(E), atol=1e-5 * scale)


# ----------------------------------------------------------------------------
# (b) Gumbel-max, τ → 0, hard sample.


def test_gumbel_max_frequencies_match_softmax():
  """argmax(α + G) ~ Categorical(softmax α) (Maddison et al.), per edge."""
  alpha = _alpha(3)
  n = 100_000
  noise = sampling.gumbel_noise(jax.random.key(4), (n, E, K))
  counts = np.asarray(jax.jit(lambda g: sampling.hard_sample(alpha, g).sum(0))(noise), np.float64)
  chex.assert_trees_all_close(counts.sum(-1), np.full(E, n, np.float64))  # one-hot rows
  p = np.asarray(jax.nn.softmax(alpha), np.float64)
  freq = counts / n
  se = np.sqrt(p * (1 - p) / n)
  z_scores = (freq - p) / se
  # 112 per-category z-scores: |z| < 5 each (P(some |z| > 5) < 112 * 5.7e-7).
  assert np.max(np.abs(z_scores)) < 5.0, np.max(np.abs(z_scores))
  # Pearson chi-square summed over edges: chi2 with 14 * 7 = 98 dof,
  # mean 98, sd 14; reject above mean + 5 sd.
  chi2 = np.sum((counts - n * p) ** 2 / (n * p))
  assert chi2 < 98 + 5 * 14, chi2
  # Power: the tolerance (5 se ≤ 0.008) is far below the gap to a wrong
  # law, e.g. softmax(α / 2).
  wrong = np.asarray(jax.nn.softmax(alpha / 2), np.float64)
  assert np.max(np.abs(wrong - p)) > 10 * 5 * se.max()


def test_relaxed_sample_tends_to_one_hot_as_tau_decreases():
  """Mean max-component → 1, at the rate of the Gumbel top-two gap.

  With D the gap between the largest and second largest α_k + G_k, for small τ
  1 − max Z ≈ sigmoid(−D/τ), and D has density Σ_k p_k (1 − p_k) at 0
  (P(D > d) = Σ_k p_k / (p_k + e^d (1 − p_k))), so
  E[1 − max Z] / τ → ln 2 · Σ_k p_k (1 − p_k) (averaged over edges).
  """
  alpha = _alpha(5)
  n = 4000  # x 14 edges
  noise = _gumbel(6, (n, E, K))
  taus = [1.0, 0.5, 0.2, 0.1, 0.05, 0.02, 0.01]
  max_fn = jax.jit(lambda t: sampling.relaxed_sample(alpha, noise, t).max(-1))
  maxes = [np.asarray(max_fn(jnp.float32(t)), np.float64) for t in taus]
  means = np.array([m.mean() for m in maxes])
  assert np.all(np.diff(means) > 0), means  # strictly monotone in τ
  assert means[-1] > 0.99, means  # τ = 0.01
  p = np.asarray(jax.nn.softmax(alpha), np.float64)
  rate = np.log(2) * np.mean(np.sum(p * (1 - p), -1))
  gap = 1 - maxes[-1]
  ratio, ratio_se = gap.mean() / 0.01, gap.std() / np.sqrt(gap.size) / 0.01
  # 4 se (≈ 0.065, 12% of the rate ≈ 0.54); the O(τ) correction is ~1%.
  assert abs(ratio - rate) < 4 * ratio_se, (ratio, rate, ratio_se)


def test_hard_sample_is_argmax_of_soft_sample_for_same_noise():
  alpha = _alpha(7)
  noise = _gumbel(8, (256, E, K))
  hard = sampling.hard_sample(alpha, noise)
  for tau in (1.0, 0.1, 5.0):
    soft = sampling.relaxed_sample(alpha, noise, tau)
    chex.assert_trees_all_equal(hard, jax.nn.one_hot(jnp.argmax(soft, -1), K))
  soft, hard2, g = sampling.sample_arch_weights(jax.random.key(9), alpha, 0.3)
  chex.assert_shape([soft, hard2, g], (E, K))
  chex.assert_trees_all_close(soft, sampling.relaxed_sample(alpha, g, 0.3), rtol=1e-6)
  chex.assert_trees_all_equal(hard2, sampling.hard_sample(alpha, g))
  chex.assert_trees_all_close(soft.sum(-1), jnp.ones(E), atol=1e-6)
  chex.assert_trees_all_equal(hard2.sum(-1), jnp.ones(E))


# ----------------------------------------------------------------------------
# (c) pathwise == score-function == finite-difference gradient of E[f(Z)].

_C = jnp.array([1.0, -2.0, 0.5, 1.5])
_D = jnp.array([3.0, -1.0, 2.0, 0.5])
_ALPHA4 = jnp.array([0.5, -0.3, 1.0, 0.0])


def _f(z):
  return (_C @ z) ** 2 + jnp.sin(_D @ z)


def _wrong_log_density(z, alpha, tau):
  """A negative control: the last term's factor n replaced by n − 1."""
  n = alpha.shape[-1]
  return (alpha.sum(-1) - (tau + 1) * jnp.log(z).sum(-1)
          - (n - 1) * jax.nn.logsumexp(alpha - tau * jnp.log(z), axis=-1))


@pytest.fixture(scope='module', params=[1.0, 0.5])
def gradient_estimates(request):
  """Per-sample gradient estimates of ∇_α E[f(Z)], Z ~ Concrete(α, τ), n = 4.

  N = 100,000; the three estimators share the noise (the difference of two is
  then itself an average of i.i.d. terms, whose se accounts for correlation).
  """
  tau, n, h = request.param, 100_000, 1e-2
  noise = _gumbel(10, (n, 4))

  def f_of(a, g):
    return _f(sampling.relaxed_sample(a, g, tau))

  @jax.jit
  def estimates(noise):
    pathwise = jax.vmap(jax.grad(f_of), (None, 0))(_ALPHA4, noise)
    z = sampling.relaxed_sample(_ALPHA4, noise, tau)  # data for the score
    fz = jax.vmap(_f)(z)
    baseline = (fz.sum() - fz) / (n - 1)  # leave-one-out mean: still unbiased
    score_of = lambda logp: jax.vmap(jax.grad(logp), (None, 0))(_ALPHA4, z)
    score = (fz - baseline)[:, None] * score_of(lambda a, zi: sampling.concrete_log_density(zi, a, tau))
    wrong = (fz - baseline)[:, None] * score_of(lambda a, zi: _wrong_log_density(zi, a, tau))
    # Central difference of E[f] with common random numbers (same G for ±h).
    fd = jax.vmap(lambda g: jnp.stack(
        [(f_of(_ALPHA4 + h * e, g) - f_of(_ALPHA4 - h * e, g)) / (2 * h) for e in jnp.eye(4)]))(noise)
    return pathwise, score, wrong, fd

  return tau, [np.asarray(x, np.float64) for x in estimates(noise)]


def _mean_se(x):
  return x.mean(0), x.std(0) / np.sqrt(x.shape[0])


def test_pathwise_and_score_function_gradients_agree(gradient_estimates):
  tau, (pathwise, score, wrong, fd) = gradient_estimates
  mean_p, _ = _mean_se(pathwise)
  diff, diff_se = _mean_se(pathwise - score)
  # 4 components, each within 4 se of zero (P(fail) < 4 * 6.3e-5).
  assert np.all(np.abs(diff) < 4 * diff_se), (tau, diff, diff_se)
  # The tolerance is sharp: 4 se is < 10% of the gradient's size ...
  assert 4 * diff_se.max() < 0.1 * np.abs(mean_p).max()
  # ... and a density with a wrong α-dependence is rejected by far.
  bad, bad_se = _mean_se(pathwise - wrong)
  assert np.max(np.abs(bad) / bad_se) > 10


def test_finite_difference_agrees_with_both_estimators(gradient_estimates):
  tau, (pathwise, score, _, fd) = gradient_estimates
  # FD vs score: independent estimators of the same number, 4 se.
  diff, diff_se = _mean_se(fd - score)
  assert np.all(np.abs(diff) < 4 * diff_se), (tau, diff, diff_se)
  # FD vs pathwise under common noise: the same path derivative per sample up
  # to the central-difference error h²/6 · f''' (h = 1e-2, |f'''| ≲ 50 here →
  # ≲ 1e-3) and float32 rounding (|f| ~ 10, 1e-6 / 2h ≈ 5e-5 per sample).
  diff, _ = _mean_se(fd - pathwise)
  assert np.all(np.abs(diff) < 1e-3), (tau, diff)
  assert np.abs(fd.mean(0)).max() > 0.1  # the gradient is not ~0


@pytest.mark.parametrize('tau', [0.3, 1.0, 2.5])
@pytest.mark.parametrize('delta', [-1.5, 0.0, 0.8])
def test_concrete_log_density_matches_binary_concrete(tau, delta):
  """n = 2: X = Z_0 = sigmoid((Δ + L) / τ) with L = G_0 − G_1 ~ Logistic(0, 1),
  Δ = α_0 − α_1, so by change of variables (y = τ logit x, dy/dx = τ / x(1−x))
  p(x) = logistic_pdf(τ logit x − Δ) · τ / (x (1 − x)).
  The density is w.r.t. the first n − 1 coordinates, as in Maddison et al."""
  alpha = jnp.array([0.3 + delta, 0.3])  # only the difference matters
  x = np.linspace(0.01, 0.99, 33)
  z = jnp.stack([x, 1 - x], -1).astype(jnp.float32)
  got = np.asarray(sampling.concrete_log_density(z, alpha, tau), np.float64)
  y = tau * np.log(x / (1 - x)) - delta
  log_logistic = -y - 2 * np.log1p(np.exp(-y))
  want = log_logistic + np.log(tau) - np.log(x * (1 - x))
  # float32 log / logsumexp of O(10) terms: 1e-4 absolute in log space.
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
  # And it integrates to the right mass: with x = sigmoid(t), ∫ p(x) dx =
  # ∫ p(x(t)) x(1−x) dt over the t where float32 can hold Z (|t| < 13.8),
  # whose exact mass is the logistic CDF difference σ(τ t₁ − Δ) − σ(τ t₀ − Δ).
  t_max = np.log(1e6 - 1)
  t = np.linspace(-t_max, t_max, 8001)
  xt = 1 / (1 + np.exp(-t))
  zt = jnp.stack([xt, 1 - xt], -1).astype(jnp.float32)
  dens = np.exp(np.asarray(sampling.concrete_log_density(zt, alpha, tau), np.float64))
  integral = np.trapezoid(dens * xt * (1 - xt), t)
  sig = lambda u: 1 / (1 + np.exp(-u))
  mass = sig(tau * t_max - delta) - sig(-tau * t_max - delta)
  assert mass > 0.9
  # Trapezoid error with step 3.5e-3 is ~1e-6; float32 density ~1e-4 relative.
  assert abs(integral - mass) < 1e-3, (integral, mass)


def test_concrete_log_density_matches_histogram_n3():
  """n = 3, τ = 0.7: exp(log p) agrees with the fraction of samples that fall
  in small boxes around a few interior points (box side 0.04 in (Z_0, Z_1))."""
  alpha, tau, n, half = jnp.array([0.4, -0.2, 0.1]), 0.7, 400_000, 0.02
  z = sampling.relaxed_sample(alpha, _gumbel(11, (n, 3)), tau)
  z = np.asarray(z, np.float64)
  points = np.array([[0.3, 0.3], [0.5, 0.2], [0.2, 0.6], [0.15, 0.15]])
  for p0, p1 in points:
    inside = (np.abs(z[:, 0] - p0) < half) & (np.abs(z[:, 1] - p1) < half)
    frac = inside.mean()
    # Density at the box's centre x box area; the density's curvature over a
    # 0.04 box changes the mass by < 2% (checked on a 5x5 grid below).
    grid = np.linspace(-half, half, 5)
    g0, g1 = np.meshgrid(p0 + grid, p1 + grid)
    zz = jnp.asarray(np.stack([g0, g1, 1 - g0 - g1], -1), jnp.float32)
    dens = np.exp(np.asarray(sampling.concrete_log_density(zz, alpha, tau), np.float64))
    mass = dens.mean() * (2 * half) ** 2
    se = np.sqrt(mass * (1 - mass) / n)
    assert mass > 20 * se  # the box holds > 400 expected samples
    # 4 binomial se plus the 2% quadrature error.
    assert abs(frac - mass) < 4 * se + 0.02 * mass, (p0, p1, frac, mass, se)


# ----------------------------------------------------------------------------
# (d) temperature, entropy.


def test_temperature_schedule_is_linear_float32():
  epochs = 5
  taus = [sampling.temperature(e, epochs) for e in range(epochs)]
  for t in taus:
    assert isinstance(t, jax.Array) and t.dtype == jnp.float32 and t.shape == ()
  want = [1.0 - 0.97 * e / 4 for e in range(epochs)]  # 1, .7575, .515, .2725, .03
  np.testing.assert_allclose(np.array(taus), want, rtol=1e-6)
  # Other endpoints, and an epoch index given as a traced array (jit-friendly).
  assert float(sampling.temperature(0, 150, 2.0, 0.5)) == 2.0
  np.testing.assert_allclose(float(sampling.temperature(149, 150, 2.0, 0.5)), 0.5, rtol=1e-6)
  np.testing.assert_allclose(float(sampling.temperature(75, 151, 2.0, 0.5)), 1.25, rtol=1e-6)
  jitted = jax.jit(lambda e: sampling.temperature(e, epochs))
  np.testing.assert_allclose(float(jitted(jnp.int32(2))), 0.515, rtol=1e-6)
  np.testing.assert_allclose(float(sampling.temperature(0, 1)), 1.0)  # one-epoch run


def test_entropy():
  np.testing.assert_allclose(np.asarray(sampling.entropy(jnp.zeros((E, K)))),
                             np.full(E, math.log(8)), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(sampling.entropy(jnp.full((3, K), 7.5))),
                             np.full(3, math.log(8)), rtol=1e-6)  # shift-invariant
  one_hotish = jnp.array([[0.0] + [-1e4] * 7])
  np.testing.assert_allclose(float(sampling.entropy(one_hotish)[0]), 0.0, atol=1e-6)
  two = jnp.log(jnp.array([[0.25, 0.75]]))
  np.testing.assert_allclose(float(sampling.entropy(two)[0]),
                             -(0.25 * math.log(0.25) + 0.75 * math.log(0.75)), rtol=1e-6)
  assert float(sampling.categorical_log_prob(jax.nn.one_hot(1, 2), two[0])) == pytest.approx(
      math.log(0.75), rel=1e-6)
