"""Model summary: layer output shapes, parameter count, FLOPs per example.

    python -m resnet_jax.summary --model d2l_resnet18 --input_shape 1,224,224,1 \
        --num_classes 10 [--table]

The shapes are those the model sows (stem conv, stem pool, each stage, the
pooled features) plus the logits, the textbook's listing. FLOPs come from
XLA's cost analysis of the compiled forward pass (not counted by hand);
`--table` adds Flax's per-module table (`nn.tabulate`).
"""

import sys
from typing import Any

import jax
import jax.numpy as jnp
from absl import app, flags

from resnet_jax import models
from resnet_jax.errors import UserError

_MODEL = flags.DEFINE_string('model', 'd2l_resnet18', 'A registered model.')
_INPUT_SHAPE = flags.DEFINE_string('input_shape', '1,224,224,1',
                                   'N,H,W,C of the input.')
_NUM_CLASSES = flags.DEFINE_integer('num_classes', None,
                                    'Logits size (the model default if unset).')
_TABLE = flags.DEFINE_boolean('table', False, "Print Flax's per-module table.")


def summarize(name: str, input_shape: tuple[int, ...],
              num_classes: int | None = None) -> dict[str, Any]:
  """Shapes of the named features, parameter count and forward FLOPs."""
  model = models.create_model(name, num_classes=num_classes)
  x = jax.ShapeDtypeStruct(input_shape, jnp.float32)
  variables = jax.eval_shape(
      lambda x: model.init(jax.random.key(0), x, train=False), x)
  logits, state = jax.eval_shape(
      lambda v, x: model.apply(v, x, train=False, mutable=['intermediates']),
      variables, x)
  layers = list(_in_order(state['intermediates'], ''))
  layers.append(('logits', tuple(logits.shape)))
  compiled = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(
      variables, x).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return {
      'layers': layers,
      'params': sum(p.size for p in jax.tree.leaves(variables['params'])),
      'batch_stats': sum(p.size for p in
                         jax.tree.leaves(variables.get('batch_stats', {}))),
      'flops_per_example': float(cost.get('flops', 0.0)) / input_shape[0],
      'model': model,
  }


def _network_order(key: str) -> tuple[int, str]:
  """stem, stage1..N, pool: eval_shape returns dicts with sorted keys."""
  if key.startswith('stage') and key[5:].isdigit():
    return int(key[5:]), key
  return {'stem': 0, 'pool': 1000}.get(key, 999), key


def _in_order(tree: Any, prefix: str):
  """(name, shape) of the sown features in the order the network makes them."""
  for key in sorted(tree, key=_network_order):
    value = tree[key]
    name = f'{prefix}{key}'
    if isinstance(value, tuple):  # sow appends to a tuple
      for leaf in value:
        yield name, tuple(leaf.shape)
    else:
      yield from _in_order(value, f'{name}/')


def main(argv: list[str]) -> None:
  del argv
  try:
    shape = tuple(int(d) for d in _INPUT_SHAPE.value.split(','))
    if len(shape) != 4:
      raise ValueError
  except ValueError:
    print(f'error: --input_shape={_INPUT_SHAPE.value!r} must be N,H,W,C, e.g. '
          '1,224,224,3', file=sys.stderr)
    sys.exit(2)
  try:
    s = summarize(_MODEL.value, shape, _NUM_CLASSES.value)
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  print(f'{_MODEL.value}, input {shape}')
  for label, out in s['layers']:
    print(f'  {label:<24} output shape: {out}')
  print(f'parameters: {s["params"]:,} (+ {s["batch_stats"]:,} BatchNorm '
        'statistics)')
  print(f'forward FLOPs per example: {s["flops_per_example"] / 1e9:.3f} G '
        "(XLA's cost analysis)")
  if _TABLE.value:
    x = jnp.zeros(shape)
    print(s['model'].tabulate(jax.random.key(0), x, train=False, depth=2,
                              console_kwargs={'width': 120}))


if __name__ == '__main__':
  app.run(main)
