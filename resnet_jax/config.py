"""Every field of a run, declared once: its section, default, meaning and
valid range; `validate(config)` checks a whole config against them.

A config has four sections, and each consumer reads one of them:

  model  -> `models.from_config`: the keys are `create_model`'s arguments, so
            training, evaluation, predict.py, the summary, the benchmark and
            the converter build the same network from a workdir's config.json.
  data   -> the dataset (a row of `resnet_jax/data/datasets.py`), its resolution,
            the held-out validation split, batch sizes and augmentation.
  optim  -> the optimiser, learning-rate schedule and loss.
  run    -> duration, logging, evaluation, checkpoints, mode, warm start.

`None` means "unset" and every such field says what unset means; no other
sentinel values. The defaults are the default recipe (configs/default.py):
ResNet-8 on Fashion-MNIST, sized for a 2-core CPU. `configs/*.py` start from
`base_config()` and change what their recipe needs; on the command line any
field is `--config.SECTION.FIELD=VALUE`. `python -m resnet_jax.tools.config` lists
every field with its default and meaning.
"""

import dataclasses
import json
from typing import Any, Callable, Mapping

import ml_collections
from ml_collections import config_dict

from resnet_jax.errors import UserError

Check = Callable[[Any], bool]


@dataclasses.dataclass(frozen=True)
class Field:
  """One config field: default, type, meaning and the range it must lie in."""
  default: Any
  meaning: str
  type: type
  check: Check | None = None
  valid: str = ''      # the valid range in words, for the error message
  optional: bool = False  # None allowed ("unset"; `meaning` says what it means)


def _positive(kind: type = int) -> dict[str, Any]:
  return dict(check=lambda v: v > 0, valid='> 0', type=kind)


def _non_negative(kind: type = int) -> dict[str, Any]:
  return dict(check=lambda v: v >= 0, valid='>= 0', type=kind)


def _one_of(*choices: str) -> dict[str, Any]:
  return dict(check=lambda v: v in choices, valid='one of ' + ', '.join(
      repr(c) for c in choices), type=str)


def _unit_interval(closed_right: bool = True) -> dict[str, Any]:
  if closed_right:
    return dict(check=lambda v: 0 <= v <= 1, valid='in [0, 1]', type=float)
  return dict(check=lambda v: 0 <= v < 1, valid='in [0, 1)', type=float)


# The registries the checks consult (models, datasets, the CPU layers) own
# their names; they are imported when a config is checked, not when this
# schema is read (they import Flax).
# pylint: disable=g-import-not-at-top
def _is_model(name: str) -> bool:
  from resnet_jax import models
  return name in models.available_models()


def _is_dataset(name: str) -> bool:
  from resnet_jax.data import datasets
  return name in datasets.DATASETS


def _is_conv_impl(name: str) -> bool:
  from resnet_jax.cpu import layers
  return name in layers.CONV_IMPLS


def _model_names() -> str:
  from resnet_jax import models
  return 'a registered model: ' + ', '.join(models.available_models())


def _dataset_names() -> str:
  from resnet_jax.data import datasets
  return ('a dataset of resnet_jax/data/datasets.py: ' +
          ', '.join(datasets.DATASETS))


def _conv_impl_names() -> str:
  from resnet_jax.cpu import layers
  return 'one of ' + ', '.join(repr(c) for c in layers.CONV_IMPLS)
# pylint: enable=g-import-not-at-top


OPTIMIZERS = ('sgd', 'adamw')
SCHEDULES = ('constant', 'piecewise', 'cosine')
MODES = ('train', 'eval')
DTYPES = ('float32', 'bfloat16')
EVAL_WEIGHTS = ('raw', 'ema')

