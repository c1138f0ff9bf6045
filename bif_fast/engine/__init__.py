"""The chain machinery behind ``compute_bif``, a room per job.

``data`` (evaluation and SGLD batches), ``units`` (rows and columns, loss checks), ``model_state`` (exact
snapshot and restore), ``batched`` (several chains under ``vmap``), ``chains`` (one protocol, sequential
and batched), ``pool`` (pooled accumulators and standard errors) and ``run`` (the draw loop).
"""
