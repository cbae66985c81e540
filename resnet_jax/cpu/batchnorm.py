"""BatchNorm with a hand-written training-mode gradient, for XLA's CPU backend.

`flax.linen.BatchNorm` differentiated by JAX leaves XLA's CPU backend
several more passes over each activation than the arithmetic needs (the
statistics' reductions are differentiated through the mean and the mean of
squares separately). `batch_norm` computes the same forward pass and its
gradient in the textbook form, two reductions (sum dy, sum dy*x) and one
elementwise pass:

    dx = a * (dy - sum(dy)/n - (x - mean) * inv * dscale / n),
    dscale = (sum(dy*x) - mean * sum(dy)) * inv,  dbias = sum(dy),

with a = scale * inv, inv = 1/sqrt(var + eps): about 1.6x faster than
Flax's BatchNorm + ReLU, forward and backward (figures in
docs/performance.md).

`BatchNorm` is `nn.BatchNorm` with this path in training mode (float32,
features last, no mask, no axis name, fast variance: what the models use);
every other case, and initialisation, is Flax's own code. Parameters,
statistics and their names are Flax's, so checkpoints are interchangeable.
The reductions are ordinary JAX ops: under `jit` over a mesh XLA computes
them over the global batch (synchronised BatchNorm) as for Flax's.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp


def _statistics(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Mean and variance over all but the last axis, as Flax's fast variance
  computes them (E[x^2] - E[x]^2, clipped at 0), in one fusion."""
  axes = tuple(range(x.ndim - 1))
  mean, mean2 = jnp.mean(x, axes), jnp.mean(jnp.square(x), axes)
  return mean, jnp.maximum(0.0, mean2 - jnp.square(mean))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm(x: jax.Array, scale: jax.Array, bias: jax.Array,
               epsilon: float) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(y, mean, var): x normalised with its own batch statistics over all but
  the last axis, scaled and shifted."""
  return _forward(x, scale, bias, epsilon)[0]


def _forward(x, scale, bias, epsilon):
  mean, var = _statistics(x)
  inv = jax.lax.rsqrt(var + epsilon)
  y = (x - mean) * (inv * scale) + bias  # Flax's order of operations
  return (y, mean, var), (x, scale, mean, inv)


def _backward(epsilon, residuals, cotangents):
  del epsilon
  x, scale, mean, inv = residuals
  dy, dmean, dvar = cotangents
  axes = tuple(range(x.ndim - 1))
  n = x.size // x.shape[-1]
  sum_dy, sum_dyx = jnp.sum(dy, axes), jnp.sum(dy * x, axes)
  dscale = (sum_dyx - mean * sum_dy) * inv
  a = scale * inv
  centred = x - mean
  dx = a * dy - a * sum_dy / n - centred * (a * inv * dscale / n)
  # The statistics are outputs too (for the running averages); their
  # cotangents are zero there, but keep the gradient right in general.
  dx = dx + dmean / n + centred * (2.0 * dvar / n)
  return dx, dscale, sum_dy


batch_norm.defvjp(_forward, _backward)


class BatchNorm(nn.BatchNorm):
  """`flax.linen.BatchNorm`, with `batch_norm`'s gradient in training mode."""

  @nn.compact
  def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
    use_ra = nn.merge_param('use_running_average', self.use_running_average,
                            use_running_average)
    if (use_ra or mask is not None or self.is_initializing()
        or x.dtype != jnp.float32 or self.axis not in (-1, x.ndim - 1)
        or self.axis_name is not None or not self.use_fast_variance
        or not (self.use_scale and self.use_bias)
        or not self.force_float32_reductions):
      return super().__call__(x, use_running_average, mask=mask)
    features = (x.shape[-1],)
    ra_mean = self.variable('batch_stats', 'mean', jnp.zeros, features, jnp.float32)
    ra_var = self.variable('batch_stats', 'var', jnp.ones, features, jnp.float32)
    scale = self.param('scale', self.scale_init, features, self.param_dtype)
    bias = self.param('bias', self.bias_init, features, self.param_dtype)
    y, mean, var = batch_norm(x, jnp.asarray(scale, jnp.float32),
                              jnp.asarray(bias, jnp.float32), self.epsilon)
    ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
    ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
    return jnp.asarray(y, self.dtype or jnp.float32)


BatchNorm.__name__ = 'BatchNorm'
