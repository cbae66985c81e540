"""Training and evaluation of a run.

Where to start reading:
  train_step.py    the train and eval steps, pure functions of (state,
                   batch), with their options (`StepOptions`) and metric
                   keys; the `TrainState`.
  run_setup.py     a run from its config: data, model, durations, state,
                   compiled steps (shared by training, evaluation and the
                   benchmark).
  train_loop.py    the loop, one block per periodic action, and the
                   evaluation of a workdir's checkpoint.
  optim.py         the optimiser and learning-rate schedule.
  metric_writers.py, tensorboard_files.py, wandb_sink.py
                   where the metrics go: metrics.jsonl, TensorBoard,
                   curves.png, W&B.
  profiling.py     the jax.profiler switch.
"""
