"""Weight-only quantization as a module swap (int8 per channel, int4 group-wise).

    from agentcpu.quant import apply_quant, quantize_model
    model = apply_quant(model, "int4-g64")      # or quantize_model(model, "int4", 64)

docs/quantization.md describes the formats, the kernels and how they were chosen.
"""

from agentcpu.quant.formats import Int4Weight, Int8Weight, QuantizationError
from agentcpu.quant.model import (
    apply_quant,
    interleave_int4_layers,
    lay_out_int8_layers,
    parse_quant,
    quantize_model,
)
from agentcpu.quant.modules import Int4Linear, Int8Linear, QuantizedLinear

__all__ = [
    "Int4Linear",
    "Int4Weight",
    "Int8Linear",
    "Int8Weight",
    "QuantizationError",
    "QuantizedLinear",
    "apply_quant",
    "interleave_int4_layers",
    "lay_out_int8_layers",
    "parse_quant",
    "quantize_model",
]
