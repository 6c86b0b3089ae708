"""Loading and writing files: atomic writes, safetensors, the hub cache, run locks, work folders, outputs, LoRA and
msModelSlim folders."""
