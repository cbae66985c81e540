"""Everything that exists only for XLA's CPU backend.

`layers.py` is the entry point: `layers_for(conv_impl)` gives the layers a
network is built from (the model's one hook, `models.Layers`). Behind it:
convolutions planned per layer and pass (`conv.py`, with the three ways of
computing each pass in `passes.py`), the native kernels (`cpu_kernels.cc`,
oneDNN's convolutions and a max-pool, built on first use by `native.py` and
called through `onednn.py` and `pooling.py`), BatchNorm with a hand-written
training gradient (`batchnorm.py`) and glibc's allocator settings
(`malloc.py`). Nothing outside this folder knows about plans, oneDNN or
patches; on GPUs and TPUs none of it runs.
"""
