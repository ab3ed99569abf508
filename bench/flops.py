"""FLOPs per audio second at real size: what each model spends, what its windowing needs, how fast.

For each model (random weights of the released architectures, built by
``python tests/tiny_models.py DIR --preset full``; loaded through embedd's own
backend, as the daemon does) this prints, as JSON lines and then a table:

1. **One batch item's FLOPs**, counted with ``torch.utils.flop_counter`` on the
   backend's own ``_forward`` of one item as the backend cuts it (a MuQ 10 s
   clip, a MERT 30 s window, a Music2Latent 10 s chunk of one channel). The
   item is taken from the backend's own layout of a real track, never built
   here. torch's counter has no formula for two attention ops and counts them
   as zero: CPU ``scaled_dot_product_attention``
   (``_scaled_dot_product_flash_attention_for_cpu``: 23 % of MERT) and
   ``nn.MultiheadAttention``'s inference fast path
   (``_native_multi_head_attention``: 10 % of Music2Latent); this script adds
   formulas for both and prints their share (``unregistered_share``).
2. **An independent analytic count of the same item**: forward hooks on the
   modules add ``2 x in x out x tokens`` per Linear, ``2 x outputs x
   in_channels/groups x kernel`` per convolution, and ``4 x batch x T^2 x
   inner`` (scores and values) plus the projections per attention module --
   from layer shapes, not from the ops the counter sees. Their ratio is the
   ``agreement``. Both count multiply-adds only (norms, softmax, STFT and
   element-wise work are not FLOPs here), the work a matmul peak compares to.
3. **Per track length** (default 30 s, 4 min, 12 min): how many items the
   backend's own windowing makes (its ``window_latents`` / ``track_latents``
   run with a recording stand-in for ``_forward``, so the layout is exactly
   the daemon's: MERT's 5 s hop, MuQ's clip reuse, latent's chunking and
   padding), the FLOPs per audio second that costs, next to
   ``contract_min`` -- the least its windowing contract needs, enumerated here
   independently (MERT: 30 s windows on the 5 s grid plus the end-aligned
   tail; MuQ: the distinct 10 s clips of its 120 s / 15 s windows; latent:
   the unpadded frames of both channels) -- and ``once``, every audio second
   through the model once (no overlap). ``waste`` = 1 - contract_min/actual
   (padding, recomputed clips); ``beyond_once`` = 1 - once/actual (the
   overlap the contract itself asks for, plus any waste).
4. **Speed against the device's own limit, in the same run**: the best of a
   few square matmuls (``--peak-n``, fp32 and bf16; fp16 too on CUDA) before
   and after the models, and the time of one item's forward pass in each
   precision (the better of two timed passes; autocast, as the daemon runs
   it; the counting pass warms fp32, one untimed pass warms each other
   precision unless ``--quick``); achieved FLOP/s = counted FLOPs / time,
   ``frac_peak`` against the best matmul rate of the same precision.
   ``--stock-layout`` loads the models without ``embedd.models.layout``: the
   "before" of its channels-last layouts.

    python bench/flops.py --models-dir /tmp/embedd/fullmodels
    python bench/flops.py --models-dir /tmp/embedd/fullmodels --models mert --quick
    python bench/flops.py --models-dir .cache/tiny-models --lengths 30 --no-time   # smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

MODELS = ("muq", "mert", "latent")
_CPU_SDPA = "_scaled_dot_product_flash_attention_for_cpu"
_NATIVE_MHA = "_native_multi_head_attention"


# -- the device's limit ------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, repeats: int) -> float:
    """Best FLOP/s of an ``n x n`` matmul in ``dtype`` (one warm-up, then ``repeats`` timed)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    inner = 1 if device.type == "cpu" else 20  # a GPU matmul is too short to time alone
    best = math.inf
    with torch.inference_mode():
        torch.mm(a, b)
        _sync(device)
        for _ in range(repeats):
            started = time.perf_counter()
            for _ in range(inner):
                torch.mm(a, b)
            _sync(device)
            best = min(best, (time.perf_counter() - started) / inner)
    return 2 * n**3 / best


