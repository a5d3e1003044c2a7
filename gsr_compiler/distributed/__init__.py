"""Training on several processes with torch.distributed.

``gsr_compiler.distributed.partition``: partitioning a graph's nodes across ranks;
``gsr_compiler.distributed.halo``: exchanging halo rows in message-passing layers;
``gsr_compiler.distributed.graph_parallel``: one full graph trained across ranks.
"""
