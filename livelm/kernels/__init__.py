"""The kernel floor: livelm's C++ CPU kernels (``csrc/``), how they are built, and process
tuning for them. Imports nothing else from livelm; every other package may use it.

``build`` compiles a source with torch's extension builder, ``extensions`` holds one cached
loader per compiled module, ``cpu_memory`` keeps large step buffers in the heap. What each
module computes, its instruction-set paths and the environment switches: docs/kernels.md.
"""
