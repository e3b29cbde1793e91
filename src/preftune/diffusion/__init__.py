"""Preference optimization of text-to-image diffusion denoisers (the ``diffusion`` extra:
``pip install preftune[diffusion]``): image preference records, Diffusion-DPO, DCPO and MaPO
on the shared ``Trainer``, SPO and LongAlign (online, from prompts; ``spo.py``,
``longalign.py``), long prompts by segment-level encoding (``segments.py``), fixed-seed sample
grids, and image scorers.

Nothing here is imported by ``import preftune``; the modules import ``diffusers`` when used.
"""


def require_diffusers(what: str) -> None:
    """Stop with a ``ConfigError`` that says how to install the extra when diffusers is
    missing; ``what`` names the command or function that needs it."""
    try:
        import diffusers  # noqa: F401  (only: is it installed)
    except ImportError:
        from ..config import ConfigError

        raise ConfigError(f"{what} needs diffusers: pip install 'preftune[diffusion]'") from None
