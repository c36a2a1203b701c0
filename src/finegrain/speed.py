"""Every speed path of finegrain, each behind one switch.

A speed path gets the same result as a plainer way, only faster. Each has one field of
:class:`SpeedOptions`; the defaults are what finegrain does, and turning one off gives the plain
way: to measure what a path buys (``benchmarks/whatif.py``), or to rule it out when something
looks wrong.

- :func:`options` reads the switches in force: the defaults, then the environment variables
  (read at each call: ``FINEGRAIN_DECODER`` for ``decoder``, ``FINEGRAIN_MALLOC_TUNING=0`` for
  ``keep_freed_memory`` off), then :func:`configure` (for the rest of the process), then
  :func:`overrides` (for a ``with`` block), the later one winning.
- The paths live here or are reached from here: :func:`fuse_gelu`, :func:`contiguous_head_input` /
  :func:`apply_model_switches` (every model load), :func:`keeps_logits` (PPO's forwards), :func:`reuses_rollout_forward`
  (PPO's update), :func:`lower_frozen_weights` (PPO's frozen models under autocast),
  :func:`decoder`, :func:`sampling_grad_mode`, :func:`merged_lora`, :func:`packed_linear_weights` and
  :func:`sdpa_sampling` (sampling),
  :func:`keep_freed_memory` (the three trainers); ``fused_adamw`` is read by
  :func:`finegrain.training.make_adamw`, ``trim_minibatches`` by :func:`finegrain.ppo.train.ppo_update`.

Not switches here: the attention kernel and the precision are per-run options of the trainers
(``--attn-implementation``, :func:`finegrain.models.pick_attention`; ``--mixed-precision``).
What each path buys is measured in benchmarks/RESULTS.md.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from dataclasses import dataclass
from typing import Iterator

from .errors import ConfigError

DECODERS = ("auto", "loop", "generate")


@dataclass(frozen=True)
class SpeedOptions:
    """The switches; the defaults are finegrain's fast paths.

    fuse_gelu:              GPT-2's tanh GELU runs as one kernel: a model's ``gelu_new`` modules (transformers'
                            8-op ``NewGELUActivation``) become the one-kernel tanh GELU when it loads
                            (:func:`fuse_gelu`; the same formula, |difference| ~1e-7; the config keeps saying
                            ``gelu_new``); off, every tanh GELU runs as the 8 ops (:func:`unfuse_gelu`)
    logits_to_keep:         PPO's policy forwards run the LM head only on the positions whose log-probs are
                            needed (the response), through the model's ``logits_to_keep`` (:func:`keeps_logits`);
                            off: on every position, then cut (the same log-probs)
    reuse_rollout_forward:  with one minibatch per PPO epoch and no gradient accumulation, the rollout's policy
                            and value forward runs with autograd and the first update epoch backpropagates
                            through it instead of running it again (:func:`reuses_rollout_forward`; the same
                            update up to float rounding)
    trim_minibatches:       PPO minibatches drop the columns that are padding in all their rows
                            (``Rollout.select(trim=True)``; the same losses)
    decoder:                how :func:`finegrain.generation.sample` samples: ``auto`` (finegrain's KV-cache loop
                            unless the model's generation_config asks for more), ``loop`` (always the loop),
                            ``generate`` (transformers' ``generate``; the same distribution, other draws).
                            Environment: ``FINEGRAIN_DECODER``
    no_grad_sampling:       sample under ``torch.no_grad``, where autocast caches its bf16 copies of the
                            weights across decoding steps; off: under ``torch.inference_mode``, which casts
                            every weight again for every token (:func:`sampling_grad_mode`)
    keep_freed_memory:      on a CPU run under glibc, keep freed tensor memory in the process instead of
                            page-faulting it back in every micro-batch (:func:`keep_freed_memory`).
                            Environment: ``FINEGRAIN_MALLOC_TUNING=0`` turns it off (and ``heap_large_blocks``)
    heap_large_blocks:      with ``keep_freed_memory``, blocks above glibc's 32 MiB mmap ceiling come from the heap
                            too, so they are reused when freed instead of unmapped and faulted in again, page by
                            page: a real model's embedding gradient, LM-head weight casts, full-vocabulary logits
    fused_adamw:            AdamW with torch's fused kernel where there is one
                            (:func:`finegrain.training.make_adamw`); off: the per-tensor loop (the same rule)
    frozen_low_precision:   under bf16 (or fp16) autocast, PPO stores the frozen models' linear weights (the
                            reference, the reward model, a LoRA policy's base) in that dtype once
                            (:func:`lower_frozen_weights`): autocast would cast them to it in every matmul, and
                            it caches its casts only for weights that require grad, so a frozen weight was cast
                            again for every forward and every decoded token (the same products; half the memory)
    merge_lora_sampling:    a LoRA policy samples with each adapted layer's update merged into one weight,
                            W + scaling x B A (:func:`merged_lora`): one matmul per layer instead of three and
                            none of peft's per-call wrapper, for every decoded token. The log-probs PPO trains on
                            come from the unmerged forward that scores the rollout, so only the draws see the
                            merged weights' rounding; off: sampling runs through the adapters
    contiguous_head_input:  a causal LM's head (its output embeddings) gets its input as one contiguous block
                            (:func:`contiguous_head_input`): with ``logits_to_keep`` transformers hands it a
                            strided slice of the hidden states, which PyTorch's CPU matmul multiplies up to 70x
                            slower in bf16 without autograd (a frozen bf16 reference, the prefill of sampling);
                            off: the slice as it comes (the same products)
    preallocated_kv_cache:  finegrain's decoding loop writes each step's keys and values into a cache allocated
                            once for the prompt and every new token (:class:`finegrain.generation.PreallocatedLayer`),
                            and attention reads a view of its filled part; transformers' dynamic cache copies
                            the whole cache into a new block at every token of every layer (``torch.cat``).
                            The same keys and values, the same attention, the same tokens; where the attention
                            reads the view without copying it (SDPA; eager attention with grouped key/value
                            heads). Off: the dynamic cache
    packed_sampling_weights: on a CPU with oneDNN's bf16 kernels, a bf16 policy (bf16 weights, or bf16 autocast)
                            samples through linear layers whose weights are reordered once per sampling call into
                            oneDNN's blocked layout (:func:`packed_linear_weights`): PyTorch's bf16 product
                            reorders a plain weight in every call, which dominates decoding a few rows, where
                            each weight is read for a handful of products. The same kernel on the same numbers
                            (the same tokens, tested); off: the plain weights
    sdpa_sampling:          a policy whose attention finegrain chose as eager for its training forwards
                            (``--attn-implementation auto`` under bf16 or fp16 autocast on a CPU) samples
                            through SDPA (:func:`sdpa_sampling`): decoding one query per row, SDPA reads the
                            cached keys and values as they are (grouped ones without repeating them) where
                            eager runs two batched matmuls, a mask add and a softmax over copies. The same
                            attention up to rounding (in bf16 other draws from the same distribution); the
                            log-probs PPO trains on come from the eager forward that scores the rollout.
                            Off: sampling through eager attention too
    """

    fuse_gelu: bool = True
    logits_to_keep: bool = True
    reuse_rollout_forward: bool = True
    trim_minibatches: bool = True
    decoder: str = "auto"
    no_grad_sampling: bool = True
    keep_freed_memory: bool = True
    heap_large_blocks: bool = True
    fused_adamw: bool = True
    frozen_low_precision: bool = True
    merge_lora_sampling: bool = True
    contiguous_head_input: bool = True
    preallocated_kv_cache: bool = True
    packed_sampling_weights: bool = True
    sdpa_sampling: bool = True


_FIELDS = {f.name: f for f in dataclasses.fields(SpeedOptions)}
_configured: dict[str, object] = {}
_overrides: list[dict[str, object]] = []


def _from_environment() -> dict[str, object]:
    out: dict[str, object] = {}
    if os.environ.get("FINEGRAIN_DECODER"):
        out["decoder"] = os.environ["FINEGRAIN_DECODER"]  # checked where it is used (:func:`decoder`)
    if os.environ.get("FINEGRAIN_MALLOC_TUNING", "1") == "0":
        out["keep_freed_memory"] = out["heap_large_blocks"] = False
    return out


def options() -> SpeedOptions:
    """The switches in force now (defaults < environment < :func:`configure` < :func:`overrides`)."""
    values = _from_environment() | _configured
    for layer in _overrides:
        values |= layer
    return SpeedOptions(**values)


def _checked(changes: dict[str, object]) -> dict[str, object]:
    for name, value in changes.items():
        if name not in _FIELDS:
            raise ConfigError(f"no speed switch {name!r}; the switches: {', '.join(_FIELDS)}")
        if name == "decoder":
            if value not in DECODERS:
                raise ConfigError(f"decoder must be one of {', '.join(DECODERS)}, not {value!r}")
        elif not isinstance(value, bool):
            raise ConfigError(f"speed switch {name} is True or False, not {value!r}")
    return dict(changes)


def configure(**changes) -> SpeedOptions:
    """Set switches for the rest of the process (``configure(fuse_gelu=False)``); returns :func:`options`."""
    _configured.update(_checked(changes))
    return options()


@contextlib.contextmanager
def overrides(**changes) -> Iterator[SpeedOptions]:
    """Switches set inside a ``with`` block only, e.g. ``with speed.overrides(reuse_rollout_forward=False):``.

    Blocks nest (the inner one wins) and restore the switches on exit. Switches read when a model
    loads (``fuse_gelu``) apply to models loaded inside the block; :func:`apply_model_switches`
    brings a model loaded before it in line.
    """
    layer = _checked(changes)
    _overrides.append(layer)
    try:
        yield options()
    finally:
        _overrides[:] = [x for x in _overrides if x is not layer]


# ----------------------------------------------------------------------------- GELU fusion
def _tanh_gelu_kernel():
    """transformers' one-kernel tanh GELU class (``gelu_pytorch_tanh``)."""
    from transformers import activations

    fused = activations.ACT2CLS["gelu_pytorch_tanh"]
    return fused[0] if isinstance(fused, tuple) else fused  # ACT2CLS entries may be (class, kwargs)


def _swap(model, old: type, new: type) -> int:
    """Replace every submodule of exactly type ``old`` by a fresh ``new()``; returns how many."""
    swaps = [(parent, name) for parent in model.modules() for name, child in parent.named_children()
             if type(child) is old]
    for parent, name in swaps:
        setattr(parent, name, new())
    return len(swaps)


def fuse_gelu(model) -> int:
    """Replace transformers' ``NewGELUActivation`` modules by the one-kernel ``PytorchGELUTanh``.

    Both compute 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) (GPT-2's ``gelu_new``;
    |difference| ~1e-7), but ``gelu_new`` runs 8 elementwise ops in Python and the other one
    fused kernel. The config is left as it is, so a saved checkpoint still says ``gelu_new``.
    Returns how many modules were replaced. Unconditional: :func:`apply_model_switches` follows
    the switch.
    """
    from transformers import activations

    return _swap(model, activations.NewGELUActivation, _tanh_gelu_kernel())


def unfuse_gelu(model) -> int:
    """The reverse of :func:`fuse_gelu`: every one-kernel tanh GELU (swapped in, or the model's own
    ``gelu_pytorch_tanh``) becomes transformers' 8-op ``NewGELUActivation``, the same formula; returns how many."""
    from transformers import activations

    return _swap(model, _tanh_gelu_kernel(), activations.NewGELUActivation)


# ----------------------------------------------------------------------------- the LM head's input
_CONTIGUOUS_HOOK = "_finegrain_contiguous_input"  # attribute of a head holding its hook's handle


def _contiguous_first_input(module, args):
    if not args or args[0].is_contiguous():
        return None
    return (args[0].contiguous(), *args[1:])


def contiguous_head_input(model, on: bool = True) -> int:
    """Give a causal LM's head (``get_output_embeddings()``) a contiguous input (``on``), or stop (``off``); 0 or 1.

    Asked for the last K positions (``logits_to_keep``), transformers' LMs slice the hidden states,
    ``hidden[:, -K:]``, and pass that strided view to the head. PyTorch's CPU matmul multiplies a
    strided bf16 input through a slow path when autograd is off: SmolLM2's head on (8, 33) of (8,
    91) positions took 935 ms against 13 ms for the same rows copied into one block, the tiny
    GPT-2's (2,048 x 256) 5.3 against 0.5 ms; fp32 1.4x (107 against 79 ms). Under autocast over
    fp32 weights the cast to bf16 makes that copy anyway, so the slow path struck models held in
    bf16: a frozen reference (``--param-dtype bf16``) and the prefill of sampling. A forward
    pre-hook copies a strided input (one copy per call); a contiguous one passes untouched. Idempotent; a model
    without output embeddings (a classifier) is left alone.
    """
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        return 0
    handle = getattr(head, _CONTIGUOUS_HOOK, None)
    if on and handle is None:
        setattr(head, _CONTIGUOUS_HOOK, head.register_forward_pre_hook(_contiguous_first_input))
        return 1
    if not on and handle is not None:
        handle.remove()
        delattr(head, _CONTIGUOUS_HOOK)
        return 1
    return 0


def apply_model_switches(model) -> int:
    """Make a model follow the model-level switches (``fuse_gelu``, ``contiguous_head_input``); returns how
    many modules changed.

    Every model load and build calls it. On, GPT-2's ``gelu_new`` modules are fused; off, every
    tanh GELU runs as the 8 ops, so calling it again inside :func:`overrides` switches a live
    model (and again after the block, back: a model's own ``gelu_pytorch_tanh`` is fused then too).
    The head's contiguous-input hook is added or removed the same way.
    """
    o = options()
    return ((fuse_gelu(model) if o.fuse_gelu else unfuse_gelu(model))
            + contiguous_head_input(model, o.contiguous_head_input))


# ----------------------------------------------------------------------------- PPO
def base_model(model):
    """A peft model's base model; any other model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def forward_params(model) -> frozenset[str]:
    """Names of the keyword arguments the model's ``forward`` takes (a peft model's base model's), cached per class."""
    base = base_model(model)
    cls = type(base)
    if cls not in _FORWARD_PARAMS:
        import inspect

        _FORWARD_PARAMS[cls] = frozenset(inspect.signature(base.forward).parameters)
    return _FORWARD_PARAMS[cls]


_FORWARD_PARAMS: dict[type, frozenset[str]] = {}


def keeps_logits(model) -> bool:
    """Whether to ask a causal LM for the needed positions' logits only: switch ``logits_to_keep`` on and the
    model's forward takes ``logits_to_keep`` (transformers' LMs do; peft passes it on)."""
    return options().logits_to_keep and "logits_to_keep" in forward_params(model)


def reuses_rollout_forward(cfg) -> bool:
    """Whether PPO's first update epoch backpropagates through the rollout's own forward.

    Switch ``reuse_rollout_forward`` on, and each epoch one minibatch of the whole batch without
    accumulation: only then would the first epoch's forward repeat the rollout's exactly (same
    rows, same parameters; dropout is off). ``cfg`` is a PPO config (``batch_size``,
    ``grad_accum``, ``minibatch_size()``).
    """
    return options().reuse_rollout_forward and cfg.minibatch_size() >= cfg.batch_size and cfg.grad_accum == 1


AUTOCAST_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}  # --mixed-precision -> the dtype autocast computes in


def lower_frozen_weights(model, mixed_precision: str) -> int:
    """Store every frozen fp32 linear layer's weight (and bias) in the autocast dtype; returns how many layers.

    Under autocast a linear layer multiplies in bf16 (fp16): it casts its input, weight and bias
    first, so a weight stored in that dtype gives the same products, bit for bit, without the
    cast. Autocast caches the casts of weights that require grad for the autocast block, but
    not of frozen ones: the reference and reward models and a LoRA policy's base layers were cast
    again in every forward, and for every token while sampling. Only layers whose weight does not
    require grad change; embeddings and norms stay fp32 (they are not autocast), and a head tied
    to the input embedding gets its own low-precision copy while the embedding keeps its fp32
    table (copied out of the checkpoint's memory map, so that the map's pages of the replaced
    weights are released). The model must then only run under autocast (PPO runs every forward
    of these models under it). No-op when ``mixed_precision`` is not bf16/fp16 or switch
    ``frozen_low_precision`` is off.
    """
    import torch

    if mixed_precision not in AUTOCAST_DTYPES or not options().frozen_low_precision:
        return 0
    dtype = getattr(torch, AUTOCAST_DTYPES[mixed_precision])
    from transformers.pytorch_utils import Conv1D  # GPT-2's linear layer (an addmm, autocast like linear)

    n = 0
    for module in model.modules():
        if (type(module) not in (torch.nn.Linear, Conv1D) or module.weight.requires_grad
                or module.weight.dtype != torch.float32):
            continue
        with torch.no_grad():
            module.weight = torch.nn.Parameter(module.weight.detach().to(dtype), requires_grad=False)
            if module.bias is not None:
                module.bias = torch.nn.Parameter(module.bias.detach().to(dtype), requires_grad=False)
        n += 1
    if n:
        # transformers maps a safetensors checkpoint into memory and every tensor of it views that one
        # mapping: while the fp32 embedding or a norm still views it, the pages of the replaced weights
        # (read once above) stay resident. Own copies of the rest let the mapping go.
        with torch.no_grad():
            for t in list(model.parameters()) + list(model.buffers()):
                if not t.requires_grad and t.dtype == torch.float32:
                    t.data = t.data.clone()
    return n


# ----------------------------------------------------------------------------- sampling
def decoder(requested: str | None = None) -> str:
    """The decoder to sample with: ``requested``, else switch ``decoder``; one of :data:`DECODERS`."""
    name = requested if requested is not None else options().decoder
    if name not in DECODERS:
        raise ConfigError(f"decoder (FINEGRAIN_DECODER) must be one of {', '.join(DECODERS)}, not {name!r}")
    return name


def sampling_grad_mode(fn):
    """Decorator: run ``fn`` under ``torch.no_grad`` (switch ``no_grad_sampling`` on) or ``torch.inference_mode``.

    Not inference mode by default: CPU and CUDA autocast cache their bf16 copies of the weights
    only outside it, so decoding under it casts every weight again for every token.
    """
    @functools.wraps(fn)
    def run(*args, **kwargs):
        import torch

        with torch.no_grad() if options().no_grad_sampling else torch.inference_mode():
            return fn(*args, **kwargs)

    return run


def _autocast_dtype(device_type: str):
    """The dtype autocast computes in on ``device_type`` now, or None when autocast is off there."""
    import torch

    try:
        on = torch.is_autocast_enabled(device_type)
        return torch.get_autocast_dtype(device_type) if on else None
    except TypeError:  # torch < 2.4 has the per-device functions only
        if device_type == "cpu":
            return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
        return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None


def _mergeable_lora_layers(model) -> list:
    """(parent, name, LoRA layer, active adapters) of every peft LoRA linear layer whose update can be merged.

    A layer qualifies when its adapters are on and not merged already, its base layer is a linear
    layer (``nn.Linear`` or GPT-2's ``Conv1D``), every active adapter is plain LoRA (no DoRA or
    other variant, whose forward is not W + scaling x B A), and its dropout does nothing (eval
    mode, or p = 0). Layers whose weight is not materialised (meta, or an empty shard) are left alone.
    """
    import torch

    try:
        from peft.tuners.lora import Linear as LoraLinear
    except ImportError:
        return []
    from transformers.pytorch_utils import Conv1D

    found = []
    for parent in model.modules():
        for name, layer in parent.named_children():
            if type(layer) is not LoraLinear or layer.disable_adapters or layer.merged:
                continue
            base = layer.base_layer
            if type(base) not in (torch.nn.Linear, Conv1D) or base.weight.device.type == "meta" or not base.weight.numel():
                continue
            active = [a for a in layer.active_adapters if a in layer.lora_A]
            if not active or any(a in getattr(layer, "lora_variant", {}) or layer.use_dora.get(a) for a in active):
                continue
            drop = [layer.lora_dropout[a] for a in active]
            if any(d.training and getattr(d, "p", 0.0) > 0 for d in drop):
                continue
            found.append((parent, name, layer, active))
    return found


@contextlib.contextmanager
def merged_lora(model) -> Iterator[int]:
    """Inside the block, ``model``'s LoRA layers run as plain linear layers with their update merged in.

    Each qualifying layer (:func:`_mergeable_lora_layers`) is swapped, in its parent, for a
    shallow copy of its base layer whose weight is W + sum over active adapters of scaling x B A,
    computed in fp32 and stored in the dtype autocast multiplies in when autocast is on (the
    products autocast would make of an fp32 merged weight), else in W's dtype; the bias likewise.
    The original modules and tensors come back on exit, untouched (nothing is merged into them
    in place, so nothing is rounded away), also when the block raises. Yields how many layers were
    merged; nothing happens without peft, with switch ``merge_lora_sampling`` off, or when no
    layer qualifies. Memory: one extra copy of the adapted layers' weights during the block. Use it
    without gradients (sampling): the merged copies are frozen, so nothing trains through them.
    """
    import copy

    import torch

    layers = _mergeable_lora_layers(model) if options().merge_lora_sampling else []
    swapped = []
    try:
        with torch.no_grad():
            for parent, name, layer, active in layers:
                base = layer.base_layer
                weight = base.weight.detach().float()
                for a in active:
                    weight = weight + layer.get_delta_weight(a).float()
                dtype = _autocast_dtype(weight.device.type) or base.weight.dtype
                merged = copy.copy(base)
                merged._parameters = dict(base._parameters)  # own dict: the base layer keeps its tensors
                for hooks in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"):
                    setattr(merged, hooks, type(getattr(base, hooks))())  # a distributed wrapper's hooks stay on the base
                merged.weight = torch.nn.Parameter(weight.to(dtype), requires_grad=False)
                if base.bias is not None:
                    merged.bias = torch.nn.Parameter(base.bias.detach().to(dtype), requires_grad=False)
                setattr(parent, name, merged)
                swapped.append((parent, name, layer))
        yield len(swapped)
    finally:
        for parent, name, layer in swapped:
            setattr(parent, name, layer)


@functools.lru_cache(maxsize=None)
def _onednn_bf16_linear() -> bool:
    """Whether this torch has oneDNN's packed linear kernels and oneDNN multiplies in bf16 on this CPU."""
    import torch

    try:
        return (torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
                and hasattr(torch.ops.mkldnn, "_reorder_linear_weight") and hasattr(torch.ops.mkldnn, "_linear_pointwise"))
    except (AttributeError, RuntimeError):  # a build without oneDNN's operators
        return False


def _packing_budget() -> float:
    """Bytes the packed copies of :func:`packed_linear_weights` may take: half the memory free now (Linux), else no limit."""
    try:
        return 0.5 * os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # no such sysconf name here
        return float("inf")


class PackedLinear:
    """A bf16 linear layer whose weight is held in oneDNN's blocked layout (see :func:`packed_linear_weights`).

    Built from an ``nn.Linear`` or GPT-2's ``Conv1D`` (whose weight is stored (in, out)); multiplies
    its input in bf16 as autocast's linear does (input, weight and bias in bf16, fp32 accumulation,
    a bf16 result) with the one kernel that product would run, minus the per-call reorder of the weight.
    """

    def __init__(self, layer, rows: int):
        import torch

        weight = layer.weight.detach()
        if type(layer) is not torch.nn.Linear:  # Conv1D: x @ W + b with W (in, out)
            weight = weight.t()
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.to(torch.bfloat16).contiguous(), rows)
        self.bias = None if layer.bias is None else layer.bias.detach().to(torch.bfloat16)

    def forward(self, x):
        import torch

        return torch.ops.mkldnn._linear_pointwise(x.to(torch.bfloat16).contiguous(), self.weight, self.bias,
                                                  "none", [], "")


