"""``livelm bench``: workloads, a load generator for OpenAI-compatible servers, offline
throughput against transformers, metrics with vLLM ``bench serve``'s definitions, and
reports (JSON lines, markdown tables, sweep plots).

Modules, one concept each: :mod:`lengths` (length distributions), :mod:`prompts`
(prompt text of a given token length), :mod:`workload` (sessions and turns),
:mod:`synthetic` and :mod:`traces` (workload builders), :mod:`arrivals` (when requests
start), :mod:`metrics` (the numbers), :mod:`client` (one streamed HTTP request),
:mod:`local_server` (a livelm server this tool starts), :mod:`serve_runner`,
:mod:`throughput_runner` and :mod:`sweep` (the three modes), :mod:`hf_baseline`
(transformers' batched ``generate``, the offline peer), :mod:`random_model` (the
random-weight SmolLM2-shaped model), :mod:`machine` (commit and machine facts),
:mod:`report` and :mod:`plot` (output). The ``benchmarks/`` scripts of a source checkout
import the last few from here.
"""
