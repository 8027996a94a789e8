"""LoRA / T-LoRA files: writing ours, reading ours and other tools', checking both.

- :mod:`.write`: ``save_tlora``, our file (a plain kohya LoRA plus schedule metadata).
- :mod:`.layout`: that file's metadata (schedule header, per-layer column grouping).
- :mod:`.read`: ``load_tlora_file``, the one entry point that reads any supported file.
- :mod:`.raw`: a file's tensors and metadata, read safely (safetensors, tensors-only pickles).
- :mod:`.own`: our own format -> adapters.
- :mod:`.foreign`: format detection and plain LoRAs (kohya / ComfyUI / diffusers / PEFT);
  :mod:`.foreign_tlora`: the T-LoRA reference code's and LyCORIS's files; :mod:`.collect`: what
  both use to gather adapters; :mod:`.peft`: a PEFT LoraConfig's scale.
- :mod:`.names`: layer names in files -> model modules (family spellings: the family files).
- :mod:`.check`: ``TLoRAFileError`` and the checks every file passes before it is used (tensor
  types, ranks, alphas, values; then the adapters against the model).
- :mod:`.describe`: what a file looks made for, and the message when none of its layers fits.
- :mod:`.atomic`: ``atomic_write``, how every file of the pack is written (complete or not at all).
"""
