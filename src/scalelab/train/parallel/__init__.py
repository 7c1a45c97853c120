"""Distributed training internals: the multi-rank run (`engine`), sharded checkpoints (`checkpoint`),
torchrun launching (`launch`) and model parallelism (`tensor`). The public entry points are
`scalelab.train.distributed.parallelize` and `scalelab.train.parallel.engine.run_distributed`."""