@contextlib.contextmanager
def packed_linear_weights(model, rows: int) -> Iterator[int]:
    """Inside the block, ``model``'s bf16 linear layers multiply through weights packed once for oneDNN.

    A bf16 product on a CPU goes through oneDNN, which reorders a plain weight into its blocked
    layout in every call; decoding a few rows reads each weight for a handful of products, so the
    reorder costs more than the product (SmolLM2-135M, 8 rows, on an AMD EPYC: 1.26-1.42x faster
    decoding with the weights packed; benchmarks/RESULTS.md). Every ``nn.Linear`` and GPT-2
    ``Conv1D`` that would multiply in bf16 -- bf16 autocast is on, or the layer's weight is bf16 and
    autocast is off -- gets its ``forward`` replaced by a :class:`PackedLinear`'s (``rows``: the row
    count to pack for, the decoding batch; other counts run too). Yields how many layers; on exit
    every layer's own ``forward`` is back, also when the block raises. Nothing happens off the
    CPU, without oneDNN's bf16 kernels, under fp16 autocast, or with switch
    ``packed_sampling_weights`` off. For sampling only: the packed weights are copies, so the
    layers must not change inside the block, and nothing trains through them. Memory: one bf16
    copy of the packed layers' weights during the block (in place of the copies autocast would
    cache for fp32 weights); when that would pass half the memory free at entry, nothing is packed.
    """
    import torch
    from transformers.pytorch_utils import Conv1D

    swapped = []
    try:
        if options().packed_sampling_weights and _onednn_bf16_linear():
            autocast = _autocast_dtype("cpu")
            layers = []
            for layer in model.modules():
                if type(layer) not in (torch.nn.Linear, Conv1D) or "forward" in vars(layer):
                    continue
                w = layer.weight
                if w.device.type != "cpu" or not w.numel() or w.dim() != 2:
                    continue
                multiplies_in = autocast if autocast is not None and w.dtype == torch.float32 else w.dtype
                if autocast in (None, torch.bfloat16) and multiplies_in == torch.bfloat16:
                    layers.append(layer)
            if 2 * sum(m.weight.numel() for m in layers) > _packing_budget():
                layers = []  # the copies would not fit beside everything else: sample through the plain weights
            with torch.no_grad():
                for layer in layers:
                    try:
                        packed = PackedLinear(layer, rows)
                    except RuntimeError:  # a weight oneDNN will not pack (a shape or build it has no kernel for)
                        continue
                    layer.forward = packed.forward
                    swapped.append(layer)
        yield len(swapped)
    finally:
        for layer in swapped:
            del layer.forward


