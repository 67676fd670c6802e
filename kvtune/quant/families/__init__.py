"""Quantizer families, one module each (registered by name in :data:`kvtune.quant.family.BUILTIN`)."""
