"""``edgeexit serve``: many cameras, one server. A bundle served as Triton Inference Server models via PyTriton.

Modules: ``model`` (the inference callable: requests -> decisions, torch- and PyTriton-free), ``server`` (PyTriton:
models, dynamic batching, instances, health, metrics, draining on SIGTERM), ``client`` (tritonclient: frames ->
the same dicts as ``Decision.to_dict()``). Install: ``pip install 'edgeexit[serve]'`` in a venv of the system's Python.
"""