SCHEMA: dict[str, dict[str, Field]] = {
    'model': {
        'name': Field('cifar_resnet8', 'a name from models.available_models()',
                      str, _is_model, valid='<models>'),
        'num_classes': Field(None, "logits; unset: the dataset's number of "
                             'classes', optional=True, **_positive()),
        'width': Field(None, "stem width, stage widths scale with it; unset: "
                       "the model's own", optional=True, **_positive()),
        'stage_sizes': Field(None, "blocks per stage; unset: the model's own",
                             tuple, lambda v: len(v) > 0 and all(
                                 isinstance(n, int) and n > 0 for n in v),
                             valid='a tuple of positive integers',
                             optional=True),
        'zero_init_residual': Field(True, 'the last BatchNorm of each block '
                                    'starts at zero (Goyal et al. 2017)', bool),
        'conv_impl': Field('auto', "auto: per-layer fastest on CPU, XLA's on "
                           'GPU/TPU (see resnet_jax/cpu/)', str,
                           _is_conv_impl, valid='<conv_impls>'),
        'dtype': Field('float32', 'compute dtype; parameters and optimiser '
                       'state stay float32', **_one_of(*DTYPES)),
    },
    'data': {
        'dataset': Field('fashion_mnist', 'a row of resnet_jax/data/datasets.py '
                         '(a TFDS name)', str, _is_dataset, valid='<datasets>'),
        'tfds_data_dir': Field(None, 'where TFDS keeps prepared data; unset: '
                               '$TFDS_DATA_DIR or ~/tensorflow_datasets', str,
                               optional=True),
        'tfds_manual_dir': Field(None, 'offline: a folder with the download '
                                 'files (named as in their URLs); unset: '
                                 'download', str, optional=True),
        'pipeline': Field(None, "memory: the uint8 dataset copied to every "
                          'device; stream: Grain over ArrayRecord files, '
                          "decoded on the host; unset: the dataset's own "
                          '(stream for ImageNet, else memory)', optional=True,
                          **_one_of('memory', 'stream')),
        'stream_workers': Field(None, 'stream: decoding processes per '
                                'training process; 0: threads of the '
                                'training process; unset: one per core it '
                                'may use, less one, at most 32', optional=True,
                                **_non_negative()),
        'image_size': Field(None, 'model input side, resized on the device; '
                            "unset: the dataset's native size",
                            optional=True, **_positive()),
        'validation_examples': Field(0, "hold out the last N training "
                                     "examples as the 'val' split; 0: none",
                                     **_non_negative()),
        'batch_size': Field(64, 'global training batch, over all devices '
                            'and processes', **_positive()),
        'eval_batch_size': Field(1000, 'global evaluation batch (the last one '
                                 'is padded and masked)', **_positive()),
        'augment': {
            'crop_padding': Field(0, 'random crop of the native size after '
                                  'zero padding by this many pixels',
                                  **_non_negative()),
            'flip': Field(True, 'random horizontal flip', bool),
            'random_erasing': Field(0.0, 'probability of erasing a random '
                                    'rectangle (Zhong et al. 2017)',
                                    **_unit_interval()),
        },
    },
    'optim': {
        'optimizer': Field('sgd', 'sgd (momentum, Nesterov) or adamw',
                           **_one_of(*OPTIMIZERS)),
        'learning_rate': Field(0.1, 'peak learning rate', **_positive(float)),
        'momentum': Field(0.9, 'sgd momentum; 0: plain SGD',
                          **_unit_interval(closed_right=False)),
        'nesterov': Field(True, 'sgd: Nesterov momentum', bool),
        'weight_decay': Field(5e-4, 'L2 (sgd, coupled) or decoupled (adamw) '
                              'weight decay', **_non_negative(float)),
        'decay_bn_and_bias': Field(False, 'also decay BatchNorm parameters '
                                   'and biases', bool),
        'label_smoothing': Field(0.0, 'label smoothing of the cross-entropy',
                                 **_unit_interval(closed_right=False)),
        'grad_clip_norm': Field(None, 'clip gradients to this global norm; '
                                'unset: no clipping', optional=True,
                                **_positive(float)),
        'schedule': Field('cosine', 'learning-rate schedule',
                          **_one_of(*SCHEDULES)),
        'warmup_epochs': Field(0.3, 'linear warmup from 0, in epochs',
                               **_non_negative(float)),
        'warmup_steps': Field(None, 'linear warmup in steps; overrides '
                              'warmup_epochs when set', optional=True,
                              **_non_negative()),
        'lr_boundaries': Field((), 'piecewise: steps at which the rate is '
                               'multiplied by the matching lr_scales', tuple,
                               lambda v: all(isinstance(b, int) and b > 0
                                             for b in v) and list(v) == sorted(
                                                 set(v)),
                               valid='increasing positive step numbers'),
        'lr_scales': Field((), 'piecewise: the factors, one per boundary',
                           tuple, lambda v: all(s > 0 for s in v),
                           valid='positive factors'),
        'ema_decay': Field(0.0, 'keep an exponential moving average of the '
                           'weights (and BatchNorm statistics) with this '
                           'decay per update, evaluated beside them; 0: none',
                           **_unit_interval(closed_right=False)),
        'ema_warmup': Field(False, 'EMA decay min(ema_decay, (1+t)/(10+t)) '
                            'after t updates (as TensorFlow\'s '
                            'ExponentialMovingAverage), so the average soon '
                            'forgets the initial weights', bool),
        'grad_accum_steps': Field(1, 'split each batch into this many '
                                  'micro-batches whose gradients are summed '
                                  'into one update (BatchNorm statistics are '
                                  'per micro-batch); 1: none', **_positive()),
    },
    'run': {
        'num_epochs': Field(7.0, 'length of training in epochs',
                            **_positive(float)),
        'num_train_steps': Field(None, 'length in steps; overrides num_epochs '
                                 'when set', optional=True, **_positive()),
        'seed': Field(0, 'initialisation, data order and augmentation',
                      **_non_negative()),
        'log_every_steps': Field(50, 'a metrics record every N steps (and at '
                                 'the end of each epoch)', **_positive()),
        'profile_start_step': Field(None, 'trace steps from this one on with '
                                    "jax.profiler into WORKDIR/profile "
                                    '(process 0; TensorBoard profile plugin '
                                    'and Perfetto); unset: no trace',
                                    optional=True, **_positive()),
        'profile_num_steps': Field(5, 'how many steps to trace',
                                   **_positive()),
        'eval_every_epochs': Field(1, 'evaluate every N epochs (and at the '
                                   'end)', **_positive()),
        'checkpoint_every_steps': Field(500, 'a checkpoint every N steps (and '
                                        'after each evaluation and at the '
                                        'end)', **_positive()),
        'keep_checkpoints': Field(3, 'keep the last N checkpoints, plus the '
                                  'best by the evaluated accuracy',
                                  **_positive()),
        'mode': Field('train', 'train (or resume), or eval: evaluate a '
                      "workdir's checkpoint on every evaluation split",
                      **_one_of(*MODES)),
        'eval_step': Field(None, 'eval mode: the checkpoint step; unset: the '
                           'latest', optional=True, **_non_negative()),
        'init_from': Field(None, 'warm start: params and BatchNorm statistics '
                           'of another workdir or converted weights '
                           '(DIR or DIR:STEP)', str, optional=True),
        'progress_bar': Field(True, 'a progress bar on a terminal', bool),
        'eval_weights': Field('raw', "the weights eval mode and predict.py "
                              "use and the best checkpoint is chosen by: raw "
                              "(trained) or ema (needs optim.ema_decay > 0)",
                              **_one_of(*EVAL_WEIGHTS)),
        'wandb_project': Field(None, 'also log the metrics to this Weights & '
                               'Biases project (needs the wandb package); '
                               'unset: no W&B', str, optional=True),
    },
}


