"""Shared pieces of the side-by-side benchmarks: the tiny models, the data, stats, FLOPs, machine facts.

Every benchmark in this folder compares two systems on the SAME assets, built once per run by
:func:`build_assets` from one GPT-2 config with a fixed seed and saved as safetensors
checkpoints, so both sides load bit-identical weights:

- ``tokenizer/``  byte-level BPE trained on a synthetic corpus (``SPEC.vocab`` tokens)
- ``policy/``     GPT2LMHeadModel (also the reference model)
- ``rm_seq/``     GPT2ForSequenceClassification, 1 label (sequence reward model; value init)
- ``rm_tok/``     GPT2ForTokenClassification, 1 label (token reward model), same backbone
- ``prompts.jsonl`` PPO prompts; ``pairs.jsonl`` preference pairs for reward-model training

Nothing here imports finegrain or TRL: each side's worker does that in its own subprocess.
"""
from __future__ import annotations

import copy
import json
import os
import platform
import random
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence


@dataclass(frozen=True)
class ModelSpec:
    """The one GPT-2 config every model in the benchmarks is built from."""

    vocab: int = 2048
    n_layer: int = 6
    n_head: int = 4
    n_embd: int = 256
    n_positions: int = 256
    seed: int = 1234


SPEC = ModelSpec()

# pseudo-words from syllables: a domain the BPE tokenizer can learn thousands of merges from
_SYLLABLES = ["ka", "lo", "mi", "ren", "tas", "vo", "qui", "zel", "dor", "fa", "pen", "shu", "bri", "nox", "ul",
              "te", "gar", "wim", "hes", "jo", "cra", "ly", "sto", "ev", "in", "at", "or", "pli", "mun", "dre"]


def _words(rng: random.Random, n: int) -> list[str]:
    return ["".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 3))) for _ in range(n)]


def _sentence(rng: random.Random, vocab: Sequence[str], lo: int, hi: int) -> str:
    return " ".join(rng.choice(vocab) for _ in range(rng.randint(lo, hi))).capitalize() + "."


def synthetic_texts(seed: int = 0) -> dict[str, Any]:
    """Corpus (for the tokenizer), prompts and preference pairs, all from one seeded RNG."""
    rng = random.Random(seed)
    vocab = _words(rng, 1500)
    corpus = [_sentence(rng, vocab, 6, 20) for _ in range(6000)]
    prompts = [f"Write about {_sentence(rng, vocab, 4, 9)}" for _ in range(256)]
    pairs = []
    for i in range(512):
        body = [_sentence(rng, vocab, 5, 10) for _ in range(3)]
        worse = list(body)
        worse[rng.randrange(3)] = _sentence(rng, vocab, 5, 10)
        pairs.append({"id": f"p{i}", "prompt": f"Explain {_sentence(rng, vocab, 3, 7)}",
                      "chosen": " ".join(body), "rejected": " ".join(worse)})
    return {"corpus": corpus, "prompts": prompts, "pairs": pairs}


