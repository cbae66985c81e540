"""Model summary: layer output shapes, parameter count, FLOPs per example.

    python -m resnet_jax.tools.summary --config=configs/d2l_fashion_mnist.py \
        [--config.data.image_size=224] [--table]
    python -m resnet_jax.tools.summary --workdir=DIR   # a run's network

The network is the config's `model` section (or a workdir's config.json),
and the input one image of the run's data (image_size, the dataset's
channels). The shapes are those the model sows (stem conv, stem pool, each
stage, the pooled features) plus the logits, the textbook's listing. FLOPs
come from XLA's cost analysis of the compiled forward pass (not counted by
hand) of the same network with Flax's own layers (`models.FLAX`);
`--table` adds Flax's per-module table (`nn.tabulate`).
"""

from typing import Any

import jax
import jax.numpy as jnp
from absl import flags

from resnet_jax.checkpoint import workdir as workdir_lib

from resnet_jax import cli, models
from resnet_jax.models.resnet import network_order
from resnet_jax.data import datasets
from resnet_jax.train import run_setup


def summarize(model: models.ResNet, input_shape: tuple[int, ...]
              ) -> dict[str, Any]:
  """Shapes of the named features, parameter count and forward FLOPs."""
  x = jax.ShapeDtypeStruct(input_shape, jnp.float32)
  variables = jax.eval_shape(
      lambda x: model.init(jax.random.key(0), x, train=False), x)
  logits, state = jax.eval_shape(
      lambda v, x: model.apply(v, x, train=False, mutable=['intermediates']),
      variables, x)
  layers = list(_in_order(state['intermediates'], ''))
  layers.append(('logits', tuple(logits.shape)))
  # Counted with Flax's layers: the CPU path's custom calls (oneDNN) and
  # chunk loops hide their convolutions from the cost analysis.
  twin = model.clone(layers=models.FLAX)
  compiled = jax.jit(lambda v, x: twin.apply(v, x, train=False)).lower(
      variables, x).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return {
      'layers': layers,
      'params': sum(p.size for p in jax.tree.leaves(variables['params'])),
      'batch_stats': sum(p.size for p in
                         jax.tree.leaves(variables.get('batch_stats', {}))),
      'flops_per_example': float(cost.get('flops', 0.0)) / input_shape[0],
  }


def model_and_input(config: Any) -> tuple[models.ResNet, tuple[int, ...]]:
  """The config's network and the shape of one of its input images."""
  config = run_setup.resolve(config)
  spec = datasets.get(config.data.dataset)
  size = datasets.image_size(spec, config.data.image_size)
  return models.from_config(config.model), (1, size, size, spec.channels)


def _in_order(tree: Any, prefix: str):
  """(name, shape) of the sown features in the order the network makes them."""
  for key in sorted(tree, key=network_order):
    value = tree[key]
    name = f'{prefix}{key}'
    if isinstance(value, tuple):  # sow appends to a tuple
      for leaf in value:
        yield name, tuple(leaf.shape)
    else:
      yield from _in_order(value, f'{name}/')


def _define_flags():
  """Only when run as a command: importing the module defines no flags."""
  config = cli.define_config_flag()
  flags.DEFINE_string('workdir', None, "Summarise this workdir's network (its "
                      'config.json) instead of --config.')
  flags.DEFINE_boolean('table', False, "Print Flax's per-module table.")
  return config


def main(argv: list[str], config_flag) -> None:
  del argv
  workdir = flags.FLAGS.workdir
  config = (workdir_lib.read_config(workdir) if workdir else
            cli.config_value(config_flag))
  model, shape = model_and_input(config)
  s = summarize(model, shape)
  print(f'{config.model.name}, input {shape}')
  for label, out in s['layers']:
    print(f'  {label:<24} output shape: {out}')
  print(f'parameters: {s["params"]:,} (+ {s["batch_stats"]:,} BatchNorm '
        'statistics)')
  print(f'forward FLOPs per example: {s["flops_per_example"] / 1e9:.3f} G '
        "(XLA's cost analysis)")
  if flags.FLAGS.table:
    print(model.tabulate(jax.random.key(0), jnp.zeros(shape), train=False,
                         depth=2, console_kwargs={'width': 120}))


if __name__ == '__main__':
  _CONFIG = _define_flags()
  cli.run(lambda argv: main(argv, _CONFIG))
