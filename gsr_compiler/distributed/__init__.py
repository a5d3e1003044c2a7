"""Training on several processes with torch.distributed (``docs/distributed.md``).

Data-parallel: ``launch``: starting ranks (``gsr train --nproc N``, or detecting ``torchrun``);
``sampler``: which batch each rank trains on; ``data_parallel``: the data-parallel training
loop (DistributedDataParallel around the compiled model, checkpoints, evaluation once).

Graph-parallel: ``partition``: partitioning a graph's nodes across ranks; ``halo``: exchanging
halo rows in message-passing layers; ``graph_parallel``: one full graph trained across ranks.
"""
