"""Developer tools run as modules (``python -m bif_fast.tools.<name>``); not imported by ``import bif_fast``."""