def _fields(schema: Mapping[str, Any] = SCHEMA, prefix: str = ''):
  """(dotted path, Field) of every field, in declaration order."""
  for key, value in schema.items():
    path = f'{prefix}{key}'
    if isinstance(value, Field):
      yield path, value
    else:
      yield from _fields(value, path + '.')


FIELDS: dict[str, Field] = dict(_fields())


def _build(schema: Mapping[str, Any]) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  for key, value in schema.items():
    if isinstance(value, Field):
      # A None default is a typed placeholder, so that --config.x=5 parses.
      c[key] = (config_dict.placeholder(value.type) if value.default is None
                else value.default)
    else:
      c[key] = _build(value)
  return c


def base_config() -> ml_collections.ConfigDict:
  """Every field at its default; recipes start from here."""
  return _build(SCHEMA)


def describe() -> str:
  """Every field with its default and meaning, one line each."""
  return '\n'.join(f'{path} = {field.default!r}  # {field.meaning}'
                   for path, field in FIELDS.items())


# ------------------------------------------------------------- validation


def get(config: Any, path: str) -> Any:
  """The value of a dotted field path ('model.width')."""
  node = config
  for key in path.split('.'):
    node = node[key]
  return node


def _flat_keys(config: Any, prefix: str = '') -> list[str]:
  keys = []
  for key in config.keys():
    value = config[key]
    path = f'{prefix}{key}'
    if hasattr(value, 'keys') and path not in FIELDS:
      keys.extend(_flat_keys(value, path + '.'))
    else:
      keys.append(path)
  return keys


def _bad(path: str, value: Any, valid: str) -> UserError:
  return UserError(f'config field {path}={value!r} is invalid: must be {valid} '
                   f'(set it with --config.{path}=...)')


