"""kvlab inside vLLM: block-route as an attention-backend plugin, and streaming / kv-compress freeing
vLLM's KV blocks (see docs/vllm.md).

- :mod:`kvlab.vllm.config` -- the ``"kvlab"`` entry of vLLM's ``--additional-config``, validated by
  kvlab's own method classes (no vLLM import);
- :mod:`kvlab.vllm.methods` -- one adapter per kvlab method, found by the method's class: its vLLM
  defaults and checks, its role (inert, routes, evicts) and its hooks (no vLLM import);
- :mod:`kvlab.vllm.routing` -- page summaries, the per-step plan and the per-layer page selection
  (plain PyTorch on vLLM's tensors);
- :mod:`kvlab.vllm.backend` -- the backend vLLM runs: its CPU (and, written but not run, Triton) backend
  with kvlab's step plan and compacted block tables;
- :mod:`kvlab.vllm.plugin` -- the ``vllm.general_plugins`` entry point that registers it;
- :mod:`kvlab.vllm.eviction` -- the worker's eviction records and what every eviction adapter shares
  (plain PyTorch on vLLM's tensors), through :mod:`kvlab.vllm.page_layout` (the CPU kernel's page
  layout, probed);
- :mod:`kvlab.vllm.engine` -- the one module on vLLM's engine internals (0.32.x only): the KV-cache
  spec/manager that frees blocks, and the worker and scheduler classes eviction runs with.
"""
