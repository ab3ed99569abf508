"""Random-weight models of the real architectures, saved in the real on-disk formats.

The hub is unreachable from the test machines, and the real weights are gigabytes,
so the tests (and the CPU benchmark) build their own models: the same classes the
official loaders construct, with tiny sizes, saved exactly the way the official
repositories store them, then loaded by embedd through the same code path as the
real weights.

- ``muq``: a MuQ-MuLan directory (``config.json`` + ``model.safetensors``, the
  ``PyTorchModelHubMixin`` format of ``OpenMuQ/MuQ-MuLan-large``) whose config
  names its sub-models by their real hub ids ``OpenMuQ/MuQ-large-msd-iter`` and
  ``xlm-roberta-base``; the sub-models sit next to the weights as
  ``MuQ-large-msd-iter/`` (a MuQ directory) and ``xlm-roberta-base/`` (a
  transformers ``XLMRobertaModel`` directory with a real fast tokenizer, a
  Unigram model trained in-process with the ``tokenizers`` library) -- the
  layout ``embedd.models.muq`` documents for local installs.
- ``mert``: a HuBERT-architecture transformers directory (``HubertModel``
  ``save_pretrained`` + ``preprocessor_config.json`` for
  ``Wav2Vec2FeatureExtractor``), loaded through ``AutoModel`` like MERT.
- ``latent``: a Music2Latent checkpoint (``{"gen_state_dict": UNet state}``)
  of its own ``UNet``, built with smaller channel counts that the checkpoint
  records under ``embedd_hparams`` (see ``embedd.models.latent``).
- ``hub_cache``: all of the above again in the Hugging Face hub cache layout
  (``models--OWNER--NAME/{blobs,snapshots,refs}``) under the catalogue's default
  hub ids, so that ``ModelSpec(source=<default id>, cache_dir=<hub_cache>)``
  loads them with no network.

Everything is seeded, so two builds give the same weights; a build is cached in
its directory and skipped when the stamp matches :data:`VERSION`.

Run ``python tests/tiny_models.py DIR [--preset full]`` to build into ``DIR`` and
print the sources as JSON. ``--preset full`` builds the real sizes (random
weights, gigabytes; for the GPU benchmark).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import shutil
import sys
from pathlib import Path
from typing import Any, Iterator

VERSION = "tiny-models-2"  # 2: Music2Latent's zero-initialised kernels are random too
STAMP = "embedd-models.json"

MUQ_HUB_ID = "OpenMuQ/MuQ-MuLan-large"
MUQ_AUDIO_HUB_ID = "OpenMuQ/MuQ-large-msd-iter"
XLMR_HUB_ID = "xlm-roberta-base"
MERT_HUB_ID = "m-a-p/MERT-v1-330M"
LATENT_HUB_ID = "SonyCSLParis/music2latent"
LATENT_FILENAME = "music2latent.pt"

_SENTENCES = [
    "calm piano music for a rainy evening",
    "energetic rock with loud electric guitars and drums",
    "a sad violin melody, slow and quiet",
    "upbeat electronic dance music with heavy bass",
    "jazz trio with double bass, brushed drums and a warm piano",
    "一首适合海边风景的小提琴曲，节奏欢快",
    "classical genres, hopeful mood, piano.",
    "lo-fi hip hop beats to study and relax to",
    "acoustic folk song with female vocals and guitar",
    "Musique de film orchestrale, épique et sombre",
    "heavy metal, fast tempo, screaming vocals",
    "ambient drones, field recordings, no rhythm",
]

# The sizes of each preset. "tiny" runs in milliseconds on a CPU; "full" mirrors the
# released models (MuQ-large + XLM-R base + MuLan heads, MERT-v1-330M, Music2Latent).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "muq_encoder_dim": 32,
        "muq_encoder_depth": 2,
        "muq_conv_dim": 8,
        "muq_heads": 2,
        "muq_intermediate": 64,
        "muq_codebook_size": 64,
        "xlmr_hidden": 32,
        "xlmr_layers": 1,
        "xlmr_heads": 2,
        "xlmr_intermediate": 64,
        "xlmr_vocab": None,  # = the trained tokenizer's vocabulary
        "mulan_dim": 24,
        "mulan_depth": 1,
        "mulan_heads": 2,
        "mulan_dim_head": 12,
        "dim_latent": 16,
        "mert_hidden": 32,
        "mert_layers": 2,
        "mert_heads": 2,
        "mert_intermediate": 64,
        "mert_conv_dim": 16,
        "latent_hparams": {
            "base_channels": 4,
            "multipliers_list": [1, 2, 2, 2, 2],
            "layers_list": [1, 1, 1, 1, 1],
            "layers_list_encoder": [1, 1, 1, 1, 1],
            "attention_list": [0, 0, 0, 0, 1],
            "attention_list_encoder": [0, 0, 0, 0, 1],
            "bottleneck_base_channels": 32,
            "num_bottleneck_layers": 1,
            "heads": 2,
            "cond_channels": 16,
            "bottleneck_channels": 16,
        },
    },
    "full": {
        "muq_encoder_dim": 1024,
        "muq_encoder_depth": 12,
        "muq_conv_dim": 512,
        "muq_heads": 16,
        "muq_intermediate": 4096,
        "muq_codebook_size": 4096,
        "xlmr_hidden": 768,
        "xlmr_layers": 12,
        "xlmr_heads": 12,
        "xlmr_intermediate": 3072,
        "xlmr_vocab": 250002,
        "mulan_dim": 768,
        "mulan_depth": 8,
        "mulan_heads": 8,
        "mulan_dim_head": 64,
        "dim_latent": 512,
        "mert_hidden": 1024,
        "mert_layers": 24,
        "mert_heads": 16,
        "mert_intermediate": 4096,
        "mert_conv_dim": 512,
        "latent_hparams": None,  # the stock architecture
    },
}


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    import torch

    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.random.set_rng_state(state)


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# -- MuQ (audio tower) -----------------------------------------------------
def _muq_config(p: dict[str, Any]) -> dict[str, Any]:
    """A MuQ ``config.json`` in the shape of ``OpenMuQ/MuQ-large-msd-iter``."""
    w2v2 = {
        "activation_dropout": 0.1,
        "adapter_kernel_size": 3,
        "adapter_stride": 2,
        "add_adapter": False,
        "apply_spec_augment": True,
        "architectures": ["Wav2Vec2ConformerForCTC"],
        "attention_dropout": 0.1,
        "bos_token_id": 1,
        "classifier_proj_size": 256,
        "codevector_dim": 768,
        "conformer_conv_dropout": 0.1,
        "contrastive_logits_temperature": 0.1,
        "conv_bias": True,
        "conv_depthwise_kernel_size": 31 if p["muq_encoder_dim"] >= 256 else 7,
        "conv_dim": [512] * 7,
        "conv_kernel": [10, 3, 3, 3, 3, 2, 2],
        "conv_stride": [5, 2, 2, 2, 2, 2, 2],
        "ctc_loss_reduction": "sum",
        "ctc_zero_infinity": False,
        "diversity_loss_weight": 0.1,
        "do_stable_layer_norm": True,
        "eos_token_id": 2,
        "feat_extract_activation": "gelu",
        "feat_extract_dropout": 0.0,
        "feat_extract_norm": "layer",
        "feat_proj_dropout": 0.1,
        "feat_quantizer_dropout": 0.0,
        "final_dropout": 0.1,
        "gradient_checkpointing": False,
        "hidden_act": "swish",
        "hidden_dropout": 0.1,
        "hidden_dropout_prob": 0.1,
        "hidden_size": p["muq_encoder_dim"],
        "initializer_range": 0.02,
        "intermediate_size": p["muq_intermediate"],
        "layer_norm_eps": 1e-5,
        "layerdrop": 0.0,
        "mask_feature_length": 10,
        "mask_feature_min_masks": 0,
        "mask_feature_prob": 0.0,
        "mask_time_length": 10,
        "mask_time_min_masks": 2,
        "mask_time_prob": 0.05,
        "max_source_positions": 5000,
        "model_type": "wav2vec2-conformer",
        "num_adapter_layers": 3,
        "num_attention_heads": p["muq_heads"],
        "num_codevector_groups": 2,
        "num_codevectors_per_group": 320,
        "num_conv_pos_embedding_groups": 16,
        "num_conv_pos_embeddings": 128,
        "num_feat_extract_layers": 7,
        "num_hidden_layers": p["muq_encoder_depth"],
        "num_negatives": 100,
        "output_hidden_size": p["muq_encoder_dim"],
        "pad_token_id": 0,
        "position_embeddings_type": "rotary",
        "proj_codevector_dim": 768,
        "rotary_embedding_base": 10000,
        "torch_dtype": "float32",
        "use_weighted_layer_sum": False,
        "vocab_size": 32,
    }
    return {
        "label_rate": 25,
        "num_codebooks": 1,
        "codebook_dim": 16,
        "codebook_size": p["muq_codebook_size"],
        "features": ["melspec_2048"],
        "hop_length": 240,
        "n_mels": 128,
        "conv_dim": p["muq_conv_dim"],
        "encoder_dim": p["muq_encoder_dim"],
        "encoder_depth": p["muq_encoder_depth"],
        "mask_hop": 0.4,
        "mask_prob": 0.6,
        "is_flash": False,
        "stat": {
            "melspec_2048_cnt": 14282760192,
            "melspec_2048_mean": 6.768444971712967,
            "melspec_2048_std": 18.417922652295623,
        },
        "w2v2_config": w2v2,
        "use_rvq_target": False,
        "use_vq_target": False,
        "use_encodec_target": False,
        "rvq_ckpt_path": None,
        "recon_loss_ratio": None,
        "resume_checkpoint": None,
        "rvq_n_codebooks": 8,
        "rvq_multi_layer_num": 1,
    }


def _build_muq_audio(out: Path, p: dict[str, Any], seed: int) -> None:
    from muq import MuQ
    from safetensors.torch import save_model

    out.mkdir(parents=True, exist_ok=True)
    config = _muq_config(p)
    with _seeded(seed):
        model = MuQ(config).eval()
    _write_json(out / "config.json", config)
    save_model(model, str(out / "model.safetensors"))


# -- XLM-RoBERTa (text tower) ----------------------------------------------
def _train_tokenizer(vocab_size: int):  # -> tokenizers.Tokenizer
    """An XLM-R-shaped fast tokenizer: Unigram with metaspace, <s> x </s> template."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    specials = ["<s>", "<pad>", "</s>", "<unk>"]  # XLM-R's ids 0..3
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=specials, unk_token="<unk>", show_progress=False
    )
    tok.train_from_iterator(_SENTENCES * 4, trainer=trainer)
    tok.add_special_tokens(["<mask>"])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>",
        pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", tok.token_to_id("<s>")), ("</s>", tok.token_to_id("</s>"))],
    )
    return tok


