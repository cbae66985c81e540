"""The model zoo: textbook shapes, reference parameter counts, BN state, dtype."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_jax import config, models
from resnet_jax.models.blocks import BasicBlock, Bottleneck
from resnet_jax.errors import UserError
from resnet_jax.models import Residual, available_models, create_model


def _param_count(model, shape) -> int:
  variables = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros(shape), train=False))
  return sum(x.size for x in jax.tree.leaves(variables['params']))


def test_textbook_residual_shapes():
  x = jnp.ones((4, 6, 6, 3))
  for block, expected in [(Residual(3), (4, 6, 6, 3)),
                          (Residual(6, use_1x1conv=True, strides=2),
                           (4, 3, 3, 6))]:
    variables = block.init(jax.random.key(0), x, train=False)
    assert block.apply(variables, x, train=False).shape == expected


def test_d2l_resnet18_layer_shapes_match_the_chapter():
  model = create_model('d2l_resnet18', num_classes=10)
  x = jnp.zeros((1, 224, 224, 1))
  variables = jax.eval_shape(
      lambda: model.init(jax.random.key(0), x, train=False))
  (logits, state) = jax.eval_shape(
      lambda v: model.apply(v, x, train=False, mutable=['intermediates']),
      variables)
  feats = jax.tree.map(lambda t: t[0].shape, state['intermediates'],
                       is_leaf=lambda t: isinstance(t, tuple))
  assert feats['stem']['stem_conv'] == (1, 112, 112, 64)
  assert feats['stem']['stem_pool'] == (1, 56, 56, 64)
  assert [feats[f'stage{i}'] for i in range(1, 5)] == [
      (1, 56, 56, 64), (1, 28, 28, 128), (1, 14, 14, 256), (1, 7, 7, 512)]
  assert feats['pool'] == (1, 512)
  assert logits.shape == (1, 10)
  # The chapter's convs keep their bias; its 1x1 convs sit where it strides.
  params = variables['params']
  assert 'bias' in params['stem']['conv1']
  assert 'conv3' in params['layer2_0'] and 'conv3' not in params['layer1_0']


@pytest.mark.parametrize('name,shape,num_classes,expected', [
    ('d2l_resnet18', (1, 224, 224, 1), 10, 11_178_378),
    # torchvision's counts for 3x224x224 inputs and 1000 classes.
    ('resnet18', (1, 224, 224, 3), 1000, 11_689_512),
    ('resnet34', (1, 224, 224, 3), 1000, 21_797_672),
    ('resnet50', (1, 224, 224, 3), 1000, 25_557_032),
    ('resnet101', (1, 224, 224, 3), 1000, 44_549_160),
    ('resnet152', (1, 224, 224, 3), 1000, 60_192_808),
    ('resnext50_32x4d', (1, 224, 224, 3), 1000, 25_028_904),
    ('resnext101_32x8d', (1, 224, 224, 3), 1000, 88_791_336),
    ('wide_resnet50_2', (1, 224, 224, 3), 1000, 68_883_240),
    # Pre-activation: one BN per block input plus a final BN (timm's counts).
    ('resnetv2_18', (1, 224, 224, 3), 1000, 11_687_720),
    ('resnetv2_34', (1, 224, 224, 3), 1000, 21_795_880),
    ('resnetv2_50', (1, 224, 224, 3), 1000, 25_549_352),
    ('resnetv2_101', (1, 224, 224, 3), 1000, 44_541_480),
    ('resnetv2_152', (1, 224, 224, 3), 1000, 60_185_128),
    # ResNet-8 (n=1), counted by hand: stem 3*3*3*16 + BN 2*16 = 464; one
    # block per stage, two 3x3 convs + two BNs each: 16->16: 2*(9*16*16) +
    # 4*16 = 4,672; 16->32: 9*16*32 + 9*32*32 + 4*32 = 13,952; 32->64:
    # 9*32*64 + 9*64*64 + 4*64 = 55,552 (option A shortcuts: no
    # parameters); head 64*10 + 10 = 650. Total 75,290.
    ('cifar_resnet8', (1, 32, 32, 3), 10, 75_290),
    # He et al. Table 6: 0.27M ... 1.7M with option-A shortcuts.
    ('cifar_resnet20', (1, 32, 32, 3), 10, 269_722),
    ('cifar_resnet32', (1, 32, 32, 3), 10, 464_154),
    ('cifar_resnet44', (1, 32, 32, 3), 10, 658_586),
    ('cifar_resnet56', (1, 32, 32, 3), 10, 853_018),
    ('cifar_resnet110', (1, 32, 32, 3), 10, 1_727_962),
])
def test_parameter_counts(name, shape, num_classes, expected):
  assert _param_count(create_model(name, num_classes=num_classes),
                      shape) == expected


def _param_shapes(model, shape):
  variables = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros(shape), train=False))
  return jax.tree.map(lambda x: (x.shape, x.dtype), variables)


def test_from_config_builds_what_create_model_builds():
  section = config.base_config().model
  section.update(dict(name='cifar_resnet20', num_classes=7, width=8,
                      stage_sizes=(1, 2, 1), zero_init_residual=False,
                      conv_impl='xla', dtype='bfloat16'))
  model = models.from_config(section)
  twin = create_model('cifar_resnet20', num_classes=7, width=8,
                      stage_sizes=(1, 2, 1), zero_init_residual=False,
                      conv_impl='xla', dtype=jnp.bfloat16)
  assert model == twin
  shape = (1, 16, 16, 3)
  shapes = _param_shapes(model, shape)
  assert shapes == _param_shapes(twin, shape)
  # stage_sizes and width are honoured: blocks 1, 2, 1 of widths 8/16/32.
  params = shapes['params']
  assert sorted(k for k in params if k.startswith('layer')) == [
      'layer1_0', 'layer2_0', 'layer2_1', 'layer3_0']
  assert params['stem']['conv1']['kernel'][0] == (3, 3, 3, 8)
  assert params['layer3_0']['conv2']['kernel'][0] == (3, 3, 32, 32)
  assert params['fc']['kernel'][0] == (32, 7)
  assert model.dtype == jnp.bfloat16 and not model.zero_init_residual
  # Unset fields are the model's own: ResNet-20 as registered.
  default = config.base_config().model
  default.update(dict(name='cifar_resnet20', num_classes=10))
  assert _param_count(models.from_config(default), (1, 32, 32, 3)) == 269_722
  # The dict a workdir's config.json holds builds the same network.
  assert models.from_config(section.to_dict()) == model


def test_resnext_cardinality_is_the_number_of_groups():
  model = create_model('resnext50_32x4d', num_classes=10)
  variables = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False))
  # First stage: width 4 per group x 32 groups = 128 channels; each of the 32
  # groups of the 3x3 conv sees 128 / 32 = 4 input channels.
  assert variables['params']['layer1_0']['conv2']['kernel'].shape == (
      3, 3, 4, 128)


def test_cifar_option_b_adds_projections():
  a = _param_count(create_model('cifar_resnet20'), (1, 32, 32, 3))
  b = _param_count(create_model('cifar_resnet20', shortcut='B'),
                   (1, 32, 32, 3))
  # Two projections: 16->32 and 32->64 1x1 convs plus their BN.
  assert b - a == 16 * 32 + 2 * 32 + 32 * 64 + 2 * 64


def test_stride_in_1x1_moves_the_downsampling():
  x = jnp.zeros((1, 64, 64, 3))
  for stride_in_1x1 in (False, True):
    model = create_model('resnet50', num_classes=10,
                         stride_in_1x1=stride_in_1x1)
    _, state = jax.eval_shape(lambda m=model: m.init_with_output(
        jax.random.key(0), x, train=False, capture_intermediates=True))
    inter = state['intermediates']['layer2_0']
    conv1_hw = inter['conv1']['__call__'][0].shape[1]
    assert conv1_hw == (8 if stride_in_1x1 else 16)


def _tiny_cifar():
  return create_model('cifar_resnet20', num_classes=10, width=4)


def test_batch_stats_update_in_training_only():
  model = _tiny_cifar()
  x = jax.random.normal(jax.random.key(1), (8, 16, 16, 3)) * 3 + 1
  variables = jax.jit(model.init, static_argnames='train')(
      jax.random.key(0), x, train=False)
  apply = jax.jit(model.apply, static_argnames=('train', 'mutable'))
  _, updates = apply(variables, x, train=True, mutable=('batch_stats',))
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)),
                         variables['batch_stats'], updates['batch_stats'])
  assert all(jax.tree.leaves(changed))
  # Evaluation uses running averages: the output doesn't depend on the batch.
  y_full = apply(variables, x, train=False)
  y_one = apply(variables, x[:1], train=False)
  np.testing.assert_allclose(y_full[:1], y_one, rtol=1e-5, atol=1e-5)
  # ...while training normalises with the statistics of the batch.
  y_train_full, _ = apply(variables, x, train=True, mutable=('batch_stats',))
  y_train_two, _ = apply(variables, x[:2], train=True, mutable=('batch_stats',))
  assert not np.allclose(y_train_full[:2], y_train_two, atol=1e-4)


def test_bfloat16_compute_keeps_float32_params():
  model = create_model('resnet18', num_classes=10, width=8, dtype=jnp.bfloat16)
  x = jnp.ones((2, 32, 32, 3))
  variables = jax.eval_shape(
      lambda: model.init(jax.random.key(0), x, train=False))
  assert {p.dtype for p in jax.tree.leaves(variables)} == {jnp.dtype('float32')}
  (logits, state) = jax.eval_shape(lambda v: model.apply(
      v, x, train=True, mutable=['batch_stats', 'intermediates']), variables)
  feats = state['intermediates']
  assert feats['stage1'][0].dtype == jnp.bfloat16
  assert feats['pool'][0].dtype == jnp.bfloat16
  assert logits.dtype == jnp.float32
  assert {p.dtype for p in jax.tree.leaves(state['batch_stats'])} == {
      jnp.dtype('float32')}


@pytest.mark.parametrize('make_block', [
    lambda: Residual(6, zero_init_last=True),
    lambda: BasicBlock(6, zero_init_last=True),
    lambda: Bottleneck(2, zero_init_last=True),  # 2 * expansion 4 = 8 channels
])
def test_zero_init_block_is_identity_on_non_negative_input(make_block):
  block = make_block()
  channels = 8 if isinstance(block, Bottleneck) else 6
  x = jax.nn.relu(jax.random.normal(jax.random.key(0), (2, 5, 5, channels)))
  variables = block.init(jax.random.key(1), x, train=False)
  for train in (False, True):
    y, _ = block.apply(variables, x, train=train, mutable=['batch_stats'])
    np.testing.assert_array_equal(y, x)


def test_zero_init_whole_model_starts_as_identity_blocks():
  model = create_model('cifar_resnet20', width=4, zero_init_residual=True)
  x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  variables = model.init(jax.random.key(1), x, train=False)
  _, state = model.apply(variables, x, train=False, capture_intermediates=True,
                         mutable=['intermediates'])
  inter = state['intermediates']
  # Stage 1 has identity shortcuts: each block passes its input through.
  np.testing.assert_array_equal(inter['layer1_1']['__call__'][0],
                                inter['layer1_0']['__call__'][0])


def test_registry_names_and_errors():
  names = available_models()
  for expected in ['d2l_resnet18', 'resnet18', 'resnet152', 'resnetv2_50',
                   'resnext50_32x4d', 'resnext101_32x8d', 'wide_resnet50_2',
                   'cifar_resnet20', 'cifar_resnet110']:
    assert expected in names
  with pytest.raises(UserError, match='unknown model .*resnet50'):
    create_model('resnet51')
  with pytest.raises(UserError, match='unknown model option.*depth'):
    create_model('resnet50', depth=3)


def test_every_model_runs_forward_small():
  x = jnp.ones((1, 32, 32, 3))
  for name in available_models():
    # Narrow versions (ResNeXt with 2 groups of full width) to stay fast.
    options = {'groups': 2, 'base_width': 64} if 'resnext' in name else {}
    model = create_model(name, num_classes=7,
                         width=4 if 'cifar' in name else 8, **options)
    out = jax.eval_shape(lambda m=model: m.init_with_output(
        jax.random.key(0), x, train=False)[0])
    assert out.shape == (1, 7), name
