"""Layer-wise densities from one global density: uniform, Erdős–Rényi and ERK.

*Density* is the fraction of a variable's elements that are kept (trainable,
non-zero); *sparsity* is ``1 - density``. Given the shapes of the variables to
sparsify and one global density ``D``, :func:`allocate_densities` chooses a
density per variable so that ``round(D * N)`` elements are kept in total
(``N`` = number of elements of all the variables):

- ``uniform``: every variable gets ``D``.
- ``erdos_renyi`` (Mocanu et al. 2018, "Scalable training of artificial neural
  networks with adaptive sparse connectivity"): the density of a variable of
  shape ``(..., n_in, n_out)`` is ``eps * (n_in + n_out) / (n_in * n_out)``
  (only the last two axes count).
- ``erk``, Erdős–Rényi-Kernel (Evci et al. 2020, "Rigging the Lottery: Making
  All Tickets Winners", RigL): ``eps * (sum(shape) / prod(shape)) ** power``
  (``power`` 1 by default; RigL's ``erk_power_scale``), so convolution kernels
  count their spatial axes too.

``eps`` is the one factor that makes the kept elements add up to ``D * N``.
When that makes a variable's density exceed 1, the variables with the largest
raw probability are made dense (density 1) and ``eps`` is solved again over
the rest, repeatedly, as in ``get_sparsities_erdos_renyi`` of
google-research/rigl (``rigl/sparse_utils.py``). Unlike RigL, which sums
per-variable integer counts ``n - floor(s * n)`` on the right-hand side, the
equation here uses the exact ``D * N``; the integer counts are then rounded
once, globally (see :func:`allocate_densities`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, List, Mapping, Sequence, Tuple

from trainer.masks.checks import is_whole
from trainer.masks.errors import FreezeConfigError

DISTRIBUTIONS = ("uniform", "erdos_renyi", "erk")


def check_density(density: Any, what: str = "density") -> float:
    """Returns ``density`` as a float after checking it lies in (0, 1].

    Raises:
      FreezeConfigError: not a number (``bool`` included) or outside (0, 1].
    """
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 < float(density) <= 1.0:
        raise FreezeConfigError(f"{what} must be a number in (0, 1] (fraction of elements kept), got {density!r}")
    return float(density)


def kept_count(density: float, total: int) -> int:
    """The number of elements kept at ``density`` of ``total``: ``round(density * total)``.

    Python's ``round`` (half to even) of the float64 product.

    Args:
      density: a fraction in (0, 1].
      total: the number of elements, a positive integer.

    Raises:
      FreezeConfigError: ``density`` outside (0, 1], or so small that no
        element would be kept.
    """
    density = check_density(density)
    count = int(round(density * total))
    if count == 0:
        raise FreezeConfigError(
            f"density {density!r} keeps no element of {total} (round({density!r} * {total}) = 0); "
            f"use a density above {0.5 / total:.3g}"
        )
    return count


@dataclasses.dataclass(frozen=True)
class LayerAllocation:
    """The densities chosen for each variable, keyed by variable path.

    Attributes:
      distribution: ``"uniform"``, ``"erdos_renyi"`` or ``"erk"``.
      density: the global density asked for.
      sizes: ``{path: number of elements}``.
      densities: ``{path: density}`` from the formula, before rounding to whole
        elements, each in [0, 1]; ``sum(densities[p] * sizes[p]) == density *
        sum(sizes)`` up to float rounding.
      counts: ``{path: kept elements}``, integers with
        ``0 <= counts[p] <= sizes[p]``, ``floor`` or ``ceil`` of
        ``densities[p] * sizes[p]``, adding up to exactly
        :func:`kept_count` ``(density, sum(sizes))``.
      dense: the paths whose formula density was capped at 1, in input order.
    """

    distribution: str
    density: float
    sizes: Dict[str, int]
    densities: Dict[str, float]
    counts: Dict[str, int]
    dense: Tuple[str, ...]

    @property
    def kept_densities(self) -> Dict[str, float]:
        """``{path: counts[path] / sizes[path]}``: the densities actually realised."""
        return {p: self.counts[p] / self.sizes[p] for p in self.sizes}

    def lines(self) -> List[str]:
        """One line per variable, for a dry-run plan or a report.

        For example ``"lenet/fc1/kernel: density 0.07957 (18714 of 235200
        kept)"``; capped variables end with ``", dense (erk density capped at
        1)"``. The density shown is the realised ``counts / sizes``.
        """
        out = []
        for p, size in self.sizes.items():
            line = f"{p}: density {self.counts[p] / size:.4g} ({self.counts[p]} of {size} kept)"
            if p in self.dense:
                line += f", dense ({self.distribution} density capped at 1)"
            out.append(line)
        return out

    @property
    def total(self) -> int:
        """Elements in all the variables."""
        return sum(self.sizes.values())

    @property
    def kept(self) -> int:
        """Elements kept in all the variables (``sum(counts.values())``)."""
        return sum(self.counts.values())


def _check_shapes(shapes: Any) -> Dict[str, Tuple[int, ...]]:
    if not isinstance(shapes, Mapping) or not shapes:
        raise FreezeConfigError(f"shapes must be a non-empty mapping of variable path to shape, got {shapes!r}")
    out = {}
    for path, shape in shapes.items():
        if not isinstance(path, str):
            raise FreezeConfigError(f"shapes must be keyed by variable path (str), got key {path!r}")
        try:
            dims = tuple(shape)
        except TypeError:
            raise FreezeConfigError(f"shape of {path!r} must be a sequence of positive integers, got {shape!r}") from None
        if not all(is_whole(d, 1) for d in dims):
            raise FreezeConfigError(f"shape of {path!r} must be a sequence of positive integers, got {shape!r}")
        out[path] = tuple(int(d) for d in dims)
    return out


def _raw_probability(path: str, shape: Tuple[int, ...], distribution: str, power: float) -> float:
    if distribution == "erdos_renyi":
        if len(shape) < 2:
            raise FreezeConfigError(
                f"distribution 'erdos_renyi' needs variables of rank >= 2 (fan-in and fan-out are the last two "
                f"axes); {path!r} has shape {shape}; use 'erk' or 'uniform', or leave it out"
            )
        n_in, n_out = shape[-2:]
        return (n_in + n_out) / (n_in * n_out)
    if len(shape) < 1:
        raise FreezeConfigError(f"distribution 'erk' needs variables of rank >= 1; {path!r} is a scalar")
    return (sum(shape) / math.prod(shape)) ** power


def _formula_densities(
    shapes: Dict[str, Tuple[int, ...]], sizes: Dict[str, int], density: float, distribution: str, power: float
) -> Tuple[Dict[str, float], Tuple[str, ...]]:
    if distribution == "uniform":
        return {p: density for p in shapes}, ()
    raw = {p: _raw_probability(p, s, distribution, power) for p, s in shapes.items()}
    if density == 1.0:
        return {p: 1.0 for p in shapes}, tuple(shapes)
    target = density * sum(sizes.values())
    dense: set = set()
    while True:
        rest = [p for p in shapes if p not in dense]
        eps = (target - sum(sizes[p] for p in dense)) / sum(raw[p] * sizes[p] for p in rest)
        largest = max(raw[p] for p in rest)
        if eps * largest <= 1.0 + 1e-12:  # the tolerance keeps float rounding from densifying everything
            break
        # RigL: every variable with the largest raw probability becomes dense, then solve again.
        dense.update(p for p in rest if raw[p] == largest)
    densities = {p: 1.0 if p in dense else min(eps * raw[p], 1.0) for p in shapes}
    return densities, tuple(p for p in shapes if p in dense)


def _round_counts(sizes: Dict[str, int], densities: Dict[str, float], kept: int) -> Dict[str, int]:
    """Largest-remainder rounding: floors, then +1 for the largest fractional parts (ties: path order)."""
    exact = {p: min(max(densities[p] * sizes[p], 0.0), float(sizes[p])) for p in sizes}
    counts = {p: int(math.floor(x + 1e-9)) for p, x in exact.items()}
    counts = {p: min(c, sizes[p]) for p, c in counts.items()}
    order = sorted(sizes, key=lambda p: (-(exact[p] - counts[p]), p))
    missing = kept - sum(counts.values())
    while missing > 0:
        for p in order:
            if missing > 0 and counts[p] < sizes[p]:
                counts[p] += 1
                missing -= 1
    while missing < 0:
        for p in reversed(order):
            if missing < 0 and counts[p] > 0:
                counts[p] -= 1
                missing += 1
    return counts


def allocate_densities(
    shapes: Mapping[str, Sequence[int]],
    density: float,
    *,
    distribution: str = "erk",
    erk_power_scale: float = 1.0,
) -> LayerAllocation:
    """Chooses a density per variable from one global density.

    Rounding rule: the total kept is ``round(density * N)`` (Python ``round``,
    half to even; :func:`kept_count`). Each variable keeps the floor of
    ``densities[p] * sizes[p]``; the elements still missing go one each to the
    variables with the largest fractional parts (ties: the smaller path in
    string order), never beyond a variable's size. So every count is the floor
    or the ceiling of its formula value, and the counts add up exactly.

    Args:
      shapes: ``{variable path: shape}``, shapes as sequences of positive
        integers, e.g. ``{"lenet/fc1/kernel": (784, 300)}``. ``erdos_renyi``
        needs rank >= 2 (a bias has no fan-in/fan-out: leave it out); ``erk``
        needs rank >= 1 (a rank-1 variable gets raw probability 1 and is
        usually made dense).
      density: the global density, a number in (0, 1].
      distribution: one of ``uniform``, ``erdos_renyi``, ``erk``.
      erk_power_scale: ``erk`` only: the exponent on ``sum(shape) /
        prod(shape)`` (RigL's ``erk_power_scale``; < 1 is softer), positive.

    Returns:
      A :class:`LayerAllocation` with ``densities`` (formula), ``counts``
      (integers) and ``dense`` (capped paths), keyed like ``shapes``.

    Raises:
      FreezeConfigError: empty or malformed ``shapes``, ``density`` outside
        (0, 1] or keeping no element, an unknown ``distribution``, a
        non-positive ``erk_power_scale``, or a rank the distribution cannot
        serve.

    Examples:
      >>> a = allocate_densities({"fc1": (784, 300), "fc2": (300, 100), "fc3": (100, 10)}, 0.1)
      >>> a.dense, a.kept == round(0.1 * 266200)
      (('fc3',), True)
    """
    if distribution not in DISTRIBUTIONS:
        raise FreezeConfigError(f"distribution must be one of {list(DISTRIBUTIONS)}, got {distribution!r}")
    power = erk_power_scale
    if isinstance(power, bool) or not isinstance(power, (int, float)) or not power > 0:
        raise FreezeConfigError(f"erk_power_scale must be a positive number (1 in RigL), got {power!r}")
    density = check_density(density)
    shapes = _check_shapes(shapes)
    sizes = {p: math.prod(s) for p, s in shapes.items()}
    densities, dense = _formula_densities(shapes, sizes, density, distribution, float(power))
    kept = kept_count(density, sum(sizes.values()))
    counts = _round_counts(sizes, densities, kept)
    return LayerAllocation(
        distribution=distribution, density=density, sizes=sizes, densities=densities, counts=counts, dense=dense
    )
