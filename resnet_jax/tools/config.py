"""python -m resnet_jax.tools.config: every config field, with its default
and meaning (the schema is resnet_jax/config.py)."""

from resnet_jax import config

if __name__ == '__main__':
  print(config.describe())
