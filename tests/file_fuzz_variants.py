"""Damaged and unusual variants of files the pack writes, each with the one outcome right for it.

A :class:`Variant` turns a :class:`Source` (a file ``save_tlora`` wrote for a tiny model, as T-LoRA
Train does) into a file to read, with a seeded ``random.Random`` choosing which tensor, offset or
byte it damages, and states the :class:`Expect` ed outcome before anything is read:

- ``refused``: an error naming the file and the given words (the key, where there is one);
- ``warned``: it loads; one warning names the file and the given words;
- ``same``: it loads without a warning.

What a loaded variant must give (``result``): ``"base"`` the undamaged file's adapters exactly;
``"reference"`` exactly those of the same tensors written in float32 (float8 / float16 / bfloat16 /
float64 variants: the documented up-cast); ``"scaled"`` the undamaged adapters with one layer's
``up`` times ``alpha / k`` (an edited alpha); ``"plain"`` a plain LoRA, without schedules, of the
undamaged file's full-rank delta (no metadata at all, tensors-only pickles).

:data:`VARIANTS` holds them all, by category (:data:`CATEGORIES`); ``test_file_fuzz.py`` reads
each through the real T-LoRA Loader.
"""

from __future__ import annotations

import collections
import io
import json
import pickle
import random
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

CATEGORIES = ("truncation", "random-bytes", "header", "metadata", "tensors", "architecture", "pickle")
CANARY_CALLS: list[str] = []           # filled only if a pickle's code ran


def canary_called(*args) -> None:
    CANARY_CALLS.append(repr(args))


class Canary:
    """An object whose unpickling would call :func:`canary_called`: the safe loader must refuse it."""

    def __reduce__(self):
        return canary_called, ("a pickle ran code",)


@dataclass(frozen=True)
class Expect:
    kind: str                                  # "refused" | "warned" | "same"
    needles: tuple[str, ...] = ()
    absent: tuple[str, ...] = ()               # words the message must not say
    result: str = "base"                       # for loaded variants, see the module docstring
    reference: dict | None = None              # float32 tensors of a "reference" result
    scaled: tuple[str, float] | None = None    # (layer key stem, alpha / k) of a "scaled" result


def refused(*needles: str, absent: tuple[str, ...] = ()) -> Expect:
    return Expect("refused", needles, absent)


def warned(*needles: str, result: str = "base", scaled: tuple[str, float] | None = None) -> Expect:
    return Expect("warned", needles, result=result, scaled=scaled)


def same(result: str = "base", reference: dict | None = None) -> Expect:
    return Expect("same", result=result, reference=reference)


@dataclass
class Source:
    """A file the pack wrote: its family, bytes, tensors and metadata."""

    family: str
    path: Path
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    data: bytes = field(repr=False, default=b"")

    @property
    def header_size(self) -> int:
        return struct.unpack("<Q", self.data[:8])[0]

    def header(self) -> dict:
        return json.loads(self.data[8:8 + self.header_size])

    def keys(self, suffix: str) -> list[str]:
        return sorted(k for k in self.tensors if k.endswith(suffix))


@dataclass
class Made:
    """A variant ready to write: ``write(path)`` and what reading it must give."""

    write: Callable[[Path], None]
    expect: Expect
    suffix: str = ".safetensors"
    model: str | None = None                   # family of the model to load it on (default: its own)


@dataclass(frozen=True)
class Variant:
    category: str
    name: str
    base: str                                  # which Source it starts from
    build: Callable[[Source, random.Random], Made]

    @property
    def id(self) -> str:
        return f"{self.category}-{self.base}-{self.name}"


def tensors_file(tensors: dict, metadata: dict | None) -> Callable[[Path], None]:
    return lambda path: save_file(tensors, str(path), metadata=metadata)


def bytes_file(data: bytes) -> Callable[[Path], None]:
    return lambda path: path.write_bytes(data)


def pickle_file(obj, **kwargs) -> Callable[[Path], None]:
    return lambda path: torch.save(obj, path, **kwargs)


