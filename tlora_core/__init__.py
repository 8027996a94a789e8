"""Pure-torch core of T-LoRA: rank schedule, masks, adapter math, Ortho-LoRA init, file format.

Never imports ComfyUI, so it can be used and tested in a plain Python environment.
"""
