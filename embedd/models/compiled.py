"""Compiled forward passes: ``torch.compile`` (inductor) of each backend's common item, in the background.

Why. Eager PyTorch runs a model op by op; much of a Music2Latent pass is
memory-bound elementwise work (norms, SiLU, casts) that only fusion removes.
inductor fuses it and generates C++ (CPU) or Triton (GPU) code. Measured at
real size on the 2-core AVX2 box in fp32 (``bench/compiled.py``,
BENCHMARKS.md): Music2Latent 1.17x (0.48 -> 0.56 of the fp32 matmul peak),
MuQ 1.17x (0.67 -> 0.79), MERT 1.02x (already 0.82 eager). Compiling costs
minutes on 2 cores (90 s to 2 min per model here), so:

- **Once per host.** inductor's own persistent caches (its FX graph cache and
  AOTAutograd cache, on by default in torch 2.11) live under
  ``TORCHINDUCTOR_CACHE_DIR``, which the daemon points at
  ``<data_dir>/compile-cache`` (:func:`use_cache_dir`). A later load, after a
  restart or an idle unload, only traces the model again and finds the
  compiled code there: seconds, not minutes. ``view()`` reports the cache's
  hits and misses (a miss is inductor compiling).
- **Never in anyone's way.** Compilation is batch-lane work: the executor's
  batch thread (its nice value, its cores) compiles a freshly loaded model
  before its next batch job, or as soon as it is idle, while the interactive
  thread serves every request with the eager model. Compiling runs the model
  on one item, so it takes the place of a batch pass and the memory bound
  stays the one the passes already have. Calls switch to the compiled code
  once it is ready (under ``auto``, only if it was timed no slower than eager
  on the same item). A compile that fails or is slower leaves the model eager,
  with one log line and the state in ``status``.
- **A fixed shape, so no request compiles.** Each backend hands one example
  item (batch 1) of the shape nearly all its work has: a MuQ 10 s clip, a MERT
  30 s window, a full Music2Latent chunk. The graph is compiled for exactly
  that shape (``dynamic=False``, one shape per model); a pass of several such
  items runs them one by one through it (on a CPU a pass of one item costs the
  same per item), and every other shape (a short track's single chunk) runs
  eager. The backends' autocast context is part of the graph's guards, so the
  warm-up runs under the same one.

Mode: inductor's ``default`` on CPU (``max-autotune`` adds C++ GEMM template
tuning: many more minutes of compiling on a small host for matmuls oneDNN
already runs near peak); ``max-autotune-no-cudagraphs`` on CUDA (autotuned
Triton kernels, cached like the rest; no CUDA graphs, which pin memory per
shape). Numerics: compiled vectors stay within cosine 0.9999 of eager at the
same precision (``tests/test_compile.py``), so rows are not re-flagged.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch

from embedd.allocator import running as running_allocator

__all__ = ["CompiledForward", "compile_mode", "use_cache_dir"]

log = logging.getLogger(__name__)

#: Where ``compile = auto`` compiles: the models measured faster compiled on that device type, whose
#: compiled code a restart finds in the cache (BENCHMARKS.md, "Compiled forward passes"). On a CPU:
#: Music2Latent (1.17x, cached whole). Not MERT (1.02x: not worth its compile, and one graph is
#: compiled again at every load), not yet MuQ (1.17x, but one of its six graphs is compiled again at
#: every load: ``compile = on`` takes it anyway). CUDA: inductor's usual 1.2-2x on convolutional and
#: attention models (not measured here: no GPU was lent).
AUTO: dict[str, frozenset[str]] = {
    "cpu": frozenset({"latent"}),
    "cuda": frozenset({"muq", "mert", "latent"}),
}
#: A CPU process on tcmalloc or jemalloc (embedd.allocator) compiles nothing under ``auto``: there eager
#: Music2Latent no longer faults in every layer's output, and runs faster than its compiled code (5.70 s
#: against 7.66 s a 60 s chunk, bench/compiled.py on tcmalloc; BENCHMARKS.md). The 1.17x above was on glibc's.
AUTO_CPU_POOLED: frozenset[str] = frozenset()

#: The compiled code must be at most this much slower than eager on the example item to be used
#: (the two timings come from a background thread on a shared host: a little noise is forgiven).
SLOWER_THAN_EAGER = 1.05


def compile_mode(setting: str, model: str, device: str, allocator: str | None = None) -> str:
    """How ``model`` on ``device`` is compiled under the ``compile`` setting: ``off``, ``if_faster`` or ``always``.

    ``auto`` compiles the models measured faster on this kind of device (and, on a CPU,
    this process's allocator: ``allocator``, by default the one it runs on), and uses the
    result only if it is no slower on this host either; ``on`` compiles every model and
    uses the result whatever its speed (the operator asked for it); ``off`` never compiles.
    """
    if setting == "on":
        return "always"
    kind = device.split(":")[0]
    chosen = AUTO.get(kind, frozenset())
    if kind == "cpu" and (allocator or running_allocator()) != "system":
        chosen = AUTO_CPU_POOLED
    if setting == "auto" and model in chosen:
        return "if_faster"
    return "off"


def use_cache_dir(path: Path) -> Path:
    """Keep inductor's caches in ``path`` unless the operator chose ``TORCHINDUCTOR_CACHE_DIR`` already."""
    chosen = os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(path))
    Path(chosen).mkdir(parents=True, exist_ok=True)
    return Path(chosen)