def validate(config: Any) -> None:
  """Raises one UserError naming the first invalid field and its valid range.

  Checks that the config has exactly the declared fields, that each value
  has its type (None only where unset is allowed) and lies in its range,
  and the rules that tie fields together.
  """
  unknown = sorted(set(_flat_keys(config)) - set(FIELDS))
  if unknown:
    raise UserError(f'unknown config field {unknown[0]!r}; every field is '
                    'declared in resnet_jax/config.py (python -m '
                    'resnet_jax.tools.config lists them)')
  for path, field in FIELDS.items():
    try:
      value = get(config, path)
    except (KeyError, AttributeError):
      raise UserError(f'config field {path} is missing; start the config '
                      'from resnet_jax.config.base_config()') from None
    if value is None:
      if not field.optional:
        raise _bad(path, value, f'set ({field.meaning})')
      continue
    if not _has_type(value, field.type):
      raise _bad(path, value, f'of type {field.type.__name__}')
    if field.check is not None and not field.check(value):
      valid = {'<models>': _model_names, '<datasets>': _dataset_names,
               '<conv_impls>': _conv_impl_names}.get(
          field.valid, lambda: field.valid)()
      raise _bad(path, value, valid)
  _validate_together(config)


def _has_type(value: Any, kind: type) -> bool:
  if kind is float:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if kind is int:
    return isinstance(value, int) and not isinstance(value, bool)
  return isinstance(value, kind)


def _validate_together(config: Any) -> None:
  from resnet_jax.data import datasets
  o, d = config.optim, config.data
  if o.schedule == 'piecewise':
    if len(o.lr_boundaries) != len(o.lr_scales):
      raise UserError(
          f'config fields optim.lr_boundaries ({len(o.lr_boundaries)} values) '
          f'and optim.lr_scales ({len(o.lr_scales)}) must have the same length')
  elif o.lr_boundaries or o.lr_scales:
    raise UserError(f'config fields optim.lr_boundaries/lr_scales are set but '
                    f'optim.schedule={o.schedule!r} does not use them; set '
                    "--config.optim.schedule=piecewise or clear them")
  # That the batches split over the devices and micro-batches is checked
  # where the devices are known: sharding.check_batch_size.
  if config.run.eval_weights == 'ema' and not o.ema_decay:
    raise UserError("config field run.eval_weights='ema' needs an EMA: set "
                    '--config.optim.ema_decay (e.g. 0.999)')
  spec = datasets.get(d.dataset)
  if d.pipeline == 'memory' and spec.storage == 'stream':
    raise UserError(f'config field data.pipeline=\'memory\' is invalid for '
                    f'{d.dataset}: it does not fit in memory; use '
                    "--config.data.pipeline=stream or leave it unset")
  if spec.native_size is None and d.image_size is None:
    raise UserError(f'config field data.image_size must be set for '
                    f'{d.dataset}, whose images vary in size (e.g. '
                    '--config.data.image_size=224)')
  if datasets.pipeline(d.dataset, d.pipeline) == 'stream':
    if d.validation_examples:
      raise UserError(f'config field data.validation_examples='
                      f'{d.validation_examples}: a held-out split is only '
                      f'available for in-memory datasets, and {d.dataset} is '
                      'streamed; use 0 (or --config.data.pipeline=memory)')
  elif d.validation_examples >= spec.num_train:
    raise _bad('data.validation_examples', d.validation_examples,
               f'in [0, {spec.num_train}) for {d.dataset}')


# ----------------------------------------------------- to and from JSON


def to_json(config: Any) -> str:
  return json.dumps(config.to_dict(), indent=2, sort_keys=True) + '\n'


def from_dict(values: Mapping[str, Any], what: str = 'config'
              ) -> ml_collections.ConfigDict:
  """A full, validated config: the schema's defaults updated with `values`
  (nested sections, as `config.to_dict()` or config.json hold them)."""
  config = base_config()
  _update(config, values, '', what)
  validate(config)
  return config


def _update(node: Any, values: Mapping[str, Any], prefix: str,
            what: str) -> None:
  for key, value in values.items():
    path = f'{prefix}{key}'
    if path in FIELDS:
      if isinstance(value, list):
        value = tuple(value)
      try:
        node[key] = value
      except TypeError:
        raise _bad(path, value, f'of type {FIELDS[path].type.__name__} '
                   f'(in {what})') from None
    elif isinstance(value, Mapping) and any(
        f.startswith(path + '.') for f in FIELDS):
      _update(node[key], value, path + '.', what)
    else:
      raise UserError(f'{what} has an unknown field {path!r}: it was written '
                      'by another version of resnet_jax; retrain, or '
                      'reconvert the weights')