def _build_xlmr(out: Path, p: dict[str, Any], seed: int) -> None:
    from transformers import XLMRobertaConfig, XLMRobertaModel, XLMRobertaTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    tok = _train_tokenizer(200)
    fast = XLMRobertaTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        sep_token="</s>",
        cls_token="<s>",
        unk_token="<unk>",
        pad_token="<pad>",
        mask_token="<mask>",
        model_max_length=512,
    )
    fast.save_pretrained(str(out))
    vocab = p["xlmr_vocab"] or len(fast)
    config = XLMRobertaConfig(
        vocab_size=vocab,
        hidden_size=p["xlmr_hidden"],
        num_hidden_layers=p["xlmr_layers"],
        num_attention_heads=p["xlmr_heads"],
        intermediate_size=p["xlmr_intermediate"],
        max_position_embeddings=514,
        type_vocab_size=1,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
    )
    with _seeded(seed):
        model = XLMRobertaModel(config).eval()
    model.save_pretrained(str(out), safe_serialization=True)


# -- MuQ-MuLan ----------------------------------------------------------------
def _mulan_config(p: dict[str, Any], audio_name: str, text_name: str) -> dict[str, Any]:
    return {
        "mulan": {
            "sr": 24000,
            "clip_secs": 10,
            "dim_latent": p["dim_latent"],
            "decoupled_contrastive_learning": True,
            "hierarchical_contrastive_loss": False,
            "hierarchical_contrastive_loss_layers": None,
            "sigmoid_contrastive_loss": False,
            "rank_contrast": True,
        },
        "audio_model": {"name": audio_name, "model_dim": p["muq_encoder_dim"], "use_layer_idx": -1},
        "text_model": {"name": text_name, "model_dim": p["xlmr_hidden"]},
        "audio_transformer": {
            "dim": p["mulan_dim"],
            "tf_depth": p["mulan_depth"],
            "heads": p["mulan_heads"],
            "dim_head": p["mulan_dim_head"],
            "attn_dropout": 0.0,
            "ff_dropout": 0.0,
            "ff_mult": 4,
        },
        "text_transformer": {
            "dim": p["mulan_dim"],
            "tf_depth": p["mulan_depth"],
            "max_seq_len": 1024,
            "heads": p["mulan_heads"],
            "dim_head": p["mulan_dim_head"],
            "attn_dropout": 0.0,
            "ff_dropout": 0.0,
            "ff_mult": 4,
        },
    }


