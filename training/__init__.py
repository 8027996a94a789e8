"""In-process T-LoRA training on a ComfyUI MODEL, built on ComfyUI's own sampling objects."""
