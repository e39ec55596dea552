"""The KV-cache size calculator behind ``kvlab memory``.

The uncompressed cache holds, per layer, two vectors (K and V) of ``kv_heads x head_dim`` numbers for
every cached token::

    bytes = batch x sum over layers of (tokens cached by the layer) x kv_heads x head_dim x 2 x bytes/number

where a sliding-window layer caches ``min(context, window)`` tokens and a global layer the whole
context. Llama-3.1-8B in bf16: 32 x 8 x 128 x 2 x 2 = 131072 bytes = 128 KiB per token.

Each strategy changes one factor of that product:

- **GQA** regrouping to ``G`` KV heads (Ainslie et al., 2023): ``kv_heads -> G``.
- **MLA** (DeepSeek-V2, arXiv 2405.04434): one shared latent of width ``d_c`` plus a decoupled RoPE key of
  width ``d_rope`` per token and layer, instead of ``2 x kv_heads x head_dim``.
- **Cross-layer sharing** (CLA, Brandon et al., 2024, arXiv 2405.12981): a fraction of the layers reuse
  the K/V of the nearest layer below of the same kind (global or same window) and cache nothing.
- **Interleaved local/global** (Gemma 3, arXiv 2503.19786): ``ratio`` sliding-window layers of window ``W``
  for every global layer; the global layer is every ``(ratio + 1)``-th.
- **int8 / int4** (KIVI, arXiv 2402.02750), with the scale overhead of kvlab's ``quantize`` layout: keys
  get an fp16 scale and minimum per channel per group of ``group`` tokens, values an fp16 scale and
  minimum per token and head (the full-precision residual of fewer than ``group`` tokens is ignored).
- **A kvlab eviction method** at ratio ``r`` keeps ``1 - r`` of the tokens of every global layer.

Model shapes come from a built-in name, a ``random:`` shape, an HF ``config.json`` (file or folder), or
GGUF metadata (read with the ``gguf`` package).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kvlab.errors import KVLabError, check
from kvlab.methods.cross_layer import sharing_layers  # the method chooses its layers the same way

DTYPE_BYTES = {"float32": 4.0, "fp32": 4.0, "bfloat16": 2.0, "bf16": 2.0, "float16": 2.0, "fp16": 2.0,
               "fp8": 1.0, "float8": 1.0}
SCALE_BYTES = 2  # fp16 scale and minimum


@dataclass(frozen=True)
class ModelShape:
    """What the cache size depends on."""

    name: str
    num_layers: int
    kv_heads: int
    head_dim: int
    num_heads: int | None = None
    layer_windows: tuple[int | None, ...] = ()  # per layer: sliding window, or None for a global layer
    max_context: int | None = None

    def __post_init__(self) -> None:
        if not self.layer_windows:
            object.__setattr__(self, "layer_windows", (None,) * self.num_layers)
        check(len(self.layer_windows) == self.num_layers,
              f"{self.name}: {len(self.layer_windows)} layer types for {self.num_layers} layers")

    @property
    def local_layers(self) -> int:
        return sum(w is not None for w in self.layer_windows)

    def bytes_per_token(self, dtype_bytes: float) -> float:
        """Bytes per token of a cache with every layer global (the textbook figure)."""
        return self.num_layers * self.kv_heads * self.head_dim * 2 * dtype_bytes


# ----------------------------------------------------------------- reading configs
def _windows(n_layers: int, layer_types: list[str] | None, window: int | None, model_type: str = "",
             pattern: int | None = None) -> tuple[int | None, ...]:
    if layer_types is not None:
        check(len(layer_types) == n_layers, f"layer_types lists {len(layer_types)} layers, config has {n_layers}")
        check(window is not None or all(t != "sliding_attention" for t in layer_types),
              "config has sliding_attention layers but no sliding_window")
        return tuple(window if t == "sliding_attention" else None for t in layer_types)
    if window and pattern:
        return tuple(None if (i + 1) % pattern == 0 else window for i in range(n_layers))
    if window and model_type == "mistral":
        return (window,) * n_layers
    return (None,) * n_layers


def shape_from_config(cfg: dict[str, Any], name: str) -> ModelShape:
    """A :class:`ModelShape` from an HF-style config dict (``text_config`` is used when present)."""
    if isinstance(cfg.get("text_config"), dict):
        cfg = {**cfg, **cfg["text_config"]}
    missing = [k for k in ("num_hidden_layers", "num_attention_heads") if cfg.get(k) is None]
    if cfg.get("head_dim") is None and cfg.get("hidden_size") is None:
        missing.append("head_dim (or hidden_size)")
    check(not missing, f"config of {name} lacks {', '.join(missing)}: cannot size its KV cache")
    heads = int(cfg["num_attention_heads"])
    head_dim = int(cfg.get("head_dim") or cfg["hidden_size"] // heads)
    kv = int(cfg.get("num_key_value_heads") or heads)  # HF convention: absent means multi-head attention
    n = int(cfg["num_hidden_layers"])
    pattern = cfg.get("sliding_window_pattern") or cfg.get("_sliding_window_pattern")
    windows = _windows(n, cfg.get("layer_types"), cfg.get("sliding_window"), cfg.get("model_type", ""),
                       pattern if cfg.get("layer_types") is None else None)
    return ModelShape(name=name, num_layers=n, kv_heads=kv, head_dim=head_dim, num_heads=heads,
                      layer_windows=windows, max_context=cfg.get("max_position_embeddings"))


def _gguf_value(reader: Any, key: str) -> Any:
    fld = reader.fields.get(key)
    if fld is None:
        return None
    value = fld.contents()
    return value


def shape_from_gguf(path: Path) -> ModelShape:
    """A :class:`ModelShape` from GGUF metadata (``<arch>.block_count``, ``<arch>.attention.*``)."""
    try:
        from gguf import GGUFReader
    except ImportError:  # pragma: no cover - gguf is a dependency
        raise KVLabError("reading GGUF metadata needs the `gguf` package: pip install gguf") from None
    try:
        reader = GGUFReader(str(path))
    except Exception as exc:  # noqa: BLE001 - any parse failure is a bad file
        raise KVLabError(f"cannot read GGUF file {path}: {exc}") from None
    arch = _gguf_value(reader, "general.architecture")
    check(arch is not None, f"GGUF file {path} has no general.architecture")
    get = lambda k: _gguf_value(reader, f"{arch}.{k}")
    n, heads = get("block_count"), get("attention.head_count")
    missing = [k for k, v in (("block_count", n), ("attention.head_count", heads)) if v is None]
    embed = get("embedding_length")
    head_dim = get("attention.key_length") or (embed // heads if embed and heads else None)
    if head_dim is None:
        missing.append("attention.key_length (or embedding_length)")
    check(not missing, f"GGUF file {path} lacks {', '.join(f'{arch}.{m}' for m in missing)}")
    kv = get("attention.head_count_kv") or heads
    if isinstance(kv, list):  # per-layer counts (some architectures): size with the largest
        kv = max(kv)
    if isinstance(heads, list):
        heads = max(heads)
    window = get("attention.sliding_window")
    pattern = get("attention.sliding_window_pattern")
    if isinstance(pattern, list):  # per-layer booleans: True = sliding
        windows = tuple(window if p else None for p in pattern)
    else:
        if window and pattern is None and str(arch).startswith("gemma3"):
            pattern = 6  # llama.cpp's Gemma 3 default: 5 local layers per global one
        windows = _windows(int(n), None, window, str(arch), pattern)
    return ModelShape(name=path.name, num_layers=int(n), kv_heads=int(kv), head_dim=int(head_dim),
                      num_heads=int(heads), layer_windows=windows, max_context=get("context_length"))


def model_shape(source: str) -> ModelShape:
    """Resolve a built-in model name, ``random:<shape>``, a config.json (or its folder) or a .gguf file."""
    from kvlab.models.builtin import BUILTIN_MODELS, converted_dir
    from kvlab.models.shapes import RANDOM_SHAPES

    key = source.removeprefix("random:")
    if key in RANDOM_SHAPES:
        return shape_from_config(dict(RANDOM_SHAPES[key]), source)
    if source in BUILTIN_MODELS:
        cfg_path = converted_dir(BUILTIN_MODELS[source]) / "config.json"
        if cfg_path.is_file():
            return shape_from_config(json.loads(cfg_path.read_text()), source)
        return shape_from_config(dict(_BUILTIN_FALLBACK[source]), source)
    path = Path(source).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        if path.suffix == ".gguf":
            return shape_from_gguf(path)
        try:
            cfg = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise KVLabError(f"{path} is not a JSON config: {exc}") from None
        check(isinstance(cfg, dict), f"{path} is not a JSON object")
        return shape_from_config(cfg, source)
    raise KVLabError(f"unknown model {source!r}; give a built-in name ({', '.join(BUILTIN_MODELS)}), one of "
                     f"{', '.join(sorted(k for k in RANDOM_SHAPES if not k.startswith('tiny')))}, "
                     "a config.json (or its folder), or a .gguf file")


# Public configs of the built-in models, used when their converted copy is not there yet.
_BUILTIN_FALLBACK: dict[str, dict[str, Any]] = {
    "qwen2.5-coder-0.5b": dict(model_type="qwen2", num_hidden_layers=24, num_attention_heads=14,
                               num_key_value_heads=2, hidden_size=896, max_position_embeddings=32768),
    "qwen2.5-coder-1.5b": dict(model_type="qwen2", num_hidden_layers=28, num_attention_heads=12,
                               num_key_value_heads=2, hidden_size=1536, max_position_embeddings=32768),
    "gemma3-270m": dict(model_type="gemma3_text", num_hidden_layers=18, num_attention_heads=4,
                        num_key_value_heads=1, head_dim=256, sliding_window=512, max_position_embeddings=32768,
                        layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                                     for i in range(18)]),
}


# ----------------------------------------------------------------- the formula
@dataclass(frozen=True)
class Strategy:
    """One configuration of the cache. Defaults: the model as it is."""

    label: str = "baseline (as configured)"
    kv_heads: int | None = None  # GQA regrouping
    mla: tuple[int, int] | None = None  # (d_c, d_rope)
    share_fraction: float = 0.0  # cross-layer: fraction of layers reusing the layer below
    local_global: tuple[int, int] | None = None  # (local layers per global one, window)
    bits: int | None = None  # int8 / int4
    group: int = 32  # tokens per key scale group (quantized)
    keep: float = 1.0  # eviction: fraction of tokens kept on global layers


def cache_bytes(shape: ModelShape, context: int, batch: int = 1, dtype: str = "bfloat16",
                strategy: Strategy = Strategy()) -> float:
    """KV-cache bytes of ``batch`` sequences of ``context`` tokens under ``strategy``."""
    check(context > 0, f"context must be a positive token count, got {context}")
    check(batch > 0, f"batch must be >= 1, got {batch}")
    check(dtype in DTYPE_BYTES, f"unknown dtype {dtype!r}; allowed: {', '.join(DTYPE_BYTES)}")
    s = strategy
    check(0 < s.keep <= 1, f"kept fraction must be in (0, 1], got {s.keep}")
    check(s.bits in (None, 4, 8), f"bits must be 4 or 8, got {s.bits}")
    windows = list(shape.layer_windows)
    if s.local_global is not None:
        ratio, window = s.local_global
        check(ratio >= 1 and window >= 1, f"local:global needs ratio >= 1 and window >= 1, got {ratio}, {window}")
        windows = [None if (i + 1) % (ratio + 1) == 0 else window for i in range(shape.num_layers)]
    shared = set(sharing_layers(windows, s.share_fraction))
    kv_heads = s.kv_heads or shape.kv_heads
    check(kv_heads >= 1, f"GQA needs at least one KV head, got {kv_heads}")
    if s.mla is not None:
        d_c, d_rope = s.mla
        check(d_c >= 1 and d_rope >= 0, f"MLA needs d_c >= 1 and d_rope >= 0, got {d_c}, {d_rope}")
        numbers = d_c + d_rope
    else:
        numbers = kv_heads * shape.head_dim * 2
    if s.bits is None:
        per_number = DTYPE_BYTES[dtype]
    elif s.mla is not None:
        per_number = s.bits / 8 + 2 * SCALE_BYTES / (s.mla[0] + s.mla[1])
    else:  # keys: per-channel scales per group of tokens; values: per-token scales
        per_number = s.bits / 8 + (2 * SCALE_BYTES / s.group + 2 * SCALE_BYTES / shape.head_dim) / 2
    tokens = 0.0
    for i, w in enumerate(windows):
        if i in shared:
            continue
        tokens += min(context, w) if w is not None else context * s.keep
    return batch * tokens * numbers * per_number


def strategies(shape: ModelShape, *, gqa: int | None = None, mla: tuple[int, int] | None = (512, 64),
               share: float | None = 0.5, local_global: tuple[int, int] | None = (5, 1024),
               bits: list[int] | tuple[int, ...] = (8, 4), group: int = 32, ratio: float | None = 0.5,
               method: str = "kvlab method") -> list[Strategy]:
    """The rows of ``kvlab memory``: the baseline, each strategy alone, then all of them stacked."""
    gqa = gqa if gqa is not None else max(1, shape.kv_heads // 2)
    rows = [Strategy()]
    if gqa:
        rows.append(Strategy(f"GQA: {gqa} KV heads", kv_heads=gqa))
    if mla:
        rows.append(Strategy(f"MLA: latent {mla[0]} + RoPE key {mla[1]}", mla=mla))
    if share:
        rows.append(Strategy(f"cross-layer: {share:.0%} of layers share", share_fraction=share))
    if local_global:
        rows.append(Strategy(f"local:global {local_global[0]}:1, window {local_global[1]}", local_global=local_global))
    for b in bits:
        rows.append(Strategy(f"int{b}", bits=b, group=group))
    if ratio:
        rows.append(Strategy(f"{method} at ratio {ratio:g}", keep=1 - ratio))
    stack = dict(share_fraction=share or 0.0, local_global=local_global, bits=min(bits) if bits else None,
                 group=group, keep=1 - (ratio or 0.0))
    parts = [p for p, on in (("cross-layer", share), ("local:global", local_global),
                             (f"int{min(bits) if bits else ''}", bits), (method, ratio)) if on]
    if gqa:
        rows.append(Strategy("stacked: " + " + ".join([f"GQA {gqa}"] + parts), kv_heads=gqa, **stack))
    if mla:
        rows.append(Strategy("stacked: " + " + ".join(["MLA"] + parts), mla=mla, **stack))
    return rows


@dataclass
class MemoryRow:
    strategy: str
    context: int
    batch: int
    dtype: str
    bytes: float
    gib: float
    kib_per_token: float
    vs_baseline: float
    params: dict[str, Any] = field(default_factory=dict)


def memory_table(shape: ModelShape, contexts: list[int], batch: int = 1, dtype: str = "bfloat16",
                 rows: list[Strategy] | None = None) -> list[MemoryRow]:
    """Bytes per strategy and context; ``vs_baseline`` is the size relative to the first row."""
    rows = rows or strategies(shape)
    out = []
    for ctx in contexts:
        base = cache_bytes(shape, ctx, batch, dtype, rows[0])
        for s in rows:
            b = cache_bytes(shape, ctx, batch, dtype, s)
            params = {k: v for k, v in asdict(s).items() if k != "label" and v != getattr(Strategy(), k)}
            out.append(MemoryRow(strategy=s.label, context=ctx, batch=batch, dtype=dtype, bytes=b, gib=b / 2**30,
                                 kib_per_token=b / (ctx * batch) / 1024, vs_baseline=b / base, params=params))
    return out
