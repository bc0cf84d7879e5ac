"""The trainer's data side: plan (pure order), fetch (blocks from storage), loader (batches + state)."""
from trainer.data.loader import Batch, DataStateError, Source, TokenLoader, cu_seqlens, plan_for
from trainer.data.mixture import Mixture
from trainer.data.plan import Plan, PlanError, StepRows

__all__ = ["Batch", "DataStateError", "Mixture", "Plan", "PlanError", "Source", "StepRows", "TokenLoader", "cu_seqlens", "plan_for"]
