"""The CPU inference path: a copy of a trained AT or NAT whose matrix products run in int8 or
bf16, for decoding (NAT, NAT + LPD, AT beam search) on a CPU.

Most of a decoding pass on a CPU is matrix products: the Transformer's linear layers, the
imitation modules' policy FFNs (eq 4) and, largest at a 32k vocabulary, the tied output
projection h·Eᵀ that gives the NAT's argmax and the AT's log p(y|x) when LPD rescores.
  int8: dynamic quantization (torch.ao, fbgemm/oneDNN VNNI kernels on x86, QNNPACK on ARM) of
        every nn.Linear and of the output projection: weights int8 with one scale per output
        unit; each product's input quantized to int8 when it arrives, with one scale for the
        whole matrix, products summed in int32. That shared scale makes a translation depend a
        little on the other sentences of its batch (the fp32 and bf16 paths do not).
  bf16: weights and activations in bfloat16, products summed in fp32 (oneDNN). Fast only on
        CPUs with bf16 matrix units (AMX); elsewhere slower than fp32.
  auto: bf16 where the CPU has AMX tiles, else int8.
Softmaxes (the policies of eq 4, the output distribution) and LPD scores stay fp32. Translations
may differ from the fp32 model's where two tokens or candidates nearly tie; BENCHMARKS.md gives
the BLEU each mode costs on Multi30k.
"""
from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from .at import EncoderDecoder
from .config import CPU_MODES


def _cpu_has(feature: str) -> bool:
    """torch's probe torch.cpu._is_<feature>_supported(); False where this torch lacks it."""
    probe = getattr(torch.cpu, f"_is_{feature}_supported", None)
    return bool(probe and probe())


def has_bf16_matrix_units() -> bool:
    """True on CPUs with AMX tiles (Intel Sapphire Rapids and later), where bf16 products are
    native; elsewhere torch emulates them and bf16 is slower than fp32."""
    return _cpu_has("amx_tile")


def has_native_bf16() -> bool:
    """True on CPUs that compute bf16 products natively (AVX512-BF16 or AMX tiles), where bf16
    autocast speeds training up (1.6x on an AVX512-BF16 EPYC); on an AVX2-only CPU torch
    emulates them and a bf16 training step is ~30x slower than fp32 (BENCHMARKS.md)."""
    return _cpu_has("avx512_bf16") or has_bf16_matrix_units()


def resolve_mode(mode: str) -> str:
    """"auto" -> "bf16" or "int8" for this CPU (has_bf16_matrix_units); other modes as given."""
    if mode not in CPU_MODES:
        raise ValueError(f"CPU inference mode must be one of {', '.join(CPU_MODES)}, got {mode!r}")
    if mode == "auto":
        return "bf16" if has_bf16_matrix_units() else "int8"
    return mode


def _tied_projection(model: EncoderDecoder) -> nn.Linear:
    """The output projection h·Eᵀ as a Linear layer holding a copy of E, so it quantizes like the others."""
    proj = nn.Linear(model.cfg.d_model, model.cfg.vocab_size, bias=False)
    proj.weight = nn.Parameter(model.embed.weight.detach().clone(), requires_grad=False)
    return proj


def quantize_int8(model: EncoderDecoder) -> EncoderDecoder:
    """Every nn.Linear of `model` (in place) and its output projection h·Eᵀ, dynamically quantized."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    model.output_projection = _tied_projection(model)
    with warnings.catch_warnings():
        # torch.ao's eager quantization is deprecated in favour of torchao (another package) but
        # present and working in the pinned torch; its notices would repeat on every load.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantize_per_(tensor|channel).*deprecated", category=UserWarning)
        return quantize_dynamic(model, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True)


def for_cpu(model: EncoderDecoder, mode: str = "auto") -> EncoderDecoder:
    """A copy of `model` (on the CPU, in eval mode) for fast CPU decoding in `mode` (CPU_MODES);
    "off" returns `model` itself. The copy is for inference only: never train or save it."""
    mode = resolve_mode(mode)
    if mode == "off":
        return model
    if next(model.parameters()).device.type != "cpu":
        raise ValueError("the CPU inference path takes a model on the CPU")
    fast = copy.deepcopy(model).eval().requires_grad_(False)
    if mode == "bf16":
        return fast.to(torch.bfloat16)
    return quantize_int8(fast)
