"""Model compression without Lightning: pure functions the callbacks, the compress command and the scripts share.

- :mod:`~project.compression.measure`: the one definition of parameters, non-zeros, MACs, bytes and latency,
  and the one table formatter;
- :mod:`~project.compression.export`: every artifact written and loaded (``.pt2`` programs taking [0, 1] images);
- :mod:`~project.compression.sparsity`: unstructured magnitude masks and their schedule;
- :mod:`~project.compression.structured`: channel pruning plans (torch-pruning);
- :mod:`~project.compression.quantization` and :mod:`~project.compression.graph_mode`: int8 through torchao PT2E;
- :mod:`~project.compression.report`: the compression report's measurements, tables and plots.

The Lightning side (callbacks that drive these during a fit) is in :mod:`project.callbacks`.
"""
