"""Drop-in front ends that accept other libraries' calling conventions and run ``bif_fast.compute_bif``.

``bif_fast.compat.devinterp.bif`` takes the arguments of devinterp 2.0.1's ``devinterp.slt.bif.bif``
and returns the same ``xarray.Dataset``; switching is a one-line change of import.
``bif_fast.compat.dattri.BIFAttributor`` is a dattri 0.3.0 ``BaseAttributor`` (``cache``, ``attribute``).
"""