SDPA_SAMPLING = "_finegrain_sdpa_sampling"
"""The attribute :func:`allow_sdpa_sampling` sets on a model whose eager attention was finegrain's own pick."""


def allow_sdpa_sampling(model) -> bool:
    """Mark ``model`` (a causal LM loaded with the attention ``auto`` picked) to sample through SDPA.

    Only where that pick was not SDPA already (``auto`` picks eager, or its recomputing variant, for bf16
    and fp16 autocast on a CPU) and transformers can switch the model's attention while it lives
    (``set_attn_implementation``; its attention through transformers' attention interface), to SDPA (the
    class supports it; no attention-logit soft-capping, which SDPA refuses). Returns whether it marked the
    model. An attention the user asked for is left alone: callers mark only what ``auto`` chose.
    """
    base = base_model(model)
    config = getattr(base, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    can = (config is not None and getattr(config, "_attn_implementation", None) not in (None, "sdpa")
           and hasattr(base, "set_attn_implementation") and getattr(base, "_supports_sdpa", False)
           and getattr(text, "attn_logit_softcapping", None) is None
           and getattr(type(base), "_can_set_attn_implementation", lambda: False)())
    if can:
        setattr(base, SDPA_SAMPLING, True)
    return bool(can)


@contextlib.contextmanager
def sdpa_sampling(model) -> Iterator[bool]:
    """Inside the block, a model :func:`allow_sdpa_sampling` marked attends through SDPA; its own attention
    comes back on exit, also when the block raises. Yields whether it switched (not with switch
    ``sdpa_sampling`` off). For sampling: a decoding step attends one query per row to the cached keys,
    which SDPA reads in place; eager attention (finegrain's pick for bf16 training forwards on a CPU)
    runs two batched matmuls over copies of them (SmolLM2-135M, 8 rows: sampling 1.12x faster;
    benchmarks/RESULTS.md).
    """
    base = base_model(model)
    switch = options().sdpa_sampling and getattr(base, SDPA_SAMPLING, False)
    own = base.config._attn_implementation if switch else None
    if switch:
        base.set_attn_implementation("sdpa")
    try:
        yield bool(switch)
    finally:
        if switch:
            base.set_attn_implementation(own)


# ----------------------------------------------------------------------------- memory
_MALLOC_TUNED = False


def keep_freed_memory(device_type: str) -> bool:
    """On a CPU run under glibc, stop malloc from handing freed tensor memory back to the kernel.

    glibc returns blocks above its mmap threshold to the kernel on ``free`` and trims the top of
    the heap; a training step that allocates and frees the same activations every micro-batch
    then page-faults them back in, zero-filled, every time. Raising both thresholds keeps that
    memory in the process for reuse: the resident size stays at its peak instead of breathing.
    glibc's mmap threshold cannot pass 32 MiB, so larger blocks would still be mapped at every
    allocation and unmapped at every free, each 4 KiB page zero-filled by a fault when first
    touched (a 113 MB embedding gradient of a 49k vocabulary: 28,000 faults, 0.2 s on a VM here);
    with switch ``heap_large_blocks`` glibc maps nothing (``M_MMAP_MAX`` 0: it still maps when the
    heap cannot grow), so they are reused like the rest. Once per process, when switch
    ``keep_freed_memory`` is on (``FINEGRAIN_MALLOC_TUNING=0`` turns both off). Returns whether it
    was applied.
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED or device_type != "cpu" or not options().keep_freed_memory:
        return _MALLOC_TUNED
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # glibc only: mallopt's parameters differ elsewhere
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold, m_mmap_max = -1, -3, -4
    # 32 MiB is glibc's largest mmap threshold on 64-bit; larger blocks are mapped and unmapped unless
    # mmap is off (M_MMAP_MAX 0)
    _MALLOC_TUNED = bool(libc.mallopt(m_trim_threshold, 1 << 30)) & bool(libc.mallopt(m_mmap_threshold, 32 << 20))
    if _MALLOC_TUNED and options().heap_large_blocks:
        _MALLOC_TUNED = bool(libc.mallopt(m_mmap_max, 0))
    return _MALLOC_TUNED
