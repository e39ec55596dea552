"""GPU kernels (Triton) for decode over the paged store, each with a torch reference.

Use them through :mod:`kvlab.kernels.dispatch`, thin wrappers that run Triton on CUDA tensors and the
torch reference (:mod:`kvlab.kernels.reference`) elsewhere; triton is imported only when a kernel is
launched, so kvlab works without the ``[triton]`` extra. Attention over the store is
:func:`kvlab.attention.attend`.

Data layout (that of :class:`kvlab.cache.store.LayerStore`):

- K and V pools ``[S, D]`` (``S = num_blocks * block_size`` slots, ``D`` contiguous), slot positions
  ``[S]`` (int64, -1 where empty);
- queries grouped per KV head, ``[B, H_kv, M, D]`` with ``M = G * L``: row ``g * L + l`` is query head
  ``h * G + g`` at query token ``l`` (the grouping of :mod:`kvlab.attention.torch_attention`);
- what a row (``row = b * H_kv + h``) reads: ``block_table [B * H_kv, n]`` int32 block ids, ascending,
  -1 padded, and ``seq_lens [B * H_kv]`` tokens covered (only the last listed block may be partial);
  token ``t`` is slot ``row_offset + table[t >> log2(bs)] * bs + (t & (bs - 1))``, where the optional
  ``row_offsets [B * H_kv]`` lets the ids be block numbers within a contiguous row (the store's layout,
  :func:`kvlab.attention.reads.read_lists`). ``full`` lists all blocks of the row, ``block-route``
  the chosen ones, eviction gives rows different lengths, and a plan of single tokens is the same
  list with ``block_size = 1``.

Kernels and launch grids:

- :mod:`~kvlab.kernels.paged_attention` -- flash-decoding: grid ``(B * H_kv, num_splits)``, one program
  per GQA group and split of the list, online softmax, then a merge kernel over the splits (grid
  ``(B * H_kv,)``);
- :mod:`~kvlab.kernels.block_scoring` -- centroid scores and Quest bounds summed over a GQA group: grid
  ``(B * H_kv, cdiv(n, 32))``, top-k then in torch (:func:`~kvlab.kernels.dispatch.top_k_blocks`); and
  ``block_select``, block-route's scoring and top-k fused in one launch (grid
  ``(B * H_kv, cdiv(blocks, 64))``, the row's last program selects);
- :mod:`~kvlab.kernels.lowrank_attention` -- rank-R latents of V (and of pre-RoPE K, rotated on chip):
  the grid and merge of the paged kernel; the ``low-rank`` method's decode path on CUDA.

:mod:`~kvlab.kernels.selection` holds the torch pieces every selection shares (ascending -1 padded
lists, the forced sink and newest blocks, top-k with ties to the lowest block, row-wise scores).
:mod:`~kvlab.kernels.aot_check` compiles the kernels for a GPU architecture without a GPU. See ``README.md``
in this directory for the design notes.
"""
