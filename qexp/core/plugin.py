"""What every plugin shares: its name, the checks it runs before heavy work, and the typed
input and output of a model stage (attack, defense, quantizer).

The pipeline (qexp/pipeline/run.py) reads nothing from a plugin but what these classes and the group
base classes declare: no attribute probing, no side attributes. A stage gets a `Subject`
(the model, its tokenizer, the branch and the cache key of that model state) and returns a
`StageResult` (the new model, what it did, the files it wrote into the run dir).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


class Plugin:
    """Base of every config-group plugin (the dataclass named by a YAML's `_target_`).

    Lifecycle: the constructor only checks the plugin's own keys (no other option is built
    there); `resolve(spec)` then builds the options it names (`spec` is the run's validated
    spec, or None for a stand-alone tool such as qexp-encrypt) into its derived fields
    (`field(init=False)`); `validate_environment()` checks the packages it runs are
    installed; `check_spec(spec)` runs the checks across groups; `check_model` the checks on
    config.json; then the stage runs.
    """

    name: str
    # the config group (conf/<group>/), declared by each group's base class; errors about a
    # plugin's keys name `<group>.<key>`
    group: ClassVar[str] = ""
    # True for the `none` option of a group: the pipeline skips the stage altogether
    identity: ClassVar[bool] = False

    def resolve(self, spec: Any) -> None:
        """Build the options this plugin names (the gap attack's targets, `attack.against`,
        launder's `via`) into its derived fields, once every plugin of the run exists
        (`spec`: the run's Spec, or None outside a run); raise ConfigError."""

    def validate_environment(self) -> None:
        """The packages this plugin runs are installed (checked at validation, before any
        model loads); raise ConfigError naming the option and how to install them."""

    def settings(self) -> dict:
        """The plugin's config keys and values (derived fields left out), as a new dict."""
        return {
            f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self) if f.init
        }

    def check_spec(self, spec: Any) -> None:
        """Checks that involve other groups (e.g. a defense reading the quantizer's grid), run
        by `config.validate` before any model is loaded; raise ConfigError."""

    def check_model(self, config: Any) -> None:
        """Checks that need the model's config.json (architecture, widths, positions) but no
        weights, run before the first forward pass; raise ConfigError."""

    def fingerprint(self) -> Any:
        """What determines this plugin's output beyond its config (e.g. a digest of a data
        file's contents), for the stage cache's keys; None if nothing."""
        return None


@dataclass
class Subject:
    """The model a stage works on, with what a plugin may need besides the weights."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    branch: str  # "original" or "attacked": names per-branch files (logs/, quantized/)
    key: str  # stage-cache key of this model state (sub-steps chain from it)
    source: str = ""  # where the weights came from (a hub id, a path, a packaged file)


@dataclass
class StageResult:
    """A stage's output: the model, JSON-able facts for results.json, files it wrote."""

    model: PreTrainedModel
    info: dict = field(default_factory=dict)
    files: list[str] = field(default_factory=list)  # relative to the run dir
