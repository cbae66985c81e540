"""The fast convolution path computes what flax.linen.Conv computes, with its parameters."""

import functools
import itertools
import platform
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from resnet_jax.cpu import conv, native, onednn
from resnet_jax.cpu import layers as cpu_layers
from resnet_jax.cpu import passes
from resnet_jax.errors import UserError

STRIDES = (1, 2)
PADDINGS = ('SAME', 1, ((2, 1), (0, 3)), 'VALID')


def _pair_of_convs(impl: str, **kwargs) -> tuple[nn.Module, nn.Module]:
  return nn.Conv(**kwargs), cpu_layers.get_conv(impl)(**kwargs)


def _rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-12))


def _values_and_grads(module: nn.Module, variables, x, cot):
  """(y, d<y, cot>/d(variables, x)) in one jitted call: compiling is the slow part."""
  loss = lambda v, x: jnp.sum(module.apply(v, x).astype(jnp.float32) * cot)
  return jax.jit(lambda v, x: (module.apply(v, x), jax.grad(loss, argnums=(0, 1))(v, x)))(
      variables, x)


# 3x3: every stride x padding; 1x1 and 7x7 as ResNets use them; groups and
# bias on a subset. Few cases, because compiling each takes seconds on 2 cores.
CASES = [(3, s, p, 1, True) for s, p in itertools.product(STRIDES, PADDINGS)]
CASES += [(1, 1, 'SAME', 1, True), (1, 2, 0, 1, False), (1, 2, 'VALID', 1, True),
          (7, 2, 3, 1, True), (7, 1, ((2, 1), (0, 3)), 1, False)]
CASES += [(3, 1, 'SAME', 2, False), (3, 2, 1, 2, True), (1, 2, 'SAME', 2, False)]
LAYERS = CASES
CASES = [case + ('patches',) for case in LAYERS]
# 'hybrid' shares the kernel gradient with 'patches' and takes the rest from XLA.
CASES += [(3, 2, 1, 1, True, 'hybrid'), (7, 2, 3, 1, False, 'hybrid'),
          (1, 2, 0, 1, True, 'hybrid')]
# oneDNN computes every pass of every layer kind itself, grouped ones too.
CASES += [case + ('onednn',) for case in LAYERS]


@pytest.mark.parametrize('kernel,stride,padding,groups,use_bias,impl', CASES)
def test_matches_flax_conv_values_and_gradients(kernel, stride, padding, groups, use_bias, impl):
  if impl == 'onednn':
    _require_onednn()
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 9, 8, 4))
  reference, patches = _pair_of_convs(
      impl, features=6, kernel_size=(kernel, kernel), strides=stride,
      padding=padding, feature_group_count=groups, use_bias=use_bias)
  variables = reference.init(jax.random.PRNGKey(1), x)
  assert (jax.tree.map(jnp.shape, variables)
          == jax.tree.map(jnp.shape, patches.init(jax.random.PRNGKey(1), x)))
  if use_bias:  # Non-zero bias so that it shows in the output.
    variables = jax.tree.map(lambda v: v + 0.1, variables)
  # A fixed random cotangent, so that no gradient entry is trivially symmetric.
  cot = jax.random.normal(jax.random.PRNGKey(2), jax.eval_shape(reference.apply, variables, x).shape)

  y_ref, g_ref = _values_and_grads(reference, variables, x, cot)
  y, g = _values_and_grads(patches, variables, x, cot)
  assert y.shape == y_ref.shape
  assert _rel_err(y_ref, y) < 1e-5
  assert jax.tree.structure(g) == jax.tree.structure(g_ref)
  for a, b in zip(jax.tree.leaves(g_ref), jax.tree.leaves(g)):
    assert _rel_err(a, b) < 1e-5


