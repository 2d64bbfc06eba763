"""Load tests and benchmarks of the OFA captioning server: Locust users, benchmark, soak and burst.

An installed package (``pip install -e .``), so that its modules import each other as ``load_tests.<module>``
whether run as ``python load_tests/bench.py`` or ``python -m load_tests.bench``; Locust loads
``load_tests/locustfile.py`` by path. Nothing is imported here: the locustfile must patch gRPC for gevent
before ``tritonclient.grpc`` is imported.

Modules:
    tool            the one skeleton of the tools (``Tool``, ``main``: arguments -> server -> load -> checks ->
                    report -> verdict -> exit status), the one timer (``Stopwatch``, ``timed``) and verdict printer
    bench           ``make bench``: reference vs engine in-process vs the served ensemble
    bench_gpu       ``make bench-gpu``: the GPU deployment (engine on decoded pixels, the gpu profile served)
    bench_engine    ``make bench-engine``: engine vs reference alternating on pixels; ``timed_calls``, the one
                    engine-vs-reference measurement, which ``bench`` uses too
    engine_profile  the engine's per-stage profile, operator families per decoder step, arithmetic floor
    bench_served    ``bench``'s served phases: closed loop per concurrency, open loop per offered rate
    bench_report    ``bench``'s rows, ratios, targets and markdown
    openloop        the constant-arrival-rate sender, the latency-against-rate curve and its plot
    soak            ``make soak``: steady load, no failed request, flat memory
    burst           ``make burst``: far more requests at once than the server holds
    run_load_test   ``make load-test``: Locust headless over a stepped number of users
    locustfile      the Locust users (gRPC and HTTP)
    step_shape      the Locust load shape that steps the number of users
    loadlib         shared helpers: image corpus, latency statistics, server options, Triton metrics
    reliabilitylib  memory of processes, raw request bursts, client retries (hardening tests, soak, burst)
    testkit         what the tests and these tools share (reference model, images, parity, allocator, servers)
"""