def edited(src: Source, tensors: dict | None = None, metadata: dict | None = None,
           drop: tuple[str, ...] = ()) -> tuple[dict, dict]:
    """The source's tensors and metadata with some replaced (value None: removed) or dropped."""
    sd = {**src.tensors, **(tensors or {})}
    meta = {**src.metadata, **(metadata or {})}
    for key in drop:
        sd.pop(key, None)
        meta.pop(key, None)
    return {k: v for k, v in sd.items() if v is not None}, {k: v for k, v in meta.items() if v is not None}


def stem(key: str) -> str:
    return key.rsplit(".lora_", 1)[0].removesuffix(".alpha")


VARIANTS: list[Variant] = []


def add(category: str, base: str, name: str, build: Callable[[Source, random.Random], Made]) -> None:
    VARIANTS.append(Variant(category, name, base, build))


# --- truncation: cut anywhere, from the length prefix to the last byte -----------------------

def _cut(where: Callable[[Source, random.Random], int]) -> Callable[[Source, random.Random], Made]:
    return lambda src, rng: Made(bytes_file(src.data[:where(src, rng)]),
                                 refused("not a valid safetensors file"))


for _base in ("sdxl", "flux"):
    for _name, _where in {
        "empty": lambda s, r: 0, "in-prefix": lambda s, r: 5, "prefix-only": lambda s, r: 8,
        "mid-header": lambda s, r: 8 + s.header_size // 2, "header-only": lambda s, r: 8 + s.header_size,
        "one-data-byte": lambda s, r: 9 + s.header_size, "last-byte": lambda s, r: len(s.data) - 1,
        "random-a": lambda s, r: r.randrange(8 + s.header_size, len(s.data) - 1),
        "random-b": lambda s, r: r.randrange(1, len(s.data) - 1),
        "random-header": lambda s, r: r.randrange(9, 8 + s.header_size),
    }.items():
        add("truncation", _base, _name, _cut(_where))


# --- random bytes: never a pickle's or a zip's magic unless asked --------------------------

def _noise(rng: random.Random, size: int) -> bytes:
    data = bytearray(rng.randbytes(size))
    if data[:1] in (b"\x80", b"P"):
        data[0] = 0x41                      # not the pickle / zip magic: those have their own cases
    return bytes(data)


_ST, _PT = refused("not a valid safetensors file"), \
    refused("cannot be read as a PyTorch file", "corrupt", absent=("could run code",))
for _i in range(3):
    add("random-bytes", "none", f"safetensors-{_i}",
        lambda src, rng: Made(bytes_file(_noise(rng, rng.randrange(1, 4096))), _ST))
for _i, _suffix in enumerate((".pt", ".pt", ".pth", ".bin")):
    add("random-bytes", "none", f"pickle-{_i}",
        lambda src, rng, s=_suffix: Made(bytes_file(_noise(rng, rng.randrange(1, 4096))), _PT, s))
for _i in range(2):
    add("random-bytes", "none", f"after-length-prefix-{_i}", lambda src, rng: Made(
        bytes_file(struct.pack("<Q", 200) + _noise(rng, 300)), _ST))
add("random-bytes", "none", "after-json-start", lambda src, rng: Made(
    bytes_file(struct.pack("<Q", 200) + b'{"' + _noise(rng, 300)), _ST))
add("random-bytes", "none", "zeros", lambda src, rng: Made(bytes_file(bytes(4096)), _ST))
add("random-bytes", "none", "empty-pt", lambda src, rng: Made(bytes_file(b""), _PT, ".pt"))
add("random-bytes", "none", "pickle-magic-as-safetensors", lambda src, rng: Made(
    bytes_file(b"\x80\x02" + _noise(rng, 500)), refused("looks like a PyTorch pickle")))
add("random-bytes", "none", "pickle-magic-pt", lambda src, rng: Made(
    bytes_file(b"\x80\x02" + _noise(rng, 500)), _PT, ".pt"))
add("random-bytes", "none", "zip-magic-pt", lambda src, rng: Made(
    bytes_file(b"PK\x03\x04" + _noise(rng, 500)), _PT, ".pt"))


# --- header edits: the JSON header rewritten, the tensor bytes kept --------------------------