def build_assets(out: str | os.PathLike, spec: ModelSpec = SPEC, response_length: int | None = None) -> Path:
    """Build tokenizer, policy and reward models (one config, one seed) and the data under ``out``.

    With ``response_length``, the policy's generation_config gets ``min_new_tokens`` = that length,
    so EOS cannot be sampled earlier and every response has exactly that many tokens on both sides.
    """
    import torch
    import transformers

    from finegrain.models import save_checkpoint
    from finegrain.scratch import tiny_gpt2_config, train_bpe_tokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    texts = synthetic_texts(spec.seed)
    tok = train_bpe_tokenizer(texts["corpus"], vocab_size=spec.vocab)
    cfg = tiny_gpt2_config(len(tok), n_layer=spec.n_layer, n_head=spec.n_head, n_embd=spec.n_embd,
                           n_positions=spec.n_positions, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    heads = {"policy": transformers.GPT2LMHeadModel, "rm_seq": transformers.GPT2ForSequenceClassification,
             "rm_tok": transformers.GPT2ForTokenClassification}
    for name, cls in heads.items():
        torch.manual_seed(spec.seed)  # same backbone weights for every head
        model = cls(cfg)
        if name == "policy" and response_length:
            model.generation_config.min_new_tokens = response_length
        kind = {"policy": "policy", "rm_seq": "sequence", "rm_tok": "token"}[name]
        meta = {"stage": "benchmark", "kind": kind, "head": {"policy": "causal"}.get(name, kind)}
        if name != "policy":
            meta.update({"loss": "sequence" if kind == "sequence" else "token_mean"})
        save_checkpoint(out / name, model, tok, meta)
    tok.save_pretrained(out / "tokenizer")
    write_data(out, texts)
    (out / "spec.json").write_text(json.dumps(asdict(spec), indent=2))
    return out


def write_data(out: Path, texts: dict[str, Any]) -> None:
    """``prompts.jsonl`` and ``pairs.jsonl`` of :func:`synthetic_texts` under ``out``."""
    with open(out / "prompts.jsonl", "w", encoding="utf-8") as f:
        for i, p in enumerate(texts["prompts"]):
            f.write(json.dumps({"id": f"q{i}", "prompt": p}) + "\n")
    with open(out / "pairs.jsonl", "w", encoding="utf-8") as f:
        for p in texts["pairs"]:
            f.write(json.dumps(p) + "\n")


REAL_POLICY = "smollm2-135m-instruct"  # installed offline by scripts/install_models.sh
# the LoRA setting of every real-model benchmark (run.py's real arm, whatif.py, profile_ppo.py) and of both
# systems: r 16, alpha 32 on the attention's query and value projections (peft's default for Llama, named)
REAL_LORA: dict[str, Any] = {"lora_r": 16, "lora_alpha": 32, "lora_target_modules": ("q_proj", "v_proj")}


def build_real_assets(out: str | os.PathLike, response_length: int | None = None,
                      policy: str = REAL_POLICY) -> Path:
    """The real-model assets: SmolLM2-135M-Instruct as safetensors checkpoints, same layout as :func:`build_assets`.

    The GGUF file is dequantised once here (transformers' GGUF loader) and saved as fp32
    safetensors, so both systems load bit-identical weights without the dequantisation cost:
    ``policy/`` (LlamaForCausalLM, also the reference), ``rm_seq/`` (LlamaForSequenceClassification:
    the SmolLM2 backbone and a seeded 1-label head; reward model and value initialisation) and
    ``rm_tok/`` (the same as a token-classification checkpoint). Prompts and pairs are the
    synthetic ones of :func:`build_assets` (the response length is forced, so what the words
    mean does not change the work).
    """
    import torch
    import transformers

    from finegrain.models import load_model, load_tokenizer, save_checkpoint

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer(policy)
    model = load_model(policy, "causal", tokenizer=tok)
    if response_length:
        model.generation_config.min_new_tokens = response_length
    save_checkpoint(out / "policy", model, tok, {"stage": "benchmark", "kind": "policy", "head": "causal"})
    backbone = model.get_decoder().state_dict()
    cfg = copy.deepcopy(model.config)
    cfg.pad_token_id, cfg.num_labels = tok.pad_token_id, 1
    for name, cls, kind in (("rm_seq", transformers.AutoModelForSequenceClassification, "sequence"),
                            ("rm_tok", transformers.AutoModelForTokenClassification, "token")):
        torch.manual_seed(SPEC.seed)
        head = cls.from_config(cfg)
        head.base_model.load_state_dict(backbone, strict=True)
        meta = {"stage": "benchmark", "kind": kind, "head": kind,
                "loss": "sequence" if kind == "sequence" else "token_mean"}
        save_checkpoint(out / name, head, tok, meta)
        del head
    del model, backbone
    tok.save_pretrained(out / "tokenizer")
    write_data(out, synthetic_texts(SPEC.seed))
    (out / "spec.json").write_text(json.dumps({"policy": policy, "response_length": response_length}, indent=2))
    return out


def policy_with_length(assets: str | os.PathLike, response_length: int) -> str:
    """A policy folder under ``assets`` whose responses are exactly ``response_length`` tokens; returns its name.

    ``policy_L<n>/`` links every file of ``policy/`` except ``generation_config.json``, which is
    rewritten with ``min_new_tokens`` = n (both systems' samplers honour it), so the cost curves
    vary the length without copying weights.
    """
    assets = Path(assets)
    name = f"policy_L{response_length}"
    out = assets / name
    if out.exists():
        return name
    tmp = assets / f".{name}.tmp"
    tmp.mkdir()
    for f in (assets / "policy").iterdir():
        if f.name != "generation_config.json":
            (tmp / f.name).symlink_to(f.resolve())
    gen = json.loads((assets / "policy" / "generation_config.json").read_text())
    gen["min_new_tokens"] = response_length
    (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
    tmp.rename(out)
    return name


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ---------------------------------------------------------------- stats


def summary(xs: Sequence[float]) -> dict[str, float]:
    """median / min / max / n of a list of numbers (nan-free)."""
    xs = [float(x) for x in xs if x == x]
    if not xs:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


# ---------------------------------------------------------------- FLOPs


def matmul_params(model) -> int:
    """Parameters that take part in a matmul per token: every 2-D weight except the input
    token and position embedding tables (lookups), plus the LM head even when tied to wte."""
    n = 0
    for name, p in model.named_parameters():
        if p.dim() == 2 and not name.endswith(("wte.weight", "wpe.weight")):
            n += p.numel()
    head = getattr(model, "lm_head", None)
    if head is not None and head.weight is model.get_input_embeddings().weight:
        n += head.weight.numel()
    return n


def train_flops_per_token(n_matmul: int, n_layer: int, n_embd: int, seq_len: int) -> float:
    """Forward+backward FLOPs per token (PaLM appendix B / Chinchilla): 6 N + 12 L d T."""
    return 6.0 * n_matmul + 12.0 * n_layer * n_embd * seq_len


def matmul_peak(dtype_name: str, seconds: float = 1.5, sizes: Sequence[int] = (512, 1024, 2048)) -> float:
    """Best FLOP/s of a square torch.matmul loop in this process (2 n^3 FLOPs per product)."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        torch.matmul(a, b)  # warm-up
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / len(sizes):
            torch.matmul(a, b)
            reps += 1
        best = max(best, 2.0 * n ** 3 * reps / (time.perf_counter() - t0))
    return best


# ---------------------------------------------------------------- machine


def machine_info() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"nproc": os.cpu_count(), "cpu": cpu, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    try:
        info["loadavg_1m"] = os.getloadavg()[0]
    except OSError:
        pass
    return info


def peak_rss_gb() -> float:
    """This process's resident-size high-water mark so far, GB (Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def set_threads() -> int:
    """Torch threads: $FINEGRAIN_BENCH_THREADS or every core (the same in every subprocess)."""
    import torch

    n = int(os.environ.get("FINEGRAIN_BENCH_THREADS") or 0) or max(1, os.cpu_count() or 1)
    torch.set_num_threads(n)
    return n
