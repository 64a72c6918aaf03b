"""The job spec: one validated config object for every job kind (DESIGN §5).

The package imports only pydantic and yaml, so the API validates a spec without importing torch. Every model
derives from `Strict` (base.py), which forbids unknown keys, so a typo is an error that names the field.

- base.py: `Strict`, `SpecError`, the error formatting and `default_timesteps`.
- limits.py: bounds every stored value respects, built-in names, and the YAML reader (`load_yaml`).
- model.py, data.py, train.py: the sections of a training job (teacher, data source, schedule/optimisers/
  memory levers/loop).
- distill.py: `kind: distill` (stage 1) and the rules that read several sections (sharding and optimiser).
- rl.py: `kind: rl` (stage 2), eval.py: `kind: eval`, prepare.py: `kind: prepare`.
- load.py: `load_spec`, `parse_spec`, `apply_overrides`: a file or mapping to the job model its `kind` names.
"""

from trainer.jobspec.base import (
    NUM_TRAIN_TIMESTEPS,
    Family,
    SpecError,
    Strict,
    default_timesteps,
    format_validation_error,
)
from trainer.jobspec.data import BucketSpec, DataSpec
from trainer.jobspec.distill import (
    DEFAULT_REAL_GUIDANCE,
    SAM_GLOBAL_BLOCKS,
    DiscriminatorSpec,
    DistillJob,
    DistillSpec,
)
from trainer.jobspec.eval import EvalJob, EvalSpec, ScorerKind, ScorerSpec
from trainer.jobspec.load import JobSpec, apply_overrides, load_spec, num_processes, parse_spec, total_steps
from trainer.jobspec.model import LoraSpec, ModelSpec
from trainer.jobspec.prepare import PrepareJob, PrepareSpec
from trainer.jobspec.rl import RL_THRESHOLD_SDXL, RewardSpec, RLJob, RLSpec
from trainer.jobspec.train import (
    GuardSpec,
    MemorySpec,
    OptimizerSpec,
    OptimSpec,
    ScheduleSpec,
    TrainSpec,
    ValidationSide,
    ValidationSpec,
)

__all__ = [
    "GuardSpec",
    "DEFAULT_REAL_GUIDANCE",
    "NUM_TRAIN_TIMESTEPS",
    "RL_THRESHOLD_SDXL",
    "SAM_GLOBAL_BLOCKS",
    "BucketSpec",
    "DataSpec",
    "DiscriminatorSpec",
    "DistillJob",
    "DistillSpec",
    "EvalJob",
    "EvalSpec",
    "Family",
    "JobSpec",
    "LoraSpec",
    "MemorySpec",
    "ModelSpec",
    "OptimSpec",
    "OptimizerSpec",
    "PrepareJob",
    "PrepareSpec",
    "RLJob",
    "RLSpec",
    "RewardSpec",
    "ScheduleSpec",
    "ScorerKind",
    "ScorerSpec",
    "SpecError",
    "Strict",
    "TrainSpec",
    "ValidationSide",
    "ValidationSpec",
    "apply_overrides",
    "default_timesteps",
    "format_validation_error",
    "load_spec",
    "num_processes",
    "parse_spec",
    "total_steps",
]
