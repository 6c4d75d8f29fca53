"""Checkpoints: training-run checkpoints with exact resume (`manager`), clean stops on preemption
(`preemption`) and model-only import/export for `dsa-train convert` (`model_io`).

Submodules are imported on use (``from dsa_train.checkpoint.manager import RunCheckpointer``) so that
importing one does not pull in Orbax or JAX for the others.
"""
