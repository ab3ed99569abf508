"""What the three backends share: finding weights offline, windows, batches that survive OOM.

- **Weights without a network.** A ``source`` is a local path or a hub id.
  A local path is used as is; a hub id is first looked up in the hub cache
  (``cache_dir``, else the library default ``HF_HUB_CACHE``) with
  ``local_files_only``, and when it is there the loaders are handed the
  *snapshot directory*, so they never ask the hub anything. Only a hub id that
  is not cached goes to the network (and fails with ``unavailable`` when
  ``HF_HUB_OFFLINE=1`` or the hub is unreachable). No environment variable is
  read or written here: the decision is made per call, so the daemon's global
  state stays untouched.
- **Windows.** :func:`window_spans` lays out fixed-length windows on a hop grid.
- **Passes.** :func:`run_batched` runs forward passes over items, at most
  ``batch_size`` (the memory budget's count) per pass and as many as the
  lane's time budget allows (:mod:`embedd.models.passes`); on CUDA
  out-of-memory it halves the pass and retries the same items, down to one
  item; the smaller size is kept for the rest of that call (memory that just
  ran out rarely comes back mid-request), and the next call starts again from
  the memory budget's count.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence, TypeVar

import numpy as np
import torch

from embedd.errors import Code, EmbeddError
from embedd.models import passes

__all__ = [
    "autocast",
    "group_by",
    "is_local_path_like",
    "resolve_file",
    "resolve_repo",
    "run_batched",
    "window_spans",
]

log = logging.getLogger(__name__)
T = TypeVar("T")


# -- weights -------------------------------------------------------------
def is_local_path_like(source: str) -> bool:
    """True for strings that can only mean a filesystem path (never a hub id)."""
    return source.startswith(("/", "./", "../", "~")) or source in (".", "..")


def resolve_repo(source: str, cache_dir: str | None) -> tuple[str, bool]:
    """``(what to hand the loader, whether it is local)`` for a model repository.

    An existing directory is itself; a cached hub id is its snapshot directory;
    anything else is returned unchanged for the library to download.
    """
    path = Path(source).expanduser()
    if path.exists():
        return str(path.resolve()), True
    if is_local_path_like(source):
        raise FileNotFoundError(f"model directory {source} does not exist")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return snapshot_download(source, cache_dir=cache_dir, local_files_only=True), True
    except (LocalEntryNotFoundError, HFValidationError, FileNotFoundError, OSError):
        return source, False


def local_config(source: str, cache_dir: str | None) -> dict | None:
    """The ``config.json`` of a source that is already on this host, or None.

    Lets ``status`` report a model's real dim before the weights are loaded,
    without ever touching the network.
    """
    try:
        where, local = resolve_repo(source, cache_dir)
        if not local:
            return None
        return json.loads((Path(where) / "config.json").read_text(encoding="utf-8"))
    except Exception:  # absent, offline, unreadable: the caller falls back
        return None


def resolve_file(source: str, filename: str, cache_dir: str | None) -> str:
    """A local path to one file: ``source`` itself, ``source/filename``, or a hub repo's file.

    A hub repo is looked up in the cache first; only if it is not there is the
    file downloaded (which honours ``HF_HUB_OFFLINE``).
    """
    path = Path(source).expanduser()
    if path.is_file():
        return str(path.resolve())
    if path.is_dir():
        candidate = path / filename
        if not candidate.is_file():
            raise FileNotFoundError(f"{filename} not found in directory {source}")
        return str(candidate.resolve())
    if is_local_path_like(source):
        raise FileNotFoundError(f"checkpoint {source} does not exist")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return hf_hub_download(source, filename, cache_dir=cache_dir, local_files_only=True)
    except LocalEntryNotFoundError:
        return hf_hub_download(source, filename, cache_dir=cache_dir)


# -- windows -------------------------------------------------------------
def mono_waveform(wave: np.ndarray, *, index: int, model_name: str, min_samples: int) -> np.ndarray:
    """A track as one float32 channel of at least ``min_samples`` (a shorter track is tiled)."""
    mono = np.asarray(wave, dtype=np.float32)
    mono = mono.reshape(-1) if mono.ndim == 1 or mono.shape[0] == 1 else mono.mean(axis=0)
    if mono.size == 0:
        raise EmbeddError(Code.DECODE_ERROR, f"track {index} has no audio samples for model {model_name!r}")
    if mono.size < min_samples:
        mono = np.tile(mono, -(-min_samples // mono.size))
    return mono


def window_spans(n: int, window: int, hop: int, *, align_last_to_end: bool) -> list[tuple[int, int]]:
    """Sample spans ``[start, end)`` of the windows of an ``n``-sample signal.

    A signal no longer than one window is one window of the whole signal.
    Otherwise windows start every ``hop`` samples while a whole window fits;
    if the last one stops short of the end, one more window covers the tail:
    either the last ``window`` samples (``align_last_to_end``; every window has
    the same length, so all of them batch together) or a shorter window
    starting on the next hop (keeps every window on the hop grid, so that
    models that cache sub-window work can reuse it).
    """
    if n <= 0:
        return []
    if n <= window:
        return [(0, n)]
    spans = [(s, s + window) for s in range(0, n - window + 1, hop)]
    last_end = spans[-1][1]
    if last_end < n:
        if align_last_to_end:
            spans.append((n - window, n))
        else:
            start = spans[-1][0] + hop
            spans.append((start, n))
    return spans


def group_by(items: Sequence[T], key: Callable[[T], object]) -> dict[object, list[int]]:
    """Indices of ``items`` grouped by ``key`` (e.g. tensor length, so batches stack)."""
    groups: dict[object, list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault(key(item), []).append(i)
    return groups


# -- batches -------------------------------------------------------------
def run_batched(
    items: Sequence[T],
    forward: Callable[[Sequence[T]], torch.Tensor],
    batch_size: int,
    *,
    model_name: str,
    interrupt: threading.Event | None = None,
) -> list[torch.Tensor]:
    """``forward`` over ``items`` in passes; one output row per item, in order.

    ``batch_size`` is the memory budget's count (at most that many items per
    pass); the lane's :class:`~embedd.models.passes.PassPolicy` may take fewer
    to keep a pass within its time budget, and runs between passes (see
    :mod:`embedd.models.passes`). ``forward`` takes a slice of ``items`` and
    returns a tensor whose first axis has one entry per item. On
    ``torch.cuda.OutOfMemoryError`` the pass is halved and the same items are
    retried; a single item that still does not fit is an ``unavailable`` error
    (the GPU is busy with something else).
    """
    policy = passes.current()
    out: list[torch.Tensor] = []
    cap = max(1, int(batch_size))
    i = 0
    while i < len(items):
        if interrupt is not None and interrupt.is_set():
            raise EmbeddError(Code.CANCELLED, f"model {model_name!r} was stopped: the daemon is shutting down")
        size = cap
        if policy is not None:
            policy.before_pass(model_name)
            size = policy.items(model_name, cap)
        chunk = items[i : i + size]
        token = policy.started(model_name, len(chunk)) if policy is not None else None
        began = time.perf_counter()
        try:
            result = forward(chunk)
        except torch.cuda.OutOfMemoryError:
            result = None
        finally:
            if policy is not None and torch.cuda.is_initialized():
                torch.cuda.synchronize()  # kernels run asynchronously: time the pass, not its launch
            seconds = time.perf_counter() - began
            if policy is not None:
                policy.ended(token, seconds)
        if result is None:  # outside the except block, so the failed batch's tensors are freed
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if len(chunk) == 1:
                raise EmbeddError(
                    Code.UNAVAILABLE,
                    f"model {model_name!r} ran out of GPU memory on a single window; "
                    "free GPU memory or lower the batch size and retry",
                )
            cap = max(1, min(cap // 2, len(chunk) - 1))  # halve, and always below what failed
            log.warning("model %s: CUDA out of memory, retrying with batch size %d", model_name, cap)
            continue
        if result.shape[0] != len(chunk):
            raise RuntimeError(f"forward returned {result.shape[0]} rows for {len(chunk)} items")
        if policy is not None:
            policy.record(model_name, cap, len(chunk), seconds)
        out.extend(result.unbind(0))
        i += len(chunk)
    return out


def available_cores() -> int:
    """The CPUs this process may run on.

    torch sizes its pool from the machine's cores, which overshoots when systemd
    or a container limits the daemon to fewer (``CPUAffinity=``, cpusets): the
    extra threads then fight over the same cores. Decoding runs in separate
    processes and needs well under a core for a model's pace on a CPU, so the
    models may use all of them.
    """
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def use_available_cores() -> int:
    """Give torch's intra-op pool (of the calling thread) every available CPU; returns how many."""
    cores = available_cores()
    torch.set_num_threads(max(1, cores))
    return cores


_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@contextlib.contextmanager
def autocast(device: torch.device, precision: str) -> Iterator[None]:
    """Inference mode, plus bf16/fp16 autocast on the device when ``precision`` asks for it.

    Autocast rather than converted weights: it keeps the reductions and norms
    that overflow in 16 bits (softmax, layer/group norm, the spectrogram front
    ends) in float32, which is what the model authors' own mixed-precision
    inference does (see :mod:`embedd.models.precision`).
    """
    with torch.inference_mode():
        dtype = _AUTOCAST_DTYPES.get(precision)
        if dtype is None:
            yield
        else:
            with torch.autocast(device_type=device.type, dtype=dtype):
                yield
