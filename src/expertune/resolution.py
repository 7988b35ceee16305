"""The resolution rules: in what unit a training resolution is given and which values make sense.

One implementation for the two places a resolution is given: the run's ``--resolution`` (checked in
`config.validate`) and a dataset's ``resolution`` in the dataloader JSON (`data.dataloader`). Each caller
words the problem for where the value came from; the rules themselves are only here. Pure, no I/O.

- ``pixel`` and ``pixel_area`` take a whole number of pixels, at least 8 (one VAE latent);
- ``area`` takes megapixels: a value above `MAX_MEGAPIXELS` is surely pixels given by mistake;
- a dataset's ``pixel`` resolution is its buckets' shorter edge, which the VAE needs as a multiple of 8
  (``pixel_area`` and ``area`` edges are rounded to the bucket alignment instead).
"""

from __future__ import annotations

from typing import Literal

RESOLUTION_TYPES: tuple[str, ...] = ("pixel", "area", "pixel_area")
MAX_MEGAPIXELS = 16.0  # 16 megapixels is 4096 x 4096; "area" values above this are pixels by mistake
MIN_PIXELS = 8  # one latent of the VAE
VAE_FACTOR = 8  # the VAE downsamples each edge by 8

ResolutionProblem = Literal["megapixels", "whole_pixels", "multiple_of_8"]


def implausible_megapixels(value: float) -> bool:
    """Whether a value given in megapixels (resolution_type ``area``) must really be pixels."""
    return value > MAX_MEGAPIXELS


def resolution_problem(resolution: float, resolution_type: str, *, bucket_edge: bool = True) -> ResolutionProblem | None:
    """What is wrong with `resolution` in the unit of `resolution_type`, or None when it is fine.

    ``"megapixels"``: an ``area`` value too large to be megapixels; ``"whole_pixels"``: a pixel value that is
    not a whole number >= 8; ``"multiple_of_8"``: a ``pixel`` value that is not a multiple of 8, checked only
    with `bucket_edge` (a dataset's own resolution, which becomes its buckets' edge; the run's --resolution
    is a default that datasets may override, and is checked as such where a dataset takes it).
    """
    if resolution_type == "area":
        return "megapixels" if implausible_megapixels(resolution) else None
    if not float(resolution).is_integer() or resolution < MIN_PIXELS:
        return "whole_pixels"
    if bucket_edge and resolution_type == "pixel" and int(resolution) % VAE_FACTOR:
        return "multiple_of_8"
    return None


def resolution_value(resolution: float, resolution_type: str) -> float:
    """A resolution that passed `resolution_problem`, as it is used: megapixels as a float, pixels as an int."""
    return float(resolution) if resolution_type == "area" else int(resolution)


def nearest_multiples_of_8(resolution: int) -> tuple[int, int]:
    """The multiples of 8 just below and just above a pixel resolution (the fix a message offers)."""
    below = resolution - resolution % VAE_FACTOR
    return below, below + VAE_FACTOR
