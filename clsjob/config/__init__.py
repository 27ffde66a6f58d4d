"""Typed job configs: YAML + `--set key.path=value` overrides -> one frozen pydantic model.

Every field is documented where it is declared; `clsjob config classify|finetune|merge`
prints them all, with their defaults. One module a concern: `base` (the section, the error,
the task, storage, labels), `backend` (each back end's settings), `classify`, `finetune`
(and merge), `distill` (each command's schema), `loading` (YAML, overrides, dates, errors
that name the key), `reference` (the settings table `clsjob config` prints). Everything is
importable from `clsjob.config` as before.
"""
from clsjob.config.base import (ConfigError, TaskName, TASK, Section, StorageConfig, LabelSpec, Labels)  # noqa: F401
from clsjob.config.backend import (Example, ShotsConfig, PromptConfig, EngineConfig, BackendSection, CALIBRATED,
                                   HFBackendConfig, VLLMPoolBackendConfig, VLLMPromptBackendConfig,
                                   BACKEND_CONFIGS, BackendConfig)  # noqa: F401
from clsjob.config.classify import (InputConfig, EvaluateConfig, ClusterConfig, ResourcesConfig,
                                    CascadeStageConfig, CascadeBackendConfig,
                                    ClassifyBackendConfig, CASCADE, Stage,
                                    MAX_REVIEW_ROWS, ReviewConfig, OutputConfig, DriftLimits,
                                    MonitorConfig, AbstainConfig, ClassifyConfig, check_task,
                                    engine_gpus, gpu_mismatch, RENAMED_CLASSIFY_KEYS, rename_keys)  # noqa: F401
from clsjob.config.finetune import (TrackingConfig, TrainingConfig, FinetuneOutputConfig,
                                    FinetuneConfig, MergeConfig)  # noqa: F401
from clsjob.config.distill import (DistillTeacherConfig, DistillStudentConfig, DistillSampleConfig,
                                   DistillGateConfig, DistillOutputConfig, DistillConfig)  # noqa: F401
from clsjob.config.loading import (apply_overrides, DATE_TEMPLATE, fill_dates, load_config,
                                   validate, BACKEND_KINDS, explain, config_hash)  # noqa: F401
from clsjob.config.reference import (field_reference, union_reference, default_text)  # noqa: F401