PEAK_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def measure_peaks(device: torch.device, precisions: Sequence[str], n: int, repeats: int) -> dict[str, float]:
    return {p: matmul_peak(device, PEAK_DTYPES[p], n, repeats) for p in precisions}


# -- counting ------------------------------------------------------------------------------
def flop_counter() -> Any:
    """``FlopCounterMode`` that also counts the attention ops torch's registry has no formula for.

    CPU ``scaled_dot_product_attention`` (``_scaled_dot_product_flash_attention_for_cpu``)
    and ``nn.MultiheadAttention``'s inference fast path (``_native_multi_head_attention``,
    Music2Latent's attention) count as zero otherwise.
    """
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def cpu_sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    def native_mha(query_shape, key_shape, value_shape, embed_dim, num_head, qkv_weight_shape, *args,
                   out_shape=None, **kwargs) -> int:
        # nn.MultiheadAttention's inference fast path: q/k/v projections, attention, output projection
        batch, tq, e = query_shape
        tk = key_shape[1]
        return 2 * batch * e * e * (tq + 2 * tk) + 4 * batch * tq * tk * e + 2 * batch * tq * e * e

    custom = {}
    for name, formula in ((_CPU_SDPA, cpu_sdpa), (_NATIVE_MHA, native_mha)):
        packet = getattr(torch.ops.aten, name, None)
        if packet is not None:
            custom[packet] = formula
    return FlopCounterMode(display=False, custom_mapping=custom)


def op_totals(counter: Any) -> dict[str, int]:
    """The counter's global FLOPs per op name (``convolution``, ``mm``, ...)."""
    return {str(op).split(".")[-1]: int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}


