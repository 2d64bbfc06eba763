"""Serving layer for the OFA captioning engine on NVIDIA Triton Inference Server.

No model maths lives here: this package holds what the Triton adapters in ``model_repository/*/1/model.py``
share, and what runs around ``tritonserver``: its launcher (``make serve``, the container image's supervisor),
its supervision and its deep health probe.

Modules (in the Python backend stubs, beside the adapters):
    settings        typed settings from config.pbtxt ``parameters`` and environment variables (one helper)
    backend_utils   helpers the adapters share: inputs, settings rows, per-request errors, drain, engine health
    batching        gather the requests of one ``execute()`` into engine batches, split results back
    nbest           the ``num_captions`` input and the n-best ``captions``/``scores`` outputs of ``ofa``
    payloads        image payloads on the wire (raw bytes, base64, data URLs) and their size limits
    tensors         the served models' tensor names, data types and dims, stated once

Modules (around tritonserver):
    launcher        locate the nvidia-pytriton wheel's tritonserver; ``ServerProcess`` and ``TritonServer`` run it
    serve           ``python -m ofa_serving.serve`` (``make serve``): prepare a checkpoint, run the server
    supervisor      heal models whose stub died or hung, restart a crashed server, drain on SIGTERM
    probe           ``python -m ofa_serving.probe``: one fresh inference per model (liveness, HEALTHCHECK)
    triton_api      ``TritonHttp``: the calls to tritonserver's HTTP API (health, repository, statistics, config)
    processes       tritonserver's processes in ``/proc``: its children, its Python backend stubs, their states
    security        admin and inference keys, gRPC TLS flags, the exposure rule for a server with known CVEs
    model_config    read and write ``config.pbtxt`` through Triton's ``ModelConfig`` protobuf schema
    profiles        the ``cpu`` and ``gpu`` serving profiles as changes of config fields
    repository      generated model repositories: a profile's, or several checkpoints served at once
"""

__all__ = ["__version__"]

__version__ = "0.1.0"
