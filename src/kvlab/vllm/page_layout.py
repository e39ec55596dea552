"""Where vLLM's CPU kernel keeps token ``t``, dimension ``d`` of a (block, KV head) page, and reading and
moving tokens through it.

``ops.cpu_attn_reshape_and_cache`` packs each page per instruction set (``layer.isa``): on AVX-512
(``vec``) the keys of a page are stored ``[head_dim, block_size]`` and the values ``[block_size,
head_dim]``; ``amx`` and ``neon`` pack differently, and vLLM documents none of it (``CpuPlatform.
pack_kv_cache`` says the layout belongs to the kernel). So instead of hard-coding one layout, the kernel's
own write op is probed once per (dtype, page size, head size, ISA): coded keys and values go into a
scratch page and where each (token, dimension) lands is read back. The result is a bijection inside a
page, the same for every block and head of a layer, so gathers and moves through it are exact.
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def page_maps(dtype: torch.dtype, block_size: int, head_size: int, isa: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(key_map, value_map)``, each ``[block_size, head_size]`` long: the flat offset of token ``t``,
    dimension ``d`` inside a page's key (value) half."""
    from vllm import _custom_ops as ops

    bs, d = block_size, head_size
    maps = []
    for half in (0, 1):
        found = []
        for code in ("token", "dim"):  # two passes keep every code below 256: exact in bf16 and fp16
            page = torch.full((1, 1, bs, 2 * d), -1.0, dtype=dtype)
            key_cache, value_cache = page.view(1, 1, 2 * bs, d).chunk(2, dim=2)
            grid = torch.arange(bs)[:, None] if code == "token" else torch.arange(d)[None, :]
            values = grid.expand(bs, d)
            values = values.to(dtype)[:, None, :].contiguous()  # [bs tokens, 1 head, d]
            ops.cpu_attn_reshape_and_cache(values, values, key_cache, value_cache, torch.arange(bs), isa,
                                           k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto")
            found.append(page.view(2, bs * d)[half].float().long())
        token, dim = found
        flat = torch.full((bs, d), -1, dtype=torch.long)
        flat[token, dim] = torch.arange(bs * d)
        if bool((flat < 0).any()) or bool((token < 0).any()):
            from kvlab.errors import KVLabError

            raise KVLabError(f"vLLM's CPU kernel ({isa}, {dtype}) does not keep a page's tokens inside the page; "
                             "kvlab eviction cannot move them")
        maps.append(flat)
    return maps[0], maps[1]


def halves(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The key and value halves of every page, flat: two views ``[num_blocks, H, block_size * head_size]``."""
    nb, h, bs, d2 = kv_cache.shape
    flat = kv_cache.view(nb, h, 2, bs * (d2 // 2))
    return flat[:, :, 0], flat[:, :, 1]


def gather(kv_cache: torch.Tensor, maps: tuple[torch.Tensor, torch.Tensor], blocks: torch.Tensor,
           offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values ``[..., H, D]`` of the tokens at ``offsets`` inside physical ``blocks`` (same shape)."""
    k_map, v_map = maps
    kf, vf = halves(kv_cache)
    b = blocks.long()[..., None]
    k = kf[b, :, k_map[offsets]]  # [..., D, H]: the sliced head dimension goes last
    v = vf[b, :, v_map[offsets]]
    return k.transpose(-1, -2), v.transpose(-1, -2)


def move_per_head(kv_cache: torch.Tensor, maps: tuple[torch.Tensor, torch.Tensor], table_row: torch.Tensor,
                  src: torch.Tensor, page: int) -> None:
    """Copy each KV head ``h``'s tokens at logical positions ``src[h]`` (``[H, K]``, ascending) to positions
    ``0 .. K - 1`` of the same request (its ``table_row``), keys and values as they are (post-RoPE)."""
    k_map, v_map = maps
    kf, vf = halves(kv_cache)
    heads, k = src.shape
    dst = torch.arange(k)[None, :].expand(heads, k)
    h = torch.arange(heads)[:, None, None]
    sb, so = table_row[src // page].long()[..., None], src % page
    db, do = table_row[dst // page].long()[..., None], dst % page
    keys, values = kf[sb, h, k_map[so]], vf[sb, h, v_map[so]]  # gathered copies first: src and dst overlap
    kf[db, h, k_map[do]] = keys
    vf[db, h, v_map[do]] = values