def test_onednn_passes_match_xla_on_random_layers_inside_jit():
  """Random batch, sizes (odd ones too), channels, kernels, strides, groups
  and asymmetric paddings; each of the three passes against XLA's."""
  _require_onednn()
  rng = np.random.default_rng(7)
  for _ in range(12):
    groups = int(rng.choice([1, 1, 2, 4]))
    n, h, w = rng.integers(1, 5), rng.integers(3, 14), rng.integers(3, 14)
    cin, cout = groups * rng.integers(1, 9), groups * rng.integers(1, 9)
    k, s = int(rng.choice([1, 3, 5, 7])), (int(rng.integers(1, 3)), int(rng.integers(1, 3)))
    pads = tuple((int(a), int(b)) for a, b in rng.integers(0, k, (2, 2)))
    if any(d + sum(p) < k for d, p in zip((h, w), pads)):
      continue  # no output positions
    x = jnp.asarray(rng.normal(size=(n, h, w, cin)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(k, k, cin // groups, cout)), jnp.float32)
    reference = lambda x, kernel: jax.lax.conv_general_dilated(
        x, kernel, s, pads, dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
        feature_group_count=groups, precision='highest')
    y_ref, vjp = jax.vjp(reference, x, kernel)
    dy = jnp.asarray(rng.normal(size=y_ref.shape), jnp.float32)
    dx_ref, dk_ref = vjp(dy)
    y, dx, dks = jax.jit(lambda x, kernel, dy: (
        onednn.conv_forward(x, kernel, s, pads, groups),
        onednn.conv_input_grad(dy, kernel, x.shape, s, pads, groups),
        [onednn.conv_kernel_grad(x, dy, kernel.shape, s, pads, groups, v)
         for v in onednn.KERNEL_GRAD_VARIANTS]))(x, kernel, dy)
    case = (x.shape, kernel.shape, s, pads, groups)
    assert _rel_err(y_ref, y) < 1e-5, case
    assert _rel_err(dx_ref, dx) < 1e-5, case
    for variant, dk in zip(onednn.KERNEL_GRAD_VARIANTS, dks):
      assert _rel_err(dk_ref, dk) < 1e-5, (case, variant)


@pytest.mark.parametrize('kernel,stride,impl', [(3, 1, 'patches'), (3, 2, 'patches'),
                                                (1, 2, 'patches'), (3, 2, 'onednn')])
def test_bfloat16_compute_matches_flax_conv(kernel, stride, impl):
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 8))
  reference, patches = _pair_of_convs(
      impl, features=8, kernel_size=(kernel, kernel), strides=stride,
      dtype=jnp.bfloat16)
  variables = reference.init(jax.random.PRNGKey(1), x)
  y_ref, y = jax.jit(reference.apply)(variables, x), jax.jit(patches.apply)(variables, x)
  assert y.dtype == y_ref.dtype == jnp.bfloat16
  assert _rel_err(y_ref, y) < 2e-2  # bf16 has 8 bits of mantissa.
  cot = jnp.ones(y_ref.shape, jnp.float32)
  _, g_ref = _values_and_grads(reference, variables, x, cot)
  _, g = _values_and_grads(patches, variables, x, cot)
  for a, b in zip(jax.tree.leaves(g_ref), jax.tree.leaves(g)):
    assert a.dtype == b.dtype
    assert _rel_err(a, b) < 2e-2


def test_extra_batch_dimensions_and_unbatched_input_match_flax_conv():
  reference, patches = _pair_of_convs('patches', features=3, kernel_size=(3, 3))
  for shape in ((5, 5, 2), (2, 3, 5, 5, 2)):
    x = jax.random.normal(jax.random.PRNGKey(0), shape)
    variables = reference.init(jax.random.PRNGKey(1), x)
    y_ref, y = jax.jit(reference.apply)(variables, x), jax.jit(patches.apply)(variables, x)
    assert _rel_err(y_ref, y) < 1e-5


def _require_onednn():
  """oneDNN is in requirements.txt for Linux x86-64: there its absence is a
  failure (the build broke), elsewhere a skip."""
  if native.available():
    return
  if sys.platform == 'linux' and platform.machine() == 'x86_64':
    pytest.fail(f'oneDNN convolutions unavailable: {native.unavailable_reason()}')
  pytest.skip(f'no oneDNN here: {native.unavailable_reason()}')


def test_auto_chooses_per_layer_on_cpu_and_xla_is_flax_conv():
  assert jax.default_backend() == 'cpu'
  assert cpu_layers.resolve_conv_impl('auto') == 'per_layer'
  assert cpu_layers.get_conv('auto') is conv.AutoConv
  assert issubclass(conv.AutoConv, nn.Conv) and conv.AutoConv.plan is None
  assert cpu_layers.get_conv('xla') is nn.Conv
  assert set(cpu_layers.CONV_IMPLS) >= {'auto', 'xla', 'patches', 'hybrid', 'onednn'}


def test_auto_plan_with_onednn_follows_the_measured_rule():
  plan = functools.partial(conv.auto_plan, use_onednn=True)
  # oneDNN's forward and input gradient on 3x3 and 7x7 layers; its kernel
  # gradient where the output has 7x7 positions or more, else the matmul.
  assert plan((3, 3, 16, 16), (1, 1), (32, 32)) == conv.ONEDNN_PLAN
  assert plan((7, 7, 1, 64), (2, 2), (48, 48)) == conv.ONEDNN_PLAN
  assert plan((3, 3, 64, 64), (1, 1), (7, 7)) == conv.ONEDNN_PLAN
  # Its kernel gradient on blocked copies (large maps), as im2col + GEMM
  # (many channels on small maps), or the patches' matmul (tiny maps).
  assert plan((3, 3, 64, 64), (1, 1), (24, 24)) == ('onednn', 'onednn', 'onednn-blocked')
  assert plan((3, 3, 128, 128), (1, 1), (12, 12)) == ('onednn', 'onednn', 'onednn-gemm')
  assert plan((3, 3, 256, 256), (1, 1), (6, 6)) == ('onednn', 'onednn', 'onednn-gemm')
  assert plan((3, 3, 128, 256), (2, 2), (6, 6)) == ('onednn', 'onednn', 'patches')
  assert plan((3, 3, 512, 512), (1, 1), (3, 3)) == ('onednn', 'onednn', 'patches')
  assert plan((3, 3, 512, 512), (1, 1), (1, 1)) == ('onednn', 'onednn', 'patches')
  # 1x1 convolutions are matmuls: patches, unless the map is large.
  assert plan((1, 1, 128, 256), (2, 2), (6, 6)) == conv.PATCHES_PLAN
  assert plan((1, 1, 64, 128), (2, 2), (12, 12)) == ('onednn', 'col2im', 'onednn')
  # Grouped convolutions have no patch form.
  assert plan((3, 3, 4, 128), (1, 1), (2, 2), groups=32) == conv.ONEDNN_PLAN
  assert conv.auto_plan((3, 3, 4, 128), (1, 1), (2, 2), groups=32) == conv.XLA_PLAN


def test_auto_plan_follows_the_measured_rule():
  plan = conv.auto_plan
  # 1x1 convolutions are plain matmuls; so is everything on tiny maps, where
  # XLA's forward and input-gradient convolutions are 10-25x slower.
  assert plan((1, 1, 64, 128), (2, 2), (14, 14)) == conv.PATCHES_PLAN
  assert plan((3, 3, 256, 256), (1, 1), (2, 2)) == conv.PATCHES_PLAN
  assert plan((3, 3, 512, 512), (1, 1), (3, 3)) == conv.PATCHES_PLAN
  assert plan((3, 3, 64, 64), (1, 1), (8, 8)) == conv.PATCHES_PLAN
  # Few channels on a large map: XLA's own forward and input gradient; the
  # kernel gradient is a matmul everywhere.
  assert plan((3, 3, 16, 16), (1, 1), (28, 28)) == ('xla', 'xla', 'patches')
  # Strided, or 64+ output channels: the input gradient as matmul + col2im.
  assert plan((3, 3, 16, 32), (2, 2), (14, 14)) == ('xla', 'col2im', 'patches')
  assert plan((3, 3, 64, 64), (1, 1), (24, 24)) == ('xla', 'col2im', 'patches')


def test_a_whole_model_under_auto_has_flax_parameters_and_outputs():
  # The textbook ResNet-18 at 28x28 mixes every plan: XLA's forward on the 14x14 stem,
  # matmuls for the 1x1 shortcuts and the 1x1..2x2 maps of the last stages.
  from resnet_jax import models
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 28, 28, 1))
  plain = models.create_model('d2l_resnet18', width=16)
  auto = models.create_model('d2l_resnet18', conv_impl='auto', width=16)
  variables = plain.init(jax.random.PRNGKey(1), x, train=False)
  assert (jax.tree.map(jnp.shape, variables)
          == jax.tree.map(jnp.shape, auto.init(jax.random.PRNGKey(1), x, train=False)))
  y_ref = jax.jit(lambda v, x: plain.apply(v, x, train=False))(variables, x)
  y = jax.jit(lambda v, x: auto.apply(v, x, train=False))(variables, x)
  assert _rel_err(y_ref, y) < 1e-5


