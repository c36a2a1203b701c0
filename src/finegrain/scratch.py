"""Models built from nothing: a BPE tokenizer trained on the data, and randomly initialised models.

For runs without a pretrained model (``finegrain sft --from-scratch``, ``train-rm --from-scratch``),
the sandbox and the tests: no download, no network.
"""
from __future__ import annotations

from typing import Iterable

from .errors import ConfigError
from .models import AUTO_CLASSES, RECOMPUTED_EAGER, Head, ensure_pad_token, register_attention
from .speed import apply_model_switches


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 512, *, eos: str = "<|endoftext|>",
                        pad: str | None = "<pad>", extra_special: Iterable[str] = ()):
    """Train a byte-level BPE tokenizer (GPT-2 style, with offsets) on ``texts``; no network needed."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [eos] + ([pad] if pad else []) + list(extra_special)
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=eos, bos_token=eos, unk_token=None,
                                   pad_token=pad, model_max_length=2048)
    if pad is None:
        ensure_pad_token(fast)
    return fast


def scratch_model(architecture: str, head: Head, tokenizer, *, n_layer: int, n_head: int, n_embd: int,
                  n_positions: int, attn_implementation: str | None = None, dtype=None):
    """A new, randomly initialised model for ``tokenizer``: ``encoder`` (BERT) or ``decoder`` (GPT-2).

    ``head`` as in :func:`finegrain.models.load_model`; dropout off, like the sandbox's GPT-2 (the
    same settings for both, so that the two kinds compare on equal terms).
    """
    import transformers

    if n_embd % n_head:
        raise ConfigError(f"--n-embd {n_embd} must be a multiple of --n-head {n_head}")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if architecture == "encoder":
        config = transformers.BertConfig(vocab_size=len(tokenizer), hidden_size=n_embd, num_hidden_layers=n_layer,
                                         num_attention_heads=n_head, intermediate_size=4 * n_embd,
                                         max_position_embeddings=n_positions, pad_token_id=pad,
                                         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=1)
    elif architecture == "decoder":
        config = tiny_gpt2_config(len(tokenizer), n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                                  n_positions=n_positions, eos_token_id=tokenizer.eos_token_id, pad_token_id=pad)
    else:
        raise ConfigError(f"unknown architecture {architecture!r} (encoder or decoder)")
    if attn_implementation is not None:
        if attn_implementation == RECOMPUTED_EAGER:
            register_attention()
        config._attn_implementation = attn_implementation
    auto = getattr(transformers, AUTO_CLASSES[head])
    model = auto.from_config(config, dtype=dtype) if dtype is not None else auto.from_config(config)
    apply_model_switches(model)
    return model


def tiny_gpt2_config(vocab_size: int, *, n_layer: int = 2, n_head: int = 2, n_embd: int = 32, n_positions: int = 256,
                     eos_token_id: int = 0, pad_token_id: int | None = None, num_labels: int = 1):
    """A small GPT-2 config for tests and the sandbox (no pretrained weights)."""
    from transformers import GPT2Config

    return GPT2Config(vocab_size=vocab_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=n_positions,
                      bos_token_id=eos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                      num_labels=num_labels, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                      # GPT-2's tanh GELU in one kernel instead of gelu_new's 8 elementwise ops (the same
                      # formula, |diff| ~1e-7; what it buys: benchmarks/RESULTS.md)
                      activation_function="gelu_pytorch_tanh")
