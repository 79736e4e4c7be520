"""The DeepSpeed config checked against DeepSpeed itself, so that a mistake fails before training.

DeepSpeed ignores a top-level key it does not know: `zero_optimizaton` (a typo) silently trains
with ZeRO-0. The valid key sets come from DeepSpeed's own code, not a hand-kept list, so that they
follow the installed version: the top-level keys are those `DeepSpeedConfig` reads while parsing a
config plus the key-name constants of its config modules; the `zero_optimization` keys are the
fields (and aliases) of its pydantic `DeepSpeedZeroConfig`. Values are then checked by
constructing `DeepSpeedConfig` itself, and its assertion or pydantic error becomes a ConfigError
naming the template and key instead of a traceback from deep inside `deepspeed.initialize`.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import re

import pydantic
from deepspeed import comm as ds_comm
from deepspeed.runtime.config import DeepSpeedConfig, DeepSpeedConfigError
from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

from engine.config import ConfigError

_KEY_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_CONSTANT_MODULES = (
    "deepspeed.runtime.constants",
    "deepspeed.profiling.constants",
    "deepspeed.autotuning.constants",
    "deepspeed.elasticity.constants",
    "deepspeed.runtime.swap_tensor.constants",
    "deepspeed.runtime.activation_checkpointing.config",
)
"""DeepSpeed modules whose upper-case string constants name config keys (sections DeepSpeedConfig
reads through `.keys()` or sub-parsers, which the read recording below cannot see)."""


_READ_BY_INITIALIZE = ("sequence_parallel_size", "data_parallel_size")
"""The mesh layout: read by deepspeed.initialize itself, never by DeepSpeedConfig's parser."""


class _ReadRecorder(dict):
    """A config dict that remembers every key DeepSpeed asks it for."""

    def __init__(self, data: dict, seen: set):
        super().__init__(data)
        self.seen = seen

    def get(self, key, default=None):
        self.seen.add(key)
        return super().get(key, default)

    def __getitem__(self, key):
        self.seen.add(key)
        return super().__getitem__(key)

    def __contains__(self, key):
        self.seen.add(key)
        return super().__contains__(key)

    def __copy__(self):
        return _ReadRecorder(self, self.seen)


@functools.lru_cache(maxsize=1)
def top_level_keys() -> frozenset:
    """Every top-level key the installed DeepSpeed understands."""
    seen: set = set(_READ_BY_INITIALIZE)
    minimal = {"train_batch_size": 1, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1}
    try:
        DeepSpeedConfig(_ReadRecorder(minimal, seen))
    except Exception:  # a DeepSpeed version that parses differently: the constants still count
        pass
    for name in _CONSTANT_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        seen.update(v for k, v in vars(module).items() if k.isupper() and isinstance(v, str))
    return frozenset(k for k in seen if isinstance(k, str) and _KEY_NAME.match(k))


@functools.lru_cache(maxsize=1)
def zero_keys() -> frozenset:
    """Every key of the `zero_optimization` section (field names and their aliases)."""
    keys = set()
    for name, info in DeepSpeedZeroConfig.model_fields.items():
        keys.add(name)
        if info.alias:
            keys.add(info.alias)
    return frozenset(keys)


def _unknown_key_error(template: str, key: str, valid: frozenset, section: str = "") -> ConfigError:
    close = difflib.get_close_matches(key, sorted(valid), n=1, cutoff=0.6)
    where = f"{section}.{key}" if section else key
    hint = f"; did you mean {(section + '.' if section else '') + close[0]!r}?" if close else ""
    return ConfigError(f"{template}: unknown DeepSpeed config key {where!r}{hint} (DeepSpeed would ignore it)")


def check_keys(ds: dict, template: str) -> None:
    """Refuse keys DeepSpeed does not know (top level and zero_optimization), naming the nearest."""
    valid = top_level_keys()
    for key in ds:
        if key not in valid:
            raise _unknown_key_error(template, str(key), valid)
    zero = ds.get("zero_optimization")
    if isinstance(zero, dict):
        for key in zero:
            if key not in zero_keys():
                raise _unknown_key_error(template, str(key), zero_keys(), "zero_optimization")
    elif zero is not None and not isinstance(zero, bool):
        raise ConfigError(f"{template}: zero_optimization must be a mapping, got {zero!r}")


class _DataParallel:
    """The one thing DeepSpeedConfig asks a model-parallel unit: the data-parallel world size, so
    that an initialised process group of another layout does not change the check."""

    def __init__(self, world_size: int):
        self.world_size = world_size

    def get_data_parallel_world_size(self) -> int:
        return self.world_size


def _section_holding(ds: dict, loc: tuple) -> str:
    """The top-level section whose mapping holds the key a sub-config's pydantic error names (a
    DeepSpeedConfig error says which model failed, not under which key it was read)."""
    holders = [k for k, v in ds.items() if isinstance(v, dict) and loc and loc[0] in v]
    return holders[0] if len(holders) == 1 else ""


def _pydantic_message(error: pydantic.ValidationError, section: str) -> str:
    first = error.errors()[0]
    loc = ".".join(str(p) for p in first.get("loc", ()))
    key = ".".join(p for p in (section, loc) if p)
    value = first.get("input")
    return f"{key or error.title}: {first.get('msg', 'invalid value')} (got {value!r})"


def validate(ds: dict, template: str, world_size: int) -> None:
    """Parse the resolved config with DeepSpeed's own DeepSpeedConfig; its complaint is a ConfigError."""
    zero = ds.get("zero_optimization")
    if isinstance(zero, dict):
        try:  # first alone, so that the message can name zero_optimization.<key>
            DeepSpeedZeroConfig(**zero)
        except pydantic.ValidationError as e:
            raise ConfigError(f"{template}: {_pydantic_message(e, 'zero_optimization')}") from None
    checked = dict(ds)
    if not ds_comm.is_initialized() and isinstance(ds.get("train_batch_size"), int) and world_size > 1:
        # Without a process group DeepSpeedConfig assumes one rank: check the same per-rank
        # geometry at world size 1 (train_batch_size = micro x accumulation x world was checked
        # when it was filled).
        checked["train_batch_size"] = ds["train_batch_size"] // world_size
    try:
        DeepSpeedConfig(checked, mpu=_DataParallel(world_size))
    except pydantic.ValidationError as e:
        section = _section_holding(ds, tuple(e.errors()[0].get("loc", ())))
        raise ConfigError(f"{template}: DeepSpeed rejects the config ({e.title}): {_pydantic_message(e, section)}") from None
    except (AssertionError, ValueError, TypeError, KeyError, DeepSpeedConfigError) as e:
        raise ConfigError(f"{template}: DeepSpeed rejects the config: {_describe(e)}") from None


def _describe(error: BaseException) -> str:
    text = str(error).strip()
    return text or type(error).__name__
