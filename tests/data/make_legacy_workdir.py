"""Makes tests/data/legacy_workdir: run at commit 0900507 (the flat layout,
before the package was split into layers) from the repository root:

  python tests/data/make_legacy_workdir.py OUT

then copy OUT/workdir/{checkpoints,config.json,metrics.jsonl} into
tests/data/legacy_workdir. legacy_workdir_expected.json holds what that
commit printed when it evaluated the workdir (train.py --config.run.mode=eval),
resumed it with the same flags and --config.run.num_train_steps=10, and ran
predict.py on docs/examples/ankle_boot.png.
"""

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / 'tests'))
import conftest  # noqa: E402  pylint: disable=wrong-import-position

FLAGS = ['--config.model.width=4', '--config.data.batch_size=16',
         '--config.data.eval_batch_size=16', '--config.run.num_train_steps=6',
         '--config.run.checkpoint_every_steps=4',
         '--config.run.log_every_steps=2', '--config.optim.ema_decay=0.9',
         '--config.run.progress_bar=false']


def main(out: str) -> None:
  data = os.path.join(out, 'data')
  os.makedirs(data, exist_ok=True)
  conftest.write_fake_dataset(data, 'fashion_mnist', num_train=64,
                              num_test=20)
  subprocess.run([sys.executable, str(ROOT / 'train.py'),
                  f'--workdir={os.path.join(out, "workdir")}',
                  f'--config.data.tfds_data_dir={data}', *FLAGS],
                 check=True, cwd=ROOT)


if __name__ == '__main__':
  main(sys.argv[1])
