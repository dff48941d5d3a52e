"""The model: its configuration and preset shapes (`config`), the module graph (`transformer`), the kernel
backend table (`backends`) and the KV cache (`kv_cache`)."""