def _build_muq_mulan(out: Path, p: dict[str, Any], seed: int) -> None:
    from muq import MuQMuLan
    from safetensors.torch import save_model

    audio_dir = out / MUQ_AUDIO_HUB_ID.split("/")[-1]
    text_dir = out / XLMR_HUB_ID.split("/")[-1]
    _build_muq_audio(audio_dir, p, seed + 1)
    _build_xlmr(text_dir, p, seed + 2)
    with _seeded(seed):
        # constructed from the local sub-model directories; saved naming them by hub id
        model = MuQMuLan(_mulan_config(p, str(audio_dir), str(text_dir))).eval()
    _write_json(out / "config.json", _mulan_config(p, MUQ_AUDIO_HUB_ID, XLMR_HUB_ID))
    save_model(model, str(out / "model.safetensors"))


# -- MERT (HuBERT architecture) ---------------------------------------------
def _build_mert(out: Path, p: dict[str, Any], seed: int) -> None:
    from transformers import HubertConfig, HubertModel, Wav2Vec2FeatureExtractor

    out.mkdir(parents=True, exist_ok=True)
    config = HubertConfig(
        hidden_size=p["mert_hidden"],
        num_hidden_layers=p["mert_layers"],
        num_attention_heads=p["mert_heads"],
        intermediate_size=p["mert_intermediate"],
        conv_dim=(p["mert_conv_dim"],) * 7,
        feat_extract_norm="layer",
        do_stable_layer_norm=True,
        num_conv_pos_embeddings=128 if p["mert_hidden"] >= 256 else 16,
        num_conv_pos_embedding_groups=16 if p["mert_hidden"] >= 256 else 2,
    )
    with _seeded(seed):
        model = HubertModel(config).eval()
    model.save_pretrained(str(out), safe_serialization=True)
    Wav2Vec2FeatureExtractor(
        feature_size=1,
        sampling_rate=24000,
        padding_value=0.0,
        do_normalize=True,
        return_attention_mask=True,
    ).save_pretrained(str(out))