def _with_header(src: Source, edit: Callable[[dict], object], size_delta: int = 0) -> bytes:
    header = src.header()
    edit(header)
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text) + size_delta) + text + src.data[8 + src.header_size:]


def _header_variant(pick: str, edit: Callable[[dict, str], object], expect: Callable[[str], Expect]):
    """A header edit of one entry chosen by the seed among the keys ending in ``pick``."""
    def build(src: Source, rng: random.Random) -> Made:
        key = rng.choice(src.keys(pick))
        return Made(bytes_file(_with_header(src, lambda h: edit(h, key))), expect(key))
    return build


def _set(**fields) -> Callable[[dict, str], None]:
    return lambda header, key: header[key].update(
        {k: v(header[key]) if callable(v) else v for k, v in fields.items()})


_INT = {"sdxl": ("I32", "int32", "U32", "uint32"), "flux": ("I16", "int16", "U16", "uint16")}
_GENERIC = lambda key: refused("not a valid safetensors file")   # noqa: E731
for _base in ("sdxl", "flux"):
    signed, signed_name, unsigned, unsigned_name = _INT[_base]
    for _name, _pick, _edit, _expect in (
        ("weight-as-int", ".weight", _set(dtype=signed), lambda k, n=signed_name: refused(f"'{k}'", f"stored as {n}")),
        ("weight-as-uint", ".weight", _set(dtype=unsigned), lambda k, n=unsigned_name: refused(f"'{k}'", f"stored as {n}")),
        ("alpha-as-int32", ".alpha", _set(dtype="I32"), lambda k: refused(f"'{k}'", "stored as int32")),
        ("weight-as-f64", ".weight", _set(dtype="F64"), _GENERIC),
        ("unknown-dtype", ".weight", _set(dtype="X9"), _GENERIC),
        ("down-dims-swapped", ".lora_down.weight", _set(shape=lambda e: e["shape"][::-1]),
         lambda k: refused(f"'{k}'", "do not form a pair")),
        ("up-flattened", ".lora_up.weight", _set(shape=lambda e: [e["shape"][0] * e["shape"][1]]),
         lambda k: refused(f"'{k}'", "do not form a pair")),
        ("down-4d", ".lora_down.weight", _set(shape=lambda e: [*e["shape"], 1, 1]),
         lambda k: refused(f"'{k}'", "do not form a pair")),
        ("offsets-overlap", ".weight", _set(data_offsets=lambda e: [e["data_offsets"][0] + 4,
                                                                     e["data_offsets"][1] + 4]), _GENERIC),
        ("offsets-beyond", ".weight", _set(data_offsets=lambda e: [e["data_offsets"][0], 10 ** 9]), _GENERIC),
        ("entry-removed", ".weight", lambda h, k: h.pop(k), _GENERIC),
        ("metadata-not-string", ".alpha",
         lambda h, k: h["__metadata__"].update({"tlora.rank": 4}), _GENERIC),
    ):
        add("header", _base, _name, _header_variant(_pick, _edit, _expect))
    for _name, _delta in (("length-plus-1", 1), ("length-minus-1", -1), ("length-huge", 2 ** 40)):
        add("header", _base, _name, lambda src, rng, d=_delta: Made(
            bytes_file(_with_header(src, lambda h: None, d)), refused("not a valid safetensors file")))
    add("header", _base, "json-broken", lambda src, rng: Made(bytes_file(
        src.data[:8] + src.data[8:8 + src.header_size - 12] + b" " * 12 + src.data[8 + src.header_size:]),
        refused("not a valid safetensors file")))
    add("header", _base, "not-utf8", lambda src, rng: Made(bytes_file(
        src.data[:9] + b"\xff" + src.data[10:]), refused("not a valid safetensors file")))
    add("header", _base, "metadata-removed", lambda src, rng: Made(
        bytes_file(_with_header(src, lambda h: h.pop("__metadata__"))), same("plain")))


# --- metadata edits: the pack's header keys and the other entries ----------------------------

