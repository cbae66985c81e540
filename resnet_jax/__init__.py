"""resnet_jax: residual networks in JAX/Flax."""
