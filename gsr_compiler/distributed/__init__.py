"""Training on several processes with torch.distributed (``docs/distributed.md``).

``launch``: starting ranks (``gsr train --nproc N``, or detecting ``torchrun``);
``sampler``: which batch each rank trains on; ``data_parallel``: the data-parallel training
loop (DistributedDataParallel around the compiled model, checkpoints, evaluation once).
"""