def _cache_counts() -> dict[str, int]:
    from torch._dynamo.utils import counters

    return {
        "hits": int(counters["inductor"]["fxgraph_cache_hit"]),
        "misses": int(counters["inductor"]["fxgraph_cache_miss"]),
    }


class CompiledForward:
    """``fn`` eager until :meth:`compile_now` made its compiled version for ``example``'s shape, then that.

    ``if_faster``: keep ``fn`` when the compiled code was timed slower on the example.

    Call it like ``fn`` (inside the backend's autocast context), with a batch whose
    items have ``example``'s shape or any other: only matching batches use the
    compiled code, item by item. Calls may come from both lane threads at once;
    :meth:`compile_now` runs on the batch lane's.
    """

    def __init__(
        self,
        name: str,
        fn: Callable[[torch.Tensor], torch.Tensor],
        example: torch.Tensor,
        *,
        context: Callable[[], Any],
        if_faster: bool = True,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.name = name
        self._if_faster = if_faster  # use the compiled code only if timed no slower than eager
        self._fn = fn
        self._example = example
        self._context = context  # the backend's autocast (and inference mode): the guards the calls will meet
        self._clock = clock
        self._compiled: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.state = "waiting"  # waiting | compiling | ready | slower | failed | stopped
        self.error: str | None = None
        self.compile_s: float | None = None
        self.eager_s: float | None = None
        self.compiled_s: float | None = None
        self.cache: dict[str, int] | None = None
        self.items = 0  # items run through the compiled code (a statistic: two threads may race on it)

    # -- the calls ---------------------------------------------------------------
    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        compiled = self._compiled
        if compiled is None or batch.shape[1:] != self._example.shape[1:] or batch.dtype != self._example.dtype:
            return self._fn(batch)
        self.items += batch.shape[0]
        if batch.shape[0] == 1:
            return compiled(batch)
        return torch.cat([compiled(batch[i : i + 1]) for i in range(batch.shape[0])])

    # -- the compilation ---------------------------------------------------------
    @property
    def due(self) -> bool:
        return self.state == "waiting"

    def stop(self) -> None:
        """The model is unloaded: never compile it, never call the compiled code again."""
        self._compiled = None
        if self.state in ("waiting", "compiling"):
            self.state = "stopped"

    def compile_now(self) -> None:
        """Compile (or find in the cache), time against eager on the example, and use it if no slower.

        Never raises: a failure is the state ``failed`` and one log line; the model stays eager.
        """
        if not self.due:
            return
        self.state = "compiling"
        try:
            self._compile()
        except Exception as exc:  # noqa: BLE001 -- any compiler failure leaves the model eager
            reason = (str(exc).strip().splitlines() or [""])[0]
            self.state, self.error = "failed", f"{type(exc).__name__}: {reason}"
            log.warning("model %s: compilation failed, it stays eager (%s)", self.name, self.error)

    def _compile(self) -> None:
        import torch._inductor.config as inductor_config

        inductor_config.compile_threads = 1  # in the batch lane's thread, at its nice: no pool of compiler workers
        mode = "max-autotune-no-cudagraphs" if self._example.device.type == "cuda" else "default"
        compiled = torch.compile(self._fn, dynamic=False, mode=mode)
        before = _cache_counts()
        with self._context():
            began = self._clock()
            compiled(self._example)  # traces, then compiles or finds the code in the cache
            self.compile_s = self._clock() - began
            if self._if_faster:  # one pass each way, to keep eager where compiled is slower here
                began = self._clock()
                self._fn(self._example)
                self.eager_s = self._clock() - began
            # A second compiled call (timed): a model that sets up state on its first call (MuQ) is
            # traced again here, in this chore, not in the first request that meets it.
            began = self._clock()
            compiled(self._example)
            self.compiled_s = self._clock() - began
            self.cache = {k: v - before[k] for k, v in _cache_counts().items()}
        if self.state != "compiling":  # unloaded meanwhile
            return
        if self.eager_s is not None and self.compiled_s > self.eager_s * SLOWER_THAN_EAGER:
            self.state = "slower"
            log.warning(
                "model %s: compiled %.2f s per item against %.2f s eager; it stays eager",
                self.name, self.compiled_s, self.eager_s,
            )  # fmt: skip
            return
        self._compiled = compiled
        self.state = "ready"
        log.info(
            "model %s: compiled in %.1f s (cache: %d hits, %d misses); %.2f s per item (eager: %s)",
            self.name, self.compile_s, self.cache["hits"], self.cache["misses"], self.compiled_s,
            "not timed" if self.eager_s is None else f"{self.eager_s:.2f} s",
        )  # fmt: skip

    def view(self) -> dict[str, Any]:
        """What ``status`` shows of it."""
        return {
            "state": self.state,
            "shape": list(self._example.shape),
            "compile_s": self.compile_s,
            "eager_s": self.eager_s,
            "compiled_s": self.compiled_s,
            "cache": self.cache,
            "items": self.items,
            "error": self.error,
        }
