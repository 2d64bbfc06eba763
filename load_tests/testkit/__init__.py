"""Test and benchmark kit of the OFA captioning project: what the tests and ``load_tests/`` share.

Modules:
    reference  ModelScope's OFA captioning run in-process (``Reference``), the stand-ins for the packages it
               imports but never calls (``install_stand_ins``) and the tie-aware parity helpers; needs the dev
               requirements (``make setup-dev``: requirements/dev.txt, ModelScope and fairseq)
    parity     the one rule for comparing two computations' captions: same tokens and text, scores within
               ``SCORE_ATOL`` (``assert_same_results``); bit-exact equality only for the same computation twice
    images     deterministic synthetic images (``image_corpus``, ``synthetic_rgb``, encoders);
               ``python -m load_tests.testkit.images samples/`` regenerates the committed sample images
    memory     the C allocator's handling of freed memory (``keep_freed_memory``), a process-wide setting that
               ``bench_engine``'s second timing pass uses
    baseline   the engine of commit 0741503 (``load_baseline``), importable beside the current one: the decode
               loop's "before" for ``bench_engine`` and the before/after test; needs git history
    servers    a server process for the length of a block (``running``, ``started``), Triton's metrics parser,
               the demo checkpoint's folder (``demo_checkpoint_dir``)
"""
