"""A workdir written by the flat layout (commit 0900507, before the package
was split into layers) still resumes, evaluates and predicts: parameter
names, checkpoint items and config.json are unchanged.

tests/data/legacy_workdir was made by tests/data/make_legacy_workdir.py at
that commit (cifar_resnet8 at width 4 with an EMA, 6 steps on the fake
Fashion-MNIST of `write_fake_dataset(num_train=64, num_test=20)`), and
legacy_workdir_expected.json holds what that code printed and wrote when it
evaluated the workdir, resumed it to step 10 and predicted an image.
"""

import json
import pathlib
import shutil

import pytest

from helpers import write_fake_dataset
from resnet_jax.checkpoint import workdir as workdir_lib
from resnet_jax import predictor
from resnet_jax.train import train_loop

DATA = pathlib.Path(__file__).resolve().parent / 'data'
EXPECTED = json.loads((DATA / 'legacy_workdir_expected.json').read_text())
EXAMPLE = DATA.parents[1] / 'docs' / 'examples' / 'ankle_boot.png'


@pytest.fixture
def legacy(tmp_path) -> tuple[str, str]:
  """A copy of the old workdir, its config pointing at the same fake data
  made again here."""
  data_dir = tmp_path / 'data'
  write_fake_dataset(str(data_dir), 'fashion_mnist', num_train=64,
                     num_test=20)
  workdir = tmp_path / 'workdir'
  shutil.copytree(DATA / 'legacy_workdir', workdir)
  config = workdir_lib.read_config(str(workdir))
  config.data.tfds_data_dir = str(data_dir)
  workdir_lib.write_config(str(workdir), config)
  return str(workdir), str(data_dir)


def test_old_workdir_evaluates_as_before(legacy):
  workdir, _ = legacy
  config = workdir_lib.read_config(workdir)
  result = train_loop.evaluate_checkpoint(config, workdir)
  assert result['step'] == 6
  for key, value in EXPECTED['eval_step6'].items():
    assert result[key] == pytest.approx(value, abs=1e-4), key


def test_old_workdir_resumes_as_before(legacy):
  workdir, _ = legacy
  config = workdir_lib.read_config(workdir)
  config.run.num_train_steps = 10
  config.run.progress_bar = False
  train_loop.train_and_evaluate(config, workdir)
  rows = [json.loads(line) for line in
          (pathlib.Path(workdir) / 'metrics.jsonl').read_text().splitlines()]
  for want in EXPECTED['resumed_to_step10']:
    got = [r for r in rows if r['step'] == want['step'] and
           ('loss' in r) == ('loss' in want)]
    assert len(got) == 1, want['step']
    for key in ('loss', 'accuracy', 'train_loss', 'test_loss',
                'test_accuracy', 'ema_test_loss'):
      if key in want:
        assert got[0][key] == pytest.approx(want[key], rel=1e-3), key


def test_old_workdir_predicts_as_before(legacy):
  workdir, _ = legacy
  p = predictor.Predictor(workdir)
  probs = p.probabilities(p.load([str(EXAMPLE)]))[0]
  name, prob = EXPECTED['predict_ankle_boot_top']
  assert p.names[int(probs.argmax())] == name
  assert float(probs.max()) == pytest.approx(prob, abs=2e-3)
