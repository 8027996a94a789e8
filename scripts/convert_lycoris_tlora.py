"""Convert a LyCORIS 'tlora' file into a T-LoRA file that applies exactly on any base, quantized or not.

    python scripts/convert_lycoris_tlora.py --base <full-precision model .safetensors> <lycoris file>
        [--out <converted .safetensors>] [--family flux] [--min-rank N] [--power P]

Run it once with ComfyUI's Python (it needs only torch and safetensors, not ComfyUI). ``--base`` is
the bf16 / fp16 / fp32 model file the LyCORIS file was trained on (the one a quantized fp8 /
nvfp4 / GGUF copy was made from). The converted file (default: ``<name>_tlora.safetensors`` beside
the LyCORIS file) goes in ComfyUI's ``loras`` folder and loads with T-LoRA Loader; see the README's
"LyCORIS T-LoRA files on quantized models" and ``tlora_core/lycoris_convert.py``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tlora_core.lycoris_convert import convert_lycoris  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("lycoris", type=Path, help="the LyCORIS 'tlora' .safetensors file")
    parser.add_argument("--base", type=Path, required=True,
                        help="the full-precision diffusion model file it was trained on")
    parser.add_argument("--out", type=Path, help="the converted file (default: <name>_tlora.safetensors)")
    parser.add_argument("--family", help="the model family id, if its layer names are ambiguous")
    parser.add_argument("--min-rank", type=float, help="rank schedule to store (default: rank / 2)")
    parser.add_argument("--power", type=float, help="schedule exponent to store (default: 1)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    out = args.out or args.lycoris.with_name(f"{args.lycoris.stem}_tlora.safetensors")
    try:
        written = convert_lycoris(args.lycoris, args.base, out, family=args.family,
                                  min_rank=args.min_rank, power=args.power)
    except (OSError, ValueError) as err:
        logging.error("%s", err)
        return 1
    logging.info("wrote %s", written)
    return 0


if __name__ == "__main__":
    sys.exit(main())
