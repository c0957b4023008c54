"""File formats: key names, the safetensors container, metadata."""
