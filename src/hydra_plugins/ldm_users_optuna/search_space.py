"""hydra-optuna-sweeper's search-space syntax, read by Hydra's own override parser, as Optuna >= 4 distributions.

`params:` entries and command-line arguments are Hydra overrides. A sweep becomes a distribution:
  choice(a, b, ...)                  -> CategoricalDistribution
  range(start, stop, step)           -> IntDistribution (FloatDistribution with a float bound or step; a shuffled
                                        range is a choice); `stop` included, as hydra-optuna-sweeper has it (so a
                                        search written for it searches the same values here)
  interval(low, high)                -> FloatDistribution (IntDistribution when both bounds are integers)
  tag(log, interval(low, high))      -> the same on a log scale
Anything else (`experiment=smoke`) is a fixed override given to every trial.
"""

from __future__ import annotations

from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, Transformer
from hydra.errors import HydraException


def _choices(override: Override) -> list:
    return list(override.sweep_iterator(transformer=Transformer.encode))


def to_distribution(override: Override) -> Any:
    """The Optuna distribution of a sweep override; None for a fixed one."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if not override.is_sweep_override():
        return None
    value = override.value()
    if override.is_choice_sweep() or (override.is_range_sweep() and value.shuffle):
        return CategoricalDistribution(_choices(override))
    if override.is_range_sweep():
        start, stop, step = value.start, value.stop, value.step
        if any(isinstance(x, float) for x in (start, stop, step)):
            return FloatDistribution(float(start), float(stop), step=float(step))
        return IntDistribution(int(start), int(stop), step=int(step))
    if override.is_interval_sweep():
        log = "log" in value.tags
        if isinstance(value.start, int) and isinstance(value.end, int):
            return IntDistribution(int(value.start), int(value.end), log=log)
        return FloatDistribution(float(value.start), float(value.end), log=log)
    raise HydraException(f"{override.input_line}: the Optuna sweeper takes choice(), range(), interval() and "
                         f"tag(log, interval()) sweeps.")


def parse(overrides: list[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """(search space: key -> distribution, fixed overrides: key -> value); a later override of a key wins."""
    space: dict[str, Any] = {}
    fixed: dict[str, str] = {}
    for override in OverridesParser.create().parse_overrides(overrides):
        key = override.get_key_element()
        space.pop(key, None)
        fixed.pop(key, None)
        distribution = to_distribution(override)
        if distribution is None:
            fixed[key] = override.get_value_element_as_str()
        else:
            space[key] = distribution
    return space, fixed
