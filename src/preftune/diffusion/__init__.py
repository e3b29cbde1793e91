"""Preference optimization of text-to-image diffusion denoisers (the ``diffusion`` extra:
``pip install preftune[diffusion]``): image preference records, Diffusion-DPO, DCPO and MaPO
on the shared ``Trainer``, SPO (online, from prompts; ``spo.py``), fixed-seed sample grids, and
an image scorer.

Nothing here is imported by ``import preftune``; the modules import ``diffusers`` when used.
"""
