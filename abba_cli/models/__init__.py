"""The base model: loading a hub id or folder with the bundled offline fallback (loading, bundled) and
bitsandbytes-quantized bases (quantization)."""
