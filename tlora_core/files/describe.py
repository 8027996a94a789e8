"""What a LoRA file looks made for, and the message when none of its layers fits the model.

Contract: :func:`guess_file_architecture` names the architecture (a key of
:data:`ARCHITECTURE_LABELS`) that a file's metadata label or, without one, its key names show;
:func:`no_match_message` says, for a file of which no layer fits the model, what the file is
without ever contradicting itself: a file of text-encoder layers only is said to be one; a label
that its key names disagree with is quoted beside what the names show; a file that looks made for
the model's own architecture is not told it was made for another one.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

from .. import families
from .names import TEXT_ENCODER_PREFIXES

# What a file can look made for: the known families, a few the pack does not load, and undecided.
_JOINT = [f for f in families.all_families() if f.diffusers_joint_blocks]
ARCHITECTURE_LABELS = {
    **{f.id: f.label for f in families.all_families()}, "sd1": "SD 1.x/2.x",
    "diffusers-joint": f"{', '.join(f.label for f in _JOINT[:-1])} or {_JOINT[-1].label} (diffusers names "
                       "their joint blocks alike)",
    "text-encoder": "text encoders only", "unknown": "an unrecognised model",
}
# The families' own key hints (Family.file_key_hint), asked before the generic rules below.
_HINTS = [(f.id, re.compile(f.file_key_hint)) for f in families.all_families() if f.file_key_hint]
# Names that mean the same model to a reader of messages ("sd1" is what key names can tell).
_ALIKE = {"sd1": "sd15"}

_FLUX_KEY = re.compile(r"(double|single)[._]blocks|(^|[._])(single_)?transformer[._]blocks[._]\d+[._]attn[._]")
_UNET_KEY = re.compile(r"(input|output)[._]blocks|middle[._]block|(down|up)[._]blocks|mid[._]block")
# Attention in the first UNet level exists in SD 1.x/2.x, not in SDXL.
_SD1_KEY = re.compile(r"input[._]blocks[._][12][._]1[._]|down[._]blocks[._]0[._]attentions")
_TE_KEY = re.compile(r"^(lora_te\d?_|text_encoder|te\d?[._]|clip_|t5)")
# diffusers spells FLUX's double blocks, SD3's joint blocks and Qwen-Image's blocks alike
# (transformer_blocks.N.attn.*): FLUX's single blocks, SD3's own names and SD3.5's second image
# attention (attn2), Qwen-Image's img_mlp / txt_mlp tell them apart.
_DIFFUSERS_JOINT_KEY = re.compile(r"(?:^|(?<!single)[._])transformer[._]blocks[._]\d+[._]attn[._]")
_SD3_KEY = re.compile(r"joint[._]blocks|(?:^|[._])transformer[._]blocks[._]\d+[._]attn2[._]")
_LABEL_KEYS = ("tlora.architecture", "modelspec.architecture", "ss_base_model_version")


def is_text_encoder_key(key: str) -> bool:
    """Whether a file key belongs to a text encoder (kohya ``lora_te*_``, diffusers
    ``text_encoder*``, ``te1.``, ``clip_``, ``t5`` ...), whatever family's names follow."""
    return key.startswith(TEXT_ENCODER_PREFIXES) or bool(_TE_KEY.search(key))


def file_label(metadata: Mapping[str, str]) -> tuple[str, str] | None:
    """``(architecture, "key = 'value'")`` of the metadata entry that labels the file, or None.

    A known family's own id or file labels first (what this pack and the stock tools write), then
    words that other tools' labels contain.
    """
    if metadata.get("tlora.architecture") in families.ids():
        return metadata["tlora.architecture"], f"tlora.architecture = '{metadata['tlora.architecture']}'"
    for family in families.all_families():
        for key, value in family.file_labels.items():
            if metadata.get(key) == value:
                return family.id, f"{key} = '{value}'"
    for key in _LABEL_KEYS:
        text = metadata.get(key, "").lower()
        for needle, arch in (("flux", "flux"), ("xl", "sdxl"), ("sd3", "sd3"),
                             ("stable-diffusion-3", "sd3"), ("v1", "sd1"), ("v2", "sd1")):
            if needle in text:
                return arch, f"{key} = '{metadata[key]}'"
    return None


