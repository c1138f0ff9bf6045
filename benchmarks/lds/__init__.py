"""The retraining benchmark: linear datamodelling scores (LDS) of attribution methods on small offline models.

Sign convention (the one place it is stated): a score matrix ``scores[i, j]`` is the predicted *change in
query j's loss when training point i is included*. The predicted loss of query j after training on a
subset S is then ``sum_{i in S} scores[i, j]`` (up to a constant), and the LDS rank-correlates it with the
loss actually measured after retraining on S. Under this convention the BIF enters as ``+bif``
(``-Cov(l_i, phi_j)``: including i tilts the posterior by ``exp(-beta l_i)``, which moves ``E[phi_j]`` by
``-beta Cov(l_i, phi_j)``), and the classical influence function as ``-g_j^T H^-1 g_i``.
"""
