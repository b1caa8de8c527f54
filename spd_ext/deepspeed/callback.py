"""A ``transformers.TrainerCallback`` that attaches spd_ext to the engine Trainer creates.

    trainer = Trainer(model=model, args=TrainingArguments(..., deepspeed="ds_config.json"),
                      train_dataset=data)
    trainer.add_callback(SpdExtCallback(trainer))   # reads the ds_config's "spd_ext" section
    trainer.train()

Trainer builds its DeepSpeed engine inside ``train()``, before ``on_train_begin``; the
callback attaches there, and adds spd_ext's weights and signals to Trainer's logs.
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from spd_ext.deepspeed.config import SpdExtConfig


class SpdExtCallback(TrainerCallback):
    def __init__(self, trainer: Any, config: dict | SpdExtConfig | None = None) -> None:
        self.trainer = trainer
        self.config = config
        self.integration = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        from spd_ext.deepspeed import attach

        engine = getattr(self.trainer, "model_wrapped", None)
        if engine is None or not hasattr(engine, "allreduce_gradients"):
            raise RuntimeError(
                "SpdExtCallback needs a Trainer running DeepSpeed (TrainingArguments("
                "deepspeed=...)), launched with the deepspeed launcher or torchrun; this "
                f"Trainer wraps its model in {type(engine).__name__}")
        self.integration = attach(engine, self.config)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None,
               **kwargs: Any) -> None:
        if self.integration is None or logs is None:
            return
        last = self.integration.last
        extra = {f"spd_ext/weight/rank{r}": w for r, w in enumerate(last.get("weights") or [])}
        extra.update({f"spd_ext/{key}": last[key] for key in
                      ("grad_norm", "syncs_forward", "syncs_backward") if key in last})
        logs.update(extra)  # for the reporting callbacks after this one
        if state.log_history:  # Trainer appended its copy of the logs before callbacks ran
            state.log_history[-1].update(extra)