def _guess_from_keys(keys: Iterable[str]) -> str:
    votes: Counter[str] = Counter()
    joint = text_encoder = 0
    for key in keys:
        if is_text_encoder_key(key):
            # Checked first: text-encoder names (self_attn.q_proj, mlp.fc1) resemble some
            # diffusion models' (Anima's), and count only when nothing else in the file does.
            text_encoder += 1
            continue
        hinted = next((family for family, hint in _HINTS if hint.search(key)), None)
        if hinted is not None:
            votes[hinted] += 1
        elif _UNET_KEY.search(key):
            votes["sd1" if _SD1_KEY.search(key) else "sdxl"] += 1
        elif _SD3_KEY.search(key):
            votes["sd3"] += 1
        elif _DIFFUSERS_JOINT_KEY.search(key):
            joint += 1
        elif _FLUX_KEY.search(key):
            votes["flux"] += 1
    if votes["sd1"]:
        # One SD 1.x-only block is enough: SDXL files never contain it.
        votes["sd1"] += votes.pop("sdxl", 0)
    if joint:
        # The file's other keys say whose joint blocks these are, if only one such family has any.
        sides = [f.id for f in _JOINT if votes[f.id] > 0]
        votes[sides[0] if len(sides) == 1 else "diffusers-joint"] += joint
    if votes:
        return votes.most_common(1)[0][0]
    return "text-encoder" if text_encoder else "unknown"


def guess_file_architecture(keys: Iterable[str], metadata: Mapping[str, str] | None = None) -> str:
    """Which architecture a file looks made for: a key of :data:`ARCHITECTURE_LABELS`.

    Metadata (``tlora.architecture``, ``modelspec.architecture``, ``ss_base_model_version``) wins;
    otherwise the keys vote: a family's own hint (``Family.file_key_hint``) first, then block names
    (FLUX ``double_blocks`` / diffusers ``single_transformer_blocks``, SD3 ``joint_blocks`` /
    diffusers ``attn2``, LDM / diffusers UNet names); diffusers' ``transformer_blocks.N.attn`` go
    with the other keys of the one family that spells joint blocks so (FLUX, SD3, Qwen-Image), and
    are ``"diffusers-joint"`` when nothing else tells. Text-encoder keys say ``"text-encoder"``
    only when nothing else in the file names a diffusion model.
    """
    label = file_label(metadata or {})
    return label[0] if label else _guess_from_keys(keys)


def _label(arch: str) -> str:
    return ARCHITECTURE_LABELS.get(arch, arch)


def _same(a: str, b: str) -> bool:
    return _ALIKE.get(a, a) == _ALIKE.get(b, b)


def _agree(label: str, by_keys: str) -> bool:
    """Whether a label and what the key names show can both be true of one file."""
    return by_keys == "unknown" or _same(label, by_keys) or \
        (by_keys == "diffusers-joint" and label in {f.id for f in _JOINT})


def no_match_message(source: str, keys: Sequence[str], model_arch: str,
                     metadata: Mapping[str, str] | None = None, shown: Sequence[str] = ()) -> str:
    """The error for a file of which no layer matches the model.

    Args:
        source: the file's name.
        keys: the file's keys (what its names show).
        model_arch: the model's family id (or ``"unknown"``).
        metadata: the file's metadata (its label), if the caller has it.
        shown: the keys to quote (default: the first of ``keys``).
    """
    sample = ", ".join(f"'{n}'" for n in list(shown or keys)[:4]) or "(no LoRA keys at all)"
    by_keys = _guess_from_keys(keys)
    if by_keys == "text-encoder":
        return (f"{source}: holds text-encoder layers only (first keys: {sample}). T-LoRA Loader "
                "adapts the diffusion model, not the text encoders, so nothing of this file can be "
                "applied here; load it with ComfyUI's LoraLoader (its clip input) instead.")
    label = file_label(metadata or {})
    model = _label(model_arch)
    if label is not None and not _agree(label[0], by_keys):
        what = (f"Its layer names look made for {_label(by_keys)}, although its metadata says "
                f"{_label(label[0])} ({label[1]}); the model is {model}.")
    else:
        arch = label[0] if label is not None else by_keys
        how = f"is labelled for {_label(arch)} ({label[1]})" if label is not None else \
            f"has the layer names of {_label(arch)}"
        if _same(arch, model_arch):
            what = (f"It {how}, like this model, but none of its layer names is a layer of this "
                    f"model: it was made for another size or version of {model}, or written by a "
                    "tool whose layer names this loader does not know.")
        else:
            what = f"The file looks made for {_label(arch)}; the model is {model}."
    return (f"{source}: none of its layers matches a layer of this model. {what} First keys: "
            f"{sample}. Load it on the model it was trained for, or pick the file made for this model.")