# -- Music2Latent ----------------------------------------------------------------
def _build_latent(out_file: Path, p: dict[str, Any], seed: int) -> None:
    import torch

    from embedd.models.latent import build_unet

    out_file.parent.mkdir(parents=True, exist_ok=True)
    hparams = p["latent_hparams"]
    with _seeded(seed):
        unet = build_unet(hparams).eval()
        _revive_zero_kernels(unet)
    checkpoint: dict[str, Any] = {"gen_state_dict": unet.state_dict()}
    if hparams:
        checkpoint["embedd_hparams"] = dict(hparams)
    torch.save(checkpoint, str(out_file))


def _revive_zero_kernels(unet: Any) -> None:
    """Give the kernels the package starts at zero random values, as training would have.

    music2latent zero-initialises the last kernel of every residual branch and
    every attention's output projection (``init_as_zero``: a fresh network is the
    identity). Left so, half the checkpoint's tensors are zero and every residual
    block and attention of the test model is a no-op: its vectors would say
    nothing about the arithmetic of the released one (bf16 against fp32, compiled
    against eager). Such a kernel gets PyTorch's default initialisation instead.
    """
    import math

    import torch

    for module in unet.modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.nn.Parameter) and weight.dim() >= 2 and not weight.detach().any():
            torch.nn.init.kaiming_uniform_(weight.detach(), a=math.sqrt(5))