def test_batch_chunks_divide_the_batch_and_bound_the_bytes():
  assert passes.batch_chunks(256, 1 << 20, limit=128 << 20) == 2
  assert passes.batch_chunks(256, 1 << 20, limit=96 << 20) == 4  # 64 <= 96
  assert passes.batch_chunks(6, 10, limit=25) == 3
  assert passes.batch_chunks(7, 10, limit=25) == 7  # prime: one at a time
  assert passes.batch_chunks(4, 10, limit=1000) == 1


@pytest.mark.parametrize('plan', [conv.PATCHES_PLAN, ('xla', 'col2im', 'patches')])
def test_chunked_patches_match_flax_conv_values_and_gradients(plan):
  x = jax.random.normal(jax.random.PRNGKey(0), (6, 9, 8, 4))
  kwargs = dict(features=6, kernel_size=(3, 3), strides=2, padding=1)
  reference = nn.Conv(**kwargs)
  # One example's patches: 5*4 positions * 36 features * 4 bytes = 2880 bytes.
  chunked = conv.Conv(plan=plan, patch_bytes_limit=6000, **kwargs)  # 3 chunks
  variables = reference.init(jax.random.PRNGKey(1), x)
  cot = jax.random.normal(jax.random.PRNGKey(2), (6, 5, 4, 6))
  y_ref, g_ref = _values_and_grads(reference, variables, x, cot)
  y, g = _values_and_grads(chunked, variables, x, cot)
  assert _rel_err(y_ref, y) < 1e-5
  for a, b in zip(jax.tree.leaves(g_ref), jax.tree.leaves(g)):
    assert _rel_err(a, b) < 1e-5
  lowered = jax.jit(lambda v, x: chunked.apply(v, x)).lower(variables, x).as_text()
  if plan[0] == 'patches':
    assert 'while' in lowered  # really a loop over chunks


