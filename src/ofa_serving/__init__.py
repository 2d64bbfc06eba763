"""Serving layer for the OFA captioning engine on NVIDIA Triton Inference Server.

No model maths lives here: this package holds what the Triton adapters in ``model_repository/*/1/model.py``
share (typed settings, batching, Triton error handling, image payload decoding) and the ``tritonserver``
launcher used by ``make serve``, the integration tests, the load tests and the benchmark.

Modules:
    settings   typed settings from config.pbtxt ``parameters`` and environment variables (one helper)
    batching   gather the requests of one ``execute()`` into engine batches, split results back
    adapter    small helpers around ``triton_python_backend_utils`` (inputs, per-request errors)
    images     image payload decoding for the wire (raw bytes, base64, data URLs) and its limits
    launcher   locate and run the ``tritonserver`` binary of the nvidia-pytriton wheel (``TritonServer``)
    serve      ``python -m ofa_serving.serve``: prepare a checkpoint, run the server in the foreground
"""

__all__ = ["__version__"]

__version__ = "0.1.0"
