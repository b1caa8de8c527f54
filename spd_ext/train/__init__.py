"""The training loop (spd_ext.train.loop) and the Trainer that runs it on a model and an
optimizer; `spd-ext train`'s run configuration (spd_ext.train.config) and rank program
(spd_ext.train.run), which runs it on a DeepSpeed engine."""

from spd_ext.utils.lazy import lazy_exports

# Loaded on first use: the run configuration's schema (spd_ext.train.config) is read by the
# command line without loading torch.
_EXPORTS = {"TrainerHooks": "spd_ext.hooks", "RunLog": "spd_ext.utils.run_log",
            **dict.fromkeys(["ConfigError", "RunConfig", "RunPlan", "check_environment",
                             "load_config", "plan_run"], "spd_ext.train.config"),
            "TrainConfig": "spd_ext.train.trainer_config",
            **dict.fromkeys(["LoopSettings", "StepResult", "TrainingDiverged", "TrainingLoop"],
                            "spd_ext.train.loop"),
            **dict.fromkeys(["TrainResult", "Trainer", "lr_at",
                             "make_optimizer"], "spd_ext.train.trainer")}

__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(globals(), _EXPORTS)