def test_unknown_impl_is_a_user_error_naming_the_choices():
  with pytest.raises(UserError, match='auto, xla, patches, hybrid'):
    cpu_layers.get_conv('winograd')


def test_unsupported_padding_mode_is_a_user_error():
  module = conv.PatchConv(features=2, kernel_size=(3, 3), padding='CIRCULAR')
  with pytest.raises(UserError, match='conv_impl="xla"'):
    module.init(jax.random.PRNGKey(0), jnp.ones((1, 4, 4, 1)))


class _TinyResNet(nn.Module):
  """Stem conv + BN + one residual block with a strided 1x1 shortcut + head."""
  conv_cls: type[nn.Module]

  @nn.compact
  def __call__(self, x, train: bool = True):
    bn = lambda: nn.BatchNorm(use_running_average=not train, momentum=0.9)
    x = nn.relu(bn()(self.conv_cls(8, (7, 7), strides=2, padding=3)(x)))
    y = nn.relu(bn()(self.conv_cls(16, (3, 3), strides=2, padding=((1, 1), (1, 1)),
                                   use_bias=False)(x)))
    y = bn()(self.conv_cls(16, (3, 3), use_bias=False)(y))
    shortcut = self.conv_cls(16, (1, 1), strides=2)(x)
    return nn.Dense(10)(jnp.mean(nn.relu(y + shortcut), axis=(1, 2)))


@pytest.mark.parametrize('impl', ['patches', 'hybrid', 'auto', 'onednn'])
def test_one_sgd_step_of_a_small_resnet_is_the_same_as_with_flax_conv(impl):
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 16, 16, 3))
  labels = jnp.arange(4) % 10
  init = _TinyResNet(nn.Conv).init(jax.random.PRNGKey(1), x)
  tx = optax.sgd(0.1, momentum=0.9)

  @functools.partial(jax.jit, static_argnums=0)
  def step(impl):
    model = _TinyResNet(cpu_layers.get_conv(impl))

    def loss_fn(params):
      logits, updates = model.apply({**init, 'params': params}, x, mutable=['batch_stats'])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
      return loss, updates

    (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(init['params'])
    new_params = optax.apply_updates(init['params'], tx.update(grads, tx.init(grads))[0])
    return loss, new_params, updates['batch_stats']

  loss_x, params_x, stats_x = step('xla')
  loss_p, params_p, stats_p = step(impl)
  assert abs(float(loss_x) - float(loss_p)) <= 1e-5 * abs(float(loss_x))
  for a, b in zip(jax.tree.leaves((params_x, stats_x)), jax.tree.leaves((params_p, stats_p))):
    # atol: a conv bias right before BatchNorm gets a gradient of only ~1e-10 (rounding noise).
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
