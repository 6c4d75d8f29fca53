"""Run-time tools a stage can switch on: JAX's persistent compilation cache and a profiler trace
of chosen steps."""

from __future__ import annotations

import jax

from dsa_train.paths import LocalStaging, is_uri, run_path


def enable_compile_cache(directory) -> None:
    """Compiled programs are written to (and read back from) ``directory``: local or a URI."""
    jax.config.update("jax_compilation_cache_dir", str(directory))
    # Cache every program, small ones too: a restarted job then recompiles nothing.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


class StepProfiler:
    """A ``jax.profiler`` trace of steps ``min(steps)`` .. ``max(steps)`` into ``out_dir``; a
    remote ``out_dir`` gets the trace copied there when it stops (traced into a local directory)."""

    def __init__(self, steps, out_dir):
        self.first, self.last = (min(steps), max(steps)) if steps else (None, None)
        self.out_dir = out_dir
        self.active = False
        self.staging = None

    def before(self, step: int) -> None:
        if step == self.first:
            if is_uri(self.out_dir):
                self.staging = LocalStaging(run_path(self.out_dir))
            jax.profiler.start_trace(str(self.staging.local if self.staging else self.out_dir))
            self.active = True

    def after(self, step: int, outputs) -> None:
        if self.active and step >= self.last:
            self.stop(outputs)

    def stop(self, outputs=None) -> None:
        if self.active:
            if outputs is not None:
                jax.block_until_ready(outputs)  # the traced steps' device work belongs in the trace
            jax.profiler.stop_trace()
            self.active = False
            if self.staging is not None:
                self.staging.close()
                self.staging = None
