"""L5: quantization-aware training and LoRA over quantized models.

    lowbit.qat.prepare(model, "w3g64")        # Linear -> FakeQuantLinear; train with any loop
    lowbit.qat.convert(model)                 # FakeQuantLinear -> QuantLinear, same outputs
    lowbit.qat.merge_lora(peft_model)         # LoRA over QuantLinear -> merged Linear (or re-quantized)
"""
from .lora import merge_lora
from .prepare import convert, prepare

__all__ = ["prepare", "convert", "merge_lora"]
