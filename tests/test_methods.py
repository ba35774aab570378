"""Search methods as values (snas_jax/methods): how each draws Z from α, its
temperature schedule and derivation; GDAS's straight-through gradient against
its closed form."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from snas_jax import methods, sampling
from snas_jax.spaces.darts import genotypes

E, K = len(genotypes.EDGES), len(genotypes.PRIMITIVES)


def _alpha(seed=0):
  return jax.random.normal(jax.random.PRNGKey(seed), (E, K)) * 0.7


def test_gdas_forward_is_the_gumbel_max_one_hot():
  key, alpha, tau = jax.random.PRNGKey(3), _alpha(), jnp.float32(4.0)
  z, hard = methods.get('gdas').draw(key, alpha, tau)
  noise = sampling.gumbel_noise(key, alpha.shape)
  np.testing.assert_array_equal(np.asarray(z), np.asarray(sampling.hard_sample(alpha, noise)))
  np.testing.assert_array_equal(np.asarray(z), np.asarray(hard))
  assert set(np.unique(np.asarray(z))) == {0.0, 1.0} and np.all(np.asarray(z).sum(-1) == 1)


@pytest.mark.parametrize('tau', [0.1, 1.0, 10.0])
def test_gdas_gradient_is_the_soft_samples_closed_form(tau):
  """L = <c, Z>: dL/dα[e,j] = (1/τ)·p[e,j]·(c[e,j] - Σ_k p[e,k]·c[e,k]),
  p = softmax((α + G)/τ): the gradient of the soft sample, not of the one-hot."""
  key, alpha = jax.random.PRNGKey(1), _alpha(1)
  c = jax.random.normal(jax.random.PRNGKey(2), (E, K))
  grad = jax.grad(lambda a: (c * methods.get('gdas').draw(key, a, tau)[0]).sum())(alpha)
  p = np.asarray(sampling.relaxed_sample(alpha, sampling.gumbel_noise(key, alpha.shape), tau),
                 np.float64)
  c64 = np.asarray(c, np.float64)
  want = p * (c64 - (p * c64).sum(-1, keepdims=True)) / tau
  chex.assert_trees_all_close(np.asarray(grad, np.float64), want, rtol=2e-5, atol=2e-6)


def test_gdas_gradient_of_a_nonlinear_loss_is_taken_at_the_one_hot():
  """For any f: d f(Z_st)/dα = J_soft(α)ᵀ ∇f(hard): f's gradient at the
  forward value (the one-hot), carried back through the soft sample."""
  key, alpha, tau = jax.random.PRNGKey(5), _alpha(2), 0.7
  f = lambda z: jnp.sum(jnp.sin(3 * z) * jnp.arange(K)) + jnp.sum(z ** 3)
  noise = sampling.gumbel_noise(key, alpha.shape)
  hard = sampling.hard_sample(alpha, noise)
  soft_fn = lambda a: sampling.relaxed_sample(a, noise, tau)
  _, vjp = jax.vjp(soft_fn, alpha)
  want, = vjp(jax.grad(f)(hard))
  got = jax.grad(lambda a: f(methods.get('gdas').draw(key, a, tau)[0]))(alpha)
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)


def test_snas_and_darts_draws():
  key, alpha, tau = jax.random.PRNGKey(0), _alpha(), jnp.float32(0.5)
  z, hard = methods.get('snas').draw(key, alpha, tau)
  soft, want_hard, _ = sampling.sample_arch_weights(key, alpha, tau)
  chex.assert_trees_all_equal((z, hard), (soft, want_hard))
  z, hard = methods.get('darts').draw(key, alpha, tau)
  chex.assert_trees_all_close(z, jax.nn.softmax(alpha, -1))
  assert hard is None


def test_temperature_schedules():
  """GDAS: τ linear from 10 to 0.1 over the search (its paper, AutoDL-Projects);
  SNAS: 1 to 0.03 as the paper; DARTS uses none."""
  assert methods.get('gdas').tau_schedule == (10.0, 0.1)
  assert methods.get('snas').tau_schedule == (1.0, 0.03)
  assert methods.get('darts').tau_schedule is None
  taus = [float(sampling.temperature(e, 5, *methods.get('gdas').tau_schedule)) for e in range(5)]
  np.testing.assert_allclose(taus, [10.0, 7.525, 5.05, 2.575, 0.1], rtol=1e-5)


def test_derivation_per_method_on_the_darts_space():
  rng = np.random.default_rng(0)
  a_n, a_r = rng.normal(size=(E, K)), rng.normal(size=(E, K))
  derived = {m: genotypes.derive(a_n, a_r, methods.get(m).derivation) for m in methods.NAMES}
  assert derived['snas'] == genotypes.derive(a_n, a_r, 'snas')
  assert derived['darts'] == derived['gdas'] == genotypes.derive(a_n, a_r, 'darts')
  # The DARTS rule keeps two inputs per node, never `none`; SNAS's argmax may differ.
  for node in derived['gdas'].normal:
    assert len(node) == 2 and all(op != 'none' for op, _ in node)
  assert [m.discrete for m in methods.METHODS.values()] == [True, False, True]


def test_unknown_method_is_one_line():
  with pytest.raises(ValueError, match="--method='enas' is not a method; use one of snas, darts, gdas"):
    methods.get('enas')


def test_search_config_takes_the_methods_temperature_unless_given():
  from snas_jax import search
  assert (search.SearchConfig().tau0, search.SearchConfig().tau_min) == (1.0, 0.03)
  gdas = search.SearchConfig(method='gdas')
  assert (gdas.tau0, gdas.tau_min) == (10.0, 0.1)
  gdas.check()
  assert search.SearchConfig(method='gdas', tau0=5.0).tau0 == 5.0
  darts = search.SearchConfig(method='darts')
  assert (darts.tau0, darts.tau_min) == (0.0, 0.0)
  darts.check()  # no τ, nothing to check


def test_resume_ignores_the_temperature_of_a_method_without_one(tmp_path):
  """A DARTS checkpoint with another --tau0 resumes (τ changes nothing
  there); an SNAS one is refused in one line."""
  from snas_jax import checkpoint, config as config_lib, search
  for method, refused in (('darts', False), ('snas', True)):
    cfg = search.SearchConfig(method=method)
    saved = dict(config_lib.to_dict(cfg), tau0=0.5)
    if refused:
      with pytest.raises(checkpoint.CheckpointError, match=r'--tau0=0\.5 there, --tau0=1\.0 now'):
        search.check_resume_config(saved, cfg, str(tmp_path))
    else:
      search.check_resume_config(saved, cfg, str(tmp_path))


def test_score_estimator_needs_a_discrete_sample():
  from snas_jax import search
  with pytest.raises(ValueError, match='--method=darts has no discrete sample'):
    search.SearchConfig(method='darts', resource_eta=1e-3).check()
  search.SearchConfig(method='gdas', resource_eta=1e-3).check()


def test_gdas_search_step():
  """--method=gdas at the step level on one cell: the network runs with a
  one-hot Z that changes with the key, α learns through the soft sample's
  gradient (with the score-function penalty, which needs the one-hot), and
  the child is read by the DARTS rule."""
  from snas_jax import costs, search
  cfg = search.SearchConfig(channels=4, layers=1, batch_size=4, epochs=1, backend='reference',
                            method='gdas', resource_eta=1e-3, alpha_lr=0.05)
  net, tx = search.make_network(cfg), search.make_optimizer(cfg, steps_per_epoch=3)
  step = jax.jit(search.train_step_fn(cfg, net, tx, costs.penalty_tables(4, 1, 8)))
  state = search.init_state(cfg, net, tx, (8, 8, 3))
  z = [search.arch_weights(cfg, state.params['alpha'], jax.random.PRNGKey(k), cfg.tau0)
       for k in (0, 1)]
  for draw in z:
    forward, hard = draw['normal']
    np.testing.assert_array_equal(forward, hard)
    assert np.all(np.asarray(forward).sum(-1) == 1) and set(np.unique(forward)) == {0.0, 1.0}
  assert not np.array_equal(z[0]['normal'][0], z[1]['normal'][0])
  rng = np.random.default_rng(0)
  alpha0 = np.asarray(state.params['alpha']['normal'])
  for _ in range(3):
    batch = {'image': rng.normal(size=(4, 8, 8, 3)).astype(np.float32),
             'label': rng.integers(0, 10, 4).astype(np.int32)}
    state, metrics = step(state, batch, np.float32(cfg.tau0))
    assert bool(metrics['finite'])
  assert not np.allclose(alpha0, state.params['alpha']['normal'])
  child = search.child_arch_weights(cfg, state.params['alpha'])
  want = search.derive_genotypes(state.params['alpha'])['darts']
  np.testing.assert_array_equal(child['normal'], genotypes.cell_to_one_hot(want.normal))
