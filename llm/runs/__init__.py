"""The run directory: what a training run (or a quantized or merged copy of one) holds on disk, how to write
one atomically, how to build the model its config describes, and how to load it back (`Run`, `load_run`)."""