_DROP = {"tlora.format_version": warned("'tlora.format_version' is missing"),
         "tlora.variant": refused("'tlora.variant' is missing"),
         "tlora.architecture": refused("'tlora.architecture' is missing"),
         "tlora.rank": refused("'tlora.rank' is missing"), "tlora.parts": refused("'tlora.parts' is missing"),
         "tlora.min_rank": refused("'tlora.min_rank' is missing"),
         "tlora.power": warned("'tlora.power' is missing"), "tlora.T": warned("'tlora.T' is missing")}
for _base in ("sdxl", "flux"):
    for _key, _expect in {**_DROP, **({"tlora.layout": refused("'tlora.layout'")} if _base == "flux" else {})
                          }.items():
        add("metadata", _base, f"drop-{_key}", lambda src, rng, k=_key, e=_expect: Made(
            tensors_file(*edited(src, drop=(k,))), e))
    add("metadata", _base, "header-stripped-training-kept", lambda src, rng: Made(tensors_file(
        *edited(src, drop=tuple(k for k in src.metadata if k.startswith("tlora.") and k != "tlora.training"))),
        warned("'tlora.training'", "without a rank schedule", result="plain")))

_VALUES = {
    "tlora.format_version": [("2", "format version 2"), ("abc", "'tlora.format_version' = 'abc'"),
                             ("", "'tlora.format_version' = ''"), ("1.0", "'tlora.format_version' = '1.0'")],
    "tlora.variant": [("dora", "unknown variant 'dora'"), ("", "unknown variant ''"),
                      ("ortho", "'tlora.min_rank' is set")],
    "tlora.architecture": [("no-such", "unknown architecture 'no-such'"), ("", "unknown architecture ''")],
    "tlora.rank": [("0", "'tlora.rank' = 0"), ("-4", "'tlora.rank' = -4"), ("abc", "'tlora.rank' = 'abc'"),
                   ("3", "'tlora.rank'"), ("99999", "'tlora.rank'")],
    "tlora.parts": [("0", "'tlora.parts' = 0"), ("3", "'tlora.parts'"), ("1", "'tlora.parts'")],
    "tlora.min_rank": [(v, f"'tlora.min_rank' = {v} must be between 1 and 'tlora.rank' = 4") for v in ("0", "5", "-1")]
    + [("abc", "'tlora.min_rank' = 'abc'"), ("2.5", "'tlora.min_rank' = '2.5'")],
    "tlora.power": [(v, f"'tlora.power' = '{v}' must be a finite number > 0") for v in ("0", "-1", "nan", "inf")]
    + [("abc", "'tlora.power' = 'abc' is not a number")],
    "tlora.T": [(v, f"'tlora.T' = '{v}' must be a finite number > 0") for v in ("0", "-5")]
    + [("abc", "'tlora.T' = 'abc' is not a whole number"), ("1.5", "'tlora.T' = '1.5' is not a whole number")],
}
for _key, _cases in _VALUES.items():
    for _value, _needle in _cases:
        add("metadata", "sdxl", f"{_key}={_value or 'empty'}", lambda src, rng, k=_key, v=_value, n=_needle: Made(
            tensors_file(*edited(src, metadata={k: v})), refused(n)))

