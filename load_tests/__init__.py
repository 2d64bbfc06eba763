"""Load tests and benchmarks of the OFA captioning server: Locust users, benchmark, soak and burst.

An installed package (``pip install -e .``), so that its modules import each other as ``load_tests.<module>``
whether run as ``python load_tests/bench.py`` or ``python -m load_tests.bench``; Locust loads
``load_tests/locustfile.py`` by path. Nothing is imported here: the locustfile must patch gRPC for gevent
before ``tritonclient.grpc`` is imported.
"""