# -- hub cache layout ------------------------------------------------------------
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def add_to_hub_cache(cache_dir: Path, repo_id: str, files: dict[str, Path]) -> Path:
    """Store ``files`` (name in repo -> local file) as ``repo_id``'s main revision in a hub cache.

    The layout is huggingface_hub's: content-addressed blobs, a snapshot
    directory of relative symlinks named by a commit hash, and ``refs/main``.
    Returns the snapshot directory.
    """
    repo_dir = cache_dir / ("models--" + repo_id.replace("/", "--"))
    blobs = repo_dir / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    digests = {name: _sha256(src) for name, src in sorted(files.items())}
    commit = hashlib.sha1(json.dumps(digests, sort_keys=True).encode()).hexdigest()
    snapshot = repo_dir / "snapshots" / commit
    for name, src in files.items():
        blob = blobs / digests[name]
        if not blob.exists():
            shutil.copyfile(src, blob)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(Path("../" * (len(Path(name).parts) + 1)) / "blobs" / digests[name])
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit, encoding="utf-8")
    return snapshot


def _files_of(directory: Path) -> dict[str, Path]:
    return {str(f.relative_to(directory)): f for f in sorted(directory.rglob("*")) if f.is_file()}


def build_hub_cache(models: dict[str, str], cache_dir: Path) -> Path:
    """Put the built models into ``cache_dir`` under the official hub ids (no network needed)."""
    muq_dir = Path(models["muq"])
    audio_dir = muq_dir / MUQ_AUDIO_HUB_ID.split("/")[-1]
    text_dir = muq_dir / XLMR_HUB_ID.split("/")[-1]
    add_to_hub_cache(cache_dir, MUQ_HUB_ID, {n: muq_dir / n for n in ("config.json", "model.safetensors")})
    add_to_hub_cache(cache_dir, MUQ_AUDIO_HUB_ID, _files_of(audio_dir))
    add_to_hub_cache(cache_dir, XLMR_HUB_ID, _files_of(text_dir))
    add_to_hub_cache(cache_dir, MERT_HUB_ID, _files_of(Path(models["mert"])))
    add_to_hub_cache(cache_dir, LATENT_HUB_ID, {LATENT_FILENAME: Path(models["latent"])})
    return cache_dir


# -- entry points ----------------------------------------------------------------
def build_models(root: Path, preset: str = "tiny", *, seed: int = 1234) -> dict[str, str]:
    """Build (or reuse) every model under ``root``; returns sources by model name plus ``hub_cache``.

    ``"muq"``, ``"mert"``, ``"latent"`` are local sources for ``ModelSpec.source``;
    ``"hub_cache"`` is a hub cache directory (for ``ModelSpec.cache_dir``, or
    ``HF_HUB_CACHE``) in which the catalogue's default hub ids resolve offline.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    root = Path(root).resolve()
    stamp = root / STAMP
    result = {
        "muq": str(root / "muq-mulan"),
        "mert": str(root / "mert"),
        "latent": str(root / "music2latent" / LATENT_FILENAME),
        "hub_cache": str(root / "hub"),
    }
    wanted = {"version": VERSION, "preset": preset, "seed": seed}
    if stamp.is_file():
        try:
            if json.loads(stamp.read_text(encoding="utf-8")) == {**wanted, "models": result}:
                return result
        except ValueError:
            pass
    for name in ("muq-mulan", "mert", "music2latent", "hub"):
        shutil.rmtree(root / name, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    p = PRESETS[preset]
    _build_muq_mulan(Path(result["muq"]), p, seed)
    _build_mert(Path(result["mert"]), p, seed + 10)
    _build_latent(Path(result["latent"]), p, seed + 20)
    build_hub_cache(result, Path(result["hub_cache"]))
    _write_json(stamp, {**wanted, "models": result})
    return result


def build_tiny_models(root: Path) -> dict[str, str]:
    """The tiny preset (what the tests use); see :func:`build_models`."""
    return build_models(root, "tiny")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    args = parser.parse_args(argv)
    print(json.dumps(build_models(args.directory, args.preset), indent=2))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
