"""OFA image captioning engine (placeholder; filled in by the engine work)."""