_LINEAR1 = "single_blocks.0.linear1"
for _name, _layout, _needle in (
    ("not-json", "{oops", "tlora.layout is not valid JSON"), ("a-list", "[]", "tlora.layout is not valid JSON"),
    ("empty", "{}", "'tlora.layout'"), ("entry-not-list", json.dumps({_LINEAR1: 5}), "not a non-empty list"),
    ("block-malformed", json.dumps({_LINEAR1: [{"rows": None}]}), "is malformed"),
    ("unknown-layer", json.dumps({"no.such.layer": [{"rows": None, "columns": 4, "parts": 1}]}),
     "layout names layers with no tensors"),
    ("rank-index-beyond", None, "do not fit rank"),
):
    def _layout_build(src, rng, layout=_layout, needle=_needle):
        if layout is None:      # the real layout with one rank index beyond the schedule's rank
            entries = json.loads(src.metadata["tlora.layout"])
            block = entries[_LINEAR1][0]
            block["rank_index"] = list(range(block["columns"] // block["parts"])) * block["parts"]
            block["rank_index"][-1] = 99
            layout = json.dumps(entries)
        return Made(tensors_file(*edited(src, metadata={"tlora.layout": layout})), refused(needle))
    add("metadata", "flux", f"layout-{_name}", _layout_build)

for _name, _meta, _expect in (
    ("labelled-flux", {"tlora.architecture": "flux"}, warned("'tlora.architecture'", "'flux'")),
    ("modelspec-flux", {"modelspec.architecture": "flux-1-dev/lora"}, same()),
    ("no-title", {"modelspec.title": None}, same()), ("no-training", {"tlora.training": None}, same()),
    ("training-not-json", {"tlora.training": "{not json"}, same()),
    ("network-dim-garbage", {"ss_network_dim": "abc"}, same()), ("junk-key", {"junk.key": "\x00\uffff"}, same()),
    ("only-tlora-keys", "drop-others", same()),
):
    def _meta_build(src, rng, meta=_meta, expect=_expect):
        if meta == "drop-others":
            meta = {k: None for k in src.metadata if not k.startswith("tlora.")}
        return Made(tensors_file(*edited(src, metadata=meta)), expect)
    add("metadata", "sdxl", _name, _meta_build)


# --- tensor edits: dtypes, values, shapes, missing and extra tensors -------------------------

def _tensor_variant(pick: str, change: Callable[[torch.Tensor, random.Random], torch.Tensor | None],
                    expect: Callable[[str, torch.Tensor], Expect]):
    """One tensor (chosen by the seed among the keys ending in ``pick``) replaced or removed."""
    def build(src: Source, rng: random.Random) -> Made:
        key = rng.choice(src.keys(pick))
        new = change(src.tensors[key], rng)
        return Made(tensors_file(*edited(src, tensors={key: new}, drop=(key,) if new is None else ())),
                    expect(key, src.tensors[key]))
    return build


def _poke(value: float) -> Callable[[torch.Tensor, random.Random], torch.Tensor]:
    def change(t: torch.Tensor, rng: random.Random) -> torch.Tensor:
        t = t.clone()
        t.view(-1)[rng.randrange(t.numel())] = value
        return t
    return change


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


for _base, _dtypes in (("sdxl", (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.bool,
                                 torch.complex64)), ("flux", (torch.int32,))):
    for _dtype in _dtypes:
        add("tensors", _base, f"weight-{_dtype_name(_dtype)}", _tensor_variant(
            ".weight", lambda t, r, d=_dtype: t.to(d),
            lambda k, t, d=_dtype: refused(f"'{k}'", f"stored as {_dtype_name(d)}")))
add("tensors", "flux", "alpha-bool", _tensor_variant(".alpha", lambda t, r: t.to(torch.bool),
                                                     lambda k, t: refused(f"'{k}'", "stored as bool")))
add("tensors", "sdxl", "alpha-int64", _tensor_variant(".alpha", lambda t, r: t.to(torch.int64),
                                                      lambda k, t: refused(f"'{k}'", "stored as int64")))
add("tensors", "sdxl", "alpha-float-bits-as-int32", _tensor_variant(
    ".alpha", lambda t, r: t.view(torch.int32), lambda k, t: refused(f"'{k}'", "stored as int32")))


def _cast_all(dtype: torch.dtype, which: str = ".weight", one: bool = False):
    """Tensors ending in ``which`` (all, or one chosen by the seed) stored as ``dtype``: they must
    read exactly as the same values written in float32."""
    def build(src: Source, rng: random.Random) -> Made:
        keys = [rng.choice(src.keys(which))] if one else src.keys(which)
        cast = {k: src.tensors[k].to(dtype) for k in keys}
        reference = {**src.tensors, **{k: t.float() for k, t in cast.items()}}
        return Made(tensors_file(*edited(src, tensors=cast)), same("reference", reference))
    return build


for _base, _cases in (
    ("sdxl", ((torch.float8_e4m3fn, True), (torch.float8_e5m2, True), (torch.float8_e4m3fn, False),
              (torch.float16, False), (torch.bfloat16, False), (torch.float64, False))),
    ("flux", ((torch.float8_e4m3fn, False), (torch.float64, False), (torch.float16, False))),
):
    for _dtype, _one in _cases:
        add("tensors", _base, f"{'one' if _one else 'all'}-weights-{_dtype_name(_dtype)}", _cast_all(_dtype, one=_one))
for _dtype in (torch.float16, torch.bfloat16, torch.float64, torch.float8_e4m3fn):
    add("tensors", "sdxl", f"alphas-{_dtype_name(_dtype)}", _cast_all(_dtype, ".alpha"))

for _base, _name, _pick, _value in (
    ("sdxl", "nan", ".weight", float("nan")), ("sdxl", "inf", ".weight", float("inf")),
    ("sdxl", "minus-inf", ".weight", -float("inf")), ("sdxl", "nan-alpha", ".alpha", float("nan")),
    ("flux", "inf", ".weight", float("inf")),
):
    add("tensors", _base, _name, _tensor_variant(_pick, _poke(_value), lambda k, t: refused(f"'{k}'", "NaN/Inf")))


def _zero_rank(src: Source, rng: random.Random) -> Made:
    key = rng.choice(src.keys(".lora_down.weight"))
    s = stem(key)
    down, up = src.tensors[key], src.tensors[f"{s}.lora_up.weight"]
    return Made(tensors_file(*edited(src, tensors={key: down[:0], f"{s}.lora_up.weight": up[:, :0]})),
                refused(f"'{s}.lora_", "rank 0"))


add("tensors", "sdxl", "zero-rank-layer", _zero_rank)
add("tensors", "flux", "zero-rank-layer", _zero_rank)
add("tensors", "sdxl", "zero-rank-down", _tensor_variant(".lora_down.weight", lambda t, r: t[:0],
                                                         lambda k, t: refused(f"'{k}' is empty")))
add("tensors", "sdxl", "alpha-empty", _tensor_variant(".alpha", lambda t, r: torch.zeros(0),
                                                      lambda k, t: refused(f"'{k}' holds 0 values")))
add("tensors", "sdxl", "drop-down", _tensor_variant(".lora_down.weight", lambda t, r: None,
                                                    lambda k, t: refused(f"'{stem(k)}'", "'.lora_down.weight'")))
add("tensors", "sdxl", "drop-up", _tensor_variant(".lora_up.weight", lambda t, r: None,
                                                  lambda k, t: refused(f"'{stem(k)}'", "'.lora_up.weight'")))
add("tensors", "sdxl", "drop-alpha", _tensor_variant(".alpha", lambda t, r: None, lambda k, t: same()))
add("tensors", "sdxl", "drop-every-alpha", lambda src, rng: Made(
    tensors_file(*edited(src, drop=tuple(src.keys(".alpha")))), same()))
for _name, _factor in (("alpha-half", 0.5), ("alpha-double", 2.0), ("alpha-huge", 1.25e8)):
    add("tensors", "sdxl", _name, _tensor_variant(
        ".alpha", lambda t, r, f=_factor: t * f,
        lambda k, t, f=_factor: warned(f"'{k}' = {float(t) * f:g}", result="scaled", scaled=(stem(k), f))))
for _name, _value, _needle in (("alpha-zero", torch.tensor(0.0), "is 0"),
                               ("alpha-negative", torch.tensor(-4.0), "never negative"),
                               ("alpha-two-values", torch.tensor([4.0, 4.0]), "holds 2 values")):
    add("tensors", "sdxl", _name, _tensor_variant(".alpha", lambda t, r, v=_value: v,
                                                  lambda k, t, n=_needle: refused(f"'{k}'", n)))
for _name, _pick, _change, _needle in (
    ("down-row-missing", ".lora_down.weight", lambda t, r: t[1:], "do not form a pair"),
    ("up-column-extra", ".lora_up.weight", lambda t, r: torch.cat([t, t[:, :1]], 1), "do not form a pair"),
    ("down-transposed", ".lora_down.weight", lambda t, r: t.T.contiguous(), "do not form a pair"),
    ("down-1d", ".lora_down.weight", lambda t, r: t.reshape(-1), "do not form a pair"),
    ("up-3d", ".lora_up.weight", lambda t, r: t[..., None], "do not form a pair"),
):
    add("tensors", "sdxl", _name, _tensor_variant(_pick, _change, lambda k, t, n=_needle: refused(f"'{k}'", n)))


def _wider_layer(src: Source, rng: random.Random) -> Made:
    key = rng.choice(src.keys(".lora_down.weight"))
    down = src.tensors[key]
    return Made(tensors_file(*edited(src, tensors={key: torch.cat([down, down[:, :1]], 1)})),
                refused("shape mismatch on layer", f"down {(down.shape[0], down.shape[1] + 1)}"))


add("tensors", "sdxl", "layer-of-another-size", _wider_layer)
for _name, _extra, _expect in (
    ("extra-unknown-tensor", {"foo.bar": torch.ones(3)}, warned("foo.bar")),
    ("extra-layer-for-no-module", {"lora_unet_no_such_layer.lora_down.weight": torch.ones(2, 4),
                                   "lora_unet_no_such_layer.lora_up.weight": torch.ones(4, 2)},
     warned("lora_unet_no_such_layer")),
    ("extra-text-encoder-pair", {"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.ones(2, 4),
                                 "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.ones(4, 2)},
     warned("lora_te1_text_model_encoder_layers_0_mlp_fc1")),
    ("extra-int-tensor", {"step": torch.tensor(800)}, refused("'step'", "stored as int64")),
):
    add("tensors", "sdxl", _name, lambda src, rng, x=_extra, e=_expect: Made(tensors_file(*edited(src, tensors=x)), e))


# --- other architectures and what the messages say about them --------------------------------

def _elsewhere(model: str, expect: Expect, metadata: dict | None = None, strip: bool = False):
    def build(src: Source, rng: random.Random) -> Made:
        sd, meta = edited(src, metadata=metadata)
        return Made(tensors_file(sd, {} if strip else meta), expect, model=model)
    return build


_KOHYA_SDXL = {"modelspec.architecture": "stable-diffusion-xl-v1-base/lora", "ss_base_model_version": "sdxl_base_v1-0"}
_SDXL_LABELS = {"tlora.architecture": "sdxl", **_KOHYA_SDXL}
add("architecture", "sdxl", "on-flux", _elsewhere("flux", refused("looks made for SDXL; the model is FLUX")))
add("architecture", "flux", "on-sdxl", _elsewhere("sdxl", refused("looks made for FLUX; the model is SDXL")))
add("architecture", "sdxl", "stripped-on-flux", _elsewhere(
    "flux", refused("looks made for SDXL; the model is FLUX"), strip=True))
add("architecture", "flux", "labelled-sdxl-on-sdxl", _elsewhere(
    "sdxl", refused("look made for FLUX", "metadata says SDXL (tlora.architecture = 'sdxl')",
                    absent=("made for SDXL",)), {"tlora.architecture": "sdxl"}))
add("architecture", "flux", "every-label-sdxl-on-sdxl", _elsewhere(
    "sdxl", refused("look made for FLUX", "metadata says SDXL", absent=("made for SDXL",)), _SDXL_LABELS))
add("architecture", "sdxl", "labelled-flux-on-flux", _elsewhere(
    "flux", refused("look made for SDXL", "metadata says FLUX", absent=("made for FLUX",)),
    {"tlora.architecture": "flux"}))
# (The tiny SD 1.5 shares most layer names and shapes with the tiny SDXL: it goes on FLUX.)
for _base, _label, _model in (("sd15", "SD 1.5", "FLUX"), ("sd3", "SD3", "SDXL"),
                              ("qwen_image", "Qwen-Image", "SDXL"), ("zimage", "Z-Image", "SDXL")):
    add("architecture", _base, f"on-{_model.lower()}", lambda src, rng, label=_label, model=_model: Made(
        tensors_file(src.tensors, src.metadata), refused(f"looks made for {label}; the model is {model}"),
        model=model.lower()))

_TE = {"kohya": "lora_te1_text_model_encoder_layers_{i}_self_attn_q_proj.lora_{p}.weight",
       "diffusers": "text_encoder.text_model.encoder.layers.{i}.mlp.fc1.lora_{P}.weight"}


def _text_encoder_only(style: str, model: str, metadata: dict | None = None, with_ours: bool = False):
    def build(src: Source, rng: random.Random) -> Made:
        sd = {}
        for i in range(rng.randrange(1, 4)):
            sd[_TE[style].format(i=i, p="down", P="A")] = torch.randn(2, 16)
            sd[_TE[style].format(i=i, p="up", P="B")] = torch.randn(16, 2)
        if with_ours:
            return Made(tensors_file({**src.tensors, **sd}, None),
                        warned("text-encoder layers", "ignored", result="plain"), model=model)
        return Made(tensors_file(sd, metadata), refused("holds text-encoder layers only",
                                                        absent=("Anima", "looks made for")), model=model)
    return build


add("architecture", "none", "text-encoder-kohya-on-sdxl", _text_encoder_only("kohya", "sdxl"))
add("architecture", "none", "text-encoder-diffusers-on-flux", _text_encoder_only("diffusers", "flux"))
add("architecture", "none", "text-encoder-labelled-sdxl", _text_encoder_only("kohya", "sdxl", _KOHYA_SDXL))
add("architecture", "sdxl", "with-text-encoder-pairs", _text_encoder_only("kohya", "sdxl", with_ours=True))


# --- pickles: tensors-only ones are plain LoRAs; anything else is refused, and nothing runs ----

for _suffix in (".pt", ".pth", ".bin"):
    add("pickle", "sdxl", f"tensors{_suffix.replace('.', '-')}", lambda src, rng, s=_suffix: Made(
        pickle_file(dict(src.tensors)), same("plain"), s))
add("pickle", "sdxl", "legacy-format", lambda src, rng: Made(
    pickle_file(dict(src.tensors), _use_new_zipfile_serialization=False), same("plain"), ".pt"))
add("pickle", "sdxl", "ordered-dict", lambda src, rng: Made(
    pickle_file(collections.OrderedDict(src.tensors)), same("plain"), ".pt"))
add("pickle", "flux", "tensors-bf16", lambda src, rng: Made(pickle_file(dict(src.tensors)), same("plain"), ".pt"))
add("pickle", "sdxl", "int-tensor", lambda src, rng: Made(
    pickle_file({**src.tensors, "step": torch.tensor(3, dtype=torch.int32)}), refused("'step'", "int32"), ".pt"))
for _name, _obj, _needle in (
    ("str-value", lambda sd: {**sd, "note": "text"}, "'note' is a str"),
    ("nested-dict", lambda sd: {"state_dict": sd}, "'state_dict' is a dict"),
    ("list", lambda sd: list(sd.values()), "holds a list"), ("tuple", lambda sd: tuple(sd.values()), "holds a tuple"),
    ("bare-tensor", lambda sd: next(iter(sd.values())), "holds a Tensor"),
    ("int-key", lambda sd: {7: next(iter(sd.values()))}, "named by a int"),
    ("code", lambda sd: {**sd, "x": Canary()}, "could run code"),
):
    add("pickle", "sdxl", _name, lambda src, rng, o=_obj, n=_needle: Made(
        pickle_file(o(dict(src.tensors))), refused(n), ".pt"))
add("pickle", "sdxl", "code-as-bin", lambda src, rng: Made(pickle_file([Canary()]), refused("could run code"), ".bin"))


def _torch_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


for _name, _cut_at in (("truncated-half", lambda n: n // 2), ("truncated-last-byte", lambda n: n - 1)):
    add("pickle", "sdxl", _name, lambda src, rng, c=_cut_at: Made(bytes_file(
        (data := _torch_bytes(dict(src.tensors)))[:c(len(data))]), _PT, ".pt"))
add("pickle", "sdxl", "as-safetensors", lambda src, rng: Made(
    bytes_file(_torch_bytes(dict(src.tensors))), refused("looks like a PyTorch pickle")))
add("pickle", "sdxl", "plain-pickle-module", lambda src, rng: Made(
    bytes_file(pickle.dumps(dict(src.tensors))), refused("not written by torch.save"), ".pt"))


def count_by_category() -> dict[str, int]:
    return {c: sum(v.category == c for v in VARIANTS) for c in CATEGORIES}