class AnalyticCount:
    """FLOPs of a forward pass from layer shapes, via a global forward hook (independent of the op counter).

    Linear: ``2 x in x out`` per token (tokens = input elements / in_features);
    convolution: ``2 x output elements x in_channels/groups x kernel``;
    mel filterbank (torchaudio ``MelScale``): ``2 x output elements x frequency bins``;
    attention: ``4 x batch x T^2 x inner`` (scores, then values) per attention
    module, plus -- for ``nn.MultiheadAttention``, whose projections are not
    Linear calls -- ``2 x tokens x 4 E^2``. The hook is global (every module
    that runs, also those outside the model's tree, like MuQ's spectrogram).
    An attention module of a class with no formula here is listed in
    ``unknown_attention`` when it runs.
    """

    _ATTENTION_INNER: dict[str, Callable[[torch.nn.Module], int]] = {
        # transformers' HuBERT (MERT): every flavour (eager/sdpa/flash) of the class
        "HubertAttention": lambda m: int(m.embed_dim),
        "HubertSdpaAttention": lambda m: int(m.embed_dim),
        "HubertFlashAttention2": lambda m: int(m.embed_dim),
        # MuQ's conformer
        "Wav2Vec2ConformerSelfAttention": lambda m: int(m.linear_q.out_features),
        # MuLan's audio transformer (muq_mulan.modules.transformer.Attention); Music2Latent's
        # Attention of the same name wraps an nn.MultiheadAttention, counted on its own
        "Attention": lambda m: int(m.to_q.out_features) if hasattr(m, "to_q") else 0,
    }

    def __init__(self) -> None:
        from torch.nn.modules.module import register_module_forward_hook

        self.totals = {"linear": 0, "conv": 0, "attention": 0, "filterbank": 0}
        self.unknown_attention: set[str] = set()
        self._handle = register_module_forward_hook(self._hook, with_kwargs=True)

    def close(self) -> None:
        self._handle.remove()

    @property
    def total(self) -> int:
        return sum(self.totals.values())

    @staticmethod
    def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor | None:
        for value in [*args, kwargs.get("hidden_states"), kwargs.get("x"), kwargs.get("query")]:
            if isinstance(value, torch.Tensor):
                return value
        return None

    def _hook(self, m: torch.nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        name = type(m).__name__
        x = self._first_tensor(args, kwargs)
        if x is None:
            return
        if isinstance(m, torch.nn.MultiheadAttention):
            batch, tokens = (x.shape[0], x.shape[1]) if m.batch_first else (x.shape[1], x.shape[0])
            e = m.embed_dim
            self.totals["linear"] += 2 * batch * tokens * 4 * e * e
            self.totals["attention"] += 4 * batch * tokens * tokens * e
        elif isinstance(m, torch.nn.Linear):
            self.totals["linear"] += 2 * (x.numel() // m.in_features) * m.in_features * m.out_features
        elif isinstance(m, torch.nn.modules.conv._ConvNd):
            self.totals["conv"] += 2 * out.numel() * (m.in_channels // m.groups) * math.prod(m.kernel_size)
        elif name == "ChannelsLastFeatureEncoder":  # embedd.models.layout: calls no Conv1d module
            batch, length = x.shape[0], x.shape[-1]
            for layer in m.conv_layers:
                c = layer.conv
                length = (length - c.kernel_size[0]) // c.stride[0] + 1
                self.totals["conv"] += 2 * batch * length * c.out_channels * c.in_channels * c.kernel_size[0]
        elif name == "MelScale":
            self.totals["filterbank"] += 2 * out.numel() * int(m.fb.shape[0])
        elif name in self._ATTENTION_INNER:
            inner = self._ATTENTION_INNER[name](m)
            batch, tokens = x.shape[0], x.shape[1]  # [batch, T, dim]
            flops = 4 * batch * tokens * tokens * inner
            if getattr(m, "position_embeddings_type", None) == "relative":  # one more q x positions matmul
                flops *= 2
            self.totals["attention"] += flops
        elif "attention" in name.lower() and not any("attention" in type(c).__name__.lower() for c in m.children()):
            self.unknown_attention.add(name)


# -- the backends' own item layout ------------------------------------------------------
@dataclasses.dataclass
class Layout:
    """What the backend's windowing made of one track: its batch items and its forward passes."""

    items: list[Any]
    passes: list[int]  # items per forward pass, in order


@dataclasses.dataclass(frozen=True)
class Adapter:
    """How to read one backend's items: no layout logic here, only sizes and shapes."""

    run: Callable[[Any, np.ndarray], Any]  # the backend's own track -> items -> forward entry point
    key: Callable[[Any], int]  # an item's size in the backend's unit (samples or frames)
    real: Callable[[Any], int]  # the part of the item that is the track's own audio (no padding)
    seconds: Callable[[Any, int], float]  # audio seconds (of one channel) of an item of size ``key``
    rows: Callable[[Any, Sequence[Any]], torch.Tensor]  # stand-in output of ``_forward``
    module: Callable[[Any], torch.nn.Module]  # the network the item runs through


def _latent_hop(model: Any) -> int:
    return int(model._constants()[0])


ADAPTERS: dict[str, Adapter] = {
    "muq": Adapter(
        run=lambda m, wave: m.window_latents([wave]),
        key=lambda clip: int(clip.shape[0]),
        real=lambda clip: int(clip.shape[0]),  # a wrapped partial clip is contract, counted below
        seconds=lambda m, n: n / m.info.sample_rate,
        rows=lambda m, items: torch.zeros(len(items), m.text_dim, device=m.device),
        module=lambda m: m._model.mulan_module,
    ),
    "mert": Adapter(
        run=lambda m, wave: m.window_latents([wave]),
        key=lambda window: int(len(window)),
        real=lambda window: int(len(window)),
        seconds=lambda m, n: n / m.info.sample_rate,
        rows=lambda m, items: torch.zeros(len(items), m.dim // 3, device=m.device),
        module=lambda m: m._model,
    ),
    "latent": Adapter(
        run=lambda m, wave: m.track_latents([wave]),
        key=lambda chunk: int(chunk.frames + chunk.pad),
        real=lambda chunk: int(chunk.frames),
        seconds=lambda m, frames: frames * _latent_hop(m) / m.info.sample_rate,
        rows=lambda m, items: torch.zeros(
            len(items), m._channels, max((c.frames + c.pad) for c in items) // m._constants()[1], device=m.device
        ),
        module=lambda m: m._encoder,
    ),
}


def record_layout(model: Any, adapter: Adapter, wave: np.ndarray) -> Layout:
    """The items and passes the backend makes of ``wave``, by its own code, with no model run.

    ``_forward`` is shadowed on the instance by a recorder returning zeros of the
    right shape, so ``window_latents``/``track_latents`` run their windowing,
    clip reuse, chunking, grouping and memory-budget batching unchanged.
    """
    layout = Layout(items=[], passes=[])

    def recorder(items: Sequence[Any]) -> torch.Tensor:
        layout.items.extend(items)
        layout.passes.append(len(items))
        return adapter.rows(model, items)

    model._forward = recorder
    try:
        adapter.run(model, wave)
    finally:
        del model._forward
    return layout


def silent_track(model: Any, seconds: float) -> np.ndarray:
    """A track of zeros (untouched pages: layouts of long tracks cost no memory)."""
    n = int(round(seconds * model.info.sample_rate))
    return np.zeros(n, np.float32) if model.info.channels == 1 else np.zeros((model.info.channels, n), np.float32)


def music_like_track(model: Any, seconds: float, seed: int = 7) -> np.ndarray:
    """Tones plus noise, so a timed pass sees audio-like numbers (no zeros, no denormals)."""
    sr, ch = model.info.sample_rate, model.info.channels
    n = int(round(seconds * sr))
    t = np.arange(n, dtype=np.float32) / sr
    rng = np.random.default_rng(seed)
    chans = [(0.3 * np.sin(2 * np.pi * (220 + 110 * c) * t) + 0.05 * rng.standard_normal(n)).astype(np.float32)
             for c in range(ch)]
    return chans[0] if ch == 1 else np.stack(chans)


# -- the windowing contracts, enumerated independently -----------------------------------
def contract_min_items(name: str, model: Any, seconds: float, layout: Layout, adapter: Adapter) -> float:
    """Items (in full-item equivalents of the layout's own sizes) the contract needs at least."""
    from embedd.models import mert as mert_mod, muq as muq_mod

    sr = model.info.sample_rate
    n = int(round(seconds * sr))
    if name == "mert":
        window, hop = mert_mod.WINDOW_S * sr, mert_mod.HOP_S * sr
        if n <= window:
            return 1.0
        grid = (n - window) // hop + 1
        return float(grid + (1 if (grid - 1) * hop + window < n else 0))
    if name == "muq":
        from embedd.models.runtime import window_spans

        clip = model._clip
        full: set[int] = set()
        partial = 0
        for start, end in window_spans(n, muq_mod.WINDOW_S * sr, muq_mod.HOP_S * sr, align_last_to_end=False):
            length = end - start
            full.update(start + k * clip for k in range(length // clip))
            partial += 1 if length % clip else 0
        return float(len(full) + partial)
    # latent: only the track's own frames, both channels (the padding is what is not needed)
    return float(sum(adapter.real(item) / adapter.key(item) for item in layout.items))


def once_items(name: str, model: Any, seconds: float, full_item_s: float) -> float:
    """Items if every audio second (of every channel the model reads) went through once."""
    return model.info.channels * seconds / full_item_s


# -- timing ----------------------------------------------------------------------------------
def time_item(model: Any, item: Any, precision: str, warm: bool) -> float:
    """The better of two passes over ``item`` in ``precision``: the model's own way when it is its own
    precision (``forward_context``: Music2Latent's bf16 weights), autocast over its weights otherwise."""
    from embedd.models.runtime import autocast

    device = model.device
    own = precision == model.spec.precision
    with model.forward_context() if own else autocast(device, precision):
        if warm:
            model._forward([item])
        best = math.inf
        for _ in range(2):  # the better of two passes: a shared box's noise only ever adds time
            _sync(device)
            started = time.perf_counter()
            model._forward([item])
            _sync(device)
            best = min(best, time.perf_counter() - started)
    return best


def count_item(model: Any, adapter: Adapter, item: Any) -> dict[str, Any]:
    """Counted and analytic FLOPs of one item (fp32; the count is the same in any precision)."""
    from embedd.models.runtime import autocast

    # torch's ModuleTracker (inside FlopCounterMode) fails on parametrized weights (MERT's weight-normed
    # positional conv) in inference mode when parameters require grad; inference needs no grad anyway
    for p in adapter.module(model).parameters():
        p.requires_grad_(False)
    analytic = AnalyticCount()
    counter = flop_counter()
    started = time.perf_counter()
    try:
        with autocast(model.device, "fp32"), counter:
            model._forward([item])
        _sync(model.device)
    finally:
        analytic.close()
    ops = op_totals(counter)
    counted = int(counter.get_total_flops())
    conv = sum(v for k, v in ops.items() if "conv" in k)
    return {
        "counted": counted,
        "ops": ops,
        "conv_share": conv / counted if counted else 0.0,
        "unregistered_share": (ops.get(_CPU_SDPA, 0) + ops.get(_NATIVE_MHA, 0)) / counted if counted else 0.0,
        "analytic": analytic.total,
        "analytic_parts": dict(analytic.totals),
        "unknown_attention": sorted(analytic.unknown_attention),
        "counting_pass_s": time.perf_counter() - started,
    }


def track_cost(model: Any, adapter: Adapter, seconds: float, flops_by_key: dict[int, dict[str, Any]]) -> tuple[Layout, int, int]:
    """The backend's layout of a ``seconds`` track and its (counted, analytic) FLOPs.

    ``flops_by_key`` caches :func:`count_item` per item size; a size not seen
    yet (a track shorter than one item) is counted on the spot.
    """
    layout = record_layout(model, adapter, silent_track(model, seconds))
    for item in layout.items:
        key = adapter.key(item)
        if key not in flops_by_key:
            flops_by_key[key] = count_item(model, adapter, item)
    counted = sum(flops_by_key[adapter.key(i)]["counted"] for i in layout.items)
    analytic = sum(flops_by_key[adapter.key(i)]["analytic"] for i in layout.items)
    return layout, counted, analytic


# -- one model ---------------------------------------------------------------------------
@dataclasses.dataclass
class Loaded:
    model: Any
    layout: Layout  # the backend's layout of a music-like track: its first item is the one timed
    precision: str
    load_s: float


def load_real_size(models_dir: Path, name: str, device: str, threads: int, track_s: float, **spec: Any) -> Loaded:
    """A real-size model of ``models_dir`` (``tests/tiny_models.py --preset full``) loaded through its
    backend in the precision the daemon picks on ``device`` (``auto``), on ``threads`` CPU threads."""
    from embedd.models import backend_class
    from embedd.models.base import ModelSpec
    from embedd.models.memory import default_budget_bytes
    from embedd.models.precision import resolve_precision

    torch.set_num_threads(threads)
    precision = resolve_precision("auto", device)
    sources = json.loads((models_dir / "embedd-models.json").read_text())["models"]
    model = backend_class(name)(ModelSpec(source=sources[name], device=device, precision=precision,
                                          memory_budget=default_budget_bytes(device), **spec))  # fmt: skip
    started = time.perf_counter()
    model.load()
    load_s = time.perf_counter() - started
    return Loaded(model, record_layout(model, ADAPTERS[name], music_like_track(model, track_s)), precision, load_s)


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (VmHWM), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def use_stock_layout() -> None:
    """Load the models without ``embedd.models.layout`` (the stock module layouts: the "before")."""
    from embedd.models import latent, mert, muq

    muq.channels_last = latent.channels_last = lambda module: module  # type: ignore[assignment]
    mert.channels_last_feature_encoder = lambda module: False  # type: ignore[assignment]


def bench_model(name: str, source: str, args: argparse.Namespace, peaks: dict[str, float], emit: Callable) -> dict:
    from embedd.models import backend_class
    from embedd.models.base import ModelSpec
    from embedd.models.memory import default_budget_bytes

    device = torch.device(args.device)
    spec = ModelSpec(source=source, device=args.device, precision="fp32",
                     memory_budget=default_budget_bytes(args.device))
    model = backend_class(name)(spec)
    started = time.perf_counter()
    model.load()
    load_s = time.perf_counter() - started
    adapter = ADAPTERS[name]
    try:
        # the timed item: the first item the backend cuts from a music-like track of the first length
        probe = record_layout(model, adapter, music_like_track(model, args.lengths[0]))
        item = probe.items[0]
        flops_by_key: dict[int, dict[str, Any]] = {adapter.key(item): count_item(model, adapter, item)}
        c = flops_by_key[adapter.key(item)]
        full_item_s = adapter.seconds(model, adapter.key(item))
        row = {
            "kind": "item", "model": name, "item_s": round(full_item_s, 3), "load_s": round(load_s, 1),
            "gflop_counted": round(c["counted"] / 1e9, 2), "gflop_analytic": round(c["analytic"] / 1e9, 2),
            "agreement": round(c["analytic"] / c["counted"], 4) if c["counted"] else None,
            "analytic_parts_gflop": {k: round(v / 1e9, 2) for k, v in c["analytic_parts"].items()},
            "ops_gflop": {k: round(v / 1e9, 2) for k, v in sorted(c["ops"].items())},
            "conv_share": round(c["conv_share"], 3), "unregistered_share": round(c["unregistered_share"], 3),
            "counting_pass_s": round(c["counting_pass_s"], 2),
        }
        if c["unknown_attention"]:
            row["unknown_attention"] = c["unknown_attention"]
        speeds: dict[str, dict[str, float]] = {}
        if not args.no_time:
            for precision in args.precisions:
                # fp32 is warm from the counting pass; others get one untimed pass unless --quick
                seconds = time_item(model, item, precision, warm=precision != "fp32" and not args.quick)
                achieved = c["counted"] / seconds
                speeds[precision] = {
                    "s": round(seconds, 3),
                    "gflop_s": round(achieved / 1e9, 1),
                    "frac_peak": round(achieved / peaks[precision], 3) if precision in peaks else None,
                    "audio_s_per_s": round(full_item_s / seconds, 3),
                }
            row["speed"] = speeds
        emit(row)

        lengths = []
        for seconds in args.lengths:
            layout, actual, analytic = track_cost(model, adapter, seconds, flops_by_key)
            per_item = actual / len(layout.items)  # all items of one size for tracks >= one item
            minimum = contract_min_items(name, model, seconds, layout, adapter) * per_item
            once = once_items(name, model, seconds, full_item_s) * c["counted"]
            out = {
                "kind": "track", "model": name, "track_s": seconds, "items": len(layout.items),
                "passes": len(layout.passes), "items_per_pass": max(layout.passes),
                "gflop_per_audio_s": round(actual / seconds / 1e9, 2),
                "contract_min_gflop_per_audio_s": round(minimum / seconds / 1e9, 2),
                "once_gflop_per_audio_s": round(once / seconds / 1e9, 2),
                "waste": round(1 - minimum / actual, 4),
                "beyond_once": round(1 - once / actual, 4),
                "analytic_gflop_per_audio_s": round(analytic / seconds / 1e9, 2),
                "agreement": round(analytic / actual, 4),
                "tflop_track": round(actual / 1e12, 2),
            }
            for precision, s in speeds.items():  # model-only time for the track at the item's rate
                out[f"est_{precision}_audio_s_per_s"] = round(seconds / (len(layout.items) * s["s"]), 3)
            emit(out)
            lengths.append(out)
        return {"item": row, "tracks": lengths}
    finally:
        model.unload()


# -- the report ----------------------------------------------------------------------------
def summary(results: dict[str, dict], peaks: dict[str, float], precisions: Sequence[str]) -> str:
    lines = ["", "peak matmul GFLOP/s: " + ", ".join(f"{p} {v / 1e9:.0f}" for p, v in peaks.items()), ""]
    head = f"{'model':7} {'item':>6} {'GFLOP/item':>10} {'analytic':>9} {'agree':>6} {'conv':>5}"
    for p in precisions:
        head += f" {p + ' GFLOP/s':>13} {'of peak':>7}"
    lines.append(head)
    for name, r in results.items():
        it = r["item"]
        line = (f"{name:7} {it['item_s']:5.0f}s {it['gflop_counted']:10.1f} {it['gflop_analytic']:9.1f} "
                f"{it['agreement']:6.3f} {it['conv_share']:5.2f}")
        for p in precisions:
            s = it.get("speed", {}).get(p)
            line += f" {s['gflop_s']:13.1f} {s['frac_peak'] or 0:7.3f}" if s else f" {'-':>13} {'-':>7}"
        lines.append(line)
    lines += ["", f"{'model':7} {'track':>6} {'items':>5} {'GFLOP/audio-s':>13} {'contract min':>12} "
                  f"{'once':>8} {'waste':>6} {'beyond once':>11}"]
    for name, r in results.items():
        for t in r["tracks"]:
            lines.append(f"{name:7} {t['track_s']:5.0f}s {t['items']:5d} {t['gflop_per_audio_s']:13.1f} "
                         f"{t['contract_min_gflop_per_audio_s']:12.1f} {t['once_gflop_per_audio_s']:8.1f} "
                         f"{t['waste']:6.3f} {t['beyond_once']:11.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models-dir", required=True, type=Path, help="built by tests/tiny_models.py (--preset full)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--lengths", nargs="+", type=float, default=[30.0, 240.0, 720.0], help="track seconds")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch threads on CPU")
    parser.add_argument("--precisions", nargs="+", default=None, choices=sorted(PEAK_DTYPES),
                        help="timed precisions (default fp32 bf16; fp32 fp16 bf16 on CUDA)")
    parser.add_argument("--peak-n", type=int, default=2048, help="matmul size of the peak")
    parser.add_argument("--peak-repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="no warm-up pass for bf16/fp16; 3 peak repeats")
    parser.add_argument("--no-time", action="store_true", help="count only (no timing, no peaks)")
    parser.add_argument("--stock-layout", action="store_true",
                        help="without embedd.models.layout (channels-last convolutions, MERT's [B,T,C] front end)")
    args = parser.parse_args(argv)
    if args.stock_layout:
        use_stock_layout()
    cuda = args.device.startswith("cuda")
    args.precisions = args.precisions or (["fp32", "fp16", "bf16"] if cuda else ["fp32", "bf16"])
    if args.quick:
        args.peak_repeats = min(args.peak_repeats, 3)
    if not cuda:
        torch.set_num_threads(args.threads)
    sources = json.loads((args.models_dir / "embedd-models.json").read_text())["models"]
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if cuda else f"{os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    print(f"# bench/flops.py {time.strftime('%Y-%m-%d %H:%M')} {args.device} ({where}), torch {torch.__version__}, "
          f"models {args.models_dir}{', stock layout' if args.stock_layout else ''}", flush=True)

    def emit(row: dict) -> None:
        print(json.dumps(row), flush=True)

    peaks: dict[str, float] = {}
    if not args.no_time:
        before = measure_peaks(device, args.precisions, args.peak_n, args.peak_repeats)
        emit({"kind": "peak", "when": "before", "n": args.peak_n,
              "gflop_s": {p: round(v / 1e9, 1) for p, v in before.items()}})
        peaks = dict(before)
    results = {}
    started = time.perf_counter()
    for name in args.models:
        results[name] = bench_model(name, sources[name], args, peaks, emit)
    if not args.no_time:
        after = measure_peaks(device, args.precisions, args.peak_n, args.peak_repeats)
        emit({"kind": "peak", "when": "after", "n": args.peak_n,
              "gflop_s": {p: round(v / 1e9, 1) for p, v in after.items()}})
        best = {p: max(before[p], after[p]) for p in before}
        # the fractions above used the first peak; restate them against the best of both
        for r in results.values():
            for p, s in r["item"].get("speed", {}).items():
                s["frac_peak"] = round(s["gflop_s"] * 1e9 / best[p], 3)
        emit({"kind": "frac_peak_best", "peak_gflop_s": {p: round(v / 1e9, 1) for p, v in best.items()},
              "frac_peak": {n: {p: s["frac_peak"] for p, s in r["item"].get("speed", {}).items()}
                            for n, r in results.items()}})
        peaks = best
    print(summary(results, peaks, args.precisions if not args.no_time else []))
    print(f"\n(models part {time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
