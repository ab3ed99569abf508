"""The model executor: two lane threads that own every model, and the registry they share.

The event loop never runs model code. It submits a job and awaits a future.
Two threads take the jobs, one per kind of waiting:

- the **interactive** thread takes the *control* lane (unload, housekeeping)
  and the *interactive* lane (a person is waiting: a text search, a file
  embed, a recommendation);
- the **batch** thread takes the *batch* lane (the library job).

Why two threads and not one queue with priorities: one forward pass of a big
model on a small CPU takes seconds (a MERT 30 s window is 2.1 TFLOP), and a
priority queue only helps *between* passes. With a thread of its own, an
interactive request starts at once, beside the batch pass in flight; the batch
thread runs at a lower CPU priority (``nice``) and on at most ``batch_threads``
cores, so the kernel gives the person's request, and Navidrome's own streaming,
the CPU first. And the batch yields: before every forward pass (see
:mod:`embedd.models.passes`) it waits while interactive work is queued or
running, so a person's request is served before the batch's next pass, and the
batch lane's passes are sized by time (``pass_budget_s``) as well as memory.
Work nobody waits for any more (a cancelled or paused job, a client that went
away) is withdrawn from the queues at once and stops the call running it at
its next pass boundary.

Each lane is bounded: a full lane answers ``overloaded`` at once instead of
queueing without limit. Audio jobs for the same model and lane are coalesced:
a thread takes the first one plus whatever else is queued for that model and
runs them as one ``embed_audio_many`` call, so windows share forward passes.

The :class:`ModelRegistry` creates, loads and unloads the backends for both
threads. A model is loaded once (a per-model lock: the second thread waits for
the first one's load), used concurrently (the backends keep no per-call state
on the object), and never unloaded while a thread is inside it, while work for
it is queued, or while the running batch job uses it (``pin``). What the event
loop may see of it (``snapshot``) is plain data replaced wholesale.

The package, along those concerns:

- :mod:`~embedd.executor.core`: the :class:`Executor` (the state the threads
  and the loop share, under one condition; start and stop, the registry's pins);
- :mod:`~embedd.executor.threads`: the two lane threads, their scheduling
  between passes, coalescing, running a job;
- :mod:`~embedd.executor.jobs`: jobs and passes, their one event order,
  submitting, cancelling and withdrawing work;
- :mod:`~embedd.executor.status`: what status reads (queue depths, models, lanes);
- :mod:`~embedd.executor.lanes`: the lanes, their settings, compute threads and metrics;
- :mod:`~embedd.executor.registry`: the :class:`ModelRegistry`.
"""

from __future__ import annotations

from embedd.executor.core import Executor
from embedd.executor.lanes import Lane, LaneSettings, resolve_device
from embedd.executor.registry import ModelRegistry, ModelState

__all__ = ["Executor", "Lane", "LaneSettings", "ModelRegistry", "ModelState", "resolve_device"]
