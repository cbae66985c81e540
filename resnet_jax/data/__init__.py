"""The data: what a run trains and evaluates on, delivered as global,
sharded uint8 batches on the devices.

Where to start reading:
  datasets.py     one row per dataset (shape, classes, mean/std, splits,
                  evaluation crop, in memory or streamed); add a row to add
                  a dataset.
  device_data.py  the `Data` interface both pipelines share, and `load`.
  order.py        which examples make each batch: the epoch permutations
                  and the evaluation padding (one rule for both pipelines;
                  what makes a resume exact).
  in_memory.py    the in-memory pipeline's uint8 cache (small datasets).
  streaming.py    the streamed pipeline: Grain over ArrayRecord files.
  host_decode.py  decoding and host crops for the streamed pipeline.
  preprocess.py   on-device resize, normalisation and augmentation.
  records.py, tfds_io.py
                  ArrayRecord files without TensorFlow; TFDS preparation.
"""
